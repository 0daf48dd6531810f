"""Old import path, kept because models registered before the engine moved carry a copy of
`pyfunc_model.py` that imports `ticketsmith.checkpoint.model_from_checkpoint`."""
from ticketsmith.engine.checkpoint import model_from_checkpoint  # noqa: F401
