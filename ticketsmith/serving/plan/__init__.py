"""The deployable serving plan: what a registered ticket ships and its pyfunc runs.

A plan is a folder, with nothing pickled in it:

    plan.json            input spec, steps, kernels, routes ranked per batch size, why, digests
    weights.safetensors  numpy arrays: the compacted weights and biases, CSR parts, input index
    model.onnx           the compacted network as one ONNX graph (the `onnxruntime` route)
    model_int8.onnx      the same graph with int8 weights (ONNX Runtime's dynamic
                         quantization; the `onnxruntime_int8` route, inexact)

A *route* runs the whole network in one runtime:

    onnxruntime  the compacted network as an ONNX graph (any chain: Linear and Conv2d layers)
    onnxruntime_int8  that graph with dynamically quantized int8 weights: inexact, so it is
                 served only where the benchmark measured it and its accuracy passed the gate
    numpy        the compacted chain step by step; per Linear layer and batch size a numpy
                 dense matmul or a scipy CSR product, whichever measured faster (Linear
                 chains only)

The modules, split by who runs them:

    layout   the folder's files, routes and what they need; reading a plan (digests checked);
             which route ships at a batch size. Torch-free.
    inputs   natural input (what a user has) → model input, and logits → the output asked for.
             Torch-free.
    runtime  the routes and `PlanRunner` / `load_plan`: what a served model imports. Torch-free.
    build    building a plan from a masked model: compaction, ONNX, kernels chosen by
             measurement, int8 quantization (needs torch).
    check    every route against the masked model (`serving.agreement`'s bounds; needs torch).
    rank     the benchmark's measured order of routes per batch size, and the plan in words.

A request runs the first available route of the measured batch size nearest to its own (log
scale). A route or kernel this host cannot run (a missing library, a CUDA-only kernel on a
CPU host) is skipped for the next one, and the runner says so in `fallbacks`. Files are
checked against the digests in plan.json, so a damaged plan fails loudly instead of serving
wrong answers.

Nothing is re-exported here on purpose: importing `ticketsmith.serving.plan.runtime` runs this
file first, and a served model must not pay for the builder's imports.
"""
