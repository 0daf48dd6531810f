"""How the README's test command shares the suite between its two workers (tests/conftest.py):
files with slow tests are handed out first, in the order collected, and each worker runs on
cores of its own. Both are read from this very run, not from a copy of the rules."""
from __future__ import annotations

import os

import pytest


def test_files_with_slow_tests_come_first(request):
    files = list(dict.fromkeys(item.path for item in request.session.items))
    slow = {item.path for item in request.session.items if item.get_closest_marker("slow")}
    if not slow or len(slow) == len(files):
        pytest.skip("one kind of file collected: nothing to order")
    flags = [path in slow for path in files]
    # every file with a slow test, then every file without: one change of kind at most
    assert flags == sorted(flags, reverse=True), [p.name for p in files]


def test_xdist_hands_the_files_out_in_that_order(request):
    """pytest-xdist re-sorts the files by test count unless `loadscopereorder` is off."""
    config = request.config
    if not config.pluginmanager.hasplugin("xdist"):
        pytest.skip("run without pytest-xdist: one process, nothing handed out")
    assert config.option.loadscopereorder is False


def test_each_worker_runs_on_its_share_of_the_cores(request):
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    cores = os.cpu_count() or 1
    if not count or count > cores or not hasattr(os, "sched_getaffinity"):
        pytest.skip("one process, or more workers than cores: the cores are not shared out")
    assert len(os.sched_getaffinity(0)) <= cores // count
