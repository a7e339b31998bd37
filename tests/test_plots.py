"""pipeline.tools.plots: `dvc plots show` whose page draws every chart with the network cut off.

A tiny DVC project (two loss columns on one chart, a confusion matrix, an image) drawn by the real
`python -m pipeline.tools.plots`, then opened in Debian's /usr/bin/chromium (Playwright, as tests/test_page.py) with
every request that is not file:// aborted. Without Chromium the browser test skips and says so. The screenshot
goes to the test's tmp_path.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.tools.plots import main, remote_sources
from tests.conftest import ROOT, dvc, tool_env
from tests.test_page import CHROMIUM, CHROMIUM_FLAGS, needs_chromium

DVC_YAML = """\
plots:
  - loss:
      template: simple
      title: Loss
      x: epoch
      y:
        train.csv: [train_loss, valid_loss]
  - predictions.csv:
      template: confusion
      x: actual
      y: predicted
  - examples.png
"""


def plots_cmd(project: Path, *args: str) -> subprocess.CompletedProcess:
    """The real `python -m pipeline.tools.plots` in `project`, this checkout's module."""
    env = {**tool_env(), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline.tools.plots", *args]
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=120)


def init_project(dest: Path) -> Path:
    dest.mkdir(parents=True)
    dvc(dest, "init", "--no-scm", "-q")
    return dest


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> Path:
    """A project with three plots, drawn by pipeline.tools.plots into page/index.html."""
    project = init_project(tmp_path_factory.mktemp("plots") / "project")
    (project / "dvc.yaml").write_text(DVC_YAML)
    rows = [f"{e},{1 / e:.3f},{1.2 / e + 0.1:.3f}" for e in range(1, 6)]
    (project / "train.csv").write_text("\n".join(["epoch,train_loss,valid_loss", *rows]) + "\n")
    pairs = ["cat,cat"] * 7 + ["cat,dog"] * 2 + ["dog,dog"] * 8 + ["dog,cat"] * 3
    (project / "predictions.csv").write_text("\n".join(["actual,predicted", *pairs]) + "\n")
    Image.new("RGB", (40, 20), (200, 30, 30)).save(project / "examples.png")
    done = plots_cmd(project, "--out", "page")
    assert done.returncode == 0, done.stderr
    assert (project / ".dvc" / "tmp" / "plots-offline.html").stat().st_size > 500_000  # the bundle is inlined
    return project


def test_the_page_loads_nothing_from_the_network(drawn):
    page = (drawn / "page" / "index.html").read_text()
    assert remote_sources(page) == []
    assert page.count("vegaEmbed('#") == 2 and 'src="static/workspace_examples.png"' in page
    # DVC's own page (what the template replaces) fetches the Vega scripts from a CDN
    dvc(drawn, "plots", "show", "-o", "cdn")
    assert any("cdn.jsdelivr.net" in url for url in remote_sources((drawn / "cdn" / "index.html").read_text()))


def test_no_plot_files_is_an_error_that_says_what_to_run(tmp_path):
    done = plots_cmd(init_project(tmp_path / "empty"))
    assert done.returncode != 0 and "drew nothing" in done.stderr and "dvc repro" in done.stderr


def test_without_vl_convert_it_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vl_convert", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match="pip install vl-convert-python"):
        main(["--template", str(tmp_path / "t.html"), "--out", str(tmp_path / "out")])


# per vega chart (div id: the plot's name, special characters as _): data marks drawn, charts failed
CHARTS_JS = """() => Object.fromEntries([...document.querySelectorAll('.vega-embed')].map(div => [div.id, {
    lines: [...div.querySelectorAll('.mark-line.role-mark path')].filter(p => p.getAttribute('d').length > 20).length,
    cells: div.querySelectorAll('.mark-rect.role-mark path').length,
    failed: div.classList.contains('chart-failed'),
}]))"""


@pytest.mark.slow
@needs_chromium
def test_every_chart_draws_with_the_network_cut_off(drawn, tmp_path):
    from playwright.sync_api import sync_playwright

    blocked, errors = [], []

    def only_files(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.route("**/*", only_files)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto((drawn / "page" / "index.html").as_uri())
        page.wait_for_function("() => document.querySelectorAll('.vega-embed svg.marks, .chart-failed').length >= 2")
        charts = page.evaluate(CHARTS_JS)
        image_width = page.eval_on_selector("img", "img => img.naturalWidth")
        page.screenshot(path=tmp_path / "plots.png", full_page=True)
        browser.close()

    assert blocked == [] and errors == []
    assert charts["loss"] == {"lines": 2, "cells": 0, "failed": False}  # train and valid loss on one chart
    assert charts["predictions_csv"]["cells"] >= 4 and not charts["predictions_csv"]["failed"]  # 2 x 2 counts
    assert image_width == 40
    assert (tmp_path / "plots.png").stat().st_size > 10_000
