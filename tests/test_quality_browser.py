"""The quality dashboard in a real browser: the charts are drawn (Chart.js, vendored), the
labeler x labeler heatmap and the daily table read right, and nothing breaks the CSP.

One `prefloop serve` per backend (tests/browser.py); the judgments are made through the
labeling service in the server's database, on chosen days.
"""

from __future__ import annotations

import datetime as dt
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from playwright.sync_api import Page
from sqlalchemy import select

from app.auth import service as auth_service
from app.auth.models import Role, User
from app.config import Settings
from app.labeling import service as labeling
from app.labeling.schemas import JudgmentIn
from app.web import SESSION_COOKIE
from tests.factories import make_campaign, make_labeler, make_task

if TYPE_CHECKING:
    from tests.browser import Browsing, LiveServer

pytest_plugins = ["tests.browser"]
pytestmark = pytest.mark.browser

TASKS = 8
# Set QUALITY_SHOTS=/tmp/shots to keep screenshots of the dashboard (for a human to look at).
SHOTS = os.environ.get("QUALITY_SHOTS", "")


def seed(server: LiveServer, tag: str) -> tuple[str, dict[str, str]]:
    """Three labelers on 8 tasks of 3 completions, half of them four days before the rest
    (so the trend has empty days between): ada and bea rank by the true order, cy reverses
    it on three tasks of the first day and one of the last. Returns the campaign's slug and the labelers' usernames by first name."""
    yesterday = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    noon = yesterday.replace(hour=12, minute=0, second=0, microsecond=0)
    with server.database.session() as db:
        campaign = make_campaign(db, k=3, overlap=3)
        truth = {}
        for _ in range(TASKS):
            task = make_task(db, campaign)
            truth[task.id] = [item.completion_id for item in task.items]
        people = {name: make_labeler(db, f"{name}-{tag}") for name in ("ada", "bea", "cy")}
        rng = random.Random(7)
        for name, user in people.items():
            for n in range(TASKS):
                when = noon - dt.timedelta(days=4 if n < TASKS // 2 else 0, minutes=n)
                lease = labeling.next_task(db, user=user, campaign=campaign, rng=rng, now=when)
                assert lease is not None
                order = truth[lease.task_id]
                reverse = name == "cy" and n in (0, 1, 2, 4)
                ranking = [[cid] for cid in (reversed(order) if reverse else order)]
                labeling.submit(
                    db,
                    user=user,
                    submit_key=lease.submit_key,
                    answer=JudgmentIn(ranking=ranking, time_on_task_ms=2000),
                    now=when + dt.timedelta(seconds=3),
                )
        db.commit()
        return campaign.slug, {name: user.username for name, user in people.items()}


def admin_page(server: LiveServer, browsing: Browsing, username: str) -> Page:
    """An admin with a browser session (made in the database; the login form has its tests)."""
    with server.database.session() as db:
        user = auth_service.create_user(db, username=username, role=Role.admin, password=None)
        token = auth_service.create_session(
            db, Settings.model_construct(session_max_hours=1), user, ip=None, user_agent=None
        )
        db.commit()
    context = browsing.new_context()
    context.add_cookies(
        [{"name": SESSION_COOKIE, "value": token, "url": server.url, "httpOnly": True}]
    )
    return browsing.new_page(context)


def open_dashboard(page: Page, slug: str) -> None:
    response = page.goto(f"/admin/campaigns/{slug}/quality")
    assert response is not None and response.status == 200
    page.wait_for_selector("#quality-charts[data-ready]", state="attached")


def test_dashboard_draws_charts_heatmap_and_daily_table(
    server: LiveServer, browsing: Browsing
) -> None:
    slug, names = seed(server, "charts")
    ada, bea, cy = names["ada"], names["bea"], names["cy"]
    page = admin_page(server, browsing, "quality-admin")
    page.set_viewport_size({"width": 1280, "height": 1000})
    open_dashboard(page, slug)

    # Three charts, each a Chart.js instance on a visible canvas of real size.
    assert page.locator("#quality-charts").get_attribute("data-ready") == "3"
    for name in ("agreement", "throughput", "trend"):
        canvas = page.locator(f'[data-chart="{name}"] canvas')
        assert canvas.is_visible()
        box = canvas.bounding_box()
        assert box is not None and box["width"] > 200 and box["height"] > 100, name
        drawn = canvas.evaluate(
            "c => { const chart = Chart.getChart(c);"
            " return chart ? chart.data.datasets.map(d => d.data.length) : null; }"
        )
        assert drawn and all(n > 0 for n in drawn), (name, drawn)
    # The agreement chart's InstructGPT band sits on pairwise agreement.
    reference = page.locator("#chart-agreement").evaluate(
        "c => Chart.getChart(c).data.datasets.find(d => d.label.startsWith('InstructGPT')).data[0]"
    )
    assert reference == pytest.approx([0.711, 0.741])
    # The trend runs over every day from the first to the last: five, three of them empty.
    days = page.locator("#chart-trend").evaluate("c => Chart.getChart(c).data.labels")
    assert len(days) == 5

    # The days' agreement: (ada-bea 4 + ada-cy 1 + bea-cy 1) / 12 pairs, then (4 + 3 + 3) / 12.
    per_day = page.locator("#chart-trend").evaluate("c => Chart.getChart(c).data.datasets[0].data")
    assert per_day == [0.5, None, None, None, 0.8333]

    # The heatmap: ada and bea agree on all 8 tasks, cy on half of them.
    heatmap = page.get_by_test_id("agreement-matrix")
    agree = heatmap.locator(f'td[data-a="{ada}"][data-b="{bea}"]')
    assert agree.locator(".heat-value").inner_text() == "100 %"
    assert agree.locator(".heat-count").inner_text() == str(TASKS)
    assert "heat-10" in (agree.get_attribute("class") or "")
    against = heatmap.locator(f'td[data-a="{cy}"][data-b="{ada}"]')
    assert against.locator(".heat-value").inner_text() == "50 %"
    assert "heat-5" in (against.get_attribute("class") or "").split()
    assert heatmap.locator(f'td[data-a="{bea}"][data-b="{bea}"] .heat-count').inner_text() == "8"
    # Names on both axes lead to the labeler's page.
    row_link = heatmap.locator("tbody th").get_by_role("link", name=cy)
    column_link = heatmap.locator("thead th").get_by_role("link", name=cy)
    with server.database.session() as db:
        cy_id = db.scalar(select(User.id).where(User.username == cy))
    assert row_link.get_attribute("href") == f"/admin/campaigns/{slug}/labelers/{cy_id}"
    assert column_link.get_attribute("href") == row_link.get_attribute("href")

    # The daily table is folded away once the charts tell the same, and still there.
    daily = page.get_by_test_id("daily-table")
    assert daily.evaluate("d => d.open") is False
    daily.locator("summary").click()
    assert daily.locator("tbody tr").count() == 5
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=f"{SHOTS}/quality-{server.backend}.png", full_page=True)
        page.locator("#quality-charts").screenshot(path=f"{SHOTS}/charts-{server.backend}.png")
        page.set_viewport_size({"width": 390, "height": 844})
        page.screenshot(path=f"{SHOTS}/quality-{server.backend}-phone.png", full_page=True)
    assert browsing.problems() == []


def test_without_javascript_the_numbers_stay(server: LiveServer, browsing: Browsing) -> None:
    slug, names = seed(server, "nojs")
    page = admin_page(server, browsing, "quality-admin-nojs")
    page.context.route("**/*.js*", lambda route: route.abort())  # no Chart.js, no quality.js
    response = page.goto(f"/admin/campaigns/{slug}/quality")
    assert response is not None and response.status == 200
    assert page.locator(".chart-card:visible").count() == 0  # no empty chart boxes
    daily = page.get_by_test_id("daily-table")
    assert daily.is_visible() and daily.evaluate("d => d.open") is True
    matrix = page.get_by_test_id("agreement-matrix")
    cell = matrix.locator(f'td[data-a="{names["bea"]}"][data-b="{names["ada"]}"]')
    assert cell.inner_text().split() == ["100", "%", str(TASKS)]
    assert page.get_by_test_id("pairwise-agreement").is_visible()
    if SHOTS:
        page.screenshot(path=f"{SHOTS}/quality-{server.backend}-nojs.png", full_page=True)


def test_a_campaign_without_judgments_draws_nothing_and_breaks_nothing(
    server: LiveServer, browsing: Browsing
) -> None:
    with server.database.session() as db:
        slug = make_campaign(db, k=3).slug
        db.commit()
    page = admin_page(server, browsing, "quality-admin-empty")
    open_dashboard(page, slug)
    assert page.locator("#quality-charts").get_attribute("data-ready") == "0"
    assert page.locator(".chart-card:visible").count() == 0
    assert page.get_by_text("The matrix needs two labelers or more.").is_visible()
    assert browsing.problems() == []
