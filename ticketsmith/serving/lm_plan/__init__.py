"""The serving plan of a language-model ticket: what a registered GPT ticket ships.

The image plan's sibling, in the same family of formats (a folder: plan.json with every
file's digest, weights as safetensors, nothing pickled), but with torch at run time: its
routes are GPT modules decoded with the KV cache (`engine.generate`).

    runtime  the folder's files and routes, `load_lm_plan` / `LmPlanRunner`: what serves
    check    every route against the masked model (`serving.agreement`'s bounds)
    build    compaction, sparse kernels and int8 weights, measurement per phase and batch
             size, the ranking; `ensure_lm_plan`

Kept apart from `serving.plan`, whose runtime a served image model imports without torch;
this package imports `lm_kernels` and `lm_benchmark`, which import the image plan's layout.
"""
from ticketsmith.serving.lm_plan.build import LmPlanSettings, build_lm_plan, ensure_lm_plan
from ticketsmith.serving.lm_plan.runtime import LmPlanRunner, checkpoint_digest, load_lm_plan

__all__ = ["LmPlanRunner", "LmPlanSettings", "build_lm_plan", "checkpoint_digest",
           "ensure_lm_plan", "load_lm_plan"]
