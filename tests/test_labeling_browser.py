"""The labeler's pages in a real browser: ranking by mouse and keyboard, pairwise strength,
demonstrations, skips, edits, failures (double clicks, a dead network, an ended session),
hostile content, and the layout.

One `prefloop serve` process per backend serves the whole module (see tests/browser.py);
each test seeds a campaign of its own and signs in as a labeler of its own. What the page
did is checked in the server's database, which is the point of the exercise.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page
from sqlalchemy import select

from app.auth import service as auth_service
from app.auth.models import Role, User
from app.campaigns.models import Campaign, CampaignMode
from app.config import Settings
from app.labeling import service
from app.labeling.models import (
    Assignment,
    AssignmentState,
    Comparison,
    Completion,
    CompletionSource,
    Judgment,
    Task,
)
from app.web import SESSION_COOKIE
from tests.conftest import PASSWORD
from tests.factories import make_campaign, make_task

if TYPE_CHECKING:
    from tests.browser import Browsing, LiveServer

pytest_plugins = ["tests.browser"]
pytestmark = pytest.mark.browser

CARDS = "#ranking > li.completion-card"
# Set LABELING_SHOTS=/tmp/shots to keep screenshots of the task page (for a human to look at).
SHOTS = os.environ.get("LABELING_SHOTS", "")


# --- seeding and reading the server's database ----------------------------------------------


@dataclass(frozen=True)
class Seeded:
    slug: str
    campaign_id: int
    task_ids: list[int]


def seed(server: LiveServer, tasks: list[dict[str, Any]], **campaign_fields: Any) -> Seeded:
    """A campaign with the given tasks (make_task keyword arguments), committed."""
    with server.database.session() as db:
        campaign = make_campaign(db, overlap=1, **campaign_fields)
        made = [make_task(db, campaign, **spec) for spec in tasks]
        db.commit()
        return Seeded(campaign.slug, campaign.id, [task.id for task in made])


def judgments_of(server: LiveServer, user: User) -> list[Judgment]:
    with server.database.session() as db:
        return list(
            db.scalars(select(Judgment).where(Judgment.user_id == user.id).order_by(Judgment.id))
        )


def comparisons_of(server: LiveServer, judgment: Judgment) -> list[Comparison]:
    with server.database.session() as db:
        return list(db.scalars(select(Comparison).where(Comparison.judgment_id == judgment.id)))


def assignment_by_key(server: LiveServer, key: str) -> Assignment:
    with server.database.session() as db:
        found = db.scalar(select(Assignment).where(Assignment.submit_key == key))
        assert found is not None, key
        return found


def task_order(server: LiveServer, task_id: int) -> list[int]:
    """The task's completions in their stored (canonical) order."""
    with server.database.session() as db:
        return [item.completion_id for item in db.get_one(Task, task_id).items]


def tiers(ranking: list[list[int]] | None) -> list[list[int]]:
    """A ranking with each tier sorted: the order inside a tie carries no meaning."""
    assert ranking is not None
    return [sorted(tier) for tier in ranking]


# --- the page ---------------------------------------------------------------------------------


def path_of(page: Page) -> str:
    return urlsplit(page.url).path


def sign_in(
    server: LiveServer, browsing: Browsing, username: str, *, with_password: bool = False
) -> tuple[Page, User]:
    """A labeler with a browser session of their own. The session is made in the database
    (the login form has its own tests), which saves two argon2 hashes per test; a labeler
    `with_password` can sign in again through the form."""
    with server.database.session() as db:
        user = auth_service.create_user(
            db, username=username, role=Role.labeler, password=PASSWORD if with_password else None
        )
        token = auth_service.create_session(
            db, Settings.model_construct(session_max_hours=1), user, ip=None, user_agent=None
        )
        db.commit()
    context = browsing.new_context()
    context.add_cookies(
        [{"name": SESSION_COOKIE, "value": token, "url": server.url, "httpOnly": True}]
    )
    return browsing.new_page(context), user


def wait_ready(page: Page) -> None:
    """labeling.js has set up the task form (it marks it data-ready)."""
    page.wait_for_selector("#answer-form[data-ready]", state="attached")


def open_task(page: Page, slug: str) -> str:
    """Open the campaign's task page; returns the lease's submit key."""
    response = page.goto(f"/label/{slug}")
    assert response is not None and response.status == 200
    wait_ready(page)
    return submit_key(page)


def submit_key(page: Page) -> str:
    action = page.locator("#answer-form").get_attribute("action") or ""
    return action.rsplit("/", 1)[-1]


def order_of(page: Page) -> list[int]:
    return page.locator(CARDS).evaluate_all("cards => cards.map(c => Number(c.dataset.id))")


def badges(page: Page) -> list[str]:
    return [text.strip() for text in page.locator(f"{CARDS} .rank-badge").all_inner_texts()]


def wait_next_task(page: Page, old_key: str, status: str = "Saved.") -> None:
    """The answer was stored and the next task (or "All done") swapped in, with its status."""
    page.wait_for_function(
        "key => { const f = document.querySelector('#answer-form');"
        " return !f || !f.getAttribute('action').endsWith('/' + key); }",
        arg=old_key,
    )
    assert page.get_by_test_id("saved").inner_text().strip() == status
    if page.locator("#answer-form").count():
        wait_ready(page)


def focused_id(page: Page) -> int | None:
    value = page.evaluate("() => document.activeElement && document.activeElement.dataset.id")
    return int(value) if value else None


def mark_window(page: Page) -> None:
    """A marker that a full page load would wipe out."""
    page.evaluate("() => { window.__samePage = 'yes'; }")


def assert_same_window(page: Page) -> None:
    assert page.evaluate("() => window.__samePage") == "yes", "the page reloaded"


def let_task_settle(page: Page) -> None:
    """labeling.js ignores a submit in the first moments of a new task (a double click's
    second click must not answer the task that just appeared); act like a human would."""
    page.wait_for_timeout(450)


def drag_card(page: Page, source: int, target: int) -> None:
    """Drag a card by its head with the mouse, card by card like a hand would (SortableJS
    animates each step; moving past cards mid-animation would miss them)."""
    cards = page.locator(CARDS)
    grip = cards.nth(source).locator(".drag-handle").bounding_box()
    assert grip is not None
    page.mouse.move(grip["x"] + grip["width"] / 2, grip["y"] + grip["height"] / 2)
    page.mouse.down()
    step = -1 if target < source else 1
    for index in range(source + step, target + step, step):
        head = cards.nth(index).locator(".card-head").bounding_box()
        assert head is not None
        y = head["y"] + (4 if step < 0 else head["height"] - 4)
        page.mouse.move(head["x"] + 60, y, steps=6)
        page.wait_for_timeout(160)
        page.mouse.move(head["x"] + 64, y, steps=2)
    page.mouse.up()


# --- ranking ----------------------------------------------------------------------------------


def test_rank_by_dragging_a_card(server: LiveServer, browsing: Browsing) -> None:
    seeded = seed(server, [{}, {}], k=4)
    page, user = sign_in(server, browsing, "rank-drag")
    page.set_viewport_size({"width": 1280, "height": 1100})  # every card in view
    key = open_task(page, seeded.slug)
    mark_window(page)
    a, b, c, d = before = order_of(page)
    assert sorted(before) == sorted(task_order(server, seeded.task_ids[0]))

    drag_card(page, 3, 0)
    page.wait_for_function(
        "id => document.querySelector('#ranking > li.completion-card').dataset.id == id",
        arg=str(d),
    )
    assert order_of(page) == [d, a, b, c]
    assert badges(page) == ["1", "2", "3", "4"]
    # SortableJS's animation leaves style="" on the cards, an inline style the CSP refuses
    # wherever it is copied again (htmx settling the swap): labeling.js removes it.
    page.wait_for_function("() => !document.querySelector('#ranking [style]')")
    page.get_by_role("button", name="Submit").click()
    wait_next_task(page, key)

    assert_same_window(page)
    [judgment] = judgments_of(server, user)
    assert judgment.ranking == [[d], [a], [b], [c]]
    assert judgment.display_order == before
    assert judgment.time_on_task_ms > 0
    assert len(comparisons_of(server, judgment)) == 6
    assert assignment_by_key(server, key).state is AssignmentState.submitted
    assert submit_key(page) != key and page.locator(CARDS).count() == 4


def test_rank_by_keyboard_with_a_tie(server: LiveServer, browsing: Browsing) -> None:
    seeded = seed(server, [{}, {}], k=4, allow_ties=True)
    page, user = sign_in(server, browsing, "rank-keys")
    key = open_task(page, seeded.slug)
    mark_window(page)
    a, b, c, d = order_of(page)
    assert page.locator(f"{CARDS} .tie-toggle").count() == 4
    assert focused_id(page) == a, "the first card should have the focus"

    page.keyboard.press("4")  # a to the last place; the focus goes with it
    assert order_of(page) == [b, c, d, a] and focused_id(page) == a
    page.keyboard.press("k")  # focus d
    page.keyboard.press("Alt+ArrowUp")  # d one up
    assert order_of(page) == [b, d, c, a] and focused_id(page) == d
    page.keyboard.press("j")  # focus c
    page.keyboard.press("t")  # c ties with d
    assert badges(page) == ["1", "2", "2", "4"]
    tied = page.locator(f"{CARDS}[data-id='{c}']")
    assert tied.locator(".tie-badge").is_visible()
    assert tied.locator(".tie-toggle").get_attribute("aria-pressed") == "true"

    page.keyboard.press("Control+Enter")
    wait_next_task(page, key)

    assert_same_window(page)
    [judgment] = judgments_of(server, user)
    assert tiers(judgment.ranking) == [[b], sorted([c, d]), [a]]
    pairs = comparisons_of(server, judgment)
    assert len(pairs) == 6
    assert [(p.chosen_id, p.rejected_id) for p in pairs if p.is_tie] == [tuple(sorted([c, d]))]

    # The swapped-in task works by keyboard too: its first card has the focus.
    second = order_of(page)
    assert focused_id(page) == second[0]
    page.keyboard.press("2")
    assert order_of(page) == [second[1], second[0], *second[2:]]


def test_ties_only_where_the_campaign_allows_them(server: LiveServer, browsing: Browsing) -> None:
    seeded = seed(server, [{}], k=3, allow_ties=False)
    page, user = sign_in(server, browsing, "rank-noties")
    key = open_task(page, seeded.slug)
    a, b, c = order_of(page)
    assert page.locator(".tie-toggle").count() == 0
    assert "ties are off" in page.locator(".hint").inner_text()

    page.keyboard.press("j")  # focus b
    assert focused_id(page) == b
    page.keyboard.press("t")
    page.keyboard.press("=")
    assert page.locator(f"{CARDS}.tied").count() == 0
    assert badges(page) == ["1", "2", "3"]
    assert not page.locator(f"{CARDS} .tie-badge").first.is_visible()

    page.keyboard.press("Control+Enter")  # t and = changed nothing: the order is as shown
    page.get_by_test_id("confirm-order").wait_for()
    page.keyboard.press("Enter")  # on "Submit as shown"
    wait_next_task(page, key)
    assert page.get_by_test_id("no-more-tasks").is_visible()
    [judgment] = judgments_of(server, user)
    assert judgment.ranking == [[a], [b], [c]]

    # Pairwise: "about the same" is the tie. It is not offered, and its key (4) picks nothing.
    pairwise = seed(server, [{}], mode=CampaignMode.pairwise, k=2, allow_ties=False)
    key = open_task(page, pairwise.slug)
    values = page.locator("input[name=strength]").evaluate_all("rs => rs.map(r => r.value)")
    assert values == ["-3", "-2", "-1", "1", "2", "3"]
    assert page.get_by_text("About the same").count() == 0
    page.keyboard.press("4")
    assert page.locator("input[name=strength]:checked").count() == 0
    page.keyboard.press("5")
    assert page.locator("input[name=strength]:checked").get_attribute("value") == "1"
    shown = [
        int(x) for x in page.locator(".pair-card").evaluate_all("cs => cs.map(c => c.dataset.id)")
    ]
    page.keyboard.press("Control+Enter")
    wait_next_task(page, key)
    assert judgments_of(server, user)[1].ranking == [[shown[1]], [shown[0]]]


def test_an_order_left_as_shown_is_confirmed_before_it_is_sent(
    server: LiveServer, browsing: Browsing
) -> None:
    seeded = seed(server, [{"priority": 1}, {"priority": 0}], k=3)
    page, user = sign_in(server, browsing, "rank-as-shown")
    key = open_task(page, seeded.slug)
    watch = SubmitWatch(page)
    confirm = page.get_by_test_id("confirm-order")
    shown = order_of(page)
    assert not confirm.is_visible()

    page.keyboard.press("Control+Enter")
    confirm.wait_for()
    assert "You haven't changed the order. Submit it as shown?" in confirm.inner_text()
    assert page.evaluate("() => document.activeElement.textContent.trim()") == "Submit as shown"
    page.keyboard.press("Escape")  # keep ranking: back to the first card
    assert not confirm.is_visible() and focused_id(page) == shown[0]
    page.get_by_role("button", name="Submit").click()
    confirm.wait_for()
    page.get_by_role("button", name="Keep ranking").click()
    assert not confirm.is_visible()
    assert watch.settle() == [] and judgments_of(server, user) == []

    page.keyboard.press("Control+Enter")
    confirm.wait_for()
    page.keyboard.press("Enter")  # "Submit as shown" has the focus: agreeing is one key
    wait_next_task(page, key)
    [judgment] = judgments_of(server, user)
    assert judgment.ranking == [[cid] for cid in shown]

    # A labeler who moved a card is not asked, even when the order ends up as it was shown.
    let_task_settle(page)
    key = submit_key(page)
    shown = order_of(page)
    page.keyboard.press("2")
    page.keyboard.press("1")
    assert order_of(page) == shown
    page.keyboard.press("Control+Enter")
    wait_next_task(page, key)
    assert judgments_of(server, user)[1].ranking == [[cid] for cid in shown]
    assert len(watch.settle()) == 2


# --- pairwise and demonstrations --------------------------------------------------------------


def test_pairwise_strength_by_key_and_by_click(server: LiveServer, browsing: Browsing) -> None:
    seeded = seed(server, [{"priority": 1}, {"priority": 0}], mode=CampaignMode.pairwise, k=2)
    page, user = sign_in(server, browsing, "pairwise")
    first_canonical = task_order(server, seeded.task_ids[0])
    # Lease the first task with its pair shown the other way round, so that strength (which
    # is relative to what was shown) must be flipped to store it in the task's own order.
    with server.database.session() as db:
        lease = service.next_task(
            db, user=db.get_one(User, user.id), campaign=db.get_one(Campaign, seeded.campaign_id)
        )
        assert lease is not None and lease.task_id == seeded.task_ids[0]
        lease.display_order = list(reversed(first_canonical))
        db.commit()

    key = open_task(page, seeded.slug)
    shown = [
        int(x) for x in page.locator(".pair-card").evaluate_all("cs => cs.map(c => c.dataset.id)")
    ]
    assert shown == list(reversed(first_canonical))
    assert page.locator(".pair-card .completion-label").all_inner_texts() == ["A", "B"]
    page.keyboard.press("1")  # A (shown first) is much better
    assert page.locator("input[name=strength]:checked").get_attribute("value") == "-3"
    page.keyboard.press("Control+Enter")
    wait_next_task(page, key)

    [first] = judgments_of(server, user)
    assert first.pairwise_strength == 3, "stored in task order: the second stored is much better"
    assert first.ranking == [[shown[0]], [shown[1]]]
    [pair] = comparisons_of(server, first)
    assert (pair.chosen_id, pair.rejected_id, pair.is_tie, pair.margin) == (
        shown[0],
        shown[1],
        False,
        3.0,
    )

    let_task_settle(page)
    key = submit_key(page)
    shown = [
        int(x) for x in page.locator(".pair-card").evaluate_all("cs => cs.map(c => c.dataset.id)")
    ]
    canonical = task_order(server, seeded.task_ids[1])
    page.get_by_text("B is slightly better").click()
    assert page.locator("input[name=strength]:checked").get_attribute("value") == "1"
    page.get_by_role("button", name="Submit").click()
    wait_next_task(page, key)

    second = judgments_of(server, user)[1]
    assert second.pairwise_strength == (1 if shown == canonical else -1)
    assert second.ranking == [[shown[1]], [shown[0]]]
    [pair] = comparisons_of(server, second)
    assert (pair.chosen_id, pair.rejected_id, pair.margin) == (shown[1], shown[0], 1.0)


def test_demonstration_edits_the_suggested_draft(server: LiveServer, browsing: Browsing) -> None:
    draft = "The sky looks blue because air scatters short wavelengths more."
    seeded = seed(
        server,
        [{"prompt": "Why is the sky blue?", "completions": [draft]}],
        mode=CampaignMode.demonstration,
        k=2,
    )
    page, user = sign_in(server, browsing, "demo-writer")
    key = open_task(page, seeded.slug)
    box = page.get_by_role("textbox", name="Your response")
    assert box.input_value() == draft
    mine = "Rayleigh scattering: blue light is scattered about five times more than red."
    box.fill(mine)
    page.get_by_role("button", name="Submit").click()
    wait_next_task(page, key)
    assert page.get_by_test_id("no-more-tasks").is_visible()

    [judgment] = judgments_of(server, user)
    assert judgment.ranking is None and judgment.demonstration_id is not None
    with server.database.session() as db:
        written = db.get_one(Completion, judgment.demonstration_id)
        task = db.get_one(Task, seeded.task_ids[0])
        assert (written.text, written.source, written.author_id, written.prompt_id) == (
            mine,
            CompletionSource.human,
            user.id,
            task.prompt_id,
        )
        assert task.items[0].completion.text == draft, "the suggestion itself is unchanged"


# --- skipping and editing ---------------------------------------------------------------------


def test_skip_with_a_reason_and_the_task_stays_away(server: LiveServer, browsing: Browsing) -> None:
    seeded = seed(server, [{"priority": 1}, {"priority": 0}], k=2)
    page, _ = sign_in(server, browsing, "skipper")
    key = open_task(page, seeded.slug)
    skipped_task = assignment_by_key(server, key).task_id

    assert not page.locator("#skip-form").is_visible()
    page.get_by_role("button", name="Skip…").click()
    assert page.locator("#skip-form").is_visible()
    page.get_by_label("Why skip this task?").select_option("The prompt is unclear or broken")
    page.get_by_label("Details (optional)").fill("it stops mid-sentence")
    page.get_by_role("button", name="Skip this task").click()
    wait_next_task(page, key, status="Skipped.")

    skipped = assignment_by_key(server, key)
    assert skipped.state is AssignmentState.skipped
    assert skipped.skip_reason == "The prompt is unclear or broken — it stops mid-sentence"
    next_key = submit_key(page)
    assert assignment_by_key(server, next_key).task_id != skipped_task

    page.get_by_role("button", name="Skip…").click()
    page.get_by_role("button", name="Skip this task").click()
    wait_next_task(page, next_key, status="Skipped.")
    assert page.get_by_test_id("no-more-tasks").is_visible()
    page.reload()
    assert page.get_by_test_id("no-more-tasks").is_visible(), "a skipped task came back"
    assert page.locator("#answer-form").count() == 0


def test_edit_a_past_judgment_from_history(server: LiveServer, browsing: Browsing) -> None:
    seeded = seed(server, [{}], k=3)
    page, user = sign_in(server, browsing, "editor")
    key = open_task(page, seeded.slug)
    a, b, c = order_of(page)
    page.keyboard.press("j")
    page.keyboard.press("j")
    page.keyboard.press("t")  # c ties with b
    page.keyboard.press("Control+Enter")
    wait_next_task(page, key)
    [old] = judgments_of(server, user)
    assert tiers(old.ranking) == [[a], sorted([b, c])]

    page.goto("/label/history")
    row = page.locator(f"tr[data-judgment='{old.id}']")
    with page.expect_navigation():
        row.get_by_role("link", name="Open / edit").click()
    assert path_of(page) == f"/label/judgments/{old.id}"
    wait_ready(page)
    assert order_of(page) == [a, b, c] and badges(page) == ["1", "2", "2"], "stored order lost"

    page.locator(CARDS).first.focus()
    page.keyboard.press("3")  # a to the bottom; c stays tied with b
    assert order_of(page) == [b, c, a] and badges(page) == ["1", "1", "3"]
    with page.expect_navigation():
        page.get_by_role("button", name="Save as a new version").click()
    assert path_of(page) == "/label/history"
    assert "Your edit was saved as a new version." in page.locator("main").inner_text()

    old_now, new = judgments_of(server, user)
    assert old_now.id == old.id and not old_now.is_current
    assert new.is_current and new.supersedes_id == old.id
    assert tiers(new.ranking) == [sorted([b, c]), [a]]
    assert not any(p.is_active for p in comparisons_of(server, old_now))
    assert all(p.is_active for p in comparisons_of(server, new))
    rows = page.locator("tr[data-judgment]")
    assert rows.count() == 1 and rows.first.get_attribute("data-judgment") == str(new.id)
    assert "edited" in rows.first.inner_text()
    page.set_viewport_size({"width": 390, "height": 844})
    assert_no_sideways_scroll(page, f"history-{server.backend}-390")

    page.goto(f"/label/judgments/{old.id}")
    assert "replaced by a newer one" in page.locator("main").inner_text()
    assert page.locator("#answer-form").count() == 0


# --- failures ---------------------------------------------------------------------------------


class SubmitWatch:
    """The submit requests a page sends, and whether each has been answered (or failed)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.sent: list[str] = []
        self.over: list[str] = []
        page.on("request", lambda r: self.sent.append(r.url) if "/submit/" in r.url else None)
        for event in ("requestfinished", "requestfailed"):
            page.on(event, lambda r: self.over.append(r.url) if "/submit/" in r.url else None)

    def settle(self) -> list[str]:
        """Wait out a late second submit and every answer; returns the paths sent."""
        self.page.wait_for_timeout(150)
        for _ in range(500):
            if len(self.over) >= len(self.sent):
                break
            self.page.wait_for_timeout(20)
        return [urlsplit(url).path for url in self.sent]


def test_double_click_on_submit_stores_one_judgment(server: LiveServer, browsing: Browsing) -> None:
    seeded = seed(server, [{"priority": 1}, {"priority": 0}, {"priority": 0}], k=2)
    page, user = sign_in(server, browsing, "double-clicker")
    key = open_task(page, seeded.slug)
    watch = SubmitWatch(page)

    page.keyboard.press("2")  # a ranking of the labeler's own: no question before it is sent
    page.get_by_role("button", name="Submit").dblclick()
    wait_next_task(page, key)
    assert len(watch.settle()) == 1, watch.sent
    assert len(judgments_of(server, user)) == 1
    assert assignment_by_key(server, key).state is AssignmentState.submitted

    # Ctrl+Enter twice in a row (or held down) answers one task too.
    let_task_settle(page)
    key = submit_key(page)
    page.keyboard.press("2")
    page.keyboard.press("Control+Enter")
    page.keyboard.press("Control+Enter")
    wait_next_task(page, key)
    assert len(watch.settle()) == 2, watch.sent
    assert len(judgments_of(server, user)) == 2
    assert page.locator("#answer-form").count() == 1, "the third task was answered unseen"


def test_second_click_right_after_the_swap_does_not_answer_the_new_task(
    server: LiveServer, browsing: Browsing
) -> None:
    seeded = seed(server, [{"priority": 1}, {"priority": 0}], k=2)
    page, user = sign_in(server, browsing, "quick-clicker")
    key = open_task(page, seeded.slug)
    watch = SubmitWatch(page)

    page.keyboard.press("2")
    page.get_by_role("button", name="Submit").click()
    wait_next_task(page, key)
    second_key = submit_key(page)
    # The second click of a human double click, ~150 ms after the first, when the server
    # answered faster than that: it hits the new task's Submit button.
    page.get_by_role("button", name="Submit").click()
    page.keyboard.press("Control+Enter")
    assert watch.settle() == [f"/label/{seeded.slug}/submit/{key}"]
    assert len(judgments_of(server, user)) == 1
    assert submit_key(page) == second_key
    assert assignment_by_key(server, second_key).state is AssignmentState.active
    assert not page.get_by_test_id("confirm-order").is_visible(), "dropped, not questioned"


def test_network_failure_keeps_the_ranking_and_a_retry_saves_once(
    server: LiveServer, browsing: Browsing
) -> None:
    seeded = seed(server, [{}], k=3)
    page, user = sign_in(server, browsing, "offline")
    key = open_task(page, seeded.slug)
    a, b, c = order_of(page)
    page.keyboard.press("2")  # a to second place
    made = [b, a, c]
    assert order_of(page) == made

    page.route("**/submit/**", lambda route: route.abort("internetdisconnected"))
    page.get_by_role("button", name="Submit").click()
    toast = page.locator("#toasts .flash-error")
    toast.wait_for()
    assert "Could not reach the server" in toast.inner_text()
    assert order_of(page) == made and badges(page) == ["1", "2", "3"]
    assert submit_key(page) == key
    assert page.get_by_role("button", name="Submit").is_enabled()
    assert judgments_of(server, user) == []
    # htmx logs the failed request as console errors; nothing else may have complained.
    assert browsing.page_errors == [] and browsing.csp_violations() == []
    assert all("htmx:" in line for line in browsing.console_errors()), browsing.console
    browsing.clear()

    page.unroute("**/submit/**")
    page.get_by_role("button", name="Submit").click()
    wait_next_task(page, key)
    [judgment] = judgments_of(server, user)
    assert judgment.ranking == [[b], [a], [c]]


def test_session_expiry_mid_task_goes_to_login_and_back_to_the_same_task(
    server: LiveServer, browsing: Browsing
) -> None:
    seeded = seed(server, [{}, {}], k=2)
    page, user = sign_in(server, browsing, "expiring", with_password=True)
    key = open_task(page, seeded.slug)
    lease = assignment_by_key(server, key)
    assert server.end_sessions(user) == 1

    page.keyboard.press("2")
    with page.expect_response(lambda r: "/submit/" in r.url) as answer:
        page.get_by_role("button", name="Submit").click()
    assert answer.value.status == 401
    assert answer.value.headers.get("hx-redirect") == f"/login?next=/label/{seeded.slug}"
    page.wait_for_url(re.compile(r"/login\?"))
    assert page.locator("#task").count() == 0, "a login page was swapped into the task"
    assert page.get_by_role("button", name="Sign in").is_visible()
    assert judgments_of(server, user) == []

    browsing.submit_login(page, "expiring")
    assert path_of(page) == f"/label/{seeded.slug}"
    wait_ready(page)
    assert submit_key(page) == key, "the same lease is served again"
    again = assignment_by_key(server, key)
    assert (again.id, again.state) == (lease.id, AssignmentState.active)


# --- hostile content --------------------------------------------------------------------------

HOSTILE = [
    "<script>window.__pwned=1</script>",
    '<img src=x onerror="window.__pwned=1">',
    "[click](javascript:window.__pwned=1)",
    '<div hx-get="/api/v1/me" hx-trigger="load">x</div>',
    "{{7*7}}",
]
HOSTILE_TEXT = "\n\n".join(HOSTILE)
HOSTILE_DRAFT = "</textarea>" + HOSTILE_TEXT


def assert_inert(page: Page, where: str) -> None:
    scope = page.locator(where)
    text = scope.inner_text()
    for payload in ("<script>window.__pwned=1</script>", HOSTILE[1], HOSTILE[3], "{{7*7}}"):
        assert payload in text, f"{payload!r} does not show as text in {where}"
    assert "javascript:" in text, "the javascript: link should show as text"
    assert "49" not in text
    assert scope.locator("script, img, [hx-get], [onerror]").count() == 0
    assert page.locator("a[href^='javascript:' i]").count() == 0
    assert page.evaluate("() => typeof window.__pwned") == "undefined"


def test_hostile_prompts_and_completions_render_as_text(
    server: LiveServer, browsing: Browsing
) -> None:
    ranked = seed(
        server,
        [
            {"priority": 2, "prompt": HOSTILE_TEXT, "completions": [HOSTILE_TEXT, "plain"]},
            {
                "priority": 1,
                "messages": [
                    {"role": "system", "content": HOSTILE_TEXT},
                    {"role": "user", "content": HOSTILE_TEXT},
                ],
                "completions": ["plain", HOSTILE_TEXT],
            },
        ],
        k=2,
        guidelines_md=HOSTILE_TEXT,
    )
    written = seed(
        server,
        [{"prompt": HOSTILE_TEXT, "completions": [HOSTILE_DRAFT]}],
        mode=CampaignMode.demonstration,
        k=2,
    )
    page, _ = sign_in(server, browsing, "hostile")
    key = open_task(page, ranked.slug)
    page.locator("#guidelines summary").click()
    assert_inert(page, ".prompt")
    assert_inert(page, "#guidelines .markdown")
    assert_inert(page, f"{CARDS}:has-text('javascript:')")

    page.keyboard.press("Control+Enter")
    page.get_by_role("button", name="Submit as shown").click()
    wait_next_task(page, key)  # the chat prompt arrives through htmx
    assert page.locator(".chat-turn").count() == 2
    assert_inert(page, ".chat-system")
    assert_inert(page, ".chat-user")
    assert_inert(page, f"{CARDS}:has-text('javascript:')")

    open_task(page, written.slug)
    assert_inert(page, ".suggestions")
    assert page.get_by_role("textbox", name="Your response").input_value() == HOSTILE_DRAFT
    assert page.locator("textarea").count() == 2  # the response and the comment, nothing more
    page.wait_for_timeout(200)  # give a hx-trigger="load" or an onerror the time to fire

    assert page.evaluate("() => typeof window.__pwned") == "undefined"
    requested = browsing.requested_paths()
    assert f"/label/{written.slug}" in requested, "the request log is empty"
    assert "/api/v1/me" not in requested
    assert not [p for p in requested if p.endswith("/x")], requested
    assert browsing.problems() == []


# --- help, focus and layout -------------------------------------------------------------------

LONG_COMPLETION = """Here is a longer answer with `inline code` and a long token:
averyveryveryveryveryveryveryveryveryveryveryveryveryveryveryveryverylongwordwithoutspaces

```python
def scatter(wavelength_nm: float) -> float:
    return (550.0 / wavelength_nm) ** 4  # Rayleigh scattering is proportional to 1/lambda^4, which is why the sky is blue
```

| colour | wavelength (nm) | relative scattering | note about this colour that is rather long |
|--------|-----------------|---------------------|---------------------------------------------|
| blue   | 450             | 2.2                 | scattered the most, so it fills the sky    |
| red    | 700             | 0.38                | passes straight through                     |
"""


def test_help_overlay_focus_ring_and_layout(server: LiveServer, browsing: Browsing) -> None:
    seeded = seed(
        server,
        [
            {
                "messages": [
                    {"role": "system", "content": "You are a careful physics tutor."},
                    {"role": "user", "content": "Why is the sky blue? Keep it short."},
                ],
                "completions": [
                    LONG_COMPLETION,
                    "Because of **Rayleigh scattering**.",
                    "Blue light bounces around more. " * 12,
                    "It reflects the ocean.",
                ],
            }
        ],
        k=4,
    )
    page, _ = sign_in(server, browsing, "looker")
    page.set_viewport_size({"width": 1280, "height": 800})
    open_task(page, seeded.slug)

    first, second = page.locator(CARDS).nth(0), page.locator(CARDS).nth(1)
    page.keyboard.press("j")
    help_box = page.locator("#help")
    assert not help_box.is_visible()
    page.keyboard.press("?")
    assert help_box.is_visible()
    assert page.evaluate("() => document.activeElement.classList.contains('close-help')")
    page.keyboard.press("Escape")
    assert not help_box.is_visible()
    assert focused_id(page) == int(second.get_attribute("data-id") or 0), (
        "closing the help should give the focus back to the card that had it"
    )
    page.get_by_role("button", name="Keys").click()
    assert help_box.is_visible()
    page.get_by_role("button", name="Close").click()
    assert not help_box.is_visible()
    page.keyboard.press("g")
    assert page.locator("#guidelines").get_attribute("open") is not None
    page.keyboard.press("g")
    assert page.locator("#guidelines").get_attribute("open") is None

    second.focus()
    outline = second.evaluate(
        "el => { const s = getComputedStyle(el);"
        " return {style: s.outlineStyle, width: parseFloat(s.outlineWidth)}; }"
    )
    assert outline["style"] != "none" and outline["width"] >= 2, outline
    assert first.evaluate("el => getComputedStyle(el).outlineStyle") == "none"

    pairwise = seed(
        server,
        [{"completions": [LONG_COMPLETION, "Because of **Rayleigh scattering**."]}],
        mode=CampaignMode.pairwise,
        k=2,
    )
    for width, height in ((1280, 800), (390, 844)):
        page.set_viewport_size({"width": width, "height": height})
        assert_no_sideways_scroll(page, f"rank-{server.backend}-{width}")
    open_task(page, pairwise.slug)
    for width, height in ((390, 844), (1280, 800)):
        page.set_viewport_size({"width": width, "height": height})
        assert_no_sideways_scroll(page, f"pairwise-{server.backend}-{width}")


def assert_no_sideways_scroll(page: Page, name: str) -> None:
    page.wait_for_function("() => document.documentElement.clientWidth <= window.innerWidth")
    sizes = page.evaluate(
        "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert sizes[0] <= sizes[1], f"{name}: the page scrolls sideways: {sizes}"
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)
