"""Exports over the API and on the researcher page, and the trainer's comparisons feed, through
the real app on both backends.

In-process tests run inside the test's rolled-back transaction, where a background thread
could not see the data; they build snapshots in the request instead (`build_inline`). One
test runs the real background thread on a committed database of its own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import re
import time
import uuid

import pytest
from sqlalchemy import func, select, text, update

from app.auth import service as auth_service
from app.auth.models import Role
from app.db import Database, make_engine
from app.exports import api as exports_api
from app.exports import service as exports
from app.exports.feed import annotator_pseudonym
from app.exports.models import ExportSnapshot
from app.exports.schemas import ExportParams
from app.labeling import service as labeling
from app.labeling.models import Comparison, Judgment
from app.labeling.schemas import EditIn, JudgmentIn
from app.main import create_app
from app.quality import service as quality
from tests.conftest import make_settings
from tests.factories import make_campaign, make_labeler, make_task


def bearer(db, user) -> dict[str, str]:
    token = auth_service.create_api_token(db, user, name="script")
    db.commit()
    return {"Authorization": f"Bearer {token.secret}"}


@pytest.fixture
def researcher(db, users):
    return bearer(db, users.researcher)


@pytest.fixture
def build_inline(monkeypatch):
    """Build a scheduled snapshot at once, in the request's thread and transaction."""

    def schedule(self, snapshot_id: int) -> bool:
        exports.build_snapshot(self._database, snapshot_id, self._settings)
        return True

    monkeypatch.setattr(exports_api.ExportBuilder, "schedule", schedule)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot_count(db) -> int:
    return db.scalar(select(func.count()).select_from(ExportSnapshot))


# --- snapshots over the API --------------------------------------------------------------------


def test_create_poll_list_and_download_with_matching_checksums(
    client, judged, researcher, build_inline
):
    created = client.post(
        "/api/v1/exports",
        json={"campaigns": ["quality"], "format": "trl", "test_fraction": 0.2, "seed": 3},
        headers=researcher,
    )
    assert created.status_code == 202, created.text
    body = created.json()
    assert body["state"] == "pending" and body["url"] == f"/api/v1/exports/{body['id']}"
    assert created.headers["location"] == body["url"]

    shown = client.get(body["url"], headers=researcher).json()
    assert shown["state"] == "ready", shown
    assert shown["parameters"]["campaigns"] == ["quality"] and shown["parameters"]["seed"] == 3
    assert shown["created_by"] == "test-researcher" and shown["manifest_sha256"]
    assert sum(v for v in shown["row_counts"].values() if isinstance(v, int)) > 0
    assert shown["files"], "a ready snapshot lists its files"

    listed = client.get("/api/v1/exports", headers=researcher).json()
    assert [e["id"] for e in listed["exports"]] == [body["id"]]

    for entry in shown["files"]:
        first = client.get(entry["url"], headers=researcher)
        assert first.status_code == 200
        assert sha256(first.content) == entry["sha256"] and len(first.content) == entry["bytes"]
        assert "attachment" in first.headers["content-disposition"]
        again = client.get(entry["url"], headers=researcher)
        assert again.content == first.content  # the same snapshot, the same bytes


def test_bad_parameters_are_422_with_the_field_named(client, judged, researcher, db):
    cases = [
        ({"campaigns": ["quality"], "format": "trl", "min_agreement": 2}, "min_agreement"),
        ({"campaigns": ["quality"], "format": "csv"}, "format"),
        ({"campaigns": ["quality"], "format": "trl", "bogus": 1}, "bogus"),
        ({"campaigns": [], "format": "trl"}, "campaigns"),
        ({"campaigns": ["quality"], "format": "trl", "test_fraction": 0.9}, "test_fraction"),
    ]
    for payload, field in cases:
        response = client.post("/api/v1/exports", json=payload, headers=researcher)
        assert response.status_code == 422, (payload, response.text)
        assert field in {str(part) for d in response.json()["detail"] for part in d["loc"]}
    assert snapshot_count(db) == 0


def test_unknown_campaign_is_404_and_creates_nothing(client, judged, researcher, db):
    response = client.post(
        "/api/v1/exports",
        json={"campaigns": ["quality", "no-such-campaign"], "format": "trl"},
        headers=researcher,
    )
    assert response.status_code == 404 and "no-such-campaign" in response.json()["detail"]
    assert snapshot_count(db) == 0


def test_labeler_tokens_are_403_and_revoked_tokens_401(client, judged, users, db):
    labeler = bearer(db, users.labeler)
    revoked = auth_service.create_api_token(db, users.researcher, name="old")
    db.commit()
    assert auth_service.revoke_api_token(db, users.researcher, revoked.token.id)
    db.commit()
    gone = {"Authorization": f"Bearer {revoked.secret}"}
    calls = [
        ("POST", "/api/v1/exports", {"campaigns": ["quality"], "format": "trl"}),
        ("GET", "/api/v1/exports", None),
        ("GET", "/api/v1/exports/1", None),
        ("GET", "/api/v1/exports/1/files/train.jsonl", None),
        ("GET", "/api/v1/campaigns/quality/comparisons", None),
    ]
    for method, url, payload in calls:
        assert client.request(method, url, json=payload, headers=labeler).status_code == 403
        refused = client.request(method, url, json=payload, headers=gone)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert snapshot_count(db) == 0


def pending_snapshot(db, users) -> ExportSnapshot:
    snapshot = exports.create_snapshot(
        db, ExportParams(campaigns=["quality"], format="trl"), actor_id=users.researcher.id
    )
    db.commit()
    return snapshot


def test_a_pending_snapshot_has_no_files_yet_and_downloads_are_409(
    client, judged, users, db, researcher
):
    snapshot = pending_snapshot(db, users)
    shown = client.get(f"/api/v1/exports/{snapshot.id}", headers=researcher).json()
    assert shown["state"] == "pending" and shown["files"] == []
    response = client.get(f"/api/v1/exports/{snapshot.id}/files/train.jsonl", headers=researcher)
    assert response.status_code == 409 and "being built" in response.json()["detail"]
    assert client.get("/api/v1/exports/999999", headers=researcher).status_code == 404


def test_only_recorded_files_of_the_snapshot_are_served(
    client, judged, researcher, build_inline, db, settings
):
    made = client.post(
        "/api/v1/exports", json={"campaigns": ["quality"], "format": "trl"}, headers=researcher
    ).json()
    snapshot = db.get(ExportSnapshot, made["id"])
    db.refresh(snapshot)
    folder = exports.snapshot_folder(settings, snapshot)
    (folder / "stray.txt").write_text("not part of the snapshot")
    (folder.parent / "secret.txt").write_text("beside the snapshot")
    base = f"/api/v1/exports/{snapshot.id}/files/"
    names = [
        "stray.txt",
        "secret.txt",
        "../secret.txt",
        "..%2Fsecret.txt",
        "%2E%2E%2Fsecret.txt",
        "..%5Csecret.txt",
        "%2Fetc%2Fpasswd",
        "nothing.jsonl",
    ]
    for name in [*names, "..", "%2E%2E"]:  # a bare ".." is resolved by the client itself
        response = client.get(base + name, headers=researcher)
        assert b"beside the snapshot" not in response.content
        assert b"not part of the snapshot" not in response.content
        if name in names:
            assert response.status_code == 404, (name, response.status_code)
    recorded = snapshot.files[0]["name"]
    assert client.get(base + recorded, headers=researcher).status_code == 200


def test_the_list_is_newest_first_and_pages_with_before(client, judged, users, db, researcher):
    ids = [pending_snapshot(db, users).id for _ in range(3)]
    first = client.get("/api/v1/exports?limit=2", headers=researcher).json()
    assert [e["id"] for e in first["exports"]] == ids[::-1][:2]
    assert first["next_before"] == ids[1]
    rest = client.get(f"/api/v1/exports?limit=2&before={ids[1]}", headers=researcher).json()
    assert [e["id"] for e in rest["exports"]] == [ids[0]] and rest["next_before"] is None


# --- the comparisons feed ----------------------------------------------------------------------


def expected_feed(db, campaign) -> list[int]:
    return list(
        db.scalars(
            select(Comparison.id)
            .join(Judgment, Judgment.id == Comparison.judgment_id)
            .where(
                Comparison.campaign_id == campaign.id,
                Comparison.is_active.is_(True),
                Judgment.is_current.is_(True),
                quality.not_excluded(Comparison.user_id, Comparison.campaign_id),
            )
            .order_by(Comparison.id)
        )
    )


def read_feed(client, headers, slug: str, *, limit: int, since: int = 0) -> list[dict]:
    seen: list[dict] = []
    while True:
        page = client.get(
            f"/api/v1/campaigns/{slug}/comparisons",
            params={"since": since, "limit": limit},
            headers=headers,
        )
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["comparisons"]) <= limit and body["held_back"] is False
        seen += body["comparisons"]
        assert body["next_since"] == (
            body["comparisons"][-1]["id"] if body["comparisons"] else since
        )
        if not body["has_more"]:
            return seen
        assert len(body["comparisons"]) == limit  # has_more only on a full page
        since = body["next_since"]


def test_the_feed_serves_every_active_comparison_once(
    client, judged, researcher, db, users, settings
):
    campaign, careful, lazy = judged
    # A superseded judgment's comparisons and an excluded labeler's are left out.
    edited = db.scalar(select(Judgment).where(Judgment.user_id == careful[0].id).limit(1))
    old_ids = set(db.scalars(select(Comparison.id).where(Comparison.judgment_id == edited.id)))
    ranking = [list(reversed(tier)) for tier in reversed(edited.ranking)]
    labeling.edit(
        db,
        user=careful[0],
        judgment_id=edited.id,
        answer=EditIn(ranking=ranking, time_on_task_ms=1000, idempotency_key=uuid.uuid4().hex),
    )
    quality.exclude(db, user=lazy, campaign=campaign, reason="clicks", actor_id=users.admin.id)
    db.commit()
    expected = expected_feed(db, campaign)
    assert old_ids and not old_ids & set(expected)

    seen = read_feed(client, researcher, "quality", limit=50)
    ids = [c["id"] for c in seen]
    assert ids == expected  # in id order, each once, nothing missing
    assert len(ids) > 50 * 3  # several pages
    lazy_ids = set(db.scalars(select(Comparison.id).where(Comparison.user_id == lazy.id)))
    assert lazy_ids and not lazy_ids & set(ids)

    annotators = {c["annotator"] for c in seen}
    assert annotators == {annotator_pseudonym(settings.secret_key, u.id) for u in careful}
    body = client.get("/api/v1/campaigns/quality/comparisons?limit=10000", headers=researcher).text
    for user in [*careful, lazy]:
        assert user.username not in body
    first = seen[0]
    assert set(first) == {
        "id",
        "prompt_id",
        "chosen_id",
        "rejected_id",
        "is_tie",
        "margin",
        "source",
        "annotator",
        "judgment_id",
        "created_at",
    }
    # Caught up: the same cursor again gives nothing new and keeps the cursor.
    tail = client.get(
        f"/api/v1/campaigns/quality/comparisons?since={ids[-1]}", headers=researcher
    ).json()
    assert tail == {
        "comparisons": [],
        "next_since": ids[-1],
        "has_more": False,
        "held_back": False,
    }


def test_the_feed_can_include_the_texts(client, db, researcher, users):
    campaign = make_campaign(db, slug="texts", k=2, overlap=1)
    task = make_task(db, campaign, prompt="What is 2+2?", completions=["4", "5"])
    labeler = make_labeler(db)
    lease = labeling.next_task(db, user=labeler, campaign=campaign, rng=random.Random(1))
    four, five = (item.completion_id for item in task.items)
    labeling.submit(
        db,
        user=labeler,
        submit_key=lease.submit_key,
        answer=JudgmentIn(ranking=[[four], [five]], time_on_task_ms=2000),
    )
    db.commit()
    plain = client.get("/api/v1/campaigns/texts/comparisons", headers=researcher).json()
    assert "chosen" not in plain["comparisons"][0]
    rich = client.get(
        "/api/v1/campaigns/texts/comparisons?include_text=true", headers=researcher
    ).json()
    [row] = rich["comparisons"]
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("What is 2+2?", "4", "5")
    assert (row["chosen_id"], row["rejected_id"], row["source"]) == (four, five, "human")


def test_feed_input_errors(client, judged, researcher):
    assert client.get("/api/v1/campaigns/nope/comparisons", headers=researcher).status_code == 404
    for query in ("limit=10001", "limit=0", "since=-1", "since=abc"):
        response = client.get(f"/api/v1/campaigns/quality/comparisons?{query}", headers=researcher)
        assert response.status_code == 422, query


@pytest.mark.postgres_only
def test_the_feed_holds_back_what_an_open_transaction_could_precede(
    client, judged, researcher, db, backend
):
    """A row committed after a newer one must not be skipped: while another transaction is
    open, comparisons stamped after it began wait, and the cursor stops before them."""
    campaign, _, _ = judged
    ids = expected_feed(db, campaign)
    half = ids[len(ids) // 2]
    hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    now = dt.datetime.now(dt.UTC)
    db.execute(update(Comparison).where(Comparison.id <= half).values(created_at=hour_ago))
    db.execute(update(Comparison).where(Comparison.id > half).values(created_at=now))
    db.commit()
    other = make_engine(backend.template_url)
    try:
        with other.connect() as conn:
            conn.execute(text("SELECT 1"))  # an open transaction, begun now
            page = client.get(
                "/api/v1/campaigns/quality/comparisons?limit=10000", headers=researcher
            ).json()
            served = [c["id"] for c in page["comparisons"]]
            assert served == [i for i in ids if i <= half]
            assert page["held_back"] is True and page["has_more"] is False
            assert page["next_since"] == half
            conn.rollback()
        rest = client.get(
            f"/api/v1/campaigns/quality/comparisons?since={half}&limit=10000", headers=researcher
        ).json()
        assert [c["id"] for c in rest["comparisons"]] == [i for i in ids if i > half]
        assert rest["held_back"] is False
    finally:
        other.dispose()


# --- the researcher page -----------------------------------------------------------------------


def form_data(csrf: str | None, **fields) -> dict:
    data = {
        "campaigns": ["quality"],
        "format": "trl",
        "file_format": "jsonl",
        "sources": ["human", "import", "ai"],
        "dedupe": "true",
    }
    data.update(fields)
    if csrf:
        data["csrf_token"] = csrf
    return data


def test_the_page_shows_the_form_and_the_list(client, as_role, judged, users, db):
    pending_snapshot(db, users)
    as_role("researcher")
    page = client.get("/research/exports")
    assert page.status_code == 200
    assert 'data-testid="export-form"' in page.text and 'value="quality"' in page.text
    assert 'data-state="pending"' in page.text and 'hx-trigger="every 2s"' in page.text
    home = client.get("/research")
    assert home.status_code == 200 and 'href="/research/exports"' in home.text


def test_creating_a_snapshot_through_the_form(client, as_role, judged, db, build_inline):
    csrf = as_role("researcher")
    refused = client.post("/research/exports", data=form_data(None), follow_redirects=False)
    assert refused.status_code == 403 and snapshot_count(db) == 0

    created = client.post(
        "/research/exports", data=form_data(csrf, seed="7"), follow_redirects=False
    )
    assert created.status_code == 303 and created.headers["location"] == "/research/exports"
    snapshot = db.scalar(select(ExportSnapshot))
    db.refresh(snapshot)
    assert snapshot.state == "ready" and snapshot.parameters["seed"] == 7
    page = client.get("/research/exports")
    assert f"Snapshot #{snapshot.id} is being built" in page.text
    assert 'data-state="ready"' in page.text
    for entry in snapshot.files:
        assert f"/api/v1/exports/{snapshot.id}/files/{entry['name']}" in page.text
        assert entry["sha256"][:12] in page.text
        download = client.get(f"/api/v1/exports/{snapshot.id}/files/{entry['name']}")
        assert sha256(download.content) == entry["sha256"]
    detail = client.get(f"/research/exports/{snapshot.id}")
    assert detail.status_code == 200 and snapshot.manifest_sha256 in detail.text


def test_bad_form_input_shows_the_form_again_and_creates_nothing(client, as_role, judged, db):
    csrf = as_role("researcher")
    cases = [
        (form_data(csrf, min_agreement="1.5"), "min_agreement"),
        (form_data(csrf, campaigns=[]), "campaigns: choose at least one"),
        (form_data(csrf, campaigns=["no-such-campaign"]), "no-such-campaign"),
        (form_data(csrf, since="2026-05-02", until="2026-05-01"), "since"),
    ]
    for data, expected in cases:
        response = client.post("/research/exports", data=data)
        assert response.status_code == 422, (data, response.status_code)
        assert 'data-testid="export-errors"' in response.text and expected in response.text
        assert 'data-testid="export-form"' in response.text
        assert "List should" not in response.text, "pydantic's own wording reached the page"
    assert snapshot_count(db) == 0


def test_a_pending_row_polls_the_snapshot_url_for_its_fragment(client, as_role, judged, users, db):
    snapshot = pending_snapshot(db, users)
    as_role("researcher")
    url = f"/research/exports/{snapshot.id}"
    row = client.get(url, headers={"HX-Request": "true", "HX-Target": f"snapshot-{snapshot.id}"})
    assert row.status_code == 200 and row.text.lstrip().startswith("<tr")
    assert "<html" not in row.text and 'hx-trigger="every 2s"' in row.text
    state = client.get(url, headers={"HX-Request": "true", "HX-Target": "snapshot-state"})
    assert 'id="snapshot-state"' in state.text and "<html" not in state.text
    assert client.get(url).status_code == 200

    snapshot.state, snapshot.error = "failed", "disk full"
    db.commit()
    row = client.get(url, headers={"HX-Request": "true", "HX-Target": f"snapshot-{snapshot.id}"})
    assert 'data-state="failed"' in row.text and "hx-trigger" not in row.text
    assert "disk full" in row.text
    done = client.get(url, headers={"HX-Request": "true", "HX-Target": "snapshot-state"})
    assert done.headers.get("hx-refresh") == "true"


# --- the real background build, on a committed database ----------------------------------------


def seed(database: Database, slug: str) -> tuple[dict[str, str], int]:
    """Two labelers rank four tasks; returns a researcher's token header and the count of
    comparisons."""
    with database.session() as db:
        campaign = make_campaign(db, slug=slug, k=3, overlap=2)
        for _ in range(4):
            make_task(db, campaign)
        rng = random.Random(2)
        for name in ("ann", "bob"):
            user = make_labeler(db, name)
            while (
                lease := labeling.next_task(db, user=user, campaign=campaign, rng=rng)
            ) is not None:
                ranking = [[cid] for cid in lease.display_order]
                labeling.submit(
                    db,
                    user=user,
                    submit_key=lease.submit_key,
                    answer=JudgmentIn(ranking=ranking, time_on_task_ms=2000),
                )
        researcher = auth_service.create_user(
            db, username="res", role=Role.researcher, password=None
        )
        token = auth_service.create_api_token(db, researcher, name="e2e")
        db.commit()
        total = db.scalar(select(func.count()).select_from(Comparison))
        return {"Authorization": f"Bearer {token.secret}"}, total


def test_a_snapshot_is_built_on_a_background_thread(fresh_database_url, tmp_path):
    from fastapi.testclient import TestClient

    settings = make_settings(database_url=fresh_database_url, data_dir=tmp_path / "data")
    database = Database(fresh_database_url)
    try:
        headers, total = seed(database, "bg")
        app = create_app(settings, database)
        with TestClient(app) as client:
            created = client.post(
                "/api/v1/exports",
                json={"campaigns": ["bg"], "format": "trl", "file_format": "parquet"},
                headers=headers,
            )
            assert created.status_code == 202
            url = created.json()["url"]
            deadline = time.monotonic() + 60
            while (shown := client.get(url, headers=headers).json())["state"] == "pending":
                assert time.monotonic() < deadline, "the snapshot was not built within 60 s"
                time.sleep(0.2)
            assert shown["state"] == "ready", shown
            for entry in shown["files"]:
                data = client.get(entry["url"], headers=headers).content
                assert sha256(data) == entry["sha256"]
            feed = client.get("/api/v1/campaigns/bg/comparisons", headers=headers).json()
            assert len(feed["comparisons"]) == total and feed["held_back"] is False
            assert not app.state.export_builder.busy()
    finally:
        database.dispose()


def ticked_campaigns(html: str) -> list[str]:
    """The campaign checkboxes of the new-snapshot form that start ticked."""
    return re.findall(r'name="campaigns" type="checkbox" value="([^"]+)" checked>', html)


def test_the_form_ticks_the_only_campaign_or_the_one_asked_for(
    client, as_role, judged, db, build_inline
):
    csrf = as_role("researcher")
    page = client.get("/research/exports")
    assert ticked_campaigns(page.text) == ["quality"]
    # What the browser sends for the form as it stands is a snapshot, not "choose at least one".
    created = client.post(
        "/research/exports",
        data=form_data(csrf, campaigns=ticked_campaigns(page.text)),
        follow_redirects=False,
    )
    assert created.status_code == 303 and snapshot_count(db) == 1

    make_campaign(db, slug="second")
    db.commit()
    assert ticked_campaigns(client.get("/research/exports").text) == []
    asked = client.get("/research/exports", params={"campaign": "second"})
    assert ticked_campaigns(asked.text) == ["second"]
    unknown = client.get("/research/exports", params={"campaign": "no-such"})
    assert unknown.status_code == 200 and ticked_campaigns(unknown.text) == []
