"""Make docs/images/plots_diff.png, the README's picture of two experiments compared.

Two demo experiments (learning rate 1e-3 and 3e-4) are run with `dvc exp run` in a clone of this
repository, compared with `dvc plots diff`, and the HTML page DVC writes is photographed in headless
Chromium. DVC's page loads the Vega libraries from a CDN; they come from vl-convert-python instead, so
this runs offline. Run from the repository root, after committing (the clone is of HEAD):

    pip install -e '.[docs]'         # vl-convert-python
    apt-get install chromium         # or any Chrome / Chromium on PATH
    python docs/make_plots_screenshot.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import vl_convert
from PIL import Image, ImageChops

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs/images/plots_diff.png"
# Both runs log the eval loss every 25 steps, for a curve with more than three points.
EXPERIMENTS = {
    "lr-1e-3": ["-S", "train.eval_steps=25"],
    "lr-3e-4": ["-S", "train.eval_steps=25", "-S", "train.learning_rate=3e-4"],
}
TARGETS = ["train_loss", "eval_loss", "eval_loss_by_timestep", "metrics/train/validation/step-000200.png"]
# DVC's own page, with the Vega libraries from a file beside it instead of the CDN (`{scripts}`).
TEMPLATE = """<!DOCTYPE html>
<html>
<head>
  <title>dvc plots diff</title>
  <script src="vega.js"></script>
  <style>body { font-family: sans-serif; } table { border-spacing: 15px; }</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""
WIDTH, HEIGHT = 1400, 4000  # the window; the white below the last plot is cropped


def run(cmd: list[str], cwd: Path) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if found := shutil.which(name):
            return found
    sys.exit("no Chromium or Chrome on PATH: apt-get install chromium")


def main() -> None:
    browser = chromium()
    with tempfile.TemporaryDirectory(prefix="plots-diff-") as tmp:
        project = Path(tmp) / "project"
        run(["git", "clone", "--quiet", str(ROOT), str(project)], Path(tmp))
        for name, settings in EXPERIMENTS.items():
            run(["dvc", "exp", "run", "--name", name, *settings], project)
        template = Path(tmp) / "template.html"
        template.write_text(TEMPLATE)
        pages = Path(tmp) / "plots"
        diff = ["dvc", "plots", "diff", *EXPERIMENTS, "--targets", *TARGETS]
        run([*diff, "--html-template", str(template), "-o", str(pages)], project)
        (pages / "vega.js").write_text(vl_convert.javascript_bundle(vl_version="5.21"))
        shot = Path(tmp) / "shot.png"
        headless = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        window = [f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=20000"]
        run([*headless, *window, f"--screenshot={shot}", (pages / "index.html").as_uri()], Path(tmp))
        page = Image.open(shot).convert("RGB")
        content = ImageChops.difference(page, Image.new("RGB", page.size, "white")).getbbox()
        if content is None:
            sys.exit(f"the page rendered blank: open {pages / 'index.html'} to see why")
        OUTPUT.parent.mkdir(parents=True, exist_ok=True)
        page.crop((0, 0, WIDTH, min(HEIGHT, content[3] + 20))).save(OUTPUT, optimize=True)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
