"""The page in a real browser: Playwright driving Debian's Chromium (DESIGN.md section 7)
against the embedded service on the real PostgreSQL, Redis and Celery worker.

A user signs in with an API token (sign-in box and ``#token=``), starts a simulate job and, after
uploading a real recording (progress bar, metadata, preview), an infer job from the forms
generated from the parameter schemas (only non-default values sent; client-side and server 422
messages next to the fields), waits for it in the jobs dashboard, opens it with the keyboard,
and uses the viewer: slider, play, overlay options, zoom and pan, display range, a clicked cell's
dF/F trace, the cell list, downloads (sha256 checked); ground truth instead of / beside the
prediction on the simulated video. A fine-tune's training curves (updated while it runs, then
cancelled from the dashboard) and the model comparison are drawn from metrics stored in the
database as the worker writes them. Screenshots go to ``test-artifacts/``
(CALSEG_TEST_ARTIFACTS); the path is printed.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
import uuid
from pathlib import Path

import httpx
import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from calseg.demo import CHROMIUM_ARGS
from calseg.io.tables import read_events_csv

pytestmark = pytest.mark.integration

CHROMIUM = Path(os.environ.get("CALSEG_CHROMIUM", "/usr/bin/chromium"))
SHOTS = Path(os.environ.get("CALSEG_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))
REAL = "astrocast_sample_1.tiff"  # (75, 100, 100) uint16 astrocyte recording
SIM = {"n_videos": 3, "n_frames": 6, "height": 96, "width": 128, "seed": 5}


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing: run scripts/system-deps.sh (Debian's chromium)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))
        yield b
        b.close()


@pytest.fixture(scope="module")
def user(service) -> dict:
    """A fresh non-admin user with a token, made on the service's database."""
    from calseg.service.auth import create_token, create_user
    from calseg.service.db import session_scope

    name = f"browser-{uuid.uuid4().hex[:6]}"
    with session_scope(service.settings.database_url) as session:
        u = create_user(session, name)
        _, token = create_token(session, u, "browser-test")
        return {"id": u.id, "name": name, "token": token}


@pytest.fixture(scope="module")
def api(service, user) -> httpx.Client:
    with httpx.Client(
        base_url=service.url, timeout=60, headers={"Authorization": f"Bearer {user['token']}"}
    ) as c:
        yield c


def _canvas_digest(page) -> str:
    """sha256 of the viewer canvas's pixels (RGBA, as drawn)."""
    data = page.evaluate(
        """() => { const c = document.querySelector('#view-canvas');
            return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data
              .filter((_, i) => i % 4 !== 3)).join(','); }"""
    )
    return hashlib.sha256(data.encode()).hexdigest()


def _wait_frame(page, predicate: str = "true", timeout: int = 30_000) -> None:
    """Wait until the canvas shows a frame whose request URL satisfies ``predicate`` (JS,
    with ``src`` and ``frame`` bound) and no frame request is pending."""
    page.wait_for_function(
        f"""() => {{ const c = document.querySelector('#view-canvas');
            const src = c.dataset.src || '', frame = c.dataset.frame;
            return src !== '' && ({predicate}) && src === c.dataset.src; }}""",
        timeout=timeout,
    )
    page.wait_for_timeout(150)


def _transform(page) -> tuple[float, float, float]:
    s, tx, ty = page.locator("#view-canvas").get_attribute("data-transform").split()
    return float(s), float(tx), float(ty)


def _click_pixel(page, px: int, py: int) -> None:
    """Click the centre of image pixel (px, py) of the frame drawn on the canvas (scrolled
    into the viewport first: the mouse only reaches what is on screen)."""
    page.evaluate("document.querySelector('#view-canvas').scrollIntoView({block: 'center'})")
    scale, tx, ty = _transform(page)
    box = page.evaluate(
        """() => { const c = document.querySelector('#view-canvas');
            const r = c.getBoundingClientRect();
            return {left: r.left, top: r.top, fx: r.width / c.width, fy: r.height / c.height}; }"""
    )
    x = box["left"] + (tx + (px + 0.5) * scale) * box["fx"]
    y = box["top"] + (ty + (py + 0.5) * scale) * box["fy"]
    page.mouse.click(x, y)


def _fake_jobs(service, user: dict, dataset_job_id: str) -> tuple[str, str]:
    """A running finetune job with a training curve and a succeeded evaluate job with metrics
    per model, stored in the database as the worker would (no GPU run needed)."""
    from calseg.service.db import session_scope
    from calseg.service.models import Job, Metric

    with session_scope(service.settings.database_url) as s:
        ft = Job(kind="finetune", state="running", params={}, progress=0.4, stage="train",
                 owner_id=user["id"])  # fmt: skip
        ev = Job(kind="evaluate", state="succeeded", progress=1.0, result={},
                 params={"dataset_job_id": dataset_job_id}, owner_id=user["id"])  # fmt: skip
        s.add_all([ft, ev])
        s.flush()
        for step in range(1, 41):  # as calseg.service.runners.TrainingCurve records them
            s.add(Metric(job_id=ft.id, name="loss", value=2.0 / step, subset="train", step=step))
            s.add(
                Metric(job_id=ft.id, name="train_iou", value=step / 50, subset="train", step=step)
            )
        for step in (10, 20, 30, 40):
            s.add(
                Metric(
                    job_id=ft.id, name="val_iou", value=0.2 + step / 100, subset="val", step=step
                )
            )
        for model, iou in (("SAM2 fine-tuned", 0.71), ("SAM2 untuned", 0.42), ("classical", 0.35)):
            s.add(Metric(job_id=ev.id, name="iou", value=iou, model=model, subset="test"))
            s.add(Metric(job_id=ev.id, name="dice", value=iou + 0.1, model=model, subset="test"))
        return ft.id, ev.id


def test_sign_in_upload_infer_and_view(service, browser, user, api, real_file) -> None:
    real = real_file(REAL)
    SHOTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots in {SHOTS}")
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    # --- sign in: a wrong token is refused, the sign-in box takes a good one, sign out
    page.goto(service.url + "/")
    page.wait_for_selector("#signin:not([hidden])")
    page.fill("#token-input", "cs_" + "x" * 43)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_function(
        "document.querySelector('#signin-error').textContent.includes('invalid or revoked')"
    )
    assert page.locator("#app").is_hidden()
    page.fill("#token-input", user["token"])
    page.keyboard.press("Enter")
    page.wait_for_selector("#app:not([hidden])")
    assert page.locator("#user-name").text_content() == user["name"]
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_selector("#signin:not([hidden])")
    assert page.evaluate("localStorage.getItem('calseg.token')") is None
    # ... and #token= in the address signs in, then leaves the address bar
    page.goto(f"{service.url}/#token={user['token']}")
    page.wait_for_selector("#app:not([hidden])")
    page.wait_for_function(f"document.querySelector('#user-name').textContent === '{user['name']}'")
    assert "token" not in page.evaluate("location.href")
    # stored by the sign-in (waited for: on a loaded CI machine the check once ran first)
    page.wait_for_function(f"localStorage.getItem('calseg.token') === '{user['token']}'")

    # --- the simulate form (a small dataset for the ground-truth views, made meanwhile):
    # inputs by type, defaults shown, a nested object as collapsible JSON
    page.select_option("#job-kind", "simulate")
    page.wait_for_selector("#f-simulate-n_videos")
    assert page.locator("#f-simulate-integrator").input_value() == '"euler"'  # enum default
    checks = page.locator("#f-simulate-pattern_classes input[type=checkbox]")
    checked = {checks.nth(i).get_attribute("value") for i in range(4) if checks.nth(i).is_checked()}
    assert checks.count() == 4 and checked == {'"waves"', '"transients"'}  # the default
    page.locator("#job-more").evaluate("d => d.open = true")
    overrides = page.locator("#f-simulate-model_overrides")
    assert overrides.evaluate("e => e.tagName") == "TEXTAREA" and not overrides.is_visible()
    page.locator("details.param-details summary:has-text('model_overrides')").click()
    overrides.fill("{not json")
    for name, value in SIM.items():
        page.fill(f"#f-simulate-{name}", str(value))
    page.get_by_role("button", name="Submit simulate job").click()
    assert "not valid JSON" in page.locator("#f-simulate-model_overrides-err").text_content()
    overrides.fill("")
    with page.expect_request(lambda r: r.url.endswith("/api/jobs") and r.method == "POST") as req:
        page.get_by_role("button", name="Submit simulate job").click()
    assert req.value.post_data_json == {"kind": "simulate", "params": SIM}
    page.wait_for_function(
        "document.querySelector('#job-form-status').textContent.includes('simulate job')"
    )
    sims = api.get("/api/jobs", params={"kind": "simulate"}).json()["items"]
    assert len(sims) == 1 and {k: sims[0]["params"][k] for k in SIM} == SIM
    sim_id = sims[0]["id"]

    # --- upload with progress; metadata and a preview
    page.set_input_files("#upload-file", str(real))
    page.get_by_role("button", name="Upload", exact=True).click()
    page.wait_for_selector("#upload-result:not([hidden])", timeout=60_000)
    page.wait_for_function("document.querySelector('#upload-preview').naturalWidth > 0")
    assert page.locator("#upload-progress").get_attribute("value") == "100"
    assert page.evaluate("document.querySelector('#upload-preview').src").startswith("blob:")
    rec = next(r for r in api.get("/api/recordings").json() if r["filename"] == REAL)
    assert (rec["n_frames"], rec["height"], rec["width"]) == (75, 100, 100)
    meta = page.locator("#upload-meta").text_content()
    assert "frames75" in meta and "100 × 100" in meta and f"data type{rec['dtype']}" in meta
    assert rec["id"] in meta and rec["sha256"] in meta
    # the reader's warnings are shown (this file stores its frames as ImageJ Z slices)
    shown = page.locator("#upload-warnings").text_content()
    assert rec["warnings"] and all(w in shown for w in rec["warnings"]) and "Z slices" in shown

    # --- the infer form, generated from the schema, filled in for the recording
    assert page.locator("#job-kind").input_value() == "infer"
    assert page.locator("#gt-box").is_hidden()  # a real recording has no ground truth
    assert page.locator("#f-infer-recording_id").input_value() == rec["id"]
    assert page.locator("#f-infer-min_region_px").input_value() == "15"  # default shown
    assert "default: 15" in page.locator("#f-infer-min_region_px-hint").text_content()
    page.select_option("#f-infer-method", label="classical")
    page.locator("#job-more").evaluate("d => d.open = true")
    page.fill("#f-infer-min_region_px", "0")  # schema minimum 1: refused in the page
    page.get_by_role("button", name="Submit infer job").click()
    err = page.locator("#f-infer-min_region_px-err")
    assert err.text_content() == "must be ≥ 1"
    assert page.locator("#f-infer-min_region_px").get_attribute("aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "f-infer-min_region_px"
    page.fill("#f-infer-min_region_px", "15")
    page.fill("#f-infer-low_percentile", "99.9")  # above high_percentile: the server says 422
    page.get_by_role("button", name="Submit infer job").click()
    page.wait_for_function(
        "document.querySelector('#f-infer-low_percentile-err').textContent.includes('99.9')"
    )
    assert api.get("/api/jobs", params={"kind": "infer"}).json()["total"] == 0
    page.fill("#f-infer-low_percentile", "0.5")
    with page.expect_request(lambda r: r.url.endswith("/api/jobs") and r.method == "POST") as req:
        # two clicks in one go submit one job (the button is disabled while the request runs)
        page.evaluate("const b = document.querySelector('#job-submit'); b.click(); b.click()")
    # only what differs from the defaults is sent
    assert req.value.post_data_json == {
        "kind": "infer",
        "params": {"recording_id": rec["id"], "method": "classical"},
    }
    page.wait_for_function(
        "document.querySelector('#job-form-status').textContent.includes('queued')"
    )
    page.wait_for_timeout(500)  # a second request, were there one, has arrived by now
    jobs = api.get("/api/jobs", params={"kind": "infer"}).json()["items"]
    assert len(jobs) == 1 and jobs[0]["params"]["method"] == "classical"
    assert jobs[0]["params"]["recording_id"] == rec["id"]
    job_id = jobs[0]["id"]

    # --- the dashboard shows it (owner, progress) until it succeeds; Enter on the row opens it
    row = page.locator(f"#jobs-body tr[data-job-id='{job_id}']")
    row.wait_for()
    assert row.locator("td").nth(4).text_content() == user["name"]
    assert row.locator("td.what").text_content().endswith(f"· {REAL}")  # method · recording
    page.wait_for_selector(
        f"#jobs-body tr[data-job-id='{job_id}']:has-text('succeeded')", timeout=180_000
    )
    page.screenshot(path=str(SHOTS / "page_jobs.png"), full_page=True)
    page.select_option("#filter-state", "failed")
    page.wait_for_selector("#jobs-body:has-text('no jobs match')")
    page.select_option("#filter-state", "")
    row.wait_for()
    row.focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("#viewer:not([hidden])", timeout=30_000)
    _wait_frame(page, "frame === '0'")
    assert page.locator("#frame-slider").get_attribute("max") == "74"

    # the labels, to know where cells are
    job = api.get(f"/api/jobs/{job_id}").json()
    labels = tifffile.imread(
        io.BytesIO(api.get(f"/api/jobs/{job_id}/artifacts/labels.tif").content)
    )
    assert labels.shape == (75, 100, 100)
    busiest = int(np.argmax((labels.reshape(75, -1) > 0).sum(axis=1)))
    assert labels[busiest].any(), "the baseline found no active cell in the recording"
    # two coverages, each named (the page showed one next to the other metric unexplained)
    footprint, mean_frame = (labels > 0).any(axis=0).mean(), (labels > 0).mean()
    assert footprint > mean_frame
    fields = " ".join(page.locator("#result-fields").text_content().split())
    assert (
        f"{100 * footprint:.1f} % of the field labelled in some frame, "
        f"{100 * mean_frame:.1f} % in the mean frame (metric foreground_fraction)"
    ) in fields, fields

    # --- slider: another frame, other pixels; overlay options change the pixels
    first = _canvas_digest(page)
    page.locator("#frame-slider").fill(str(busiest))
    _wait_frame(page, f"frame === '{busiest}' && src.includes('/frames/{busiest}.png')")
    assert page.locator("#frame-label").text_content().startswith(str(busiest))
    with_overlay = _canvas_digest(page)
    assert with_overlay != first
    page.locator("#overlay-toggle").uncheck()
    _wait_frame(page, "src.includes('overlay=0')")
    assert _canvas_digest(page) != with_overlay
    page.locator("#overlay-toggle").check()
    _wait_frame(page, "src.includes('overlay=1')")
    assert _canvas_digest(page) == with_overlay
    page.locator("#opacity").fill("1")
    _wait_frame(page, "src.includes('alpha=1&')")
    opaque = _canvas_digest(page)
    assert opaque != with_overlay
    page.select_option("#style-select", "outline")
    _wait_frame(page, "src.includes('style=outline')")
    assert _canvas_digest(page) not in (opaque, with_overlay)
    page.select_option("#style-select", "both")
    page.select_option("#colors-select", "single")
    _wait_frame(page, "src.includes('colors=single') && src.includes('style=both')")
    assert _canvas_digest(page) not in (opaque, with_overlay)
    page.select_option("#colors-select", "instance")
    page.locator("#opacity").fill("0.45")
    _wait_frame(page, "src.includes('alpha=0.45') && src.includes('style=both')")
    assert _canvas_digest(page) == with_overlay

    # --- display range (16-bit data): a narrower range changes the pixels
    lo, hi = (
        float(page.locator("#range-lo").input_value()),
        float(page.locator("#range-hi").input_value()),
    )
    assert hi > lo
    page.fill("#range-hi", str(lo + (hi - lo) / 4))
    _wait_frame(page, "src.includes('hi=')")
    assert _canvas_digest(page) != with_overlay
    page.get_by_role("button", name="Auto range").click()
    _wait_frame(page, "!src.includes('hi=')")
    assert _canvas_digest(page) == with_overlay

    # --- click a cell: its dF/F trace is drawn; background says so
    from scipy import ndimage

    inside = ndimage.distance_transform_edt(labels[busiest] > 0)
    y, x = np.unravel_index(int(np.argmax(inside)), inside.shape)  # deepest labelled pixel
    cell = int(labels[busiest, y, x])
    outside = ndimage.distance_transform_edt(labels[busiest] == 0)
    by, bx = np.unravel_index(int(np.argmax(outside)), outside.shape)  # farthest from cells
    _click_pixel(page, int(bx), int(by))
    page.wait_for_function(
        "document.querySelector('#trace-caption').textContent.includes('no cell here')"
    )
    _click_pixel(page, int(x), int(y))
    page.wait_for_function("document.querySelector('#trace-plot svg path.trace-line')")
    assert page.locator("#trace-caption").text_content().strip() == f"cell {cell}"
    plot = page.locator("#trace-plot svg")
    assert plot.get_attribute("role") == "img" and f"cell {cell}" in plot.get_attribute(
        "aria-label"
    )
    d = page.locator("#trace-plot path.trace-line").get_attribute("d")
    points = d.count("L") + d.count("M")
    assert points >= 50, f"trace path has only {points} points: {d[:200]}"  # 75 frames
    assert page.locator("#trace-marker").get_attribute("data-frame") == str(busiest)
    page.screenshot(path=str(SHOTS / "page_viewer.png"), full_page=True)

    # --- zoom (wheel) and pan (drag) change the transform; Reset view restores it
    fit = _transform(page)
    page.evaluate("document.querySelector('#view-canvas').scrollIntoView({block: 'center'})")
    box = page.locator("#view-canvas").bounding_box()  # in the viewport: the mouse reaches it
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.wheel(0, -300)
    page.wait_for_function(
        f"document.querySelector('#view-canvas').dataset.transform.split(' ')[0] > {fit[0]}"
    )
    zoomed = _transform(page)
    assert zoomed[0] > fit[0] * 1.2
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 60, cy + 30, steps=5)
    page.mouse.up()
    page.wait_for_function(
        "document.querySelector('#view-canvas').dataset.transform.split(' ')[1]"
        f" > {zoomed[1] + 40}",
        timeout=5_000,
    )
    panned = _transform(page)
    assert panned[0] == zoomed[0] and panned[1] > zoomed[1] + 40 and panned[2] > zoomed[2] + 20
    assert (
        page.locator("#trace-caption").text_content().strip() == f"cell {cell}"
    )  # a drag is no click
    page.get_by_role("button", name="Reset view").click()
    assert _transform(page) == fit
    page.locator("#view-canvas").focus()  # keys on the focused canvas: + zooms, 0 fits
    page.keyboard.press("+")
    assert _transform(page)[0] > fit[0] * 1.2
    page.keyboard.press("0")
    assert _transform(page) == fit

    # --- keyboard: Tab from Play reaches the slider; ArrowRight moves one frame
    page.locator("#play").focus()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "frame-slider"
    page.keyboard.press("ArrowRight")
    _wait_frame(page, f"frame === '{busiest + 1}'")
    assert page.locator("#frame-label").text_content().startswith(str(busiest + 1))
    assert page.locator("#trace-marker").get_attribute("data-frame") == str(busiest + 1)
    # ... and a cell chosen from the list (keyboard) plots its trace
    cells = api.get(f"/api/jobs/{job_id}/cells").json()
    assert len(cells["ids"]) == len(set(cells["ids"])) >= 1
    assert page.locator("#cell-select option").count() == len(cells["ids"]) + 1
    other = str(cells["ids"][-1])
    page.select_option("#cell-select", other)  # a native <select>: keyboard-operable
    page.wait_for_function(
        f"document.querySelector('#trace-caption').textContent.trim() === 'cell {other}'"
    )

    # --- Play steps through the frames until Pause
    shown = page.locator("#view-canvas").get_attribute("data-frame")
    page.get_by_role("button", name="Play", exact=True).click()
    page.wait_for_function(
        f"['{shown}', '{int(shown) + 1}', '{int(shown) + 2}'].indexOf("
        "document.querySelector('#view-canvas').dataset.frame) < 0",
        timeout=15_000,
    )
    page.get_by_role("button", name="Pause", exact=True).click()
    assert page.locator("#play").get_attribute("aria-pressed") == "false"

    # --- every visible control has a name a screen reader can say
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button, canvas')]
            .filter((e) => e.offsetParent !== null)
            .filter((e) => !(e.getAttribute('aria-label') || e.getAttribute('aria-labelledby')
                || (e.id && document.querySelector(`label[for="${e.id}"]`)) || e.closest('label')
                || (e.tagName === 'BUTTON' && e.textContent.trim())))
            .map((e) => e.id || e.outerHTML.slice(0, 80))"""
    )
    assert unnamed == [], f"controls without a label: {unnamed}"

    # --- downloads: every artifact listed with its size; a download carries the token
    names = [a["name"] for a in job["artifacts"]]
    rows = page.locator("#artifact-list tr")
    assert rows.count() == len(names) and len(names) >= 4
    listed = [rows.nth(i).get_attribute("data-artifact") for i in range(rows.count())]
    assert sorted(listed) == sorted(names)
    art = next(a for a in job["artifacts"] if a["name"] == "labels.tif")
    size_text = page.locator("#artifact-list tr[data-artifact='labels.tif'] td").nth(2)
    assert size_text.get_attribute("title") == f"{art['size_bytes']} bytes"
    with page.expect_download() as dl:
        page.get_by_role("button", name="download labels.tif").click()
    saved = dl.value.path()
    assert hashlib.sha256(Path(saved).read_bytes()).hexdigest() == art["sha256"]
    assert dl.value.suggested_filename == "labels.tif"

    # --- a running fine-tune: training curves from its metrics, updated by polling
    ft_id, ev_id = _fake_jobs(service, user, sim_id)
    page.evaluate(f"location.hash = '#job={ft_id}'")
    page.wait_for_selector("#curves:not([hidden]) svg[data-group='IoU']", timeout=15_000)
    loss = page.locator("#curve-plots svg[data-group='loss'] path[data-name='loss']")
    assert loss.get_attribute("data-points") == "40"
    iou = page.locator("#curve-plots svg[data-group='IoU'] path[data-name='val_iou']")
    assert iou.get_attribute("data-points") == "4"
    train_iou = page.locator("#curve-plots svg[data-group='IoU'] path[data-name='train_iou']")
    assert train_iou.get_attribute("data-points") == "40"
    assert page.locator("#curve-plots svg").count() == 2
    from calseg.service.db import session_scope
    from calseg.service.models import Metric

    with session_scope(service.settings.database_url) as s:
        s.add(Metric(job_id=ft_id, name="val_iou", value=0.7, step=50))
    page.wait_for_function(
        "document.querySelector(\"path[data-name='val_iou']\").dataset.points === '5'",
        timeout=15_000,
    )
    page.screenshot(path=str(SHOTS / "page_curves.png"), full_page=True)
    # the dashboard's Cancel ends it (the API answers), Retry is offered instead
    page.get_by_role("button", name=f"cancel finetune job {ft_id[:8]}").click()
    ft_row = page.locator(f"#jobs-body tr[data-job-id='{ft_id}']")
    page.wait_for_selector(f"#jobs-body tr[data-job-id='{ft_id}']:has-text('cancelled')")
    assert ft_row.get_by_role("button", name=f"retry finetune job {ft_id[:8]}").count() == 1
    assert api.get(f"/api/jobs/{ft_id}").json()["state"] == "cancelled"
    page.wait_for_function(
        "document.querySelector('#detail-progress').textContent.includes('cancelled')"
    )

    # --- the model comparison table: the evaluate job's metrics per model
    page.get_by_role("button", name="Refresh").click()
    page.wait_for_selector("#compare-table tbody tr:has-text('SAM2 fine-tuned')")
    table = page.locator("#compare-table").text_content()
    for model, iou_value in (
        ("SAM2 fine-tuned", "0.71"),
        ("SAM2 untuned", "0.42"),
        ("classical", "0.35"),
    ):
        assert model in table and iou_value in table
    assert ev_id[:8] in table and f"dataset {sim_id[:8]}" in table
    assert page.locator("#compare-table tbody tr").count() == 3  # one row per model
    page.select_option("#compare-dataset", sim_id)  # the models compared on one dataset
    page.wait_for_function("document.querySelector('#compare-dataset').value !== ''")
    assert page.locator("#compare-table tbody tr").count() == 3

    # --- a stale #job= link says what is wrong; Back returns to the job before
    page.evaluate("location.hash = '#job=no-such-job'")
    page.wait_for_function(
        "document.querySelector('#detail-title').textContent.includes('no-such-job')"
    )
    assert "no job no-such-job" in page.locator("#detail-fields").text_content()
    assert page.locator("#viewer").is_hidden()
    page.go_back()
    page.wait_for_function(
        f"document.querySelector('#detail-title').textContent.includes('{ft_id}')"
    )

    # --- simulated data: ground truth instead of, or beside, the prediction
    sim = api.get(f"/api/jobs/{sim_id}").json()
    deadline = time.monotonic() + 120
    while sim["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"simulate job still {sim['state']}"
        time.sleep(0.5)
        sim = api.get(f"/api/jobs/{sim['id']}").json()
    assert sim["state"] == "succeeded", sim["error"]
    video = next(v["id"] for v in sim["result"]["videos"] if v["split"] == "test")
    params = {"dataset_job_id": sim["id"], "video_id": video, "method": "classical"}
    inf = api.post("/api/jobs", json={"kind": "infer", "params": params}).json()
    page.evaluate(f"location.hash = '#job={inf['id']}'")
    page.wait_for_selector("#viewer:not([hidden]) #gt-box:not([hidden])", timeout=120_000)
    _wait_frame(page, f"src.includes('{inf['id']}') && src.includes('gt=0')")
    canvas = page.locator("#view-canvas")
    assert canvas.get_attribute("data-size") == f"{SIM['width']}x{SIM['height']}"
    predicted = _canvas_digest(page)
    page.select_option("#gt-select", label="ground truth")
    _wait_frame(page, "src.includes('gt=2')")
    assert canvas.get_attribute("data-size") == f"{SIM['width']}x{SIM['height']}"
    assert _canvas_digest(page) != predicted
    page.select_option("#gt-select", label="side by side")
    _wait_frame(page, "src.includes('gt=1')")
    assert canvas.get_attribute("data-size") == f"{2 * SIM['width'] + 4}x{SIM['height']}"
    page.screenshot(path=str(SHOTS / "page_viewer_gt.png"), full_page=True)

    # the README's picture: the viewer on the real recording with a cell's trace
    page.evaluate(f"location.hash = '#job={job_id}'")
    page.wait_for_selector("#viewer:not([hidden])")
    _wait_frame(page, "frame === '0'")
    page.locator("#frame-slider").fill(str(busiest))
    _wait_frame(page, f"frame === '{busiest}'")
    _click_pixel(page, int(x), int(y))
    page.wait_for_function("document.querySelector('#trace-plot svg path.trace-line')")
    clip = page.evaluate(
        """() => { const y = (id) => document.getElementById(id).getBoundingClientRect();
            const top = y('detail-title').top + scrollY - 12;
            const bottom = y('viewer').bottom + scrollY + 12;
            return {x: 0, y: top, width: 1280, height: bottom - top}; }"""
    )
    page.screenshot(path=str(SHOTS / "page_viewer_astrocast.png"), full_page=True, clip=clip)
    assert errors == [], f"JavaScript errors on the page: {errors}"

    # make demo's screenshot opens the page the same way (#token=...&job=...); its own
    # Playwright runs in a thread (the sync API cannot nest in this thread's loop)
    from concurrent.futures import ThreadPoolExecutor

    from calseg.demo import screenshot_page

    url = f"{service.url}/#token={user['token']}&job={job_id}"
    with ThreadPoolExecutor(1) as pool:
        shot = pool.submit(screenshot_page, url, SHOTS / "demo_page.png").result(timeout=120)
    assert shot is not None and shot.stat().st_size > 10_000


def _upload(api: httpx.Client, path: Path) -> dict:
    with path.open("rb") as fh:
        r = api.post("/api/recordings", files={"file": (path.name, fh, "application/octet-stream")})
    assert r.status_code in (200, 201), r.text
    return r.json()


def _wait_job(api: httpx.Client, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = api.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            assert job["state"] == "succeeded", job.get("error")
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['state']}"
        time.sleep(0.5)


def _open_job(page, job_id: str) -> None:
    page.evaluate(f"location.hash = '#job={job_id}'")
    page.wait_for_selector("#result-box:not([hidden])", timeout=60_000)
    page.wait_for_function(
        f"document.querySelector('#detail-title').textContent.includes('{job_id}')"
    )


def _no_horizontal_scroll(page) -> None:
    over = page.evaluate(
        """() => [document.documentElement.scrollWidth, window.innerWidth,
            [...document.querySelectorAll('body *')].filter((e) => {
              const r = e.getBoundingClientRect();
              return r.width > 0 && r.right > window.innerWidth + 1
                && !e.closest('.table-wrap') && getComputedStyle(e).position !== 'absolute';
            }).slice(0, 5).map((e) => e.id || e.tagName + '.' + e.className)]"""
    )
    assert over[0] <= over[1] + 1, f"page wider than the window: {over}"


def test_a_biologists_first_hour(service, browser, user, api, real_file, tmp_path) -> None:
    """Issue 15 in the browser: defaults that work, empty results that explain themselves,
    names that cannot be confused, the analysis a calcium-imaging user expects, no UUIDs to
    type, at 1280 x 800 and on a phone-sized window (screenshots in test-artifacts/)."""
    from calseg.io.recordings import UPLOAD_SUFFIXES

    SHOTS.mkdir(parents=True, exist_ok=True)
    recs = {
        name: _upload(api, real_file(name))
        for name in ("sima_example.tif", REAL, "fissa_b_AVG_A02.tif")
    }
    page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{service.url}/#token={user['token']}")
    page.wait_for_selector("#app:not([hidden])")

    # --- the upload box takes every format the readers take, and says which
    accept = page.locator("#upload-file").get_attribute("accept").split(",")
    assert set(UPLOAD_SUFFIXES) <= set(accept), set(UPLOAD_SUFFIXES) - set(accept)
    formats = page.locator("#upload-formats").text_content()
    for word in ("TIFF", "HDF5", ".npy", "AVI", "ND2", "CZI", "LIF"):
        assert word in formats, word

    # --- the infer form: method auto (= classical here, said why); recordings picked by name
    page.select_option("#job-kind", "infer")
    page.wait_for_selector("#f-infer-recording_id-pick option >> nth=1", state="attached")
    method = page.locator("#f-infer-method")
    assert method.input_value() == '"auto"'
    assert method.locator("option:checked").text_content() == "auto (here: classical)"
    assert "CALSEG_SAM2_CHECKPOINT" in page.locator("#f-infer-method-hint").text_content()
    options = page.locator("#f-infer-recording_id-pick option").all_text_contents()
    sima_opt = next(o for o in options if o.startswith("sima_example.tif"))
    assert "20 frames, 128×256 px" in sima_opt and "MiB" in sima_opt and "uploaded" in sima_opt
    page.select_option("#f-infer-recording_id-pick", label=sima_opt)
    assert page.locator("#f-infer-recording_id").input_value() == recs["sima_example.tif"]["id"]
    with page.expect_response(
        lambda r: r.url.endswith("/api/jobs") and r.request.method == "POST"
    ) as resp:
        page.get_by_role("button", name="Submit infer job").click()
    assert resp.value.request.post_data_json == {
        "kind": "infer",
        "params": {"recording_id": recs["sima_example.tif"]["id"]},  # the defaults: auto
    }
    empty_id = resp.value.json()["id"]
    empty = _wait_job(api, empty_id)
    assert empty["result"]["method"] == "classical" and empty["result"]["n_cells"] == 0

    # --- the empty result explains itself: why, the activity map, next steps with numbers
    _open_job(page, empty_id)
    assert page.locator("#random-banner").is_hidden()
    fields = page.locator("#result-fields").text_content()
    assert "classical" in fields and "0 cells (active)" in fields
    assert "no SAM2 weights are configured" in fields  # why this method
    page.wait_for_selector("#diagnosis-box:not([hidden])")
    reason = page.locator("#diagnosis-reason").text_content()
    assert "noise SDs" in reason
    # said once: the reason was also listed among the job's warnings (a new-user check)
    assert not any("why no cell" in w for w in empty["result"].get("warnings", []))
    assert reason[:80] not in page.locator("#detail-fields").text_content()
    first = page.locator("#suggestion-list li").first
    assert "calseg segment sima_example.tif OUT_DIR --target cells" in first.text_content()
    assert re.search(r"\d+ regions on the mean projection", first.text_content())
    page.wait_for_function("document.querySelector('#activity-img').naturalWidth > 0")
    _wait_frame(page, f"src.includes('{empty_id}') && frame === '0'")
    page.screenshot(path=str(SHOTS / "page_empty_result_1280x800.png"), full_page=True)

    # --- "Use these settings": the infer form filled in, target cells; its result is honest
    first.get_by_role("button", name=re.compile("Use these settings")).click()
    assert page.locator("#f-infer-target").input_value() == '"cells"'
    assert page.locator("#f-infer-recording_id").input_value() == recs["sima_example.tif"]["id"]
    with page.expect_response(
        lambda r: r.url.endswith("/api/jobs") and r.request.method == "POST"
    ) as resp:
        page.get_by_role("button", name="Submit infer job").click()
    cells_id = resp.value.json()["id"]
    cells_job = _wait_job(api, cells_id)
    assert cells_job["params"]["target"] == "cells"
    # the suggestion was for sima: choosing another recording returns the form to defaults
    page.select_option("#f-infer-recording_id-pick", recs[REAL]["id"])
    page.wait_for_function(
        "document.querySelector('#job-form-status').textContent.includes('back to the defaults')"
    )
    assert page.locator("#f-infer-target").input_value() == '"active"'
    assert page.locator("#f-infer-recording_id").input_value() == recs[REAL]["id"]
    _open_job(page, cells_id)
    evidence = page.locator("#result-fields").text_content()
    m = re.search(
        r"(\d+) regions labelled \((\d+) % of the field\); (\d+) shows? a calcium", evidence
    )
    assert m and int(m.group(1)) == cells_job["result"]["n_cells"], evidence
    page.wait_for_selector("#raster-box:not([hidden])")
    assert page.locator("#raster-canvas").get_attribute("data-rows") == m.group(1)

    # --- SAM2 with random weights: every output says so (page, jobs list, overlay image)
    sam = api.post(
        "/api/jobs",
        json={"kind": "infer", "params": {"recording_id": recs["fissa_b_AVG_A02.tif"]["id"],
                                          "method": "sam2", "image_size": 64}},
    ).json()  # fmt: skip
    sam = _wait_job(api, sam["id"])
    assert sam["result"]["model_label"] == "SAM2 untuned (random weights)"
    _open_job(page, sam["id"])
    banner = page.locator("#random-banner")
    assert banner.is_visible() and "RANDOM weights" in banner.text_content()
    overlay = next(a for a in sam["artifacts"] if a["name"] == "overlay.png")
    img = iio.imread(io.BytesIO(api.get(overlay["url"]).content))
    red = (img[..., 0] > 180) & (img[..., 1] < 60) & (img[..., 2] < 60)
    assert red.sum() > 1000  # the red banner on the contact sheet

    # --- a recording with cells: notes, raster sortable by onset, events, exports
    ac = api.post(
        "/api/jobs", json={"kind": "infer", "params": {"recording_id": recs[REAL]["id"]}}
    ).json()
    ac = _wait_job(api, ac["id"])
    _open_job(page, ac["id"])
    notes = page.locator("#notes-list").text_content()
    # (its counts' noise is now measured by the mean |difference|: no "noise estimate is 0")
    assert "dF/F looks inflated" in notes and "noise estimate is 0" not in notes
    page.wait_for_selector("#raster-box:not([hidden])")
    page.wait_for_selector("#events-body tr")
    canvas = page.locator("#raster-canvas")
    n = len(api.get(f"/api/jobs/{ac['id']}/cells").json()["ids"])
    assert (
        canvas.get_attribute("data-rows") == str(n) and canvas.get_attribute("data-sort") == "onset"
    )
    (tmp_path / "events.csv").write_bytes(
        api.get(f"/api/jobs/{ac['id']}/artifacts/events.csv").content
    )
    events = read_events_csv(tmp_path / "events.csv")
    onset: dict[int, float] = {}
    for e in events:
        onset[e["cell_id"]] = min(onset.get(e["cell_id"], np.inf), e["onset_s"])
    order = [int(x) for x in canvas.get_attribute("data-order").split(",")]
    firsts = [onset.get(c, np.inf) for c in order]
    assert firsts == sorted(firsts)  # rows by first event onset; cells without events last
    page.select_option("#raster-sort", "id")
    page.wait_for_function("document.querySelector('#raster-canvas').dataset.sort === 'id'")
    by_id = [int(x) for x in canvas.get_attribute("data-order").split(",")]
    assert by_id == sorted(by_id)
    page.select_option("#raster-sort", "onset")
    assert page.locator("#events-body tr").count() == min(len(events), 200)
    assert f"{len(events)} events" in page.locator("#events-title").text_content()
    # significant events (those the pattern class counts) are marked (a new-user check found
    # "9 significant" in the result and no way to tell which)
    floor = ac["result"]["significant_event_amplitude"]
    significant = [e for e in events if e["amplitude"] >= floor]
    assert len(significant) == ac["result"]["n_significant_events"] > 0
    assert f"{len(significant)} significant" in page.locator("#events-title").text_content()
    shown = sorted(events, key=lambda e: (e["onset_s"], e["cell_id"]))[:200]
    assert page.locator("#events-body tr.significant").count() == sum(
        e["amplitude"] >= floor for e in shown
    )
    page.locator("#events-body tr").first.click()
    first_cell = page.locator("#events-body tr").first.get_attribute("data-cell")
    page.wait_for_function(
        f"document.querySelector('#trace-caption').textContent.trim() === 'cell {first_cell}'"
    )
    traces = next(a for a in ac["artifacts"] if a["name"] == "traces.csv")
    with page.expect_download() as dl:
        page.get_by_role("button", name="Traces (CSV)").click()
    assert hashlib.sha256(Path(dl.value.path()).read_bytes()).hexdigest() == traces["sha256"]
    for name in ("Events (CSV)", "ROI set (ImageJ .zip)"):
        assert page.get_by_role("button", name=name).is_visible()
    assert page.locator("#view-canvas").get_attribute("data-scale-bar").endswith(("µm", "unknown)"))
    page.evaluate("document.querySelector('#detail').scrollIntoView()")
    page.screenshot(path=str(SHOTS / "page_analysis_1280x800.png"))
    page.screenshot(path=str(SHOTS / "page_analysis_1280x800_full.png"), full_page=True)

    # --- the jobs list tells the infer jobs apart: method or model, recording
    page.select_option("#filter-kind", "infer")
    page.wait_for_selector(f"#jobs-body tr[data-job-id='{ac['id']}']")
    what = {
        jid: page.locator(f"#jobs-body tr[data-job-id='{jid}'] td.what").text_content()
        for jid in (empty_id, cells_id, sam["id"], ac["id"])
    }
    assert what[empty_id] == "classical · sima_example.tif"
    assert what[cells_id] == "classical · sima_example.tif · all cells on a projection"
    # (settings that differ from the defaults are named)
    assert what[sam["id"]] == "SAM2 untuned (random weights) · fissa_b_AVG_A02.tif · image_size 64"
    assert what[ac["id"]] == f"classical · {REAL}"
    page.select_option("#filter-kind", "")

    # --- a narrow window (a phone): nothing wider than the screen, everything reachable
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(300)
    _no_horizontal_scroll(page)
    page.screenshot(path=str(SHOTS / "page_analysis_390.png"), full_page=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(SHOTS / "page_top_390.png"))
    _open_job(page, empty_id)
    _wait_frame(page, f"src.includes('{empty_id}')")
    _no_horizontal_scroll(page)
    page.screenshot(path=str(SHOTS / "page_empty_result_390.png"), full_page=True)

    # --- Back past the first job opened closes the job detail (it stayed open: a new-user
    # check); a jobs filter survives a reload
    for _ in range(20):
        if "job=" not in page.url:
            break
        page.go_back()
    assert "job=" not in page.url
    page.wait_for_selector("#detail", state="hidden")
    assert page.locator("#analysis").is_hidden() and page.locator("#viewer").is_hidden()
    page.go_forward()
    page.wait_for_selector("#detail:not([hidden])")
    page.select_option("#filter-state", "failed")
    page.wait_for_selector("#jobs-body:has-text('no jobs match')")
    page.reload()
    page.wait_for_selector("#jobs-body:has-text('no jobs match')")
    assert page.locator("#filter-state").input_value() == "failed"
    page.select_option("#filter-state", "")
    page.wait_for_selector(f"#jobs-body tr[data-job-id='{empty_id}']")
    assert errors == [], f"JavaScript errors on the page: {errors}"


def test_delete_an_ended_job_from_the_dashboard(service, browser, user) -> None:
    """The page had no way to delete a job (DELETE /api/jobs/ID existed; a user's finished jobs
    filled their storage quota). An ended job's row has a Delete button: it asks first, keeps
    the job when the answer is no, removes the row, the open detail and the job's files when it
    is yes, and says why when the server refuses (409: a running job uses it), until the next
    action (the 2 s refresh line used to overwrite such errors at once)."""
    from calseg.service.db import session_scope
    from calseg.service.models import Job

    with session_scope(service.settings.database_url) as s:
        done = Job(kind="simulate", state="succeeded", progress=1.0, result={}, params=SIM,
                   owner_id=user["id"], stored_bytes=300 * 2**20)  # fmt: skip
        used = Job(kind="simulate", state="succeeded", progress=1.0, result={}, params=SIM,
                   owner_id=user["id"])  # fmt: skip
        s.add_all([done, used])
        s.flush()
        s.add(Job(kind="finetune", state="running", progress=0.1, stage="train",
                  params={"dataset_job_id": used.id}, owner_id=user["id"]))  # fmt: skip
        done_id, used_id = done.id, used.id
    folder = service.settings.artifact_dir / "jobs" / done_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text("{}")
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{service.url}/#token={user['token']}")
    page.wait_for_selector(f"tr[data-job-id='{done_id}']")
    page.evaluate(f"location.hash = '#job={done_id}'")
    page.wait_for_function(
        f"document.querySelector('#detail-title').textContent.includes('{done_id}')"
    )
    assert page.locator("#detail").is_visible()
    delete = page.get_by_role("button", name=f"delete simulate job {done_id[:8]} and its files")
    answers = [False, True, True]  # no, then yes, then yes (the refused one)
    page.on("dialog", lambda d: d.accept() if answers.pop(0) else d.dismiss())
    delete.click()  # "no": nothing happens
    page.wait_for_timeout(500)
    assert page.locator(f"tr[data-job-id='{done_id}']").count() == 1 and folder.exists()
    # the header shows the storage the user has against their quota; the job's 300 MiB count
    page.wait_for_function("document.querySelector('#storage-used').textContent.includes(' of ')")
    before = page.locator("#storage-used").text_content()
    assert re.fullmatch(r"· storage [0-9.]+ MiB of 100\.00 GiB", before), before
    delete.click()  # "yes"
    page.wait_for_selector(f"tr[data-job-id='{done_id}']", state="detached")
    page.wait_for_function(
        f"document.querySelector('#storage-used').textContent !== {before!r}", timeout=15_000
    )

    def mib(text: str) -> float:  # "· storage 12.3 MiB of 100.00 GiB" -> 12.3
        number, unit = text.split()[2:4]
        return float(number) * {"B": 2**-20, "KiB": 2**-10, "MiB": 1, "GiB": 1024}[unit]

    after = page.locator("#storage-used").text_content()
    assert mib(before) - mib(after) == pytest.approx(300, abs=0.2), (before, after)
    assert page.locator("#jobs-action").text_content() == f"deleted simulate job {done_id[:8]}"
    assert page.locator("#detail").is_hidden() and not folder.exists()
    with session_scope(service.settings.database_url) as s:
        assert s.get(Job, done_id) is None
    # refused: the message stays past the table's refresh
    page.get_by_role("button", name=f"delete simulate job {used_id[:8]} and its files").click()
    page.wait_for_function("document.querySelector('#jobs-action').textContent.includes('failed')")
    page.wait_for_timeout(2500)  # one refresh of the jobs table later
    said = page.locator("#jobs-action").text_content()
    assert said.startswith(f"delete of simulate job {used_id[:8]} failed: ") and "used by" in said
    assert page.locator(f"tr[data-job-id='{used_id}']").count() == 1 and answers == []
    assert errors == []
    page.close()
