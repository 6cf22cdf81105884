"""Screenshots of a run's report.html for the README, made by headless Chromium.

    make screenshots            # after `make run`: runs/demo -> docs/report_top.png, report_why.png
    python docs/screenshots.py RUN_DIR OUT_DIR [--why "digits / augshufflenet@0.5 W4A4"]

Two images: the top of the report (title and verdict table) and the "why recalibration fails"
block of one cell. Each part is cut out of the report's own HTML (with its own CSS), rendered
alone at 1200 px wide, and the blank space below it trimmed. Needs a Chromium binary (the
``CHROMIUM`` environment variable, else ``chromium`` or ``chromium-browser`` on PATH; Debian's
package ``chromium``) and Pillow (a matplotlib dependency).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def _chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    sys.exit("screenshots: no Chromium found; install Debian's 'chromium' or set CHROMIUM")


def _shoot(html: str, out: Path, width: int = 1200, height: int = 4000) -> None:
    from PIL import Image, ImageChops

    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(html)
        png = Path(tmp) / "shot.png"
        subprocess.run(
            [
                _chromium(),
                *FLAGS,
                f"--user-data-dir={tmp}/profile",
                f"--window-size={width},{height}",
                f"--screenshot={png}",
                page.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        im = Image.open(png).convert("RGB")
        box = ImageChops.difference(im, Image.new("RGB", im.size, "white")).getbbox()
        if box is not None:
            im = im.crop((0, 0, width, min(im.height, box[3] + 16)))
        out.parent.mkdir(parents=True, exist_ok=True)
        im.save(out, optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--why", default="digits / augshufflenet@0.5 W4A4", help="the cell's heading")
    args = ap.parse_args(argv)
    text = (args.run_dir / "report.html").read_text()
    head = text[: text.index("<body>") + len("<body>")]
    top = text[: text.index("<h2>Key numbers</h2>")] + "</body></html>"
    _shoot(top, args.out_dir / "report_top.png")
    print(f"wrote {args.out_dir / 'report_top.png'}")
    start = text.find(f"<h3>{args.why}</h3>")
    if start < 0:
        print(f"no 'why' block for {args.why!r} in this report; only the top was made")
        return 0
    end = min(i for i in (text.find("<h3>", start + 4), text.find("<h2>", start)) if i > 0)
    why = text[start:end]
    why = re.sub(r"<figcaption.*?</figcaption>", "", why, flags=re.S)
    _shoot(head + why + "</body></html>", args.out_dir / "report_why.png")
    print(f"wrote {args.out_dir / 'report_why.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
