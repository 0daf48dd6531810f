"""Registering a ticket skips MLflow's comparison of the model's pinned requirements with this
interpreter (the pins are read from it), and only while the ticket is logged."""
from __future__ import annotations

import mlflow.pyfunc
import mlflow.utils.environment as environment
import pytest

from ticketsmith.tracking.registry import _requirements_from_this_interpreter

NAME = "warn_dependency_requirement_mismatches"


def test_the_check_is_skipped_only_inside_and_restored_after_an_error():
    before = [getattr(m, NAME) for m in (environment, mlflow.pyfunc)]
    with pytest.raises(RuntimeError):
        with _requirements_from_this_interpreter():
            inside = [getattr(m, NAME) for m in (environment, mlflow.pyfunc)]
            assert all(f is not b for f, b in zip(inside, before))
            assert all(f(["torch==0.0.1"]) is None for f in inside)
            raise RuntimeError("logging the model failed")
    assert [getattr(m, NAME) for m in (environment, mlflow.pyfunc)] == before
