"""Campaigns: input rules, the service (guidelines versions, overlap, audit), the admin
pages and the `prefloop campaign` commands, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.models import AuditEvent
from app.auth import service as auth_service
from app.campaigns import service
from app.campaigns.models import (
    DEFAULT_FLAGS,
    Campaign,
    CampaignGuidelines,
    CampaignMode,
    CampaignStatus,
)
from app.campaigns.schemas import (
    CampaignSettings,
    InvalidCampaign,
    parse_create,
    parse_settings,
    settings_of,
)
from app.db import Database
from app.labeling import service as labeling
from app.labeling.models import Comparison, Prompt, Task, TaskStatus
from app.labeling.schemas import EditIn, JudgmentIn
from app.web import SESSION_COOKIE
from tests.factories import make_campaign, make_labeler, make_task
from tests.test_cli import cli_env, one_error_line, run_cli, run_cli_together

HOSTILE = '<script>alert("x")</script>\n\n<img src=x onerror=alert(1)>\n\n**Be kind.**'


def new_campaign(db: Session, slug: str = "helpful", actor=None, **values) -> Campaign:
    data = parse_create({"slug": slug, "name": values.pop("name", slug.title()), **values})
    campaign = service.create(db, data=data, actor=actor)
    db.flush()
    return campaign


def events(db: Session, campaign: Campaign, action: str) -> list[AuditEvent]:
    return list(
        db.scalars(
            select(AuditEvent)
            .where(AuditEvent.entity_type == "campaign", AuditEvent.entity_id == str(campaign.id))
            .where(AuditEvent.action == action)
            .order_by(AuditEvent.id)
        )
    )


def changed(campaign: Campaign, **values) -> CampaignSettings:
    return parse_settings({**settings_of(campaign), **values})


# --- input rules (no database) --------------------------------------------------------------


@pytest.mark.parametrize(
    "slug", ["a", "Upper", "-lead", "trail-", "under_score", "sp ace", "é-x", "x" * 65, "new", ""]
)
def test_bad_slugs_are_refused(slug: str) -> None:
    with pytest.raises(InvalidCampaign) as caught:
        parse_create({"slug": slug, "name": "N"})
    assert set(caught.value.errors) == {"slug"}


def test_good_slugs_and_defaults() -> None:
    for slug in ("ab", "a-1", "x" * 64, "2024-q3-helpfulness"):
        assert parse_create({"slug": slug, "name": "N"}).slug == slug
    data = parse_create({"slug": "ok", "name": "  Spaced  "})
    assert data.name == "Spaced"
    assert (data.k, data.mode, data.overlap, data.gold_rate) == (4, CampaignMode.rank, 3, 0.0)
    assert (data.lease_minutes, data.allow_ties, data.status) == (30, True, CampaignStatus.active)
    assert data.flags == DEFAULT_FLAGS


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("k", 1, "between 2 and 9"),
        ("k", 10, "between 2 and 9"),
        ("k", "four", "whole number"),
        ("overlap", 0, "between 1 and 50"),
        ("overlap", 51, "between 1 and 50"),
        ("gold_rate", 1.5, "between 0 and 1"),
        ("gold_rate", -0.1, "between 0 and 1"),
        ("recheck_rate", 0.6, "between 0 and 0.5"),
        ("recheck_rate", "often", "Enter a number"),
        ("lease_minutes", 0, "1 to 1440"),
        ("lease_minutes", 1441, "1 to 1440"),
        ("mode", "best-of", "rank, pairwise or demonstration"),
        ("name", "   ", "name"),
        ("flags", "harmful, Harmful", "listed twice"),
        ("flags", "x" * 41, "40 characters"),
        ("flags", ",".join(f"f{i}" for i in range(21)), "at most 20"),
    ],
)
def test_out_of_range_values_name_their_field(field: str, value: object, message: str) -> None:
    with pytest.raises(InvalidCampaign) as caught:
        parse_settings({"name": "N", field: value})
    assert list(caught.value.errors) == [field]
    assert message in caught.value.errors[field]


def test_pairwise_forces_k_two_and_flags_split() -> None:
    data = parse_settings({"name": "N", "mode": "pairwise", "k": "6"})
    assert (data.mode, data.k) == (CampaignMode.pairwise, 2)
    assert parse_settings({"name": "N", "mode": "rank", "k": "6"}).k == 6
    flags = parse_settings({"name": "N", "flags": " unsafe, rude\n\nlong-winded ,\n"}).flags
    assert flags == ["unsafe", "rude", "long-winded"]
    assert parse_settings({"name": "N", "flags": ""}).flags == []


# --- service ---------------------------------------------------------------------------------


def test_create_stores_version_one_and_an_audit_event(db: Session, users) -> None:
    campaign = new_campaign(
        db, "helpful", actor=users.admin, guidelines_md="# Rank by help", mode="pairwise", k=5
    )
    db.commit()
    assert service.get_by_slug(db, "helpful") is campaign
    assert (campaign.k, campaign.guidelines_version, campaign.created_by_id) == (
        2,
        1,
        users.admin.id,
    )
    versions = db.scalars(select(CampaignGuidelines)).all()
    assert [(v.campaign_id, v.version, v.guidelines_md) for v in versions] == [
        (campaign.id, 1, "# Rank by help")
    ]
    [event] = events(db, campaign, "campaign.create")
    assert event.actor_id == users.admin.id
    assert event.before is None
    assert event.after["slug"] == "helpful" and event.after["mode"] == "pairwise"
    assert event.after["k"] == 2 and event.after["guidelines_version"] == 1
    assert "guidelines_md" not in event.after


def test_duplicate_slug_is_a_validation_error(db: Session) -> None:
    new_campaign(db, "taken")
    with pytest.raises(InvalidCampaign) as caught:
        new_campaign(db, "taken", name="Other")
    assert "already exists" in caught.value.errors["slug"]
    # The session is still usable and holds one campaign.
    assert len(db.scalars(select(Campaign).where(Campaign.slug == "taken")).all()) == 1


def test_guidelines_edit_is_a_new_version_and_audits_only_changes(db: Session, users) -> None:
    campaign = new_campaign(db, "gg", guidelines_md="v1 text", overlap=3)
    service.update(db, campaign=campaign, data=changed(campaign), actor=users.admin)
    assert events(db, campaign, "campaign.update") == []  # nothing changed, nothing recorded

    service.update(
        db,
        campaign=campaign,
        data=changed(campaign, guidelines_md="v2 text", name="Renamed"),
        actor=users.admin,
    )
    db.commit()
    assert campaign.guidelines_version == 2
    texts = {
        v.version: v.guidelines_md
        for v in db.scalars(
            select(CampaignGuidelines).where(CampaignGuidelines.campaign_id == campaign.id)
        )
    }
    assert texts == {1: "v1 text", 2: "v2 text"}
    [event] = events(db, campaign, "campaign.update")
    assert event.before == {"name": "Gg", "guidelines_version": 1}
    assert event.after == {"name": "Renamed", "guidelines_version": 2}

    # Settings alone leave the guidelines version where it is.
    service.update(db, campaign=campaign, data=changed(campaign, lease_minutes=45), actor=None)
    assert campaign.guidelines_version == 2
    assert events(db, campaign, "campaign.update")[-1].after == {"lease_minutes": 45}


def _task(db: Session, campaign: Campaign, **values) -> Task:
    prompt = Prompt(campaign_id=campaign.id, text="p", content_hash="h")
    db.add(prompt)
    db.flush()
    task = Task(campaign_id=campaign.id, prompt_id=prompt.id, **values)
    db.add(task)
    db.flush()
    return task


def test_overlap_change_recomputes_task_status(db: Session) -> None:
    campaign = new_campaign(db, "oo", overlap=3)
    other = new_campaign(db, "other", overlap=3)
    two_of_three = _task(db, campaign, required_judgments=3, judgment_count=2)
    done = _task(db, campaign, required_judgments=3, judgment_count=3, status=TaskStatus.complete)
    retired = _task(db, campaign, required_judgments=3, status=TaskStatus.retired)
    gold = _task(db, campaign, required_judgments=1, is_gold=True)
    elsewhere = _task(db, other, required_judgments=3, judgment_count=2)

    service.update(db, campaign=campaign, data=changed(campaign, overlap=2), actor=None)
    db.commit()
    for task in (two_of_three, done, retired, gold, elsewhere):
        db.refresh(task)
    assert (two_of_three.required_judgments, two_of_three.status) == (2, TaskStatus.complete)
    assert (done.required_judgments, done.status) == (2, TaskStatus.complete)
    assert (retired.required_judgments, retired.status) == (3, TaskStatus.retired)
    assert (gold.required_judgments, gold.status) == (1, TaskStatus.open)
    assert (elsewhere.required_judgments, elsewhere.status) == (3, TaskStatus.open)

    service.update(db, campaign=campaign, data=changed(campaign, overlap=4), actor=None)
    db.commit()
    for task in (two_of_three, done):
        db.refresh(task)
        assert (task.required_judgments, task.status) == (4, TaskStatus.open)
    assert events(db, campaign, "campaign.update")[-1].before == {"overlap": 2}

    counts = {row.campaign.slug: row.counts for row in service.list_campaigns(db)}
    assert (counts["oo"].open_tasks, counts["oo"].complete_tasks) == (3, 0)  # gold is open too
    assert (counts["oo"].retired_tasks, counts["oo"].gold_tasks) == (1, 1)
    assert (counts["other"].open_tasks, counts["other"].judgments) == (1, 0)


def test_k_and_mode_are_fixed_once_there_are_tasks(db: Session) -> None:
    campaign = new_campaign(db, "fixed", k=4)
    service.update(db, campaign=campaign, data=changed(campaign, k=3), actor=None)
    assert campaign.k == 3  # no tasks yet: allowed
    _task(db, campaign, required_judgments=3)
    with pytest.raises(InvalidCampaign) as caught:
        service.update(db, campaign=campaign, data=changed(campaign, mode="pairwise"), actor=None)
    assert set(caught.value.errors) == {"k", "mode"}  # pairwise would also change K
    assert (campaign.k, campaign.mode) == (3, CampaignMode.rank)


def test_set_status_records_the_change_once(db: Session, users) -> None:
    campaign = new_campaign(db, "ss", status="draft")
    service.set_status(db, campaign=campaign, status=CampaignStatus.active, actor=users.admin)
    service.set_status(db, campaign=campaign, status=CampaignStatus.active, actor=users.admin)
    assert campaign.status == CampaignStatus.active
    [event] = events(db, campaign, "campaign.status")
    assert (event.before, event.after) == ({"status": "draft"}, {"status": "active"})


# --- pages -----------------------------------------------------------------------------------


@pytest.fixture
def sign_in(client, users, db, settings):
    """Sign a role in by creating its session directly (fast); returns its CSRF token."""

    def _sign_in(role: str) -> str:
        client.cookies.clear()
        token = auth_service.create_session(db, settings, users[role], ip=None, user_agent=None)
        db.commit()
        client.cookies.set(SESSION_COOKIE, token)
        return auth_service.resolve_session(db, settings, token).csrf_token

    return _sign_in


def form(csrf: str | None, **values: str) -> dict[str, str]:
    data = {
        "name": "Helpfulness",
        "description": "Rank answers",
        "guidelines_md": "# Be helpful",
        "k": "4",
        "mode": "rank",
        "overlap": "3",
        "gold_percent": "10",
        "lease_minutes": "30",
        "allow_ties": "true",
        "flags": "harmful\nwrong",
    }
    if csrf is not None:
        data["csrf_token"] = csrf
    data.update(values)
    return data


@pytest.mark.parametrize("role", ["labeler", "researcher"])
def test_pages_are_for_admins_only(client, sign_in, db: Session, role: str) -> None:
    new_campaign(db, "secret")
    db.commit()
    csrf = sign_in(role)
    for path in ("/admin/campaigns", "/admin/campaigns/new", "/admin/campaigns/secret"):
        assert client.get(path).status_code == 403, path
    posted = client.post("/admin/campaigns", data=form(csrf, slug="mine"), follow_redirects=False)
    assert posted.status_code == 403
    status = client.post(
        "/admin/campaigns/secret/status", data={"csrf_token": csrf, "status": "archived"}
    )
    assert status.status_code == 403
    assert service.get_by_slug(db, "mine") is None
    assert service.get_by_slug(db, "secret").status == CampaignStatus.active


def test_every_page_counts_only_active_comparisons(client, sign_in, db: Session) -> None:
    """An edited judgment replaces its comparisons: no page may count the superseded ones."""
    campaign = make_campaign(db, slug="edited", k=3, overlap=1)
    make_task(db, campaign)
    labeler = make_labeler(db)
    lease = labeling.next_task(db, user=labeler, campaign=campaign)
    first = [[cid] for cid in lease.display_order]
    judgment, _ = labeling.submit(
        db, user=labeler, submit_key=lease.submit_key, answer=JudgmentIn(ranking=first)
    )
    labeling.edit(
        db,
        user=labeler,
        judgment_id=judgment.id,
        answer=EditIn(ranking=first[::-1], idempotency_key=secrets.token_hex(12)),
    )
    db.commit()
    stored = db.scalars(select(Comparison).where(Comparison.campaign_id == campaign.id)).all()
    assert len(stored) == 6 and sum(c.is_active for c in stored) == 3  # 3 pairs, edited once
    sign_in("admin")
    cell = re.compile(r'data-testid="comparisons-edited">(\d+)<')
    for path in (
        "/admin",
        "/research",
        "/research/exports",
        "/admin/campaigns",
        "/admin/campaigns/edited",
    ):
        page = client.get(path)
        assert page.status_code == 200, path
        assert cell.findall(page.text) == ["3"], path


def test_a_demonstration_campaign_offers_sft_not_ranking_tools(client, sign_in, db) -> None:
    make_campaign(db, slug="written", mode=CampaignMode.demonstration, k=4)
    make_campaign(db, slug="ranked", k=3)
    db.commit()
    sign_in("admin")
    written = client.get("/admin/campaigns/written").text
    assert 'href="/jobs/new/sft?campaign=written"' in written and "Fine-tune (SFT)" in written
    for absent in ("Label quality", "Disagreements", "/quality", "/disagreements"):
        assert absent not in written, absent
    ranked = client.get("/admin/campaigns/ranked").text
    assert "Label quality" in ranked and "Disagreements" in ranked
    assert "/jobs/new/sft" not in ranked
    for path in ("/admin/campaigns", "/admin"):
        page = client.get(path).text
        row = re.search(r"<tr[^>]*>(?:(?!</tr>).)*written(?:(?!</tr>).)*</tr>", page, re.S)
        assert row is not None, path
        cells = re.findall(r"<td>(.*?)</td>", row.group(0), re.S)
        assert "\u2013" in cells[3 if path == "/admin/campaigns" else 2] and "4" not in cells, (
            path,
            cells,
        )


def test_guidelines_versions_are_a_plain_list_of_versions(client, sign_in, db) -> None:
    campaign = new_campaign(db, "listed", guidelines_md="1. First rule\n2. Second rule")
    service.update(
        db, campaign=campaign, data=changed(campaign, guidelines_md="- Only rule"), actor=None
    )
    db.commit()
    sign_in("admin")
    page = client.get("/admin/campaigns/listed").text
    block = page.split('data-testid="guidelines-versions"', 1)[1].split("</section>", 1)[0]
    assert "reversed" not in page.split('data-testid="guidelines-versions"', 1)[0][-80:]
    assert re.findall(r'<li class="version" data-version="(\d+)">', block) == ["2", "1"]
    assert "Version 2 (current)" in block and "Version 1" in block
    assert "<li>First rule</li>" in block and "<li>Only rule</li>" in block  # the Markdown's own


def test_create_through_the_form(client, sign_in, db: Session, users) -> None:
    csrf = sign_in("admin")
    page = client.get("/admin/campaigns/new")
    assert page.status_code == 200
    assert 'for="f-slug"' in page.text and 'id="f-slug"' in page.text  # labelled inputs
    assert "<script>" not in page.text.split("</head>")[1] and " style=" not in page.text

    without_token = client.post(
        "/admin/campaigns", data=form(None, slug="helpful"), follow_redirects=False
    )
    assert without_token.status_code == 403
    assert service.get_by_slug(db, "helpful") is None

    created = client.post(
        "/admin/campaigns", data=form(csrf, slug="helpful", status="draft"), follow_redirects=False
    )
    assert created.status_code == 303, created.text
    assert created.headers["location"] == "/admin/campaigns/helpful"
    campaign = service.get_by_slug(db, "helpful")
    assert campaign is not None
    assert (campaign.k, campaign.gold_rate, campaign.status) == (4, 0.1, CampaignStatus.draft)
    assert campaign.flags == ["harmful", "wrong"] and campaign.created_by_id == users.admin.id

    shown = client.get("/admin/campaigns/helpful")
    assert shown.status_code == 200
    assert "Created campaign &#39;helpful&#39;" in shown.text  # the flash
    assert 'href="/admin/imports?campaign=helpful"' in shown.text
    assert "/label/helpful" in shown.text
    assert "<h1>Be helpful</h1>" in shown.text  # the guidelines preview, rendered

    listed = client.get("/admin/campaigns")
    row = re.search(r'<tr data-testid="campaign-helpful".*?</tr>', listed.text, re.S)
    assert row and "Helpfulness" in row.group(0) and "10 %" in row.group(0)


def test_invalid_form_shows_messages_with_422(client, sign_in, db: Session) -> None:
    new_campaign(db, "taken")
    db.commit()
    csrf = sign_in("admin")
    bad = client.post(
        "/admin/campaigns", data=form(csrf, slug="Bad Slug", k="12", gold_percent="lots")
    )
    assert bad.status_code == 422
    assert "lower-case letters, digits and hyphens" in bad.text
    assert "K must be between 2 and 9." in bad.text
    assert "Enter a number." in bad.text
    assert 'value="Bad Slug"' in bad.text  # what was typed stays in the form
    assert 'aria-invalid="true"' in bad.text

    duplicate = client.post("/admin/campaigns", data=form(csrf, slug="taken"))
    assert duplicate.status_code == 422
    assert "already exists" in duplicate.text
    assert len(db.scalars(select(Campaign)).all()) == 1


def test_edit_settings_guidelines_and_status(client, sign_in, db: Session) -> None:
    campaign = new_campaign(db, "edit", guidelines_md="# First", overlap=3)
    task = _task(db, campaign, required_judgments=3, judgment_count=2)
    db.commit()
    csrf = sign_in("admin")

    bad = client.post("/admin/campaigns/edit", data=form(csrf, overlap="0", k="4"))
    assert bad.status_code == 422 and "Overlap must be between 1 and 50." in bad.text
    assert "Nothing was saved" in bad.text

    saved = client.post(
        "/admin/campaigns/edit",
        data=form(csrf, guidelines_md="# Second\r\nbe brief", overlap="2", k="4"),
        follow_redirects=False,
    )
    assert saved.status_code == 303
    db.refresh(campaign)
    db.refresh(task)
    assert (campaign.guidelines_version, campaign.guidelines_md) == (2, "# Second\nbe brief")
    assert (campaign.overlap, task.status) == (2, TaskStatus.complete)
    page = client.get("/admin/campaigns/edit")
    assert "The guidelines are now version 2." in page.text
    assert "Version 2 (current)" in page.text and "Version 1" in page.text

    fixed = client.post("/admin/campaigns/edit", data=form(csrf, k="5", overlap="2"))
    assert fixed.status_code == 422 and "K cannot change once the campaign has tasks." in fixed.text

    paused = client.post(
        "/admin/campaigns/edit/status",
        data={"csrf_token": csrf, "status": "paused"},
        follow_redirects=False,
    )
    assert paused.status_code == 303
    db.refresh(campaign)
    assert campaign.status == CampaignStatus.paused
    assert len(events(db, campaign, "campaign.status")) == 1
    assert client.get("/admin/campaigns/nope").status_code == 404


def test_saving_the_form_unchanged_changes_nothing(client, sign_in, db: Session) -> None:
    campaign = new_campaign(
        db,
        "steady",
        gold_rate=1 / 3,
        recheck_rate=1 / 7,
        guidelines_md="# Rules\n\n1. one",
        flags=["a", "b"],
    )
    db.commit()
    csrf = sign_in("admin")
    page = client.get("/admin/campaigns/steady").text
    shown = {
        name: re.search(rf'id="f-{name}"[^>]*value="([^"]*)"', page).group(1)
        for name in ("name", "k", "overlap", "gold_percent", "recheck_percent", "lease_minutes")
    }
    guidelines = re.search(r'id="f-guidelines_md".*?>(.*?)</textarea>', page, re.S).group(1)
    flags = re.search(r'id="f-flags".*?>(.*?)</textarea>', page, re.S).group(1)
    values = {**shown, "guidelines_md": guidelines.replace("\n", "\r\n"), "flags": flags}
    saved = client.post(
        "/admin/campaigns/steady",
        data=form(csrf, **values, description="", allow_ties="true"),
        follow_redirects=False,
    )
    assert saved.status_code == 303
    assert events(db, campaign, "campaign.update") == []
    assert "Nothing changed." in client.get("/admin/campaigns/steady").text
    db.refresh(campaign)
    assert (campaign.guidelines_version, campaign.gold_rate, campaign.recheck_rate) == (
        1,
        1 / 3,
        1 / 7,
    )


def test_the_recheck_rate_through_the_form(client, sign_in, db: Session, users) -> None:
    csrf = sign_in("admin")
    assert 'id="f-recheck_percent"' in client.get("/admin/campaigns/new").text
    created = client.post(
        "/admin/campaigns",
        data=form(csrf, slug="again", recheck_percent="20"),
        follow_redirects=False,
    )
    assert created.status_code == 303, created.text
    campaign = service.get_by_slug(db, "again")
    assert campaign.recheck_rate == 0.2
    assert re.search(
        r'id="f-recheck_percent"[^>]*value="20"', client.get("/admin/campaigns/again").text
    )

    too_many = client.post("/admin/campaigns/again", data=form(csrf, recheck_percent="60"))
    assert too_many.status_code == 422
    assert "The re-check rate must be between 0 and 0.5 (0 % to 50 %)." in too_many.text
    demo = client.post(
        "/admin/campaigns/again", data=form(csrf, mode="demonstration", recheck_percent="5")
    )
    assert demo.status_code == 422 and "rank and pairwise campaigns only" in demo.text
    saved = client.post(
        "/admin/campaigns/again", data=form(csrf, recheck_percent="5 %"), follow_redirects=False
    )
    assert saved.status_code == 303
    db.refresh(campaign)
    assert campaign.recheck_rate == 0.05
    [update] = events(db, campaign, "campaign.update")
    assert (update.before, update.after) == ({"recheck_rate": 0.2}, {"recheck_rate": 0.05})
    assert update.actor_id == users.admin.id


def test_hostile_guidelines_are_shown_as_text(client, sign_in, db: Session) -> None:
    new_campaign(db, "hostile", name="<b>Bold</b> name", guidelines_md=HOSTILE)
    db.commit()
    csrf = sign_in("admin")
    page = client.get("/admin/campaigns/hostile")
    assert page.status_code == 200
    body = page.text.split("</head>")[1]
    assert "<script" not in body and "<img" not in body and "<b>" not in body
    assert "&lt;script&gt;alert" in body and "&lt;img src=x onerror" in body
    assert "<strong>Be kind.</strong>" in body  # real Markdown still renders
    listed = client.get("/admin/campaigns").text
    assert "&lt;b&gt;Bold&lt;/b&gt; name" in listed and "<b>Bold" not in listed

    preview = client.post(
        "/admin/campaigns/preview",
        data={"guidelines_md": HOSTILE},
        headers={"X-CSRF-Token": csrf, "HX-Request": "true"},
    )
    assert preview.status_code == 200
    assert "<script" not in preview.text and "<img" not in preview.text
    assert "&lt;script&gt;" in preview.text and "<strong>Be kind.</strong>" in preview.text
    assert "<html" not in preview.text  # a fragment, not a page


# --- CLI ---------------------------------------------------------------------------------


def test_cli_create_list_show_update(fresh_database_url: str, tmp_path: Path) -> None:
    env = cli_env(fresh_database_url, tmp_path / "data")
    guidelines = tmp_path / "guidelines.md"
    guidelines.write_text("# Version one\n", encoding="utf-8")
    created = run_cli(
        "campaign", "create", "cli-camp", "--name", "From the CLI", "--k", "3",
        "--overlap", "2", "--gold-rate", "0.25", "--recheck-rate", "0.1", "--no-ties",
        "--flags", "rude, unsafe",
        "--guidelines-file", str(guidelines),
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "created campaign 'cli-camp' (rank, K=3, overlap 2, active)" in created.stdout

    guidelines.write_text("# Version two\n", encoding="utf-8")
    updated = run_cli(
        "campaign", "update", "cli-camp", "--overlap", "4", "--guidelines-file", str(guidelines),
        "--status", "paused",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert updated.returncode == 0, updated.stderr
    assert "guidelines_md, overlap, status" in updated.stdout

    # Reads and refusals, at once (process start-up is most of their cost).
    listed, shown, *refused = run_cli_together(
        ("campaign", "list"),
        ("campaign", "show", "cli-camp"),
        ("campaign", "create", "cli-camp"),
        ("campaign", "update", "cli-camp", "--overlap", "zero"),
        ("campaign", "update", "no-such-campaign", "--overlap", "2"),
        ("campaign", "show", "no-such-campaign"),
        env=env,
        cwd=tmp_path,
    )
    assert listed.returncode == 0, listed.stderr
    row = next(line.split() for line in listed.stdout.splitlines() if "cli-camp" in line)
    assert row[:8] == ["cli-camp", "rank", "3", "4", "0.25", "paused", "0", "0"], listed.stdout
    assert shown.returncode == 0, shown.stderr
    assert "version 2 of 2" in shown.stdout and "rude, unsafe" in shown.stdout
    assert "re-check rate:  0.1" in shown.stdout
    expected = [
        (2, "error: SLUG: A campaign with the slug 'cli-camp' already exists"),
        (2, "error: --overlap: Enter a whole number"),
        (1, "error: no campaign 'no-such-campaign'"),
        (1, "error: no campaign 'no-such-campaign'"),
    ]
    for result, (code, start) in zip(refused, expected, strict=True):
        assert result.returncode == code, (result.args, result.stderr)
        assert one_error_line(result).startswith(start), result.stderr

    database = Database(fresh_database_url)
    try:
        with database.session() as session:
            campaign = service.get_by_slug(session, "cli-camp")
            assert campaign is not None
            assert (campaign.allow_ties, campaign.gold_rate, campaign.overlap) == (False, 0.25, 4)
            assert campaign.recheck_rate == 0.1
            assert campaign.guidelines_md == "# Version two"
            assert campaign.status == CampaignStatus.paused
            assert [c.slug for c in session.scalars(select(Campaign))] == ["cli-camp"]
            actions = [
                e.action for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))
            ]
            assert actions == ["campaign.create", "campaign.update", "campaign.status"]
    finally:
        database.dispose()


def test_cli_rejects_bad_options_before_touching_the_database(tmp_path: Path) -> None:
    env = cli_env(f"sqlite:///{tmp_path / 'unused.db'}", tmp_path / "data")
    results = run_cli_together(
        ("campaign", "create", "Bad_Slug"),
        ("campaign", "create", "ok-slug", "--k", "12"),
        ("campaign", "create", "ok-slug", "--mode", "best", "--flags", "a,A"),
        ("campaign", "update", "ok-slug", "--status", "closed"),
        ("campaign", "create", "ok-slug", "--recheck-rate", "0.7"),
        ("campaign", "create", "ok-slug", "--guidelines-file", str(tmp_path / "missing.md")),
        env=env,
        cwd=tmp_path,
    )
    expected = [
        "error: SLUG: Use 2 to 64 lower-case letters",
        "error: --k: K must be between 2 and 9",
        "error: --mode: Choose rank, pairwise or demonstration; --flags: The flag 'A' is listed twice",
        "error: --status: Choose draft, active, paused or archived",
        "error: --recheck-rate: The re-check rate must be between 0 and 0.5 (0 % to 50 %)",
        "error: --guidelines-file: cannot read",
    ]
    for result, start in zip(results, expected, strict=True):
        assert result.returncode == 2, (result.args, result.stderr)
        assert one_error_line(result).startswith(start), result.stderr
    assert not (tmp_path / "unused.db").exists()
