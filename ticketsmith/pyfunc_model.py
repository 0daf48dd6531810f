"""Old import path of the registered model's code (now `ticketsmith.tracking.pyfunc_model`)."""
from ticketsmith.tracking.pyfunc_model import TicketModel  # noqa: F401
