"""Review, roles, search and alerts in a real browser: Debian's Chromium driven by Playwright against
a real `sendit run` (its web server, watcher and queue workers).

No browser is downloaded: Playwright drives /usr/bin/chromium. Without it the tests are skipped,
except under CI=true, where they fail. The webhook receiver is a real HTTP server on loopback in this
process. With SENDIT_UPDATE_SCREENSHOTS=1 the review page and the dashboard are written to
docs/screenshots/ (review.png, dashboard-review.png).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from tests.helpers import WebhookReceiver, stop_process_group, wait_for, write_ultrasound
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS, _chromium_or_skip, _env, _free_port, start_run

pytestmark = pytest.mark.slow  # starts `sendit run` and a browser

SECRET = "browser-review-secret-key-0123456789-abcdef"
PASSWORDS = {"rita": "rita reviews ultrasound", "vera": "vera only looks here"}


class RefusingProvider:
    """An identifier provider that refuses every series for good: the series goes to ERROR."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        pass

    def identify(self, series: list[Any]) -> Any:
        from sendit.identifiers.base import IdentifierError

        raise IdentifierError("the test's provider refuses every series", retryable=False)


def _start(tmp: Path, extra: str = "") -> tuple[subprocess.Popen[bytes], str, Path]:
    """`sendit run` on a free port, with a reviewer (rita) and a viewer (vera) made by `sendit createuser`."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    (tmp / "sendit.toml").write_text(
        # OCR off: the synthetic ultrasound holds no text, and the filter's flag alone must quarantine it
        f'SECRET_KEY = "{SECRET}"\nDATA_DIR = "data"\nRETRY_BASE_SECONDS = 0\nSITE_URL = "{base}"\nOCR = false\n'
        + extra
    )
    env = _env(tmp)
    for name, role in (("rita", "reviewer"), ("vera", "viewer")):
        made = subprocess.run(
            [sys.executable, "-m", "sendit", "createuser", name, "--password-stdin", "--role", role],
            cwd=tmp,
            env=env,
            input=PASSWORDS[name] + "\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
    process = start_run(tmp, env, port)
    return process, base, tmp / "data"


@pytest.fixture
def browser() -> Iterator[Any]:
    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def _page(browser: Any, base: str, name: str) -> Any:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto(base + "/login/")
    page.fill("#id_username", name)
    page.fill("#id_password", PASSWORDS[name])
    page.click("button[type=submit]")
    page.wait_for_selector("h1:has-text('Dashboard')")
    return page


def _arrive(data: Path, name: str, **kwargs: Any) -> None:
    """An ultrasound moved into the input folder at once (written elsewhere first)."""
    staging = data.parent / f"staging-{name}"
    write_ultrasound(staging / name / "1.dcm", **kwargs)
    (staging / name).rename(data / "input" / name)


def _rows_appear(page: Any, url: str) -> str:
    """Reload ``url`` (a series list) until a series is listed; its id."""

    def listed() -> bool:
        page.goto(url)
        return bool(page.locator("#series-table tr[data-series]").count())

    assert wait_for(listed, 60, every=1), "no series listed in time"
    return str(page.locator("#series-table tr[data-series]").first.get_attribute("data-series"))


def _shot(page: Any, name: str, tmp: Path) -> None:
    target = tmp / name
    page.screenshot(path=str(target), full_page=True)
    if os.environ.get("SENDIT_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, SCREENSHOTS / name)


def test_reviewer_blanks_a_quarantined_ultrasound_and_a_viewer_cannot_review_or_discard(
    browser: Any, tmp_path: Path
) -> None:
    process, base, data = _start(tmp_path)
    try:
        _arrive(data, "us-exam", frames=2, rows=96, columns=128)
        rita = _page(browser, base, "rita")
        series_id = _rows_appear(rita, base + "/series/?status=QUARANTINED")
        rita.click(f"#series-table tr[data-series='{series_id}'] a")
        rita.wait_for_selector("[data-testid=review-link]")
        pseudonym_json = rita.locator("[data-testid=identifiers]").text_content()
        rita.click("[data-testid=review-link]")

        # the review page: the rule that fired, the original header, a preview with a frame slider
        rita.wait_for_selector("h1:has-text('Review image')")
        review_url = rita.url
        assert "Ultrasound without a known layout" in rita.locator("[data-testid=rule-fired]").text_content()
        header = rita.locator("[data-testid=header]").text_content()
        assert "PatientName" in header and "SONO^JANE" in header and "(0028,0010)" in header
        nested = rita.locator("#header tr[data-depth='1']").first
        assert nested.is_hidden()  # a sequence's items are folded until asked for
        rita.click("#header button.fold")
        assert nested.is_visible() and "CodeValue" in nested.text_content()
        rita.wait_for_function("() => document.getElementById('preview').naturalWidth === 128")
        rita.fill("#frame", "1")
        rita.dispatch_event("#frame", "input")
        rita.wait_for_function("() => document.getElementById('preview').src.endsWith('frame=1')")

        # draw a rectangle over the top left of the preview: a blanking rule
        box = rita.locator("#preview").bounding_box()
        assert box is not None
        rita.mouse.move(box["x"] + box["width"] * 0.05, box["y"] + box["height"] * 0.05)
        rita.mouse.down()
        rita.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.3, steps=5)
        rita.mouse.up()
        region = [int(rita.input_value(f"#{name}")) for name in ("x0", "y0", "x1", "y1")]
        assert 0 <= region[0] < region[2] <= 128 and 0 <= region[1] < region[3] <= 96
        _shot(rita, "review.png", tmp_path)
        rita.click("#make-rule")
        rita.wait_for_selector("[data-testid=filter-text]")
        assert (
            f"coordinates {region[0]},{region[1]},{region[2]},{region[3]}"
            in rita.locator("[data-testid=filter-text]").text_content()
        )
        rita.click("#release")
        rita.wait_for_selector(".messages li.info:has-text('released 1 image(s)')")
        rita.goto(f"{base}/series/{series_id}/")
        rita.wait_for_function("() => document.querySelector('#series-status').textContent === 'DONE'", timeout=60_000)

        # delivered with exactly that region blanked, in every frame
        (delivered,) = [p for p in (data / "output").rglob("*") if p.is_file()]
        pixels = pydicom.dcmread(delivered).pixel_array
        x0, y0, x1, y1 = region
        assert (pixels[:, y0:y1, x0:x1] == 0).all()
        outside = np.ones(pixels.shape[1:3], dtype=bool)
        outside[y0:y1, x0:x1] = False
        assert (pixels[:, outside] == 200).all()
        events = rita.locator("#events").text_content()
        assert "review: original header and preview viewed" in events and "blanking rule #1 drawn" in events

        # a viewer: no review page, no discard, and a search by pseudonym finds the series
        vera = _page(browser, base, "vera")
        refused = vera.goto(review_url)
        assert refused is not None and refused.status == 403
        _arrive(
            data,
            "us-second",
            study_uid="1.2.826.0.1.3680043.8.498.901",
            series_uid="1.2.826.0.1.3680043.8.498.902",
            sop_uid="1.2.826.0.1.3680043.8.498.903",
            rows=50,
        )
        held = _rows_appear(vera, base + "/series/?status=QUARANTINED")
        vera.goto(f"{base}/series/{held}/")
        assert vera.locator("#series-actions button").count() == 0
        assert vera.locator("[data-testid=review-link]").count() == 0
        status = vera.evaluate(
            """async id => (await fetch(`/series/${id}/discard`, {method: "POST", headers: {"X-CSRFToken":
                 document.querySelector("input[name=csrfmiddlewaretoken]").value}})).status""",
            held,
        )
        assert status == 403
        import json

        pseudonym = json.loads(pseudonym_json)["patient_id"]
        vera.goto(base + "/series/")
        vera.fill("[data-testid=search-q]", pseudonym)
        vera.click("[data-testid=search-button]")
        vera.wait_for_selector("[data-testid=series-count]")
        found = vera.locator("#series-table tr[data-series]")
        ids = {found.nth(i).get_attribute("data-series") for i in range(found.count())}
        assert ids == {series_id, held}  # both exams of this (one) patient, nothing else
        vera.fill("[data-testid=search-q]", "SIDRNOBODY0000")
        vera.click("[data-testid=search-button]")
        vera.wait_for_selector("[data-testid=series-count]:has-text('0 found')")

        # the dashboard, with both kinds of counts and the destinations' details
        rita.goto(base + "/")
        rita.wait_for_function("() => document.querySelector('#destinations [data-destination]') !== null")
        assert "last success" in rita.locator("#destinations").text_content()
        _shot(rita, "dashboard-review.png", tmp_path)
        # a narrow screen keeps the menu
        rita.set_viewport_size({"width": 380, "height": 800})
        for link in ("Dashboard", "Series", "Rejected files"):
            assert rita.locator(f"[data-testid=menu] a:has-text('{link}')").is_visible()
    finally:
        stop_process_group(process)


def test_a_webhook_receiver_on_loopback_gets_the_error_alert(browser: Any, tmp_path: Path) -> None:
    with WebhookReceiver() as hook:
        extra = (
            f'ALERT_WEBHOOK_URL = "{hook.url}"\nMAX_ATTEMPTS = 1\n'
            'IDENTIFIER_PROVIDER = "tests.test_browser_review.RefusingProvider"\n'
        )
        process, base, data = _start(tmp_path, extra)
        try:
            _arrive(data, "us-error")
            assert wait_for(lambda: any(a.get("event") == "series_error" for a in hook.received), 60, every=0.5)
            alert = next(a for a in hook.received if a["event"] == "series_error")
            assert alert["status"] == "ERROR" and "refuses every series" in str(alert["reason"])
            text = str(alert)
            assert "SONO" not in text and "MRN-US" not in text and "ACC-US" not in text  # no PHI
            page = _page(browser, base, "vera")
            page.goto(str(alert["url"]))  # the link leads to the series, behind the login
            assert page.locator("#series-status").text_content() == "ERROR"
        finally:
            stop_process_group(process)
