"""The page in a real browser: Playwright driving Debian's Chromium (DESIGN.md section 7)
against the embedded service on the real PostgreSQL, Redis and Celery worker.

A user uploads a real recording from the page, starts an infer job, waits for it to
succeed in the jobs table, opens the viewer and moves the frame slider; the overlaid frame
must change. Screenshots are kept in ``test-artifacts/`` (CALSEG_TEST_ARTIFACTS).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from calseg.demo import CHROMIUM_ARGS

pytestmark = pytest.mark.integration

CHROMIUM = Path(os.environ.get("CALSEG_CHROMIUM", "/usr/bin/chromium"))
SHOTS = Path(os.environ.get("CALSEG_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing: run scripts/system-deps.sh (Debian's chromium)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))
        yield b
        b.close()


def _frame_digest(page) -> str:
    """sha256 of the viewer's frame as the browser decoded and drew it."""
    png = page.locator("#frame-img").screenshot()
    return hashlib.sha256(png).hexdigest()


def test_upload_segment_and_browse_frames(service, client, browser) -> None:
    real = Path(service.settings.real_data_dir) / "astrocast_sample_1.tiff"
    if not real.exists():
        pytest.skip(f"real recording {real} missing (set CALSEG_REAL_DATA_DIR)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(service.url + "/")
    page.wait_for_selector("#service-status")

    # upload from the form and start a (fast) baseline infer job
    page.set_input_files("#upload-file", str(real))
    page.select_option("#upload-method", "baseline")
    page.get_by_role("button", name="Upload and segment").click()
    page.wait_for_function(
        "document.querySelector('#upload-status').textContent.includes('queued')", timeout=60_000
    )
    recs = client.get("/api/recordings").json()
    recs = recs.get("items", recs) if isinstance(recs, dict) else recs
    rec = next(r for r in recs if r["filename"] == "astrocast_sample_1.tiff")
    assert (rec["n_frames"], rec["height"], rec["width"]) == (75, 100, 100)
    # the jobs table shows the job, which ends succeeded
    page.wait_for_selector("#jobs-body tr:has-text('infer'):has-text('succeeded')", timeout=180_000)
    page.screenshot(path=str(SHOTS / "page_jobs.png"), full_page=True)

    # the viewer opened on the job: move the slider, the frame changes
    page.wait_for_selector("#viewer:not([hidden]) #frame-img[src]", timeout=60_000)
    page.wait_for_function("document.querySelector('#frame-img').complete", timeout=30_000)
    slider = page.locator("#frame-slider")
    assert slider.get_attribute("max") == "74"  # astrocast_sample_1.tiff holds 75 frames
    first_src = page.locator("#frame-img").get_attribute("src")
    first = _frame_digest(page)
    slider.fill("12")
    page.wait_for_function(
        f"document.querySelector('#frame-img').src.indexOf('{first_src}') < 0"
        " && document.querySelector('#frame-img').complete",
        timeout=30_000,
    )
    page.wait_for_timeout(300)
    assert page.locator("#frame-label").text_content().startswith("12")
    assert _frame_digest(page) != first
    page.screenshot(path=str(SHOTS / "page_viewer.png"), full_page=True)

    # on the frame with the most labelled pixels, the overlay toggle changes the drawn frame
    jobs = client.get("/api/jobs", params={"kind": "infer"}).json()
    job = (jobs.get("items", jobs) if isinstance(jobs, dict) else jobs)[0]
    tif = client.get(f"/api/jobs/{job['id']}/artifacts/labels.tif")
    assert tif.status_code == 200
    labels = tifffile.imread(io.BytesIO(tif.content))
    assert labels.shape == (75, 100, 100)
    busiest = int(np.argmax((labels.reshape(75, -1) > 0).sum(axis=1)))
    assert labels[busiest].any(), "the baseline found no active cell in the recording"
    slider.fill(str(busiest))
    page.wait_for_function(
        f"document.querySelector('#frame-img').src.includes('/frames/{busiest}.png')"
        " && document.querySelector('#frame-img').complete",
        timeout=30_000,
    )
    page.wait_for_timeout(300)
    with_overlay = _frame_digest(page)
    page.locator("#overlay-toggle").uncheck()
    page.wait_for_function("document.querySelector('#frame-img').src.includes('overlay=0')")
    page.wait_for_function("document.querySelector('#frame-img').complete")
    page.wait_for_timeout(300)
    assert _frame_digest(page) != with_overlay

    # click a cell of the busiest frame: its dF/F trace is drawn, the caption names it
    from scipy import ndimage

    inside = ndimage.distance_transform_edt(labels[busiest] > 0)
    y, x = np.unravel_index(int(np.argmax(inside)), inside.shape)  # deepest labelled pixel
    cell = int(labels[busiest, y, x])
    outside = ndimage.distance_transform_edt(labels[busiest] == 0)
    by, bx = np.unravel_index(int(np.argmax(outside)), outside.shape)  # farthest from cells
    page.locator("#overlay-toggle").check()  # the cells drawn, as a user would click them
    page.wait_for_function(
        "document.querySelector('#frame-img').src.includes('overlay=1')"
        " && document.querySelector('#frame-img').complete"
    )
    page.locator("#frame-img").scroll_into_view_if_needed()

    def click_pixel(px: int, py: int) -> None:
        """Click the centre of image pixel (px, py), in CSS pixels of the displayed image."""
        box = page.evaluate(
            """() => { const i = document.querySelector('#frame-img');
                const r = i.getBoundingClientRect();
                return {left: r.left + i.clientLeft, top: r.top + i.clientTop,
                        w: i.clientWidth, h: i.clientHeight,
                        nw: i.naturalWidth, nh: i.naturalHeight}; }"""
        )
        assert (box["nw"], box["nh"]) == (100, 100)
        scale = min(box["w"] / box["nw"], box["h"] / box["nh"])  # object-fit: contain
        left = box["left"] + (box["w"] - box["nw"] * scale) / 2
        top = box["top"] + (box["h"] - box["nh"] * scale) / 2
        page.mouse.click(left + (px + 0.5) * scale, top + (py + 0.5) * scale)

    click_pixel(int(bx), int(by))
    page.wait_for_function(
        "document.querySelector('#trace-caption').textContent.includes('no cell here')",
        timeout=15_000,
    )
    click_pixel(int(x), int(y))
    page.wait_for_function(
        "document.querySelector('#trace-plot svg path.trace-line')", timeout=15_000
    )
    assert page.locator("#trace-caption").text_content().strip() == f"cell {cell}"
    assert page.locator("#trace-caption").get_attribute("aria-live") == "polite"
    plot = page.locator("#trace-plot svg")
    assert plot.get_attribute("role") == "img"
    assert f"cell {cell}" in plot.get_attribute("aria-label")
    d = page.locator("#trace-plot path.trace-line").get_attribute("d")
    points = d.count("L") + d.count("M")
    assert points >= 50, f"trace path has only {points} points: {d[:200]}"  # 75 frames
    assert page.locator("#trace-marker").get_attribute("data-frame") == str(busiest)
    assert page.get_by_text("time (s)").count() == 1 and page.get_by_text("dF/F").count() >= 1
    page.screenshot(path=str(SHOTS / "page_trace.png"), full_page=True)
    assert errors == [], f"JavaScript errors on the page: {errors}"

    # a stale link says what is wrong; following a #job= link (or Back) switches jobs
    page.evaluate("location.hash = '#job=no-such-job'")
    page.wait_for_function(
        "!document.querySelector('#detail').hidden"
        " && document.querySelector('#detail-title').textContent.includes('no-such-job')",
        timeout=15_000,
    )
    assert "no job no-such-job" in page.locator("#detail-fields").text_content()
    assert page.locator("#viewer").is_hidden()
    page.evaluate(f"location.hash = '#job={job['id']}'")
    page.wait_for_function(
        f"document.querySelector('#detail-title').textContent.includes('{job['id']}')",
        timeout=15_000,
    )
    page.wait_for_selector("#viewer:not([hidden])", timeout=15_000)
    page.go_back()  # back to the stale link
    page.wait_for_function(
        "document.querySelector('#detail-title').textContent.includes('no-such-job')",
        timeout=15_000,
    )
    assert errors == [], f"JavaScript errors on the page: {errors}"
