"""Screenshots of the Dagster UI as a user sees it, in headless Chromium.

Starts `dagster-webserver -m jobs.definitions` on 127.0.0.1 (a free port) over the instance at
`$DAGSTER_HOME` (default ./.dagster_home, where `make demo` records its runs), opens each page in
headless Chromium through Playwright, saves a PNG per page, and stops the webserver by its PID.
Pages: the runs of each job (the job's Runs tab), every run, and the `daily_assignments` and
`experiment_results` asset pages (the former's checks tab: checks per partition).

    make demo && make bench-setup      # runs to show; Playwright (the bench group)
    apt-get install chromium           # the browser: Debian's (Playwright's own download is not used)
    .venv/bin/python benchmarks/ui_screenshots.py [--out benchmarks/screenshots] [--chromium /usr/bin/chromium]

Prints one line per page: the file, its size, and the distinct runs the page links to. The last
page is the first check's Partitions tab, where the UI shows each day's check status.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("build_graph_job", "publish_assignments_job", "refresh_results_job")
LOCATION = "jobs.definitions"


def pages() -> list[tuple[str, str]]:
    out = [(f"runs_{job}", f"/locations/{LOCATION}/jobs/{job}/runs") for job in JOBS]
    out += [
        ("runs_all", "/runs"),
        ("asset_daily_assignments_checks", "/assets/daily_assignments?view=checks"),
        ("asset_daily_assignments", "/assets/daily_assignments?view=partitions"),
        ("asset_experiment_results", "/assets/experiment_results"),
    ]
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/server_info", timeout=2):
                return
        except Exception:
            time.sleep(0.5)
    raise SystemExit(f"the Dagster webserver did not answer at {url} within {seconds:.0f}s")


def shown(target: Path, path: str, page) -> None:
    """One line per page: the file, its size, and the distinct runs it links to (the runs a
    Runs tab lists; Dagster draws its tables with divs, so rows are counted by their run links)."""
    links = page.locator("a[href*='/runs/']")
    runs = {h.rstrip("/").rsplit("/", 1)[-1] for h in (links.nth(i).get_attribute("href") or "" for i in range(links.count()))
            if "/runs/" in h}
    where = target.relative_to(ROOT) if target.is_relative_to(ROOT) else target
    print(f"{where}: {target.stat().st_size // 1024} KB, {len(runs)} run(s) linked on the page ({path})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "screenshots"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--settle", type=float, default=6.0, help="seconds to let each page finish loading")
    args = parser.parse_args()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit("Playwright is not installed: make bench-setup") from None
    if not Path(args.chromium).exists():
        raise SystemExit(f"no Chromium at {args.chromium}: apt-get install chromium (or --chromium PATH)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PRICELAB_DEMO": os.environ.get("PRICELAB_DEMO", "1")}
    env.setdefault("DAGSTER_HOME", str(ROOT / ".dagster_home"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    webserver = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster-webserver")), "-m", LOCATION, "-h", "127.0.0.1", "-p", str(port)],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_until_up(url, 180)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            for name, path in pages():
                page.goto(url + path, wait_until="networkidle", timeout=120_000)
                page.wait_for_timeout(args.settle * 1000)
                target = out / f"{name}.png"
                page.screenshot(path=str(target), full_page=False)
                shown(target, path, page)
            # the first check's own Partitions tab: the per-day statuses the UI derives for it
            page.goto(url + "/assets/daily_assignments?view=checks", wait_until="networkidle", timeout=120_000)
            page.wait_for_timeout(args.settle * 1000)
            page.get_by_text("Partitions", exact=True).last.click()
            page.wait_for_timeout(args.settle * 1000)
            target = out / "asset_daily_assignments_check_partitions.png"
            page.screenshot(path=str(target), full_page=False)
            shown(target, "(checks, first check, Partitions tab)", page)
            browser.close()
    finally:
        os.killpg(webserver.pid, signal.SIGTERM)
        try:
            webserver.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(webserver.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
