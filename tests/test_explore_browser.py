"""The real thing: `python explore.py` serves the app. Over Streamlit's websocket (no browser):
the first page and a density click sent as the browser sends it. In headless system Chromium
(Playwright) at a laptop's 1440 x 900: plain column names, the chosen latent's top images and
their colour bar in the first viewport, a latent reopened from its URL, a density click, a patch
chosen on the Image page, Search and Compare, the Steer curve rising (on the second generated
set, where steering works), the server gone after SIGTERM; a second explorer on the same port is
refused. The screenshots go to docs/guide/img/explore_<page>.png, which the README and the guide
show."""

from __future__ import annotations

import contextlib
import io
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
from discovery_helpers import SHARED, TRAIT_A, TRAIT_B, planted_sae, planted_store
from explore_helpers import COLOUR_BAR as COLOUR_BAR_CLASS
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
        "dataset.contrast.group_a={species: 001.Alpha}",  # the planted store's species
        "dataset.contrast.group_b={species: 002.Beta}",
    ]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "_stcore/health", timeout=1):
            return True
    except OSError:
        return False


def wait_until_served(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        if answers(url):
            return
        time.sleep(0.5)
    raise AssertionError(f"explorer did not answer at {url}")


def click_density_right_half(page) -> None:
    """Click the density scatter right of its middle, halfway up: the nearest point is the
    rightmost one, SHARED (it fires on twice the patches of the trait latents)."""
    chart = page.locator('[data-testid="stVegaLiteChart"]').first
    chart.scroll_into_view_if_needed()
    bounds = chart.bounding_box()  # the plot area spans most of it (axis left, legend right)
    page.mouse.click(bounds["x"] + 0.7 * bounds["width"], bounds["y"] + 0.5 * bounds["height"])


def click_until(page, chart, text: str, tries: int = 4) -> None:
    """Click the middle of `chart` until `text` shows: Vega attaches its event handlers some
    time after the chart is drawn (later on a loaded machine), and a click before is lost."""
    from playwright.sync_api import expect

    for attempt in range(tries):
        page.wait_for_timeout(1000 * (attempt + 1))
        bounds = chart.bounding_box()
        page.mouse.click(bounds["x"] + bounds["width"] / 2, bounds["y"] + bounds["height"] / 2)
        try:
            expect(page.get_by_text(text)).to_be_visible(timeout=20_000)
            return
        except AssertionError:
            if attempt == tries - 1:
                raise


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
        yield tmp_path, port, url, env, proc
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever the test left running
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_served_page_and_density_click_over_the_websocket(served):
    pytest.importorskip("websockets.sync.client")  # a Streamlit dependency since its 1.5x
    from streamlit.runtime.state.common import user_key_from_element_id

    from traitsae.explore.draw import DENSITY_PICK

    _, port, _, _, _ = served
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


VIEWPORT = {"width": 1440, "height": 900}  # a laptop screen
DOCS_IMG = REPO / "docs" / "guide" / "img"  # the screenshots the README and guide show
MAX_SHOT_BYTES = 150_000


def wait_idle(page, timeout_ms: float = 120_000) -> None:
    """Until Streamlit's script run has finished (its "running" widget is gone)."""
    from playwright.sync_api import expect

    page.wait_for_timeout(300)
    expect(page.locator('[data-testid="stStatusWidget"]')).to_have_count(0, timeout=timeout_ms)
    page.wait_for_timeout(300)


def save_shot(page, name: str) -> Path:
    """The first viewport as docs/guide/img/explore_<name>.png, scaled to 1080 px and reduced to
    a 128-colour palette (small enough for the repo; the docs always show the current app)."""
    from PIL import Image

    wait_idle(page)
    picture = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    picture = picture.resize((1080, round(1080 * picture.height / picture.width)), Image.LANCZOS)
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    path = DOCS_IMG / f"explore_{name}.png"
    partial = path.with_suffix(".tmp.png")
    picture.quantize(colors=128).save(partial, optimize=True)
    partial.replace(path)
    assert path.stat().st_size <= MAX_SHOT_BYTES, (path, path.stat().st_size)
    return path


def in_first_viewport(locator) -> bool:
    box = locator.bounding_box()
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"]


def open_page(page, name: str) -> None:
    page.get_by_text(name, exact=True).first.click()  # the sidebar's page choice
    expect_heading(page, name)


def expect_heading(page, name: str) -> None:
    from playwright.sync_api import expect

    expect(page.get_by_role("heading", name=name, exact=True)).to_be_visible(timeout=120_000)


@pytest.mark.skipif(CHROMIUM is None, reason="no system chromium (CI installs it in .ci/run)")
def test_browser_at_laptop_size(served):
    """What a user sees at 1440 x 900: plain column names, the latent's top images and their
    colour bar in the first viewport, a latent reopened from its URL, the density click, a
    patch chosen on the Image page, Search and Compare; then SIGTERM ends the server."""
    from playwright.sync_api import expect, sync_playwright

    root, port, url, env, proc = served
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(url, wait_until="networkidle", timeout=120_000)
        expect_heading(page, "Latents")
        # The first script run imports torch and loads the codes: give a loaded machine time.
        box = page.locator('[data-testid="stNumberInput"] input').first
        expect(box).to_be_visible(timeout=240_000)
        headers = page.locator('[data-testid="stDataFrame"] th').all_inner_texts()
        assert {"images firing", "patches firing", "label mix (bits)"} <= set(headers), headers
        assert not [h for h in headers if "_" in h], headers  # no code identifiers
        box.fill(str(TRAIT_A))
        box.press("Enter")
        expect(page.get_by_text(f"Top images of latent {TRAIT_A}")).to_be_visible(timeout=120_000)
        expect(page.get_by_text("Alpha · ", exact=False).first).to_be_visible(timeout=120_000)
        gallery = page.locator('[data-testid="stImage"] img')
        expect(gallery.first).to_be_visible(timeout=60_000)
        assert gallery.count() >= 12
        assert in_first_viewport(gallery.first), gallery.first.bounding_box()
        bar = page.locator(f".{COLOUR_BAR_CLASS}").first
        table = page.locator('[data-testid="stDataFrame"]').first
        assert in_first_viewport(bar) and table.bounding_box()["y"] < VIEWPORT["height"] / 2
        page.wait_for_timeout(500)
        assert f"latent={TRAIT_A}" in page.url
        save_shot(page, "latents")

        # The link reopens the app on that latent.
        other = browser.new_page(viewport=VIEWPORT)
        other.goto(f"{url}?page=Latents&latent={TRAIT_B}", wait_until="networkidle")
        expect(other.get_by_text(f"Top images of latent {TRAIT_B}")).to_be_visible(timeout=120_000)
        expect(other.locator('[data-testid="stNumberInput"] input').first).to_have_value(
            str(TRAIT_B), timeout=60_000
        )
        other.close()

        click_density_right_half(page)
        expect(page.get_by_text(f"Top images of latent {SHARED}")).to_be_visible(timeout=60_000)
        expect(box).to_have_value(str(SHARED), timeout=60_000)

        open_page(page, "Image")
        # The chart's own drawing (Vega's svg or canvas, class "marks"): its centre is a patch.
        grid = page.locator('[data-testid="stVegaLiteChart"] .marks').first
        expect(grid).to_be_visible(timeout=120_000)
        click_until(page, grid, "Latents firing on the 1 chosen patches")
        assert page.locator(f".{COLOUR_BAR_CLASS}").count() >= 3  # chosen map, top maps, error
        page.locator('[data-testid="stMain"]').first.evaluate("e => e.scrollTo(0, 0)")
        save_shot(page, "image")

        open_page(page, "Search by example")
        page.get_by_label("positive: add all of").first.click()
        page.get_by_role("option", name="species").click()
        expect(page.get_by_text("Latents that fire on the positives")).to_be_visible(timeout=60_000)
        expect(page.get_by_text("+ Alpha", exact=False).first).to_be_visible(timeout=60_000)
        save_shot(page, "search")

        open_page(page, "Compare groups")
        expect(page.get_by_text("AUROC for group A", exact=False).first).to_be_visible(
            timeout=120_000
        )
        save_shot(page, "compare")

        open_page(page, "Guess the image")
        expect(page.get_by_role("button", name="this one").first).to_be_visible(timeout=60_000)
        save_shot(page, "guess")
        assert "Traceback" not in page.content()
        browser.close()

    # A second explorer on the same port: one clear line, exit status 2, no traceback.
    second = subprocess.run(
        explore_command(root, port), env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 2, second.stderr
    assert f"error: port {port} on 127.0.0.1 is in use" in second.stderr
    assert "Traceback" not in second.stderr

    # SIGTERM to explore.py alone (as `kill <pid>` sends it): the server goes with it.
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while answers(url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not answers(url), f"the server still answers at {url} after SIGTERM"


def steer_demo_command(root: Path, port: int, out: Path) -> list[str]:
    """`explore.py` on `make demo`'s steering SAE (causal_helpers.steer_demo_root)."""
    return [
        sys.executable,
        str(REPO / "explore.py"),
        f"run={root / 'steer-train'}",
        f"paths.root_dir={root}",
        f"explore.port={port}",
        "explore.browser=false",
        f"hydra.run.dir={out}",
    ]


@pytest.mark.skipif(CHROMIUM is None, reason="no system chromium (CI installs it in .ci/run)")
def test_browser_steer_curve_rises_on_the_demo(tmp_path):
    """The Steer page runs eval=steer on `make demo`'s steering set-up (backbone=tiny_maxpool,
    SAE at block 2, target DEMO_STEER_TARGET): the curve over alpha rises and beats the
    random-latent control, as the page says."""
    from causal_helpers import makefile_value, steer_demo_root
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path])}
    proc = subprocess.Popen(
        steer_demo_command(steer_demo_root(), port, tmp_path / "explore"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_served(proc, url)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
            )
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(f"{url}?page=Steer", wait_until="networkidle", timeout=120_000)
            expect_heading(page, "Steer")
            page.get_by_label("target class").first.click()
            page.get_by_role("option", name=makefile_value("DEMO_STEER_TARGET")).click()
            wait_idle(page)
            page.get_by_role("button", name="run eval=steer").click()
            expect(page.get_by_text("rises at every alpha: yes", exact=False)).to_be_visible(
                timeout=600_000
            )
            expect(page.get_by_text("beats random latents at every alpha > 0: yes")).to_be_visible()
            expect(page.locator('[data-testid="stVegaLiteChart"]').first).to_be_visible()
            save_shot(page, "steer")
            assert "Traceback" not in page.content()
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
