"""The executive report, built from real tiny experiments tracked in MLflow (SQLite and a real
`mlflow server`) and from a local run folder; its HTML opened in headless Chromium."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import mean, stdev

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from ticketsmith.cli import main
from ticketsmith.base.config import load_config
from ticketsmith.engine.lottery import run_experiment
from ticketsmith.pipeline import run_prune
from ticketsmith.report.build import build_report
from ticketsmith.tracking.registry import model_name_for
from ticketsmith.report.stats import (breaking_level, level_stats, min_rejecting_n,
                                      paired_comparison, pooled_comparison, sign_flip_p, spread)
from ticketsmith.tracking.tracker import TAG

REPO = Path(__file__).resolve().parents[2]
FIGURES = ("accuracy_vs_weights.png", "early_stop_vs_weights.png", "speedup_vs_sparsity.png",
           "training_curves.png")
NO_BENCH_FIGURES = tuple(f for f in FIGURES if not f.startswith("speedup"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny(tmp: Path, *extra: str):
    return load_config(REPO / "configs" / "tiny.yaml",
                       [f"experiment.output_dir={tmp / 'runs'}", *extra])


def tracked_experiment(tmp: Path, *extra: str):
    """Run the tiny experiment through the whole prune pipeline into a fresh SQLite store
    (artifacts in `tmp/mlruns`: MLflow puts them under the working directory)."""
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(tmp)
        mlflow.set_tracking_uri(uri)
        cfg = tiny(tmp, *extra)
        client = MlflowClient(uri)
        run_prune(cfg, client=client, progress=False, echo=lambda s: None)
    mlflow.set_tracking_uri(None)
    return cfg, client


def children(client: MlflowClient, exp_hash: str) -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, f"tags.`{TAG}hash` = '{exp_hash}' and "
                                   f"tags.`{TAG}role` = 'child'")


def table_rows(md: str, first_header: str) -> list[list[str]]:
    """Cells of the markdown table whose header starts with `first_header`."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def assert_png(path: Path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 15_000, f"{path.name} is only {len(data)} bytes"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.width >= 600 and img.height >= 300, (path.name, img.size)


# --- a tiny real experiment: 2 replicates, 3 levels, ticket vs random re-init, benchmarked --

@pytest.fixture(scope="module")
def experiment(tmp_path_factory, brief_benchmark):
    tmp = tmp_path_factory.mktemp("report")
    cfg, client = tracked_experiment(tmp, "experiment.replicates=2",
                                     "experiment.benchmark=true")
    md = build_report(client, cfg.hash(), tmp / "reports")
    return cfg, client, md


def test_report_opens_with_the_answer(experiment):
    cfg, client, md = experiment
    text = md.read_text()
    assert md.parent.name == f"tiny-{cfg.hash()}" and md.name == "executive_summary.md"
    answer = text.split("## The answer", 1)[1].split("##", 1)[0].strip()
    first = answer.splitlines()[0]
    # The safe zone (or that no level passes), where random re-init breaks, the speedup —
    # with mean ± std over n.
    assert re.search(r"Safe optimisation zone: up to \d+\.\d% sparsity|No pruned level passes",
                     first), first
    assert "random re-init" in first and "± " in first and "n=2" in first
    if "Safe optimisation zone" in first:
        assert re.search(r"measured \d+\.\d\d× at batch 1 and \d+\.\d\d× at batch 256",
                         first), first
        assert re.search(r"Serving: \d+\.\d\d× \(\d+\.\d\d–\d+\.\d\d\) at batch 1", answer), answer
    else:
        assert "No ticket qualifies for serving" in first
    assert "n=1" not in answer


def test_table_numbers_match_the_mlflow_runs(experiment):
    cfg, client, md = experiment
    runs = children(client, cfg.hash())
    groups: dict[tuple[str, int], list] = {}
    for r in runs:
        key = (r.data.tags[TAG + "variant"], int(r.data.tags[TAG + "level"]))
        groups.setdefault(key, []).append(r)
    rows = table_rows(md.read_text(), "Variant")
    assert len(rows) == len(groups) == 1 + 3 * 2
    dense_acc = mean(100 * r.data.metrics["test_accuracy"] for r in groups[("dense", 0)])
    names = {"dense": "dense", "ticket": "ticket", "random re-init": "random_reinit"}
    for variant, level, sparsity, acc, delta, gate, *_ in rows:
        group = groups[(names[variant], int(level))]
        values = [100 * r.data.metrics["test_accuracy"] for r in group]
        assert len(values) == 2
        assert acc == f"{mean(values):.2f} ± {stdev(values):.2f}% (n=2)"
        assert sparsity == f"{100 * group[0].data.metrics['sparsity']:.1f}%"
        if variant != "dense":
            assert delta == f"{mean(values) - dense_acc:+.2f} pts"
        if variant == "ticket":
            decision = {r.data.tags["quality_gate"] for r in group}
            assert len(decision) == 1
            assert gate.startswith("PASS" if decision == {"passed"} else "FAIL")
    # Speedups: the best correct format of the replicate-0 ticket's benchmark.json artifact
    # (never a dense baseline in another runtime: that is no saving of the ticket).
    from ticketsmith.serving.formats import BASELINES

    for row in rows:
        if row[0] != "ticket":
            assert row[0] == "dense" or row[6:9] == ["—", "—", "—"]
            continue
        run = next(r for r in groups[("ticket", int(row[1]))]
                   if r.data.tags[TAG + "replicate"] == "0")
        bench = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="benchmark/benchmark.json",
            dst_path=str(md.parent.parent / "dl" / row[1]), tracking_uri=client.tracking_uri)
        ).read_text())
        best = {}
        for col, bs in ((6, 1), (7, 256)):
            ok = [r for r in bench["results"] if r["batch_size"] == bs and r["correct"]
                  and r["format"] not in BASELINES]
            best[bs] = max(ok, key=lambda r: r["speedup"])
            assert row[col].startswith(f"{best[bs]['speedup']:.2f}×"), (row, best[bs])
        assert best[1]["format"] in row[8] and best[256]["format"] in row[8]


def test_paired_statistics_with_two_replicates(experiment):
    text = experiment[2].read_text()
    section = text.split("## Does the initialisation matter?", 1)[1].split("\n## ", 1)[0]
    rows = table_rows(section, "Level")
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert all(r[2] == "2" for r in rows)  # pairs
    assert "exact one-sided sign-flip permutation test" in section
    assert "smallest p the exact test can give is 0.25" in section   # 1/2^2
    assert "the one-sided test can from n = 5 pairs" in section
    assert "**All levels pooled:**" in section and "unstructured (weight) tickets" in section
    assert "Breaking point:" in section


def test_every_figure_is_a_real_png_and_embedded_in_the_html(experiment):
    md = experiment[2]
    for name in FIGURES:
        assert_png(md.parent / "figures" / name)
        assert f"(figures/{name})" in md.read_text()
    html = md.with_suffix(".html").read_text()
    assert html.count("data:image/png;base64,") == len(FIGURES)
    assert "src=\"figures/" not in html and "http://" not in html and "https://" not in html


def test_evidence_names_every_run_and_the_environment(experiment):
    cfg, client, md = experiment
    text = md.read_text()
    evidence = text.split("## Evidence", 1)[1]
    assert f"Config hash: `{cfg.hash()}`" in evidence
    assert "Data set: `synthetic`" in evidence and "Replicates: dense n=2" in evidence
    assert "Git commit: `" in evidence and "torch 2." in evidence and "mlflow 3." in evidence
    for run in children(client, cfg.hash()):
        assert run.info.run_id in evidence
    limits = evidence.split("### What the evidence does not support", 1)[1]
    assert "n=2 replicates" in limits and "one model per level (replicate 0)" in limits


def test_serving_scorecard_has_the_measurements_and_environment(experiment):
    text = experiment[2].read_text()
    scorecard = text.split("## Serving scorecard", 1)[1].split("\n## ", 1)[0]
    assert "Dense vs the champion ticket" in scorecard or "sparsest benchmarked" in scorecard
    rows = table_rows(scorecard, "Format")
    assert {(r[0], r[1]) for r in rows} >= {("dense", "1"), ("dense", "256")}
    dense = next(r for r in rows if r[:2] == ["dense", "1"])
    assert dense[6] == "1.00×" and float(dense[2]) > 0 and dense[9].endswith("B")
    for key in ("cpu: `", "threads: `", "torch: `", "device: `"):
        assert key in scorecard


def test_report_is_logged_to_every_parent_run(experiment):
    cfg, client, md = experiment
    ids = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(ids, f"tags.`{TAG}hash` = '{cfg.hash()}' and "
                                      f"tags.`{TAG}role` = 'parent'")
    assert len(parents) == 2
    for p in parents:
        names = {a.path for a in client.list_artifacts(p.info.run_id, "report")}
        assert {"report/executive_summary.md", "report/executive_summary.html",
                "report/figures"} <= names
        figs = {Path(a.path).name for a in client.list_artifacts(p.info.run_id, "report/figures")}
        assert set(FIGURES) <= figs


def test_registry_outcome_matches_the_aliases(experiment):
    cfg, client, md = experiment
    section = md.read_text().split("## Registry outcome", 1)[1].split("\n## ", 1)[0]
    name = model_name_for(cfg.experiment.name, cfg.hash())
    versions = client.search_model_versions(f"name = '{name}'")
    rows = table_rows(section, "Version")
    assert len(rows) == len(versions) == 3
    model = client.get_registered_model(name)
    champion = model.aliases.get("champion")
    if champion:
        assert f"version **v{champion}** is `champion`" in section
    for row in rows:
        v = next(mv for mv in versions if f"v{mv.version}" == row[0])
        assert row[3].startswith("PASS" if v.tags["quality_gate"] == "passed" else "FAIL")
        assert v.run_id in row[-1]


# --- what is deployed: the champion version's serving tags ----------------------------------

# What `benchmarks/serving_http.py --record` adds to the champion's version.
END_TO_END_TAGS = {"serving.pyfunc.speedup_bs1": "1.62", "serving.pyfunc.speedup_bs256": "4.40",
                   "serving.http.speedup_bs1": "1.07", "serving.http.speedup_bs256": "2.31",
                   "serving.http.p50_ms_bs1": "3.52", "serving.http.p99_ms_bs1": "7.10",
                   "serving.http.dense_p50_ms_bs1": "3.77", "serving.http.images_per_s_bs1": "283",
                   "serving.http.model_share_bs1": "0.08", "serving.http.p50_ms_bs256": "41.20",
                   "serving.http.measured": "2 threads, 2031-01-01"}


def champion_version(cfg, client: MlflowClient):
    name = model_name_for(cfg.experiment.name, cfg.hash())
    champ = client.get_registered_model(name).aliases.get("champion")
    assert champ, "the benchmarked tiny experiment promotes a champion"
    return name, client.get_model_version(name, str(champ))


def answer_line(text: str) -> str:
    return text.split("## The answer", 1)[1].strip().splitlines()[0]


def section_of(text: str, heading: str) -> str:
    return text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]


def test_answer_and_scorecard_say_what_the_champion_serves(experiment):
    cfg, client, md = experiment
    _, mv = champion_version(cfg, client)
    tags, text = mv.tags, md.read_text()
    first = answer_line(text)
    # 1 thread when a noisy machine made the pipeline measure again at one thread
    threads = f"{tags['serving.threads']} thread" + ("" if tags["serving.threads"] == "1" else "s")
    assert (f"The registered champion (v{mv.version}, level {tags['level']}) serves its checked "
            f"plan ({tags['serving.format']}; {threads}) and measured "
            f"{float(tags['serving.speedup_bs1']):.2f}× at batch 1 and "
            f"{float(tags['serving.speedup_bs256']):.2f}× at batch 256 vs dense in-process"
            in first), first
    assert "the best format at each batch size" not in first and "over HTTP" not in first
    measure = "`python benchmarks/serving_http.py --record`"
    answer = section_of(text, "The answer")
    assert f"Deployed: v{mv.version}'s serving plan, checked against the masked model on " \
           f"{tags['serving.checked']}." in answer and measure in answer
    card = section_of(text, "Serving scorecard").split("### What is deployed", 1)[1]
    assert threads in card and tags["serving.checked"] in card
    rows = table_rows(card, "Figure")
    assert rows == [["speedup in-process", tags["serving.format"],
                     f"{float(tags['serving.speedup_bs1']):.2f}×",
                     f"{float(tags['serving.speedup_bs256']):.2f}×"]]
    assert measure in card
    registry = section_of(text, "Registry outcome")
    assert f"It ships its checked serving plan: `{tags['serving.format']}`" in registry


def test_end_to_end_speedups_are_quoted_once_recorded(experiment, tmp_path):
    cfg, client, _ = experiment
    name, mv = champion_version(cfg, client)
    for key, value in END_TO_END_TAGS.items():
        client.set_model_version_tag(name, mv.version, key, value)
    try:
        text = build_report(client, cfg.hash(), tmp_path / "reports").read_text()
    finally:
        for key in END_TO_END_TAGS:
            client.delete_model_version_tag(name, mv.version, key)
    first = answer_line(text)
    assert "vs dense in-process; 1.62× and 4.40× through pyfunc.predict; 1.07× and 2.31× over " \
           "HTTP" in first, first
    card = section_of(text, "Serving scorecard").split("### What is deployed", 1)[1]
    rows = table_rows(card, "Figure")
    assert rows[1:] == [
        ["speedup through pyfunc.predict", "the champion's pyfunc", "1.62×", "4.40×"],
        ["speedup over HTTP", "mlflow models serve, JSON /invocations", "1.07×", "2.31×"],
        ["HTTP dense p50", "", "3.77 ms", "—"], ["HTTP images/s", "", "283", "—"],
        ["HTTP model share", "", "8%", "—"], ["HTTP p50", "", "3.52 ms", "41.20 ms"],
        ["HTTP p99", "", "7.10 ms", "—"]]
    assert "End to end: HTTP measured: 2 threads, 2031-01-01." in card
    assert "serving_http.py --record" not in text


def test_without_a_champion_the_answer_keeps_the_best_format(experiment, tmp_path):
    cfg, client, _ = experiment
    name, mv = champion_version(cfg, client)
    client.delete_registered_model_alias(name, "champion")
    try:
        text = build_report(client, cfg.hash(), tmp_path / "reports").read_text()
    finally:
        client.set_registered_model_alias(name, "champion", mv.version)
    first = answer_line(text)
    assert re.search(r"Served there, it measured \d+\.\d\d× at batch 1 and \d+\.\d\d× at batch "
                     r"256 vs dense \(the best format at each batch size", first), first
    assert "registered champion" not in text and "### What is deployed" not in text
    assert "Deployed:" not in text


def test_a_language_model_champion_shows_its_recorded_end_to_end_figures():
    """What `benchmarks/serving_http_lm.py --record` writes is shown under the champion's plan
    in the language-model scorecard; before it ran, only the plan."""
    from types import SimpleNamespace

    from ticketsmith.report.deployed import Deployed
    from ticketsmith.report.lm_serving import shipped
    from ticketsmith.report.render import to_markdown

    plan = {"serving.format": "lm_plan", "serving.threads": "1",
            "serving.routes": "prefill batch 1: compacted; decode batch 1: compacted",
            "serving.checked": "against the masked model: compacted max |logit error| 1e-6"}
    recorded = {"serving.http.speedup_bs1": "1.91", "serving.http.speedup_bs8": "2.40",
                "serving.pyfunc.speedup_bs1": "2.02", "serving.pyfunc.speedup_bs8": "2.51",
                "serving.http.tokens_per_s_bs1": "310", "serving.http.dense_tokens_per_s_bs1":
                "162", "serving.http.measured": "1 threads, 64 new tokens per row (greedy)"}
    before = to_markdown("r", shipped(SimpleNamespace(deployed=Deployed("m", "2", 2, plan))))
    assert "ships its checked serving plan" in before and "over HTTP" not in before
    text = to_markdown("r", shipped(SimpleNamespace(
        deployed=Deployed("m", "2", 2, {**plan, **recorded}))))
    rows = table_rows(text, "Figure")
    assert rows == [
        ["speedup through pyfunc.predict", "the champion's pyfunc", "2.02×", "2.51×"],
        ["speedup over HTTP", "mlflow models serve, JSON /invocations", "1.91×", "2.40×"],
        ["HTTP dense tokens/s", "", "162", "—"], ["HTTP tokens/s", "", "310", "—"]]
    assert "End to end: HTTP measured: 1 threads, 64 new tokens per row (greedy)." in text


def test_deployed_speedups_below_dense_are_said_plainly():
    from ticketsmith.report.deployed import Deployed, headline

    d = Deployed("m", "4", 2, {"serving.format": "batch 1: numpy, batch 256: onnxruntime",
                               "serving.threads": "1", "serving.speedup_bs1": "0.95",
                               "serving.speedup_bs256": "not measured"})
    assert headline(d) == ("The registered champion (v4, level 2) serves its checked plan "
                           "(batch 1: numpy, batch 256: onnxruntime; 1 thread) and measured "
                           "0.95× at batch 1 and not measured at batch 256 vs dense in-process"
                           " — not faster than dense on this hardware.")
    assert d.end_to_end == []


# --- the HTML in a real browser --------------------------------------------------------------

CHECK_SCRIPT = """<script>
window.addEventListener("error", e => document.body.insertAdjacentHTML("beforeend",
  "<pre id='js-error'>" + e.message + "</pre>"));
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;
  const rows = document.querySelectorAll("table tbody tr").length;
  document.body.insertAdjacentHTML("beforeend",
    `<pre id="render-check">images=${imgs.length} broken=${broken} rows=${rows}</pre>`);
});
</script></body>"""


def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def chromium(browser: str, url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=10000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_html_renders_in_headless_chromium(experiment, tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium/Chrome binary on PATH; install one with "
                    "`bash .ci/install-chromium.sh` (Debian package `chromium`)")
    html = experiment[2].with_suffix(".html")
    checked = tmp_path / "checked.html"
    checked.write_text(html.read_text().replace("</body>", CHECK_SCRIPT))
    out = chromium(browser, checked.as_uri(), tmp_path / "profile", "--dump-dom")
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    assert 'id="js-error"' not in dom, dom[dom.find('id="js-error"'):][:400]
    found = re.search(r'id="render-check">images=(\d+) broken=(\d+) rows=(\d+)', dom)
    assert found, dom[-2000:]
    images, broken, rows = map(int, found.groups())
    assert (images, broken) == (len(FIGURES), 0)
    assert rows >= 7
    assert "<th>Accuracy (mean ± std, n)</th>" in dom and "Safe optimisation zone" in dom
    assert "Uncaught" not in out.stderr and "Not allowed to load local resource" not in out.stderr
    shot = tmp_path / "report.png"
    out = chromium(browser, html.as_uri(), tmp_path / "profile2", f"--screenshot={shot}",
                   "--window-size=1200,2400", "--hide-scrollbars")
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    assert_png(shot)


# --- missing pieces: no benchmark, no random control, one replicate, no dense ---------------

def test_missing_pieces_are_said_not_invented(tmp_path):
    cfg, client = tracked_experiment(tmp_path, "experiment.variants=[ticket]",
                                     "prune.levels=2")
    text = build_report(client, "tiny", tmp_path / "reports").read_text()
    assert "**n=1:** one replicate only" in text
    assert "no random re-init control was run" in text
    assert "No serving benchmark has been recorded yet, so the speedup is unknown." in text
    assert "No level has both a ticket and a random re-init run" in text
    assert "## Serving scorecard\n\nNo serving benchmark recorded yet" in text
    for row in table_rows(text, "Variant"):
        assert "±" not in row[3] and row[3].endswith("(n=1)")
        assert "×" not in " ".join(row[6:])  # no speedup numbers without a benchmark
    limits = text.split("### What the evidence does not support", 1)[1]
    assert "n=1: no error bars" in limits and "No random re-init control" in limits
    figures = tmp_path / "reports" / f"tiny-{cfg.hash()}" / "figures"
    assert sorted(p.name for p in figures.iterdir()) == sorted(NO_BENCH_FIGURES)
    assert "No speedup figure: no serving benchmark has been recorded." in text
    # Without a finished dense baseline there is nothing to compare: said, not crashed.
    for run in children(client, cfg.hash()):
        if run.data.tags[TAG + "variant"] == "dense":
            client.delete_run(run.info.run_id)
    text = build_report(client, "tiny", tmp_path / "reports").read_text()
    assert "No answer yet:" in text and "no dense baseline" in text


# --- the other doors: a local run folder, the CLI, a remote tracking server ------------------

def test_runs_prefix_builds_from_a_local_folder_without_mlflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Any MLflow access would fail: nothing answers on port 9.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    runs = tmp_path / "runs"
    assert main(["prune", "-c", str(REPO / "configs" / "tiny.yaml"), "--set", f"experiment.output_dir={runs}",
                 "--set", "prune.levels=2", "--no-tracking", "-q"]) == 0
    assert main(["report", "--runs-prefix", str(runs), "--output-dir",
                 str(tmp_path / "reports")]) == 0
    md = next((tmp_path / "reports").glob("tiny-*/executive_summary.md"))
    text = md.read_text()
    assert "Source: local run folder" in text and "(not MLflow)" in text
    assert "Not available: built from a local run folder" in text
    assert "replicate_0/level_2/ticket" in text
    assert len(table_rows(text, "Variant")) == 5
    for name in NO_BENCH_FIGURES:
        assert_png(md.parent / "figures" / name)


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    assert main(["report", "--experiment", "no-such-experiment"]) == 2
    assert "no MLflow experiment or config hash" in capsys.readouterr().err
    assert main(["report"]) == 2
    assert "--experiment" in capsys.readouterr().err


def test_python_m_door(repo_root):
    out = subprocess.run([sys.executable, "-m", "ticketsmith.report", "--help"], cwd=repo_root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--runs-prefix" in out.stdout and "--experiment" in out.stdout


@pytest.mark.slow
def test_report_against_a_remote_tracking_server(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(mlflow_server)
    try:
        client = MlflowClient(mlflow_server)
        cfg = tiny(tmp_path, "prune.levels=1", "experiment.name=tiny-remote")
        run_prune(cfg, client=client, progress=False, echo=lambda s: None)
        shutil.rmtree(tmp_path / "runs")  # the report must not need the local run folder
        md = build_report(client, "tiny-remote", tmp_path / "reports")
    finally:
        mlflow.set_tracking_uri(None)
    text = md.read_text()
    assert "Source: MLflow tracking store http://127.0.0.1:" in text
    assert f"{mlflow_server}/#/experiments/" in text  # run ids link to the MLflow UI
    assert len(table_rows(text, "Variant")) == 3
    parent = client.search_runs([client.get_experiment_by_name("tiny-remote").experiment_id],
                                f"tags.`{TAG}role` = 'parent'")[0]
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/executive_summary.html" in names


# --- the statistics, on hand-made records ------------------------------------------------------

def record(rep: int, level: int, variant: str, acc: float, density: float = 1.0) -> dict:
    return {"replicate": rep, "level": level, "variant": variant, "test_accuracy": acc,
            "sparsity": 1 - density, "density": density, "early_stop_iteration": 100}


def test_sign_flip_test_is_exact():
    assert sign_flip_p([1.0, 2.0, 3.0], "two-sided") == pytest.approx(2 / 8)  # all-+, all-−
    assert sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(1 / 8)   # one-sided: only all-+
    assert sign_flip_p([1.0, -1.0], "two-sided") == 1.0
    assert sign_flip_p([1.0, -1.0]) == pytest.approx(3 / 4)       # sums 0, 2, -2, 0 >= 0
    assert sign_flip_p([0.5] * 6, "two-sided") == pytest.approx(2 / 64)
    assert sign_flip_p([-1.0, -2.0]) == 1.0                       # wrong direction: no evidence
    s = spread([1.0, 3.0])
    assert (s.mean, s.n) == (2.0, 2) and s.std == pytest.approx(2 ** 0.5)
    assert spread([4.0]).std is None and spread([4.0]).text(1, "%") == "4.0% (n=1)"


def test_paired_comparison_and_breaking_points():
    recs = [record(r, 0, "dense", 0.98) for r in range(3)]
    for level, density, ticket, rand in ((1, 0.5, 0.98, 0.975), (2, 0.25, 0.975, 0.95),
                                         (3, 0.125, 0.95, 0.90)):
        for r in range(3):
            recs += [record(r, level, "ticket", ticket + 0.001 * r, density),
                     record(r, level, "random_reinit", rand, density)]
    stats = level_stats(recs)
    p = paired_comparison(stats, 2)
    assert p.n == 3 and p.mean_diff == pytest.approx(2.6)
    assert p.exact_p == pytest.approx(0.125) and p.min_p == pytest.approx(0.125)
    assert p.cohen_dz == pytest.approx(2.6 / 0.1) and p.t_p is not None and p.t_p < 0.01
    assert p.verdict == "ticket ahead, not significant"   # n=3 cannot reach p < 0.05
    assert breaking_level(stats, "ticket", 2.0).level == 3
    assert breaking_level(stats, "random_reinit", 2.0).level == 2
    single = level_stats([r for r in recs if r["replicate"] == 0])
    one = paired_comparison(single, 2)
    assert one.n == 1 and one.exact_p is None and one.verdict == "n=1: no test"


def test_five_pairs_all_ahead_can_be_significant_one_sided_and_pooled():
    """The default design (n=5) reaches a verdict: 5 of 5 pairs ahead gives p = 1/32."""
    recs = [record(r, 0, "dense", 0.98) for r in range(5)]
    for level, density in ((1, 0.5), (2, 0.25)):
        for r in range(5):
            recs += [record(r, level, "ticket", 0.97 + 0.001 * r, density),
                     record(r, level, "random_reinit", 0.95 - 0.002 * r, density)]
    stats = level_stats(recs)
    p = paired_comparison(stats, 1)
    assert p.exact_p == pytest.approx(1 / 32) and p.verdict == "ticket better (one-sided p < 0.05)"
    assert sign_flip_p(list(p.diffs), "two-sided") == pytest.approx(2 / 32)  # could never reject
    pooled = pooled_comparison(stats, [1, 2])
    assert pooled.levels == (1, 2) and len(pooled.diffs) == 5 and pooled.p == pytest.approx(1 / 32)
    assert pooled.verdict.startswith("ticket better")
    assert min_rejecting_n() == 5
    flipped = level_stats([{**r, "test_accuracy": 1.9 - r["test_accuracy"]}
                           if r["variant"] == "ticket" else r for r in recs])
    assert paired_comparison(flipped, 1).verdict == "random re-init ahead: no evidence for the ticket"


@pytest.fixture(scope="module")
def five_replicates(tmp_path_factory):
    """The default design's n=5 on a tiny real experiment (untracked: two levels at 80% per
    level, 60 iterations), and its report built from the run folder: (records, report)."""
    tmp = tmp_path_factory.mktemp("five")
    cfg = tiny(tmp, "experiment.replicates=5", "prune.levels=2", "prune.fraction=0.8",
               "train.iterations=60")
    run_experiment(cfg, progress=False, echo=lambda _: None)
    md = build_report(None, cfg.hash(), tmp / "reports", runs_prefix=tmp / "runs")
    records = [json.loads(p.read_text()) for p in (tmp / "runs").rglob("metrics.json")]
    return {(r["replicate"], r["level"], r["variant"]): r["test_accuracy"] for r in records}, \
        md.read_text()


def one_sided_exact_p(diffs: list[float]) -> float:
    """scipy's exact sign-flip permutation test of mean > 0 (all 2^n assignments)."""
    from scipy.stats import permutation_test

    return permutation_test((np.asarray(diffs),), np.mean, permutation_type="samples",
                            alternative="greater", n_resamples=np.inf).pvalue


def verdict_for(mean_diff: float, p: float) -> str:
    if mean_diff < 0:
        return "random re-init ahead: no evidence for the ticket"
    return "ticket better (one-sided p < 0.05)" if p < 0.05 else "ticket ahead, not significant"


def test_a_report_at_n5_decides_and_words_from_the_one_sided_exact_test(five_replicates):
    """Each level's p and verdict, and the pooled line's, are the one-sided exact test's on
    the recorded accuracies (scipy, computed here); the limits say what n=5 allows."""
    from scipy.stats import ttest_1samp

    acc, text = five_replicates
    section = text.split("## Does the initialisation matter?", 1)[1].split("\n## ", 1)[0]
    rows = table_rows(section, "Level")
    assert [r[0] for r in rows] == ["1", "2"]
    per_level = {}
    for row in rows:
        level = int(row[0])
        diffs = [100 * (acc[r, level, "ticket"] - acc[r, level, "random_reinit"])
                 for r in range(5)]
        per_level[level] = diffs
        p = one_sided_exact_p(diffs)
        assert row[2] == "5"
        assert float(row[5]) == pytest.approx(ttest_1samp(diffs, 0).pvalue, abs=6e-4)
        assert float(row[6]) == pytest.approx(p, abs=6e-4), (level, diffs)
        assert row[7] == verdict_for(mean(diffs), p), (level, diffs)
    # the story needs a level where all 5 pairs favour the ticket: p = 1/32 one-sided, and a
    # two-sided test (1/16) could not reject
    decided = [lv for lv, d in per_level.items() if min(d) > 0]
    assert decided and rows[decided[0] - 1][7] == "ticket better (one-sided p < 0.05)"
    pooled = [mean(per_level[lv][r] for lv in (1, 2)) for r in range(5)]
    p = one_sided_exact_p(pooled)
    assert (f"one-sided exact sign-flip p = {p:.3f}: "
            f"{verdict_for(mean(pooled), p)}.") in section
    assert ("n=5 replicates: the one-sided exact test reaches p < 0.05 only when every pair "
            "favours the ticket (its smallest p is 1/2^5 = 0.0312)") in text
    assert "cannot reach" not in text and "n ≥ 6" not in text


@pytest.mark.parametrize("n, says", [
    (2, "n=2 replicates: the one-sided exact test cannot reach p < 0.05 (its smallest p is "
        "1/2^2 = 0.25; that needs n ≥ 5 pairs)"),
    (4, "n=4 replicates: the one-sided exact test cannot reach p < 0.05 (its smallest p is "
        "1/2^4 = 0.0625; that needs n ≥ 5 pairs)"),
    (5, "n=5 replicates: the one-sided exact test reaches p < 0.05 only when every pair"),
    (6, None)])
def test_the_limits_of_few_pairs_follow_the_one_sided_test(n, says):
    from ticketsmith.report.evidence import few_pairs

    got = few_pairs(n)
    assert got == says if says is None else got.startswith(says)
