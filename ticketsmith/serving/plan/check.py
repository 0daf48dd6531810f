"""Checking a plan against the masked model it was built from (needs torch for the model).

Every route runs a fixed probe batch; exact routes must match the masked model's outputs to
float rounding, inexact ones (int8) stay within `agreement`'s relative error and argmax
agreement. A route that fails makes the plan fail: it is never shipped, nor registered.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ticketsmith.serving import agreement
from ticketsmith.serving.plan.layout import INEXACT, PLAN, PlanError, read_plan, shipped
from ticketsmith.serving.plan.runtime import load_plan

PROBE_EXAMPLES = 1000  # real test inputs a ticket's plan is checked on before registration


def check_plan(folder: str | Path, model, probe) -> dict[str, Any]:
    """Every route of the plan against the masked model on a fixed probe batch (model input,
    a torch tensor): {'max_abs_error', 'argmax_agreement', 'probe', 'routes', 'inexact'}.
    PlanError when an exact route's outputs differ beyond float rounding; an inexact route's
    record says whether it `passed` (and `why` not)."""
    import torch

    plan = read_plan(folder)
    with torch.inference_mode():
        ref = model.cpu().eval()(probe.cpu()).float().numpy()
    x = probe.cpu().numpy().astype(np.float32)
    worst, agree, routes, inexact = 0.0, 1.0, [], {}
    # At torch's thread count as it is: a plan loaded at its own (all cores) would set torch's
    # process-wide count to that, and the next level, trained after a ticket is logged as its
    # level ends, would go on at two threads on a shared 2-core machine: ten times the CPU,
    # and not the thread count its results were pinned at.
    threads = torch.get_num_threads()
    for name in plan["routes"]:
        runner = load_plan(folder, threads, route=name)
        if name not in runner.routes:
            continue
        out = runner.routes[name](x)
        if name in INEXACT:  # recorded, pass or fail: a failed one is not shippable (rank)
            record, why = agreement.inexact(out, ref)
            inexact[name] = {"relative_error": record["relative_error"],
                             "argmax_agreement": record["argmax_agreement"],
                             "passed": why is None, **({"why": why} if why else {})}
            continue
        record, why = agreement.exact(out, ref)
        if why is not None:  # an exact route that differs is a bug, never a trade-off
            raise PlanError(f"{Path(folder) / PLAN}: route {name} fails its check: {why}")
        worst = max(worst, record["max_abs_error"])
        agree = min(agree, record["argmax_agreement"])
        routes.append(name)
    if not routes:
        raise PlanError(f"{Path(folder) / PLAN}: no route could be checked on this host")
    return {"max_abs_error": worst, "argmax_agreement": agree, "probe": int(len(x)),
            "routes": routes, "inexact": inexact}


def passed(check: dict[str, Any], route: str) -> bool:
    """Whether `route` passed `check` (exact routes are listed only when they did)."""
    if route in INEXACT:
        return bool((check.get("inexact") or {}).get(route, {}).get("passed"))
    return route in check.get("routes", [])


def probe_batch(shape: list[int], n: int = 512):
    """A fixed probe batch when no test images are at hand: seeded standard-normal model input
    (the scale of normalised images)."""
    import torch

    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))


def verify(folder: str | Path, checkpoint: str | Path, probe=None,
           allow_factory: bool | str | None = False) -> dict[str, Any]:
    """The plan at `folder` against the masked model of `checkpoint` (which must be the one it
    was built from) on `probe` (model input; default `probe_batch`): `check_plan`'s record."""
    from ticketsmith.engine.checkpoint import model_from_checkpoint

    model, _, meta = model_from_checkpoint(checkpoint, "cpu", allow_factory)
    plan = read_plan(folder)
    src = plan.get("source", {})
    if any(src.get(k) is not None and meta.get(k) is not None and src[k] != meta[k]
           for k in ("hash", "level", "variant", "replicate")):
        raise PlanError(f"{Path(folder) / PLAN}: built for {src}, not for {checkpoint}")
    probe = probe_batch(list(meta["input_shape"])) if probe is None else probe
    check = check_plan(folder, model, probe)
    for b, route in shipped(plan).items():  # an inexact route that ships passes here too
        if route in INEXACT and not passed(check, route):
            why = (check["inexact"].get(route) or {}).get("why", "not checked on this host")
            raise PlanError(f"{Path(folder) / PLAN}: route {route} ships at batch {b} but "
                            f"fails its check: {why}")
    return check
