"""The dashboard in a real browser: Debian's chromium, driven by Playwright (never a downloaded
browser), on a running `conveyor serve` over items in every state. It signs in with a token, checks
the counts shown against the database, requeues a dead item and sees it pending, sees a submitted
item appear without a reload, pauses and resumes a queue and a key, and saves docs/dashboard.png."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from waiting import wait_until

import conveyor
from conveyor.model import STATES, Claim

CHROMIUM = "/usr/bin/chromium"
TOKEN = "dashboard-test-token-0123456789"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"

sync_api = pytest.importorskip("playwright.sync_api")
if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)", pytrace=False)
    pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(app: conveyor.App) -> dict[str, int]:
    """Items in every state on two queues; returns the dead items' ids by queue order."""
    store = app.store
    ids = app.submit_many("emails", [{"to": f"user{n}@example.com"} for n in range(12)])
    assert ids == 12
    claim = lambda n: store.claim(Claim("emails", n, 30.0, 1), "test-worker")  # noqa: E731
    store.resolve([(it.id, it.claim_token) for it in claim(4)])
    dead = claim(2)
    try:
        raise ConnectionError("SMTP server did not answer")
    except ConnectionError as exc:
        import traceback

        text = "".join(traceback.format_exception(exc))
    store.fail([(it.id, it.claim_token, text) for it in dead])
    claim(1)  # in progress
    pending = app.items("emails", state="pending", limit=1)[0]
    app.cancel(pending.id)
    app.submit_many("sms", [{"n": n} for n in range(3)])
    return {"dead": dead[0].id}


@pytest.fixture
def served(tmp_path):
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    app = conveyor.App(url)
    seeded = fill(app)
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - read after the process ends
    proc = subprocess.Popen([sys.executable, "-m", "conveyor", "--db", url, "serve", "--port", str(port), "--token", TOKEN],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return urllib.request.urlopen(f"{base}/healthz", timeout=1).status == 200
        except OSError:
            assert proc.poll() is None, "conveyor serve exited"
            return False

    wait_until(up, what="conveyor serve to answer /healthz")
    yield app, base, seeded
    proc.terminate()
    proc.wait(timeout=30)
    log.seek(0)
    output = log.read()
    log.close()
    app.close()
    assert TOKEN not in output, "a token was logged"
    assert "GET /v1/queues" in output  # the access log was captured at all


def test_dashboard_shows_the_database_and_acts_on_it(served):
    app, base, seeded = served
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.set_default_timeout(30_000)
            expect = sync_api.expect
            page.goto(base + "/")
            page.fill("#token", TOKEN)
            page.click("#sign-in button[type=submit]")

            def cell(queue: str, state: str):
                return page.locator(f'#queues tr[data-queue="{queue}"] td[data-state="{state}"]')

            stats = app.stats()
            for queue in ("emails", "sms"):
                for state in STATES:
                    expect(cell(queue, state)).to_have_text(f"{stats[queue][state]:,}")
            assert stats["emails"]["dead"] == 2 and stats["emails"]["in_progress"] == 1

            dead = page.locator(f'#dead li[data-item="{seeded["dead"]}"]')
            expect(dead).to_contain_text("ConnectionError: SMTP server did not answer")
            dead.locator("summary").click()
            expect(dead.locator("pre")).to_contain_text("Traceback")
            dead.locator("button[data-action=requeue-item]").click()
            expect(dead).to_have_count(0)
            assert wait_until(lambda: app.get(seeded["dead"]).state == "pending", what="the requeued item pending")
            expect(cell("emails", "dead")).to_have_text("1")
            expect(cell("emails", "pending")).to_have_text(f"{app.stats()['emails']['pending']:,}")

            new_id = app.submit("sms", {"n": "late"})
            row = page.locator(f'#items tr[data-item="{new_id}"]')
            expect(row).to_be_visible()  # the page was never reloaded
            expect(row.locator("td[data-field=state]")).to_have_text("pending")
            expect(cell("sms", "pending")).to_have_text("4")

            sms = page.locator('#queues tr[data-queue="sms"]')
            sms.locator("button[data-action=pause]").click()
            expect(sms.locator("[data-flow=paused]")).to_have_text("paused")
            assert [(c["queue"], c["key"], c["paused"]) for c in app.controls()] == [("sms", None, True)]
            app.pause("sms", key="tenant-7")
            expect(sms.locator("[data-flow=paused_keys]")).to_contain_text("tenant-7")
            sms.locator("button[data-action=resume-key]").click()
            expect(sms.locator("[data-flow=paused_keys]")).to_have_count(0)
            sms.locator("button[data-action=resume]").click()
            expect(sms.locator("[data-flow=paused]")).to_have_count(0)
            assert app.controls() == []

            store = app.store  # some throughput for the chart, then enough samples to draw it
            batch = store.claim(Claim("emails", 3, 30.0, 5), "test-worker")
            store.resolve([(it.id, it.claim_token) for it in batch])
            expect(page.locator("#throughput")).to_have_attribute("data-samples", re.compile(r"^([4-9]|\d\d+)$"))
            expect(page.locator("#throughput")).not_to_have_attribute("data-peak", "0")
            expect(cell("emails", "resolved")).to_have_text(f"{app.stats()['emails']['resolved']:,}")
            app.pause("sms", key="tenant-7")  # for the screenshot: what holds a queue back shows under its name
            expect(sms.locator("[data-flow=paused_keys]")).to_contain_text("tenant-7")
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
