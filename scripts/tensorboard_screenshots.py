"""Screenshots of TensorBoard showing a gradwatch run, for the docs (headless Chromium).

    python scripts/tensorboard_screenshots.py [--out docs/img]

Runs the demo into a temporary folder, starts the real TensorBoard server on a loopback port,
and photographs its scalars, custom-scalars, histograms and images pages. Needs Debian's `chromium`
(apt-get install chromium); the server is always stopped at the end.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PAGES = {
    "tensorboard_scalars.png": "#scalars&tagFilter=dead_fraction%7Cglobal_norm",
    "tensorboard_custom_scalars.png": "#custom_scalars",
    "tensorboard_histograms.png": "#histograms&tagFilter=activation%2F%5B13%5D%24",
    "tensorboard_images.png": "#images",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/img")
    args = p.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("needs headless Chromium: apt-get install chromium")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "demo"
        subprocess.run([sys.executable, "-m", "examples.demo", "--runs", str(runs)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(runs), "--host",
                                   "127.0.0.1", "--port", str(port), "--load_fast", "false"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}/"
        try:
            for _ in range(120):
                try:
                    urllib.request.urlopen(base + "data/plugin/scalars/tags", timeout=2).read()
                    break
                except OSError:
                    time.sleep(0.5)
            time.sleep(3)  # let the server load every run
            for name, fragment in PAGES.items():
                subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                                "--disable-sync", f"--user-data-dir={tmp}/chrome", "--hide-scrollbars",
                                "--window-size=1400,1000", "--virtual-time-budget=20000",
                                f"--screenshot={out / name}", base + fragment],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
                print(f"wrote {out / name}")
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
