"""MLflow "model from code" for a registered ticket.

The model's only artifact is the ticket's safetensors checkpoint (mask baked into the
weights); loading rebuilds the network from its metadata, so nothing is unpickled.
`mlflow.pyfunc.load_model("models:/<name>@champion").predict(x)` returns class logits for a
float32 array shaped (batch, *input_shape).
"""
import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel



class TicketModel(PythonModel):
    def load_context(self, context):
        from ticketsmith.engine.checkpoint import model_from_checkpoint

        # The factory policy of every loader: only the factory the experiment's config named
        # (recorded in the model's config when it was registered) is imported.
        allowed = (context.model_config or {}).get("allow_factory")
        self.model = model_from_checkpoint(context.artifacts["checkpoint"],
                                           allow_factory=allowed)[0]

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()


mlflow.models.set_model(TicketModel())
