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
        from ticketsmith.checkpoint import load_checkpoint
        from ticketsmith.models import build_model

        ck = load_checkpoint(context.artifacts["checkpoint"])
        meta = ck.meta
        self.model = build_model(meta["model"], tuple(meta["input_shape"]), meta["num_classes"],
                                 meta.get("factory"), meta.get("options"))
        self.model.load_state_dict(ck.state)
        self.model.eval()

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()


mlflow.models.set_model(TicketModel())
