"""Screenshots of every dashboard page in a real headless Chromium, for docs/ and the README.

    python -m dashboard.screenshots --runs runs --data data --run demo [--out docs/images] [--dicom SERIES/*]

Starts `streamlit run dashboard/app.py` on a free loopback port, opens each page by its link
(`?page=...&run=...`), waits until the page has finished running, and writes OUT/dashboard-<page>.png; with
--dicom, also the Translate page after uploading that series through the browser (dashboard-translate-dicom.png).
Chromium comes from dashboard/setup-browser.sh (/usr/bin/chromium).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
PAGES = {"runs": ("Runs", "Runs"), "compare": ("Compare", "Compare runs"), "run": ("Run", "Run {run}"),
         "translate": ("Translate", "Translate with {run}")}  # file name: (page, its heading)


@contextlib.contextmanager
def serve(runs: Path, data: Path, cwd: Path = ROOT, *app_args: str):
    """`streamlit run dashboard/app.py` on a free port, started in `cwd`; yields its URL and stops it after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"), "--server.port", str(port),
                               "--server.headless", "true", "--", "--runs", str(runs), "--data", str(data), *app_args],
                              cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"streamlit did not start: {server.stdout.read()[-2000:] if server.poll() is not None else 'timeout'}")
            time.sleep(0.5)
    try:
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def screenshots(runs: Path, data: Path, run: str, out: Path, width: int = 1400, height: int = 1700,
                dicom: list[Path] | None = None) -> list[Path]:
    """Every page, and with `dicom` (the files of one series, or a .zip of it) the Translate page once they are
    uploaded, as a user drops them in."""
    from playwright.sync_api import expect, sync_playwright

    def finished(heading: str) -> None:
        expect(page.get_by_role("heading", name=heading)).to_be_visible(timeout=120_000)
        # Streamlit shows its status widget while the script runs; charts draw after it finishes
        expect(page.get_by_test_id("stStatusWidgetRunningIcon")).to_have_count(0, timeout=300_000)
        page.wait_for_timeout(1500)

    def shoot(name: str) -> None:
        path = out / f"dashboard-{name}.png"
        tmp = path.with_name(f".{path.name}.tmp.png")
        page.screenshot(path=str(tmp))
        tmp.replace(path)
        written.append(path)

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with serve(runs, data) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": height})  # the pages scroll inside Streamlit, not the window
        for name, (title, heading) in PAGES.items():
            page.goto(f"{url}/?page={title}&run={run}")
            finished(heading.format(run=run))
            shoot(name)
            if name == "translate" and dicom:  # the page just shot, with the series dropped in
                page.get_by_text("DICOM series", exact=True).first.click()
                page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files([str(f) for f in dicom])
                expect(page.get_by_text("Download this translation (16-bit PNG)")).to_be_visible(timeout=300_000)
                finished(heading.format(run=run))
                shoot("translate-dicom")
        browser.close()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="runs folder (default: runs)")
    parser.add_argument("--data", type=Path, default=Path("data"), help="shards root for the Translate page (default: data)")
    parser.add_argument("--run", default="demo", help="the run the Run and Translate pages show (default: demo)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="where the PNGs go (default: docs/images)")
    parser.add_argument("--dicom", type=Path, nargs="+", help="the files of one DICOM series (or a .zip of it): also shoot the "
                                                               "Translate page with them uploaded")
    args = parser.parse_args()
    for path in screenshots(args.runs.resolve(), args.data.resolve(), args.run, args.out, dicom=args.dicom):
        print(path)


if __name__ == "__main__":
    main()
