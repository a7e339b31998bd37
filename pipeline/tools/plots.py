"""`dvc plots show` that draws every chart with no network: the Vega scripts go inside the page.

`python -m pipeline.tools.plots [--out dvc_plots] [--template .dvc/tmp/plots-offline.html] [TARGET ...]` (`make plots`),
then open dvc_plots/index.html.

DVC's own page loads vega, vega-lite and vega-embed from cdn.jsdelivr.net, so offline every chart is blank. DVC
fills an HTML template's `{plot_divs}` (one <div> per chart, whose inline script calls `vegaEmbed`) and `{scripts}`
(those CDN <script> tags). The template written here has no `{scripts}`: it inlines vl-convert-python's bundle of
the three libraries (~0.9 MB, Vega-Lite 5 as DVC's templates declare) in <head>, before the divs' scripts run. It is
generated at each run into .dvc/tmp/, which DVC's own .dvc/.gitignore already keeps out of git. The page is then
checked: a <script>, <img>, <link> or <iframe> that points at http(s) fails the command.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
from pathlib import Path

from pipeline.config import setup_logging
from pipeline.files import atomic_write_text

log = logging.getLogger("plots")

VEGA_LITE_MAJOR = "5"  # DVC's templates declare vega-lite v5.json; its "confusion" uses v5's deprecated `selection`
# what dvc_render replaces in a template: the bundle must not contain these (nor close its <script> tag)
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")
REMOTE = re.compile(r"<(?:script|img|link|iframe)\b[^>]*?\b(?:src|href)\s*=\s*[\"']?((?:https?:)?//[^\"'\s>]+)", re.I)

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>DVC plots</title>
<script>
@BUNDLE@
</script>
<script>
// every chart as SVG (sharp when zoomed; its marks in the DOM, which the test reads), and a chart that fails says
// why instead of staying blank: DVC's divs call vegaEmbed(selector, spec) and drop the promise
(function () {
  const embed = window.vegaEmbed;
  window.vegaEmbed = (el, spec, opts) =>
    embed(el, spec, { renderer: "svg", ...opts }).catch((error) => {
      const div = typeof el === "string" ? document.querySelector(el) : el;
      div.append(`chart failed: ${error}`);
      div.classList.add("chart-failed");
    });
})();
</script>
<style>
body { font-family: sans-serif; display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
table { border-spacing: 15px; }
.chart-failed { color: #b00; }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def vega_bundle() -> str:
    """vega + vega-lite + vega-embed as one script that sets window.vegaEmbed, from vl-convert-python."""
    try:
        import vl_convert
    except ImportError:
        raise SystemExit(
            "pipeline.tools.plots: vl-convert-python is not installed, and it holds the Vega scripts the page needs "
            "offline: "
            "run 'make install' (it is a dependency in pyproject.toml) or '.venv/bin/pip install vl-convert-python'"
        ) from None
    versions = [v for v in vl_convert.get_vegalite_versions() if v.split(".")[0] == VEGA_LITE_MAJOR]
    if not versions:
        raise SystemExit(
            f"pipeline.tools.plots: this vl-convert-python ({vl_convert.__version__}) has no Vega-Lite "
            f"{VEGA_LITE_MAJOR}.x "
            f"(it has {', '.join(vl_convert.get_vegalite_versions())}), which DVC's plot templates are written for: "
            "install an older vl-convert-python"
        )
    newest = max(versions, key=lambda v: tuple(int(n) for n in v.split(".")))
    return vl_convert.javascript_bundle(vl_version=newest)


def offline_template(bundle: str) -> str:
    """DVC's HTML template with `bundle` inlined in <head> and no `{scripts}`, so no CDN <script> is added."""
    if "</script" in bundle.lower() or any(p in bundle for p in DVC_PLACEHOLDERS):
        raise SystemExit(
            "pipeline.tools.plots: the Vega bundle contains '</script' or a DVC placeholder: it cannot be inlined"
        )
    return PAGE.replace("@BUNDLE@", bundle)


def remote_sources(html: str) -> list[str]:
    """The http(s) addresses the page would fetch (scripts, images, styles, frames); [] for a page that needs no net."""
    return REMOTE.findall(html)


def show_plots(template: Path, out: Path, targets: list[str]) -> Path:
    """Run the real `dvc plots show` with `template`; the page it wrote (out/index.html)."""
    index = out / "index.html"
    index.unlink(missing_ok=True)  # dvc writes no page when there is nothing to draw: never report an old one
    cmd = [sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(template.resolve()), "-o", str(out)]
    done = subprocess.run([*cmd, *targets], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"pipeline.tools.plots: 'dvc plots show' failed (exit {done.returncode}); run it from the project root, "
            "and "
            f"'dvc repro' first if the plot files are missing:\n{done.stdout}{done.stderr}"
        )
    if not index.exists():
        raise SystemExit(
            "pipeline.tools.plots: 'dvc plots show' drew nothing, no plot file found: run 'dvc repro' first\n"
            f"{done.stderr}"
        )
    return index


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="dvc plots show, drawn with no network.")
    parser.add_argument("targets", nargs="*", help="plots to draw (default: all, as dvc plots show)")
    parser.add_argument("--out", type=Path, default=Path("dvc_plots"), help="folder of the page (index.html)")
    parser.add_argument("--template", type=Path, default=Path(".dvc/tmp/plots-offline.html"), help="generated template")
    args = parser.parse_args(argv)
    setup_logging()

    atomic_write_text(args.template, offline_template(vega_bundle()))
    index = show_plots(args.template, args.out, args.targets)
    html = index.read_text(encoding="utf-8")
    if remote := remote_sources(html):
        raise SystemExit(f"pipeline.tools.plots: {index} still loads {', '.join(remote)}: it would be blank offline")
    log.info("%d charts, no network needed: %s", html.count("vegaEmbed('#"), index.resolve().as_uri())


if __name__ == "__main__":
    main()
