"""The one `environment()`: hardware and versions recorded with every experiment (tracking)
and every serving benchmark. Importing this module imports neither torch nor MLflow; calling
`environment()` reads torch's version and threads."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from ticketsmith import __version__


def cpu_model() -> str:
    """The CPU's marketing name (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """The commit of the checkout this package runs from ("unknown" outside one)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return commit or "unknown"


def environment(device: Any = "cpu") -> dict[str, Any]:
    """Hardware and versions on `device` (a GPU is named only when the work runs on it).

    Benchmarks add their timing facts (`serving.measure.timing_environment`); the tracker logs
    these values as strings, with MLflow's version and the git commit."""
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    return {"ticketsmith": __version__, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "threads": torch.get_num_threads(), "device": str(device),
            "platform": platform.platform(), "python": platform.python_version()}
