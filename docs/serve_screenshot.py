r"""Makes docs/serve.png: the demo page after one Generate, in headless Chromium.

  python docs/serve_screenshot.py --model=models/shapes [--out=docs/serve.png] \
      [--prompt="a large red circle in the center"] [--seed=0] [--images=8]

Starts `python -m muse_jax.serve` on a free port, drives Debian's Chromium (/usr/bin/chromium)
with Playwright, and stops the server.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "serve.png"))
    parser.add_argument("--prompt", default="a large red circle in the center")
    parser.add_argument("--seed", default="0")
    parser.add_argument("--images", default="8")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen(
        [sys.executable, "-m", "muse_jax.serve", f"--model={args.model}", f"--port={port}"],
        cwd=ROOT,
    )
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1000, "height": 720})
            page.goto(url)
            page.fill("#prompt", args.prompt)
            page.fill("#seed", args.seed)
            page.fill("#num_images", args.images)
            page.click("#generate")
            page.wait_for_function(
                "document.getElementById('grid').getAttribute('src') || "
                "document.getElementById('error').textContent",
                timeout=300_000,
            )
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
