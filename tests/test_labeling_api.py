"""The labeling JSON API and the HTML task views, through the real app on both backends."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
from sqlalchemy import func, select

from app.auth import service as auth_service
from app.campaigns.models import CampaignMode
from app.labeling.models import Assignment, AssignmentState, Judgment
from tests.factories import make_campaign, make_task

HOSTILE = [
    "<script>window.__pwned=1</script>",
    '<img src=x onerror="window.__pwned=1">',
    "[click](javascript:window.__pwned=1)",
    '<div hx-get="/api/v1/me" hx-trigger="load">x</div>',
    "{{7*7}}",
    "</textarea><b>escaped</b>",
]


@pytest.fixture
def labeler_token(db, users):
    token = auth_service.create_api_token(db, users.labeler, name="load test")
    db.commit()
    return {"Authorization": f"Bearer {token.secret}"}


@pytest.fixture
def campaign(db):
    campaign = make_campaign(db, slug="helpful", overlap=1, k=3)
    make_task(db, campaign)
    make_task(db, campaign)
    db.commit()
    return campaign


def test_next_submit_and_history_over_the_api_with_a_token(client, campaign, labeler_token, db):
    mine = client.get("/api/v1/labeling/campaigns", headers=labeler_token).json()
    assert [(c["slug"], c["available"], c["judged_total"]) for c in mine] == [("helpful", 2, 0)]

    task = client.post("/api/v1/campaigns/helpful/next", headers=labeler_token)
    assert task.status_code == 200
    body = task.json()
    assert [c["label"] for c in body["completions"]] == ["A", "B", "C"]
    assert "is_gold" not in body and "gold_ranking" not in json.dumps(body)
    # A reload returns the same lease.
    again = client.post("/api/v1/campaigns/helpful/next", headers=labeler_token).json()
    assert again["submit_key"] == body["submit_key"]

    ids = [c["id"] for c in body["completions"]]
    answer = {"ranking": [[ids[2]], [ids[0], ids[1]]], "comment": "fine", "time_on_task_ms": 900}
    url = f"/api/v1/assignments/{body['submit_key']}/judgment"
    first = client.post(url, json=answer, headers=labeler_token)
    retry = client.post(url, json=answer, headers=labeler_token)
    assert (first.status_code, retry.status_code) == (201, 200)
    assert first.json()["judgment"]["id"] == retry.json()["judgment"]["id"]
    assert first.json()["judgment"]["comparisons"] == 3
    assert retry.json()["created"] is False

    changed = client.post(url, json={"ranking": [[i] for i in ids]}, headers=labeler_token)
    assert changed.status_code == 409 and "different answer" in changed.json()["detail"]
    assert db.scalar(select(func.count()).select_from(Judgment)) == 1

    history = client.get("/api/v1/judgments", headers=labeler_token).json()
    assert [h["ranking"] for h in history] == [[[ids[2]], [ids[0], ids[1]]]]


def test_edit_over_the_api_keeps_history(client, campaign, labeler_token):
    body = client.post("/api/v1/campaigns/helpful/next", headers=labeler_token).json()
    ids = [c["id"] for c in body["completions"]]
    first = client.post(
        f"/api/v1/assignments/{body['submit_key']}/judgment",
        json={"ranking": [[i] for i in ids]},
        headers=labeler_token,
    ).json()["judgment"]
    edit = {"ranking": [[i] for i in reversed(ids)], "idempotency_key": "edit-0123456789abcdef"}
    new = client.post(f"/api/v1/judgments/{first['id']}/edit", json=edit, headers=labeler_token)
    assert new.status_code == 201
    assert new.json()["judgment"]["supersedes_id"] == first["id"]
    old = client.get(f"/api/v1/judgments/{first['id']}", headers=labeler_token).json()
    assert old["is_current"] is False


def test_the_api_rejects_malformed_answers_with_422(client, campaign, labeler_token):
    body = client.post("/api/v1/campaigns/helpful/next", headers=labeler_token).json()
    url = f"/api/v1/assignments/{body['submit_key']}/judgment"
    ids = [c["id"] for c in body["completions"]]
    for bad in (
        {"ranking": [[ids[0]], [ids[1]]]},  # incomplete
        {"ranking": "first"},  # wrong type
        {"ranking": [[i] for i in ids], "surprise": 1},  # unknown field
        {"strength": 9},
    ):
        response = client.post(url, json=bad, headers=labeler_token)
        assert response.status_code == 422, bad
    assert (
        "missing completions"
        in client.post(url, json={"ranking": [[ids[0]], [ids[1]]]}, headers=labeler_token).json()[
            "detail"
        ]
    )


def test_no_tasks_left_is_204_and_unknown_campaign_404(client, db, labeler_token):
    make_campaign(db, slug="empty")
    db.commit()
    assert client.post("/api/v1/campaigns/empty/next", headers=labeler_token).status_code == 204
    assert client.post("/api/v1/campaigns/nope/next", headers=labeler_token).status_code == 404


def test_skip_over_the_api(client, campaign, labeler_token, db):
    body = client.post("/api/v1/campaigns/helpful/next", headers=labeler_token).json()
    skipped = client.post(
        f"/api/v1/assignments/{body['submit_key']}/skip",
        json={"reason": "not my language"},
        headers=labeler_token,
    )
    assert skipped.status_code == 200
    row = db.scalar(select(Assignment).where(Assignment.submit_key == body["submit_key"]))
    assert (row.state, row.skip_reason) == (AssignmentState.skipped, "not my language")
    nxt = client.post("/api/v1/campaigns/helpful/next", headers=labeler_token).json()
    assert nxt["task_id"] != body["task_id"]


def test_another_labelers_key_is_403(client, campaign, labeler_token, db, users):
    from tests.factories import make_labeler

    other = make_labeler(db)
    other_token = auth_service.create_api_token(db, other, name="other").secret
    db.commit()
    body = client.post("/api/v1/campaigns/helpful/next", headers=labeler_token).json()
    response = client.post(
        f"/api/v1/assignments/{body['submit_key']}/judgment",
        json={"ranking": [[c["id"]] for c in body["completions"]]},
        headers={"Authorization": f"Bearer {other_token}"},
    )
    assert response.status_code == 403


def test_the_openapi_schema_describes_the_labeling_endpoints(client):
    schema = client.get("/api/openapi.json").json()
    for path in (
        "/api/v1/campaigns/{slug}/next",
        "/api/v1/assignments/{submit_key}/judgment",
        "/api/v1/assignments/{submit_key}/skip",
        "/api/v1/judgments",
        "/api/v1/judgments/{judgment_id}/edit",
    ):
        assert path in schema["paths"], path
    judgment_in = schema["components"]["schemas"]["JudgmentIn"]["properties"]
    assert {"ranking", "strength", "demonstration", "flags", "ratings"} <= judgment_in.keys()


# --- the HTML views ------------------------------------------------------------------------


def lease_from(html: str) -> tuple[str, list[int]]:
    key = re.search(r'hx-post="/label/[\w-]+/submit/([\w-]+)"', html).group(1)
    ids = [int(i) for i in re.findall(r'<li class="completion-card"[^>]*data-id="(\d+)"', html)]
    return key, ids


def test_task_page_submit_swaps_in_the_next_task(client, campaign, as_role, db):
    csrf = as_role("labeler")
    page = client.get("/label/helpful")
    assert page.status_code == 200
    key, ids = lease_from(page.text)
    assert len(ids) == 3
    form = {
        "csrf_token": csrf,
        "ranking": json.dumps([[ids[1]], [ids[0]], [ids[2]]]),
        f"flag-{ids[2]}": "harmful",
        f"rating-{ids[1]}": "6",
        "confidence": "4",
        "comment": "B is clearly best",
        "time_on_task_ms": "4200",
    }
    saved = client.post(f"/label/helpful/submit/{key}", data=form, headers={"HX-Request": "true"})
    assert saved.status_code == 200
    assert 'data-testid="saved"' in saved.text and "<html" not in saved.text
    next_key, _ = lease_from(saved.text)
    assert next_key != key
    judgment = db.scalar(select(Judgment))
    assert judgment.ranking == [[ids[1]], [ids[0]], [ids[2]]]
    assert judgment.flags == {str(ids[2]): ["harmful"]} and judgment.ratings == {str(ids[1]): 6}
    assert (judgment.confidence, judgment.comment) == (4, "B is clearly best")
    assert 0 < judgment.time_on_task_ms <= 4200

    # The same form again (a double click that got through) is answered, not stored twice.
    again = client.post(f"/label/helpful/submit/{key}", data=form, headers={"HX-Request": "true"})
    assert again.status_code == 200 and "Already saved" in again.text
    assert db.scalar(select(func.count()).select_from(Judgment)) == 1


def test_a_bad_ranking_from_the_page_is_422_and_the_lease_stays(client, campaign, as_role, db):
    csrf = as_role("labeler")
    key, ids = lease_from(client.get("/label/helpful").text)
    bad = client.post(
        f"/label/helpful/submit/{key}",
        data={"csrf_token": csrf, "ranking": json.dumps([[ids[0]]])},
        headers={"HX-Request": "true"},
    )
    assert bad.status_code == 422 and 'role="alert"' in bad.text
    assert "Missing completions" in bad.text or "missing completions" in bad.text
    assert db.scalar(select(Assignment.state).where(Assignment.submit_key == key)) == "active"


def test_a_campaign_without_guidelines_shows_no_guidelines_box(client, campaign, db, as_role):
    bare = make_campaign(db, slug="bare", k=2, guidelines_md="  \n")
    make_task(db, bare)
    make_task(db, bare)
    db.commit()
    csrf = as_role("labeler")
    page = client.get("/label/bare").text
    assert 'id="answer-form"' in page and 'id="guidelines"' not in page
    key, ids = lease_from(page)
    swapped = client.post(
        f"/label/bare/submit/{key}",
        data={"csrf_token": csrf, "ranking": json.dumps([[ids[1]], [ids[0]]])},
        headers={"HX-Request": "true"},
    )
    assert 'id="answer-form"' in swapped.text and 'id="guidelines"' not in swapped.text
    # With guidelines, the box is there.
    assert 'id="guidelines"' in client.get("/label/helpful").text


def test_the_queue_and_the_task_page_count_the_same_tasks(client, campaign, as_role):
    def waiting() -> tuple[str, ...]:
        queue = client.get("/label").text
        return re.findall(r'data-testid="available">(\d+)<', queue)

    csrf = as_role("labeler")
    assert waiting() == ["2"]
    page = client.get("/label/helpful").text  # leases a task
    assert "waiting for you: 2" in page
    assert waiting() == ["2"], "the task leased to the labeler is still theirs to do"
    key, ids = lease_from(page)
    saved = client.post(
        f"/label/helpful/submit/{key}",
        data={"csrf_token": csrf, "ranking": json.dumps([[i] for i in ids])},
        headers={"HX-Request": "true"},
    )
    assert "waiting for you: 1" in saved.text  # the next task, leased by this answer
    assert waiting() == ["1"]


def test_pairwise_and_demonstration_pages_render_their_controls(client, db, as_role):
    pair = make_campaign(db, slug="pair", mode=CampaignMode.pairwise, k=2, allow_ties=False)
    make_task(db, pair)
    demo = make_campaign(db, slug="demo", mode=CampaignMode.demonstration)
    make_task(db, demo, completions=["A draft </textarea><b>x</b>"])
    db.commit()
    as_role("labeler")
    pair_page = client.get("/label/pair").text
    assert pair_page.count('name="strength"') == 6  # no "about the same" without ties
    demo_page = client.get("/label/demo").text
    assert '<textarea name="demonstration"' in demo_page
    assert "A draft &lt;/textarea&gt;&lt;b&gt;x&lt;/b&gt;</textarea>" in demo_page


class ElementCensus(HTMLParser):
    """Every element and attribute the browser would build from a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_hostile_text_is_escaped_everywhere_on_the_task_page(client, db, as_role):
    campaign = make_campaign(db, slug="hostile", k=len(HOSTILE), overlap=1)
    make_task(
        db,
        campaign,
        messages=[{"role": "user", "content": text} for text in HOSTILE],
        completions=HOSTILE,
    )
    db.commit()
    as_role("labeler")
    html = client.get("/label/hostile").text
    census = ElementCensus()
    census.feed(html)
    scripts = [attrs.get("src") for tag, attrs in census.tags if tag == "script"]
    assert scripts and all(src and src.startswith("/static/") for src in scripts)
    assert not [a for _, attrs in census.tags for a in attrs if a.startswith("on")]
    assert not [tag for tag, _ in census.tags if tag in {"img", "iframe", "object", "b"}]
    hrefs = [attrs.get("href") or "" for tag, attrs in census.tags if tag == "a"]
    assert not [h for h in hrefs if h.lower().startswith("javascript")]
    htmx_gets = [attrs for _, attrs in census.tags if "hx-get" in attrs]
    assert htmx_gets == []
    # Escaped, the payloads are still there to read, and templates did not evaluate them.
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html
    assert "{{7*7}}" in html


def test_expired_session_on_an_htmx_submit_redirects_to_login_and_back(
    client, campaign, as_role, db, users
):
    csrf = as_role("labeler")
    key, ids = lease_from(client.get("/label/helpful").text)
    auth_service.set_password(
        db, users.labeler, "a new long passphrase", actor_id=None
    )  # ends sessions
    db.commit()
    response = client.post(
        f"/label/helpful/submit/{key}",
        data={"csrf_token": csrf, "ranking": json.dumps([[i] for i in ids])},
        headers={"HX-Request": "true", "HX-Current-URL": "http://testserver/label/helpful"},
    )
    assert response.status_code == 401
    assert response.headers["HX-Redirect"] == "/login?next=/label/helpful"


def test_history_and_edit_pages(client, campaign, as_role, db):
    csrf = as_role("labeler")
    key, ids = lease_from(client.get("/label/helpful").text)
    client.post(
        f"/label/helpful/submit/{key}",
        data={"csrf_token": csrf, "ranking": json.dumps([[i] for i in ids])},
        headers={"HX-Request": "true"},
    )
    judgment = db.scalar(select(Judgment))
    history = client.get("/label/history").text
    assert f"/label/judgments/{judgment.id}" in history
    edit_page = client.get(f"/label/judgments/{judgment.id}").text
    edit_key = re.search(r'name="idempotency_key" value="([\w-]+)"', edit_page).group(1)
    saved = client.post(
        f"/label/judgments/{judgment.id}",
        data={
            "csrf_token": csrf,
            "idempotency_key": edit_key,
            "ranking": json.dumps([[i] for i in reversed(ids)]),
        },
        follow_redirects=False,
    )
    assert saved.status_code == 303 and saved.headers["location"] == "/label/history"
    db.expire_all()
    current = db.scalar(select(Judgment).where(Judgment.is_current))
    assert current.supersedes_id == judgment.id
    assert current.ranking == [[i] for i in reversed(ids)]
