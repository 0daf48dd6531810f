"""Screenshots of the MLflow UI on a real experiment, and the checks the browser test makes.

    python scripts/ui_screenshots.py                      # quick experiment → docs/images/
    python scripts/ui_screenshots.py --config configs/tiny.yaml --out /tmp/shots

Runs the experiment for real against a fresh `mlflow server` (SQLite store, proxied artifacts,
in a temporary folder), then drives Debian's Chromium with Playwright (never a downloaded
browser) through what a newcomer clicks: the experiment, its parent run's Overview (the
answer and the ticket-vs-random figure), its Model metrics (per-level series) and the HTML
report in the artifact viewer. Every step waits for what it needs on the page, never for time.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import free_port, start_group, stop, wait_for_http  # noqa: E402  (test helpers)

CHROMIUM = os.environ.get("TICKETSMITH_CHROMIUM", "/usr/bin/chromium")
TIMEOUT_MS = 60_000   # the UI on a busy 2-core machine: React renders after several API calls
TRAINING = "workflowType=machine_learning"
# MLflow 3.17 opens its assistant side panel on a browser's first visit; it only narrows the
# screenshots, so the browser starts as one that has closed it before.
NO_ASSISTANT = """localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");"""


@dataclass
class Seen:
    """What the browser found; the test asserts on it."""
    sidebar: list[str] = field(default_factory=list)
    genai_labels: int = -1                 # "Evaluations" labels on the run page
    description_figure_px: int = 0         # natural width of the figure in the description
    chart_titles: list[str] = field(default_factory=list)
    chart_series: list[str] = field(default_factory=list)
    report_text: str = ""
    screenshots: list[Path] = field(default_factory=list)


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` over a fresh SQLite store in `root`, with proxied artifacts."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    log = open(root / "server.log", "w")
    proc = start_group(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                       env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", proc)
    except RuntimeError:
        stop(proc)
        raise
    return proc, url


def run_experiment(url: str, config: str, overrides: list[str], workdir: Path) -> tuple[str, str]:
    """Run the experiment against the server; (MLflow experiment id, replicate-0 parent run)."""
    from mlflow import MlflowClient

    from ticketsmith.base.config import load_config
    from ticketsmith.pipeline import run_prune

    cfg = load_config(config, [f"experiment.output_dir={workdir / 'runs'}", *overrides])
    client = MlflowClient(url)
    result = run_prune(cfg, client=client, progress=False, report_dir=workdir / "reports")
    tracker_exp = client.get_experiment_by_name(cfg.experiment.name).experiment_id
    parent = client.search_runs([tracker_exp], f"tags.`ticketsmith.hash` = "
                                f"'{result.experiment.exp_hash}' and tags.`ticketsmith.role` = "
                                "'parent' and tags.`ticketsmith.replicate` = '0'")[0]
    return tracker_exp, parent.info.run_id


def browse(url: str, exp_id: str, run_id: str, out: Path) -> Seen:
    """Click through the UI as a newcomer would; save screenshots into `out`."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    seen = Seen()
    run_page = f"{url}/#/experiments/{exp_id}/runs/{run_id}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-background-networking", "--disable-component-update",
            "--disable-default-apps", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 950})
            page.add_init_script(NO_ASSISTANT)
            page.set_default_timeout(TIMEOUT_MS)
            _experiment(page, f"{url}/#/experiments/{exp_id}?{TRAINING}", run_id, out, seen)
            _overview(page, f"{run_page}?{TRAINING}", out, seen)
            _metrics(page, f"{run_page}/model-metrics?{TRAINING}", out, seen)
            _report(page, f"{run_page}/artifacts?{TRAINING}", out, seen)
        finally:
            browser.close()
    return seen


def _shot(page_or_locator, out: Path, name: str, seen: Seen) -> None:
    path = out / name
    page_or_locator.screenshot(path=str(path))
    seen.screenshots.append(path)


def _experiment(page, link: str, run_id: str, out: Path, seen: Seen) -> None:
    page.goto(link)
    page.locator("text=Runs").first.wait_for()
    page.locator(f"a[href*='{run_id}']").first.wait_for()   # the parent run's row
    nav = page.locator("nav, aside").first
    seen.sidebar = [t.strip() for t in nav.locator("a").all_inner_texts() if t.strip()]
    _shot(page, out, "ui_experiment.png", seen)


def _overview(page, link: str, out: Path, seen: Seen) -> None:
    page.goto(link)
    figure = page.locator("img[src*='accuracy_vs_weights.png']").first
    figure.wait_for(state="attached")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=figure.element_handle())
    seen.description_figure_px = figure.evaluate("img => img.naturalWidth")
    # GenAI mode titles a run's breadcrumb "Evaluations"; training mode says "Runs".
    seen.genai_labels = page.get_by_text("Evaluations", exact=True).count()
    page.get_by_text("Show more", exact=True).first.click()   # the description is folded
    figure.evaluate("e => e.scrollIntoView({block: 'center'})")
    _shot(page, out, "ui_parent_overview.png", seen)


def _metrics(page, link: str, out: Path, seen: Seen) -> None:
    page.goto(link)
    cards = page.locator("[data-testid='experiment-view-compare-runs-card']")
    for series in ("accuracy/ticket", "accuracy/random_reinit"):
        cards.filter(has_text=f"({series})").first.wait_for()
    seen.chart_series = [t for t in cards.all_inner_texts()]
    seen.chart_titles = [t.split("\n", 1)[0] for t in seen.chart_series]
    section = page.locator("[data-testid='draggable-chart-cards-grid']").first
    _shot(section, out, "ui_model_metrics.png", seen)


def _report(page, link: str, out: Path, seen: Seen) -> None:
    page.goto(link)
    page.get_by_text("report", exact=True).first.click()
    page.get_by_text("executive_summary.html", exact=True).first.click()
    frame = page.frame_locator("iframe").first
    frame.locator("h1").first.wait_for()
    seen.report_text = frame.locator("body").inner_text()
    _shot(page, out, "ui_report_artifact.png", seen)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "imp_mnist.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(REPO / "docs" / "images"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ticketsmith-ui-") as tmp:
        proc, url = start_server(Path(tmp))
        try:
            exp_id, run_id = run_experiment(url, args.config, args.overrides, Path(tmp))
            seen = browse(url, exp_id, run_id, Path(args.out))
        finally:
            stop(proc)
    for path in seen.screenshots:
        print(f"screenshot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
