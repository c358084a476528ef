"""The approval widget clicked in a real browser: JupyterLab in Debian's Chromium, driven by Playwright.

JupyterLab serves a temporary copy of notebooks/hello on 127.0.0.1. Chromium
opens owner.ipynb and runs its cells up to the first cell that approves in
code (the remaining cells are the code alternative to clicking); the owner's
panel appears. A scientist process joins with the code handed over through
DUET_HANDOFF_FILE and asks for the mean age. The test clicks Accept for the
join and for the value in the panel, while the kernel is idle, and the
scientist prints the value. Screenshots go to test-output/browser/.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests import nbhandoff
from tests.waiting import until

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "test-output" / "browser"
CHROMIUM = os.environ.get("DUET_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

SCIENTIST = r"""
import os, sys
import duet
scientist = duet.join(os.environ["DUET_JOIN_CODE"], name="Dr. Lee", local_only=True, reason="Mean age, from the browser test.")
print("JOINED", flush=True)
value = scientist.store["ages"].mean().get(reason="The average age, for the paper.", timeout=120)
print("VALUE", f"{float(value):.4f}", flush=True)
scientist.close()
"""


def _require_browser():
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright)")
    if missing:
        message = "the real-browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must provide it (.ci/run installs it)")
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    until(answers, timeout, f"jupyter lab answering at {url}")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_accept_in_jupyterlab_delivers_the_value(tmp_path):
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    OUTPUT.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "notebooks"
    shutil.copytree(nbhandoff.NOTEBOOKS / "hello", root)
    cells = json.loads((root / "owner.ipynb").read_text())["cells"]
    run_first = next(i for i, c in enumerate(cells) if "wait_pending" in "".join(c["source"]))

    sig, url = nbhandoff.start_signaling()
    handoff = tmp_path / "join-code"
    env = nbhandoff.base_env(tmp_path, "owner", url)
    jupyter = tmp_path / "jupyter"
    env.update({
        "DUET_HANDOFF_FILE": str(handoff),
        "JUPYTER_CONFIG_DIR": str(jupyter / "config"),
        "JUPYTER_DATA_DIR": str(jupyter / "data"),
        "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(jupyter / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(jupyter / "workspaces"),
    })
    port, token = _free_port(), secrets.token_hex(16)
    lab_log = open(tmp_path / "jupyterlab.log", "w")
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=", "--LabApp.extension_manager=readonly", "--allow-root"],
        env=env, stdout=lab_log, stderr=subprocess.STDOUT, cwd=root,
    )
    scientist = None
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/api/status?token={token}", lab, 60)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1200})
                page.goto(f"{base}/lab/tree/owner.ipynb?token={token}")
                first = page.locator(".jp-NotebookPanel .jp-Cell").first
                expect(first).to_be_visible(timeout=60_000)
                # The kernel is up and idle before keys are sent (else they can land before the notebook listens).
                expect(page.locator(".jp-StatusBar-Widget", has_text="| Idle")).not_to_have_count(0, timeout=60_000)
                # Clear the committed outputs first, so the panel found below is this run's.
                page.get_by_role("menuitem", name="Edit").click()
                page.get_by_role("menuitem", name="Clear Outputs of All Cells").click()
                first.click()
                expect(first).to_have_class(re.compile(r"\bjp-mod-selected\b"), timeout=10_000)
                page.keyboard.press("Escape")
                for _ in range(run_first):
                    page.keyboard.press("Shift+Enter")

                panel = page.locator(".duet-owner-panel")
                expect(panel.get_by_text("Age at admission of 8 patients")).to_be_visible(timeout=60_000)
                code = nbhandoff.wait_for_file(handoff, 30)
                sci_env = nbhandoff.base_env(tmp_path, "scientist", url)
                sci_env["DUET_JOIN_CODE"] = code
                scientist = subprocess.Popen([sys.executable, "-c", SCIENTIST], env=sci_env, cwd=ROOT,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

                join_card = panel.locator(".widget-vbox", has_text="Request #1").last
                expect(join_card).to_contain_text("asks to join", timeout=60_000)
                expect(join_card).to_contain_text("Dr. Lee")
                join_card.get_by_role("button", name="Accept").click()

                release_card = panel.locator(".widget-vbox", has_text="Request #2").last
                expect(release_card).to_contain_text("asks for a value", timeout=60_000)
                expect(release_card).to_contain_text("ages → Tensor.mean")
                expect(release_card).to_contain_text("The average age, for the paper.")
                release_card.get_by_role("button", name="Preview").click()
                expect(release_card).to_contain_text("tensor(45.1250)", timeout=30_000)
                page.screenshot(path=str(OUTPUT / "owner-panel-pending.png"), full_page=True)
                release_card.get_by_role("button", name="Accept").click()

                out, _ = scientist.communicate(timeout=60)
                assert "VALUE 45.1250" in out, out
                expect(panel.locator(".duet-table", has_text="decision")).to_contain_text("accepted", timeout=30_000)
                page.screenshot(path=str(OUTPUT / "owner-panel-accepted.png"), full_page=True)
            except BaseException:
                page.screenshot(path=str(OUTPUT / "failure.png"), full_page=True)
                raise
            finally:
                browser.close()
    finally:
        if scientist is not None and scientist.poll() is None:
            scientist.kill()
            scientist.wait(10)
        lab.terminate()
        try:
            lab.wait(20)
        except subprocess.TimeoutExpired:
            lab.kill()
            lab.wait(10)
        lab_log.close()
        sig.stop()  # type: ignore[attr-defined]
    assert (OUTPUT / "owner-panel-accepted.png").stat().st_size > 0
