"""Garbage in, one line out: any config file or `--set` override either loads or is refused
with one ConfigError line naming the file or key, never another exception.

Property-based (hypothesis); the budgets below are what docs/reliability.md reports.
"""
from __future__ import annotations

import string
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ticketsmith.base.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
EXAMPLES = 200  # per property; small enough for CI, enough to find every crash seen so far
BUDGET = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Real section and field names mixed with junk, so inputs reach deep validation too.
SECTIONS = ["data", "model", "train", "prune", "experiment", "gate", "tracking", "serving"]
FIELDS = sorted({f for s in Config.model_fields.values()
                 for f in s.annotation.model_fields}) + ["", "x", "LR", "0", "a b"]
NAMES = st.sampled_from(SECTIONS + FIELDS)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["mlp", "synthetic", "adam", "2:4", "cpu", "cuda", "1e-3", "-1", "0x10",
                     "2020-01-01", "~", "ticket", "global", "inf", ".nan", "yes", "12:30"]))
VALUES = st.recursive(SCALARS, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.one_of(NAMES, st.text(max_size=8)), kids,
                                                max_size=4)), max_leaves=12)
DOCS = st.dictionaries(NAMES, st.dictionaries(NAMES, VALUES, max_size=5), max_size=5)
# YAML-ish text: dumped documents cut and spliced with YAML punctuation and raw text.
TOKENS = st.sampled_from(["\n", ": ", "- ", "&a ", "*a", "!!python/object:os.system", "{", "}",
                          "[", "]", "'", '"', "|", ">", "#", "---", "...", "? ", "\t", "%YAML 1.1",
                          "!!binary", "!!set", "<<: *a", "\x00", "\ufeff", "é"])
TEXT = st.one_of(
    DOCS.map(lambda d: yaml.safe_dump(d)),
    st.tuples(DOCS.map(lambda d: yaml.safe_dump(d)), st.integers(0, 400), st.lists(TOKENS))
      .map(lambda t: t[0][:t[1]] + "".join(t[2]) + t[0][t[1]:]),
    st.lists(st.one_of(TOKENS, st.text(max_size=10), NAMES), max_size=40).map("".join),
)
KEY = st.lists(st.one_of(NAMES, st.text(string.ascii_letters + "_", max_size=6)),
               min_size=1, max_size=4).map(".".join)
RAW_VALUE = st.one_of(st.text(max_size=30), TOKENS, VALUES.map(
    lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()))
OVERRIDE = st.one_of(st.tuples(KEY, RAW_VALUE).map("=".join), st.text(max_size=30))


def assert_one_line(exc: ConfigError, *names: str) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    assert any(n in msg for n in names), (names, msg)


@BUDGET
@given(text=TEXT)
def test_any_config_file_loads_or_is_one_line_naming_the_file(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        assert isinstance(load_config(path), Config)
        event("loaded")
    except ConfigError as exc:
        event("refused")  # counted by --hypothesis-show-statistics
        assert_one_line(exc, str(path))


@BUDGET
@given(overrides=st.lists(OVERRIDE, min_size=1, max_size=4))
def test_any_override_loads_or_is_one_line_naming_the_key(overrides):
    try:
        assert isinstance(load_config(TINY, overrides), Config)
        event("loaded")
    except ConfigError as exc:
        event("refused")  # counted by --hypothesis-show-statistics
        sections = [o.partition("=")[0].strip().split(".")[0] for o in overrides]
        assert_one_line(exc, "--set", *[s for s in sections if s])


@BUDGET
@given(doc=DOCS, overrides=st.lists(st.tuples(KEY, RAW_VALUE).map("=".join), max_size=3))
def test_structured_configs_with_overrides_never_raise_anything_else(tmp_path, doc, overrides):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_config(path, overrides)
        event("loaded")
    except ConfigError as exc:
        event("refused")  # counted by --hypothesis-show-statistics
        assert_one_line(exc, str(path), "--set")


def bomb(levels: int = 9, width: int = 9) -> str:
    """"Billion laughs": `width`**`levels` strings from a few hundred bytes of YAML."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nmodel:\n  options: {{hidden: *l{levels - 1}}}\n"


def test_a_yaml_alias_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb())  # 387 million strings if expanded
    with pytest.raises(ConfigError, match="alias bomb") as info:
        load_config(path)
    assert_one_line(info.value, str(path))


def test_an_alias_bomb_in_an_override_is_refused():
    # One line of YAML, 9**6 strings once expanded.
    bomb_value = ("[&a [x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                  "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                  "&e [*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]]")
    with pytest.raises(ConfigError, match="--set model.options") as info:
        load_config(TINY, [f"model.options={bomb_value}"])
    assert_one_line(info.value, "--set")


@pytest.mark.parametrize("text,expect", [
    ("[" * 3000 + "]" * 3000, "nested too deeply"),
    ("model:\n  options: {hidden: " + "[" * 80 + "1" + "]" * 80 + "}\n", "nested deeper"),
    ("experiment: {name: 2020-01-01}\n", None),  # a YAML date is text, not a crash
    ("!!python/object/apply:os.system [echo pwned]\n", "not valid YAML"),
])
def test_hostile_yaml_is_refused_in_one_line(tmp_path, text, expect):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    if expect is None:
        assert load_config(path).experiment.name == "2020-01-01"
        return
    with pytest.raises(ConfigError, match=expect) as info:
        load_config(path)
    assert_one_line(info.value, str(path))


def test_binary_config_file_is_one_line(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x80\x81\xfe\xff" * 100)
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_config(path)
    assert_one_line(info.value, str(path))


def test_the_cli_refuses_a_bomb_with_exit_2_and_one_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb())
    proc = subprocess.run([sys.executable, "-m", "ticketsmith", "prune", "--config", str(path),
                           "--no-tracking"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "alias bomb" in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()
