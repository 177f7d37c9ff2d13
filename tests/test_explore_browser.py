"""The real thing: `python explore.py` serves the app. Over Streamlit's websocket (no browser):
the first page and a density click sent as the browser sends it. In headless system Chromium
(Playwright): choose a latent and wait for its gallery, click a point of the density scatter,
choose a patch on the Image page; a second explorer on the same port is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from discovery_helpers import SHARED, TRAIT_A, planted_sae, planted_store
from explore_helpers import ServedSession, element_texts

from traitsae.explore.session import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def explore_command(root: Path, port: int) -> list[str]:
    return [
        sys.executable,
        str(REPO / "explore.py"),
        f"run={root / 'run'}",
        f"paths.activations_dir={root / 'activations'}",
        f"explore.image_root={root / 'images'}",
        "explore.resize_mode=stretch",
        f"explore.port={port}",
        "explore.browser=false",
        f"hydra.run.dir={root / 'explore'}",
    ]


def wait_until_served(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            with urllib.request.urlopen(url + "_stcore/health", timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"explorer did not answer at {url}")


def click_density_right_half(page) -> None:
    """Click the density scatter right of its middle, halfway up: the nearest point is the
    rightmost one, SHARED (it fires on twice the patches of the trait latents)."""
    chart = page.locator('[data-testid="stVegaLiteChart"]').first
    chart.scroll_into_view_if_needed()
    bounds = chart.bounding_box()  # the plot area spans most of it (axis left, legend right)
    page.mouse.click(bounds["x"] + 0.7 * bounds["width"], bounds["y"] + 0.5 * bounds["height"])


@pytest.fixture
def served(tmp_path):
    planted_sae(tmp_path / "run", planted_store(tmp_path, n_per_group=12))
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        explore_command(tmp_path, port),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the Streamlit child goes down with it
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_served(proc, url)
        yield tmp_path, port, url, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_served_page_and_density_click_over_the_websocket(served):
    pytest.importorskip("websockets.sync.client")  # a Streamlit dependency since its 1.5x
    from streamlit.runtime.state.common import user_key_from_element_id

    from traitsae.explore.draw import DENSITY_PICK

    _, port, _, _ = served
    session = ServedSession(port)
    page = session.run()
    kinds = [e.WhichOneof("type") for e in page]
    assert "exception" not in kinds and not element_texts(page, "alert"), element_texts(
        page, "alert"
    )
    assert element_texts(page, "heading")[:2] == ["Latents", "Top images of latent 0"]
    assert sum(len(e.imgs.imgs) for e in page if e.WhichOneof("type") == "imgs") == 12
    density = next(
        e.vega_lite_chart.id
        for e in page
        if e.WhichOneof("type") == "vega_lite_chart"
        and user_key_from_element_id(e.vega_lite_chart.id) == "density"
    )
    click = json.dumps({"selection": {DENSITY_PICK: [{"latent": SHARED}]}})
    page = session.run({density: click})  # the chart's on_select callback runs first
    session.close()
    assert f"Top images of latent {SHARED}" in element_texts(page, "heading")
    assert sum(len(e.imgs.imgs) for e in page if e.WhichOneof("type") == "imgs") == 16


@pytest.mark.skipif(CHROMIUM is None, reason="no system chromium (CI installs it in .ci/run)")
def test_browser_chooses_a_latent_and_sees_its_gallery(served):
    from playwright.sync_api import expect, sync_playwright

    root, port, url, env = served
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.goto(url, wait_until="networkidle", timeout=120_000)
        expect(page.get_by_role("heading", name="Latents")).to_be_visible(timeout=120_000)
        # The first script run imports torch and loads the codes: give a loaded machine time.
        box = page.locator('[data-testid="stNumberInput"] input').first
        expect(box).to_be_visible(timeout=240_000)
        box.fill(str(TRAIT_A))
        box.press("Enter")
        caption = page.get_by_text("001.Alpha #", exact=False).first
        expect(caption).to_be_visible(timeout=120_000)
        gallery = page.locator('[data-testid="stImage"] img')
        expect(gallery.first).to_be_visible(timeout=60_000)
        assert gallery.count() >= 12
        shot = root / "explorer.png"
        page.screenshot(path=str(shot), full_page=True)
        click_density_right_half(page)
        expect(page.get_by_text(f"Top images of latent {SHARED}")).to_be_visible(timeout=60_000)
        # the widget takes the clicked latent on Streamlit's next render: wait for it
        expect(box).to_have_value(str(SHARED), timeout=60_000)
        page.get_by_text("Image", exact=True).first.click()  # the sidebar's page choice
        # The chart's own drawing (Vega's svg or canvas, class "marks"): its centre is a patch.
        grid = page.locator('[data-testid="stVegaLiteChart"] .marks').first
        expect(grid).to_be_visible(timeout=120_000)
        page.wait_for_timeout(1000)  # Vega attaches its event handlers after the first render
        bounds = grid.bounding_box()
        page.mouse.click(bounds["x"] + bounds["width"] / 2, bounds["y"] + bounds["height"] / 2)
        try:
            expect(page.get_by_text("Latents firing on the 1 chosen patches")).to_be_visible(
                timeout=60_000
            )
        finally:
            page.screenshot(path=str(root / "image_page.png"), full_page=True)
        assert "Traceback" not in page.content()
        browser.close()
    assert shot.stat().st_size > 10_000

    # A second explorer on the same port: one clear line, exit status 2, no traceback.
    second = subprocess.run(
        explore_command(root, port), env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 2, second.stderr
    assert f"error: port {port} on 127.0.0.1 is in use" in second.stderr
    assert "Traceback" not in second.stderr
