"""The exports page in a real browser: a researcher creates a snapshot with the form, sees its
row become ready (a pending row polls itself with htmx, without reloading the page), and
downloads a file whose SHA-256 is the one the page shows.

One `prefloop serve` per backend (tests/browser.py) on a committed database, so the snapshot
is built by the server's real background thread.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import select

from app.auth.models import Role
from app.exports.models import ExportSnapshot
from app.labeling import service as labeling
from app.labeling.schemas import JudgmentIn
from tests.factories import make_campaign, make_labeler, make_task

if TYPE_CHECKING:
    from tests.browser import Browsing, LiveServer

pytest_plugins = ["tests.browser"]
pytestmark = pytest.mark.browser


def seed(server: LiveServer, slug: str) -> None:
    """Two labelers rank five tasks of three completions."""
    with server.database.session() as db:
        campaign = make_campaign(db, slug=slug, name="Browser exports", k=3, overlap=2)
        for _ in range(5):
            make_task(db, campaign)
        rng = random.Random(5)
        for name in ("ann", "bob"):
            user = make_labeler(db, f"{name}-{slug}")
            while (
                lease := labeling.next_task(db, user=user, campaign=campaign, rng=rng)
            ) is not None:
                labeling.submit(
                    db,
                    user=user,
                    submit_key=lease.submit_key,
                    answer=JudgmentIn(
                        ranking=[[cid] for cid in lease.display_order], time_on_task_ms=2000
                    ),
                )
        db.commit()


def test_a_researcher_creates_a_snapshot_and_downloads_it(
    server: LiveServer, browsing: Browsing
) -> None:
    slug = "browser-exports"
    seed(server, slug)
    server.create_user("export-researcher", Role.researcher)
    page = browsing.new_page()
    browsing.login(page, "export-researcher")

    page.goto("/research")
    page.get_by_test_id("exports-link").click()
    page.wait_for_url("**/research/exports")
    form = page.get_by_test_id("export-form")
    form.get_by_label(slug).check()
    form.get_by_label("Format", exact=True).select_option("trl")
    form.get_by_label("File type").select_option("jsonl")
    form.get_by_label("Test fraction").fill("0.2")
    form.get_by_label("Seed").fill("11")
    with page.expect_navigation():
        form.get_by_role("button", name="Create snapshot").click()

    assert "is being built" in page.locator(".flash").inner_text()
    with server.database.session() as db:
        snapshot_id = db.scalar(select(ExportSnapshot.id).order_by(ExportSnapshot.id.desc()))
    row = page.locator(f"#snapshot-{snapshot_id}")
    first_state = row.get_attribute("data-state")
    page.evaluate("window.__samePage = true")
    # A pending row polls its snapshot's URL and swaps itself in; no reload needed.
    row.and_(page.locator('[data-state="ready"]')).wait_for()
    assert row.get_by_test_id("snapshot-state").inner_text() == "ready"
    if first_state == "pending":  # a small snapshot may be ready before the page is
        assert page.evaluate("window.__samePage") is True

    with server.database.session() as db:
        snapshot = db.get(ExportSnapshot, snapshot_id)
        assert snapshot is not None and snapshot.parameters["seed"] == 11
        files = {entry["name"]: entry for entry in snapshot.files}
    link = row.get_by_role("link").filter(has_text=".jsonl").first
    name = link.inner_text()
    with page.expect_download() as download_info:
        link.click()
    data = Path(download_info.value.path()).read_bytes()
    assert hashlib.sha256(data).hexdigest() == files[name]["sha256"]
    assert files[name]["sha256"][:12] in row.inner_text()

    page.goto(f"/research/exports/{snapshot_id}")
    assert page.get_by_test_id("snapshot-state").get_attribute("data-state") == "ready"
    assert snapshot.manifest_sha256 in page.content()
