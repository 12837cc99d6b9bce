"""The dashboard in a real browser: Debian's Chromium driven by Playwright against a real `sendit run`.

No browser is downloaded: Playwright drives /usr/bin/chromium. Without it the test is skipped, except
under CI=true, where it fails. With SENDIT_UPDATE_SCREENSHOTS=1 the screenshots of the dashboard and
of a series page are written to docs/screenshots/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pydicom
import pytest

from sendit.demo import generate_demo
from tests.helpers import stop_process_group, wait_for

pytestmark = pytest.mark.slow  # starts `sendit` processes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SECRET = "browser-test-secret-key-0123456789-abcdefgh"
PASSWORD = "a long enough password"
REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "docs" / "screenshots"


class GatedProvider:
    """The local keyed provider, but it waits for a gate file: the test sees the series before it moves."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        from sendit.identifiers.local import LocalProvider

        self.gate = Path(settings["DATA_DIR"]) / "gate"
        self.inner = LocalProvider(
            settings["SECRET_KEY"], settings["DATE_SHIFT_MIN_DAYS"], settings["DATE_SHIFT_MAX_DAYS"]
        )

    def identify(self, series: list[Any]) -> Any:
        deadline = time.monotonic() + 60
        while not self.gate.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.inner.identify(series)


def _chromium_or_skip() -> None:
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing; scripts/setup.sh installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (install Debian's chromium)")


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDIT_", "DJANGO_")) and k != "DATABASE_URL"}
    env.update(
        {
            "SENDIT_CONFIG": str(tmp / "sendit.toml"),
            "SENDIT_WORKERS": "2",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
        }
    )
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`sendit run` on a free port with its own configuration, and a user made with `sendit createuser`."""
    _chromium_or_skip()
    (tmp_path / "sendit.toml").write_text(
        f'SECRET_KEY = "{SECRET}"\nDATA_DIR = "data"\nRETRY_BASE_SECONDS = 0\n'
        'IDENTIFIER_PROVIDER = "tests.test_browser.GatedProvider"\n'
    )
    env = _env(tmp_path)
    made = subprocess.run(
        [sys.executable, "-m", "sendit", "createuser", "alice", "--password-stdin", "--role", "operator"],
        cwd=tmp_path,
        env=env,
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0 and "created user alice" in made.stdout, made.stderr
    port = _free_port()
    process = start_run(tmp_path, env, port)
    try:
        yield f"http://127.0.0.1:{port}", tmp_path / "data"
    finally:
        stop_process_group(process)


def start_run(cwd: Path, env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    """`sendit run` on ``port`` in a session of its own, once its /health answers (else stopped, and
    the test fails)."""
    import httpx

    process = subprocess.Popen(
        [sys.executable, "-m", "sendit", "run", "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_for(up, 30, every=0.2):
        stop_process_group(process)
        pytest.fail("sendit run did not start")
    return process


@pytest.fixture
def page(server: tuple[str, Path]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1360, "height": 900})
            context.set_default_timeout(30_000)
            yield context.new_page()
        finally:
            browser.close()


def _drop(data: Path, seed: int, broken: int = 0) -> list[Path]:
    """A complete demo study moved into the input folder at once; the first ``broken`` series each get
    one file with a malformed StudyDate (the engine quarantines it)."""
    staging = data.parent / f"staging-{seed}"
    written = generate_demo(staging, patients=1, images_per_series=3, size=64, seed=seed)
    for series_folder in sorted({p.parent for p in written})[:broken]:
        path = sorted(series_folder.iterdir())[0]
        ds = pydicom.dcmread(path)
        ds.StudyDate = "2021-13-45"
        ds.save_as(path)
    for study in staging.iterdir():
        study.rename(data / "input" / f"{study.name}-{seed}")
    return written


def _shot(page: Any, name: str, tmp: Path) -> None:
    target = tmp / name
    page.screenshot(path=str(target), full_page=True)
    if os.environ.get("SENDIT_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, SCREENSHOTS / name)


def _statuses(page: Any, table: str) -> dict[str, str]:
    result: dict[str, str] = page.evaluate(
        """table => Object.fromEntries([...document.querySelectorAll(`#${table} tbody tr[data-series]`)]
             .map(row => [row.dataset.series, row.querySelector('.badge').textContent]))""",
        table,
    )
    return result


def test_login_watch_a_series_to_done_and_retry_a_quarantined_one(
    server: tuple[str, Path], page: Any, tmp_path: Path
) -> None:
    base, data = server
    # every page asks for a login first
    page.goto(base + "/")
    assert "/login/" in page.url
    page.fill("#id_username", "alice")
    page.fill("#id_password", "not the password")
    page.click("button[type=submit]")
    assert page.locator("text=didn't match").is_visible()
    page.fill("#id_username", "alice")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("h1:has-text('Dashboard')")
    page.evaluate("window.__sameDocument = true")  # survives only if the page is never reloaded

    # a study arrives; the dashboard shows its series waiting, then DONE — without a reload
    written = _drop(data, seed=11)
    page.wait_for_function(
        """() => [...document.querySelectorAll('#recent tbody tr[data-series] .badge')]
                 .some(b => b.textContent === 'NEW' || b.textContent === 'PROCESSING')"""
    )
    waiting = _statuses(page, "recent")
    assert waiting and all(status in ("NEW", "PROCESSING") for status in waiting.values()), waiting
    (data / "gate").touch()
    page.wait_for_function(
        """n => { const b = [...document.querySelectorAll('#recent tbody tr[data-series] .badge')];
                  return b.length === n && b.every(x => x.textContent === 'DONE'); }""",
        arg=len(waiting),
    )
    assert page.evaluate("window.__sameDocument") is True
    assert page.locator("#counts [data-status=DONE] b").text_content() == str(len(written))
    page.wait_for_function("() => Number(document.querySelector('#workers .ok, #workers .bad').textContent) > 0")
    assert "reachable" in page.locator("#destinations").text_content()
    # the chart counts them (it is recomputed every 10 s)
    page.wait_for_function(f"() => document.querySelector('#hour-total').textContent === '{len(written)} images'")

    # a study with two broken files: both series show up under errors and quarantine
    _drop(data, seed=12, broken=2)
    page.wait_for_function("() => document.querySelectorAll('#attention tbody tr[data-series]').length === 2")
    assert page.evaluate("window.__sameDocument") is True
    series_id = page.locator("#attention tbody tr[data-series]").last.get_attribute("data-series")
    page.click(f"#attention tr[data-series='{series_id}'] a")
    page.wait_for_selector("#series-status")
    assert page.locator("#series-status").text_content() == "QUARANTINED"
    assert "StudyDate" in page.locator("#images").text_content()
    assert "Hidden: it maps people to pseudonyms" in page.content()

    # the operator repairs the file set aside in quarantine, then retries from the series page
    quarantined = [p for p in (data / "quarantine").rglob("*") if p.is_file()]
    assert len(quarantined) == 2
    for path in quarantined:
        ds = pydicom.dcmread(path)
        ds.StudyDate = "20210301"
        ds.save_as(path)
    page.click("#series-actions button:has-text('Retry')")
    page.wait_for_selector("text=retried 1 image(s)")
    page.evaluate("window.__sameDocument = true")
    page.wait_for_function("() => document.querySelector('#series-status').textContent === 'DONE'", timeout=45_000)
    assert page.evaluate("window.__sameDocument") is True
    assert page.locator("#series-actions").is_hidden()
    page.wait_for_selector("#events td:has-text('retry by alice')")
    assert "alice" in page.locator("#events").text_content()
    assert page.locator("#stages").text_content().count("de-identifying") == 1
    assert "total" in page.locator("#stages").text_content()
    _shot(page, "series.png", tmp_path)

    # back on the dashboard: one series still needs a person, with its reason and the actions
    page.goto(base + "/")
    page.wait_for_function("() => document.querySelectorAll('#attention tbody tr[data-series]').length === 1")
    row = page.locator("#attention tbody tr[data-series]")
    assert "StudyDate" in row.text_content()
    assert row.locator("button").all_text_contents() == ["Retry", "Release"]  # an operator: discard is the reviewer's
    done = page.locator("#counts [data-status=DONE] b").text_content()
    page.wait_for_function(f"() => document.querySelector('#hour-total').textContent === '{done} images'")
    _shot(page, "dashboard.png", tmp_path)
