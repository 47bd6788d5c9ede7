"""Regenerate the README's TensorBoard screenshots from a log folder.

    python docs/screenshots.py --logdir runs --out docs

Starts TensorBoard on loopback, opens each tab in headless Chromium (Debian's `chromium`
package) and saves one PNG per tab. Nothing leaves the machine: Chromium runs with its
network features off and TensorBoard listens on 127.0.0.1 only. The charts are drawn in SVG
(`forceSVG`): headless Chromium draws no lines in TensorBoard's WebGL charts.
"""

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TABS = {  # TensorBoard tab (the URL fragment): window size, wide enough for what the tab shows
    "timeseries": "1400,1250",  # the tab TensorBoard opens on: the first screen a newcomer sees
    "images": "1400,900",
    "projector": "1400,900",
    "hparams": "1900,420",
}
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--no-first-run", "--no-default-browser-check",
    "--metrics-recording-only", "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--enable-unsafe-swiftshader",  # software WebGL, for the projector
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"TensorBoard did not answer at {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, default=Path("runs"), help="TensorBoard log folder")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the PNGs go")
    parser.add_argument("--wait-ms", type=int, default=20000, help="virtual time each page gets to render")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/data/runs")
        time.sleep(3)  # let TensorBoard finish its first pass over the event files
        for tab, window in TABS.items():
            target = (args.out / f"tensorboard-{tab}.png").resolve()
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run([browser, *CHROMIUM_FLAGS, f"--window-size={window}",
                                f"--user-data-dir={profile}", f"--virtual-time-budget={args.wait_ms}",
                                f"--screenshot={target}",
                                f"http://127.0.0.1:{port}/?darkMode=false&forceSVG=true#{tab}"],
                               check=True, capture_output=True, timeout=180)
            print(f"saved {target}")
    finally:
        server.terminate()
        server.wait(timeout=20)


if __name__ == "__main__":
    main()
