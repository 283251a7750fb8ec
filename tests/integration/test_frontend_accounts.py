"""Login CSRF on the page, in a real browser (Playwright + Debian's Chromium, as
test_frontend.py) against the embedded service: a link to ``/#token=<another token>`` must not
silently replace the signed-in account (issue 13 item 7). The page names both accounts and asks;
nothing changes until the user says yes, and "stay" keeps the account, its stored token and the
requests it sends.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from calseg.demo import CHROMIUM_ARGS

pytestmark = pytest.mark.integration

CHROMIUM = Path(os.environ.get("CALSEG_CHROMIUM", "/usr/bin/chromium"))


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing: run scripts/system-deps.sh (Debian's chromium)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))
        yield b
        b.close()


def _user(service, prefix: str) -> dict:
    from calseg.service.auth import create_token, create_user
    from calseg.service.db import session_scope

    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    with session_scope(service.settings.database_url) as session:
        _, token = create_token(session, create_user(session, name), "browser-test")
    return {"name": name, "token": token}


def _stored(page) -> str | None:
    return page.evaluate("localStorage.getItem('calseg.token')")


def test_a_link_with_another_token_asks_before_switching(service, browser) -> None:
    victim, attacker = _user(service, "victim"), _user(service, "mallory")
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    seen_tokens: list[str] = []
    page.on(
        "request",
        lambda r: (
            seen_tokens.append(r.headers.get("authorization", "")) if "/api/jobs" in r.url else None
        ),
    )

    # nobody signed in: the link signs in (the make serve flow), and shows who
    page.goto(f"{service.url}/#token={victim['token']}")
    page.wait_for_function(
        f"document.querySelector('#user-name').textContent === '{victim['name']}'"
    )
    assert page.locator("#user-box").is_visible()
    assert _stored(page) == victim["token"]

    # the attacker's link while signed in: asked, naming both accounts; nothing switched
    page.goto(f"{service.url}/#token={attacker['token']}")
    page.wait_for_selector("#switch-account:not([hidden])")
    assert page.locator("#switch-new").text_content() == attacker["name"]
    assert page.locator("#switch-current").text_content() == victim["name"]
    assert "token" not in page.evaluate("location.href")  # taken out of the address bar
    assert _stored(page) == victim["token"]
    assert page.locator("#user-name").text_content() == victim["name"]
    page.get_by_role("button", name="Stay signed in as I am").click()
    assert page.locator("#switch-account").is_hidden()
    seen_tokens.clear()
    page.wait_for_timeout(2500)  # a dashboard poll (2 s) goes out with the victim's token
    assert seen_tokens and set(seen_tokens) == {f"Bearer {victim['token']}"}
    assert _stored(page) == victim["token"]

    # a fresh load of the attacker's link (same browser storage): asked again, on start-up
    page2 = context.new_page()
    page2.on("pageerror", lambda exc: errors.append(str(exc)))
    page2.goto(f"{service.url}/#token={attacker['token']}")
    page2.wait_for_selector("#switch-account:not([hidden])")
    assert page2.locator("#user-name").text_content() == victim["name"]
    assert _stored(page2) == victim["token"]
    # an unknown token in a link is named as such
    page2.goto(f"{service.url}/#token=cs_{'Z' * 43}")
    page2.wait_for_function(
        "document.querySelector('#switch-new').textContent.includes('does not know')"
    )
    # only an explicit yes switches
    page2.goto(f"{service.url}/#token={attacker['token']}")
    page2.wait_for_function(
        f"document.querySelector('#switch-new').textContent === '{attacker['name']}'"
    )
    page2.get_by_role("button", name="Switch accounts").click()
    page2.wait_for_function(
        f"document.querySelector('#user-name').textContent === '{attacker['name']}'"
    )
    assert _stored(page2) == attacker["token"]
    assert errors == [], f"JavaScript errors on the page: {errors}"
    context.close()
