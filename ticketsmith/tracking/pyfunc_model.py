"""MLflow "model from code" for a registered ticket.

Artifacts: `serving`, the checked serving plan (`ticketsmith.serving.plan`: safetensors arrays,
an ONNX graph and a JSON plan) and `checkpoint`, the ticket's safetensors checkpoint (mask
baked into the weights). Nothing is unpickled. By default the plan serves; it loads without
torch (this module and the plan's runtime import none). `model_config={"format":
"masked_dense"}` or `params={"format": "masked_dense"}` serves the masked dense network
instead (torch, rebuilt from the checkpoint's metadata).

Input is what a user has: uint8 pixels 0..255 or floats 0..1 or 0..255, flat (N, 784) or
shaped (N, 28, 28) / (N, 1, 28, 28) for MNIST; the data set's normalisation is applied inside.
Input already normalised with the data set's mean and std (a torchvision `Normalize`) says so
with `params={"input": "normalized"}` or `model_config={"input": "normalized"}`; pixels
outside 0..255 are refused (`serving.plan.inputs`). Output: class probabilities
(N, classes); `params={"output": "labels"}` gives labels (N,), `"logits"` the raw logits.
"""
import inspect

import mlflow
from mlflow.pyfunc import PythonModel


class TicketModel(PythonModel):
    def load_context(self, context):
        from ticketsmith.serving.plan.runtime import load_plan

        config = context.model_config or {}
        # The factory policy of every loader: only the factory the experiment's config named
        # (recorded in the model's config when it was registered) is imported.
        self.allowed = config.get("allow_factory")
        self.format = config.get("format", "serving")
        self.input = config.get("input") or "pixels"
        self.threads = config.get("threads")
        self.checkpoint = context.artifacts["checkpoint"]
        self.plan = self.masked = self.spec = None
        serving = context.artifacts.get("serving")
        if serving and self.format == "serving":
            from threadpoolctl import threadpool_limits

            # One BLAS thread, as the plan was measured: OpenBLAS's idle threads spin and take
            # the cores that the plan's torch and ONNX Runtime threads wait on.
            threadpool_limits(limits=1, user_api="blas")
            self.plan = load_plan(serving, self.threads)
        else:
            self._masked_model()

    def _masked_model(self):
        if self.masked is None:
            import torch

            from ticketsmith.engine.checkpoint import model_from_checkpoint
            from ticketsmith.serving.plan.inputs import input_spec

            if self.threads:
                torch.set_num_threads(int(self.threads))
            self.masked, _, meta = model_from_checkpoint(self.checkpoint,
                                                         allow_factory=self.allowed)
            self.spec = input_spec(meta)
        return self.masked

    def predict(self, context, model_input, params=None):
        from ticketsmith.serving.plan.inputs import finish, to_model_input
        from ticketsmith.serving.plan.layout import PlanError

        params = params or {}
        output = params.get("output") or "probabilities"
        form = params.get("input") or self.input
        fmt = params.get("format") or self.format
        if fmt not in ("serving", "masked_dense"):
            raise PlanError(f"format: expected serving or masked_dense, got {fmt!r}")
        if fmt == "serving" and self.plan is not None:
            return self.plan.predict(model_input, output, form)
        import torch

        model = self._masked_model()
        x = torch.from_numpy(to_model_input(model_input, self.spec, form=form))
        with torch.inference_mode():
            return finish(model(x).numpy(), output)


# MLflow looks up `predict`'s signature on every call (twice); a stored signature answers at
# once (inspect.signature honours __signature__), which takes ~10 us off each request.
TicketModel.predict.__signature__ = inspect.signature(TicketModel.predict)
mlflow.models.set_model(TicketModel())
