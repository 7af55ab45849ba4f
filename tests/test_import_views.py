"""The import page (admins upload a file) and `POST /api/v1/imports` (scripts with a token)."""

from __future__ import annotations

import gzip
import json

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.audit.models import AuditEvent
from app.auth import service as auth_service
from app.campaigns.models import Campaign, CampaignMode
from app.labeling.models import Comparison, ComparisonSource, Prompt, Task
from tests.conftest import Accounts, csrf_from

ROWS = [
    {
        "id": "w1",
        "prompt": "Why is the sky blue?",
        "completions": ["Rayleigh scattering.", "Paint."],
    },
    {"id": "w2", "prompt": "Name a prime.", "completions": ["7", "8", "9"]},
]
BODY = "\n".join(json.dumps(row) for row in ROWS).encode()
HH_ROW = {
    "chosen": "\n\nHuman: Can I pet a wild fox?\n\nAssistant: Better not: they bite and carry rabies.",
    "rejected": "\n\nHuman: Can I pet a wild fox?\n\nAssistant: Sure, grab it.",
}


def make_campaign(db: Session, slug: str = "web-imports") -> Campaign:
    campaign = Campaign(slug=slug, name="Web imports", mode=CampaignMode.rank, overlap=2)
    db.add(campaign)
    db.commit()
    return campaign


def count(db: Session, model: type) -> int:
    db.expire_all()
    return db.scalar(select(func.count()).select_from(model))


def bearer(db: Session, user) -> dict[str, str]:
    token = auth_service.create_api_token(db, user, name="import script")
    db.commit()
    return {"Authorization": f"Bearer {token.secret}"}


# --- the page -------------------------------------------------------------------------------


def test_the_page_is_for_admins(client: TestClient, as_role, db: Session) -> None:
    make_campaign(db)
    as_role("admin")
    page = client.get("/admin/imports?campaign=web-imports")
    assert page.status_code == 200
    assert 'enctype="multipart/form-data"' in page.text and 'name="csrf_token"' in page.text
    assert '<option value="web-imports" selected>' in page.text
    assert "HH-RLHF" in page.text and "No imports yet." in page.text
    html = page.text
    assert "<script>" not in html and " style=" not in html

    csrf = as_role("labeler")
    assert client.get("/admin/imports").status_code == 403
    refused = client.post(
        "/admin/imports",
        data={"campaign": "web-imports", "csrf_token": csrf},
        files={"file": ("rows.jsonl", BODY, "application/x-ndjson")},
    )
    assert refused.status_code == 403
    assert count(db, Prompt) == 0


def test_upload_imports_and_reports_the_counts(
    client: TestClient, as_role, db: Session, users: Accounts
) -> None:
    campaign = make_campaign(db)
    csrf = as_role("admin")
    form = {"campaign": "web-imports", "format": "auto"}
    no_token = client.post(
        "/admin/imports", data=form, files={"file": ("rows.jsonl", BODY, "text/plain")}
    )
    assert no_token.status_code == 403 and count(db, Prompt) == 0

    response = client.post(
        "/admin/imports",
        data={**form, "csrf_token": csrf},
        files={"file": ("rows.jsonl", BODY, "application/x-ndjson")},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/admin/imports?campaign=web-imports"
    page = client.get(response.headers["location"])
    assert (
        "Imported rows.jsonl into &#39;web-imports&#39;: 2 lines; created 2 prompts, 5 completions, 2 tasks"
        in page.text
    )
    assert 'data-testid="recent-imports"' in page.text and "rows.jsonl" in page.text
    assert (count(db, Prompt), count(db, Task)) == (2, 2)
    event = db.scalars(select(AuditEvent).where(AuditEvent.action == "import.create")).one()
    assert event.actor_id == users.admin.id and event.entity_id == str(campaign.id)
    assert event.ip is not None and event.after["tasks"] == 2

    # The same file again: nothing new, and the page says so.
    again = client.post(
        "/admin/imports",
        data={**form, "csrf_token": csrf},
        files={"file": ("rows.jsonl", BODY, "application/x-ndjson")},
    )
    assert again.status_code == 200 and "2 duplicates skipped" in again.text
    assert count(db, Task) == 2

    # A pair as an already-judged comparison (the checkbox).
    judged = client.post(
        "/admin/imports",
        data={**form, "as_judged": "true", "csrf_token": csrf},
        files={"file": ("hh.jsonl", json.dumps(HH_ROW).encode(), "application/x-ndjson")},
    )
    assert judged.status_code == 200 and "1 comparison" in judged.text
    comparison = db.scalars(select(Comparison)).one()
    assert comparison.source == ComparisonSource.imported and comparison.user_id is None
    assert count(db, Task) == 2


def test_upload_with_bad_lines_lists_them_and_imports_nothing(
    client: TestClient, as_role, db: Session
) -> None:
    make_campaign(db)
    csrf = as_role("admin")
    body = BODY + b"\n{not json\n" + json.dumps({"prompt": "q", "completions": ["a"]}).encode()
    response = client.post(
        "/admin/imports",
        data={"campaign": "web-imports", "format": "auto", "skip_invalid": "", "csrf_token": csrf},
        files={"file": ("broken.jsonl", body, "application/x-ndjson")},
    )
    assert response.status_code == 422
    assert "2 bad lines; nothing was imported." in response.text
    assert "Line 3: invalid JSON" in response.text
    assert "Line 4: a rank task needs 2 to 9 completions, not 1" in response.text
    assert '<option value="web-imports" selected>' in response.text  # the form is kept
    imports = select(func.count()).where(AuditEvent.action == "import.create")
    assert count(db, Prompt) == 0 and db.scalar(imports) == 0

    for data, files, message in (
        ({"campaign": "nope"}, {"file": ("a.jsonl", BODY, "text/plain")}, "Choose the campaign"),
        ({"campaign": "web-imports"}, {"file": ("", b"", "application/octet-stream")}, "Choose a file"),
        ({"campaign": "web-imports", "format": "xml"}, {"file": ("a.jsonl", BODY, "text/plain")}, "listed formats"),
    ):  # fmt: skip
        refused = client.post("/admin/imports", data={**data, "csrf_token": csrf}, files=files)
        assert refused.status_code == 422 and message in refused.text, message
    assert count(db, Prompt) == 0


def test_upload_of_a_gzipped_file_is_unpacked(client: TestClient, as_role, db: Session) -> None:
    make_campaign(db)
    csrf = as_role("admin")
    page = client.get("/admin/imports").text
    assert ".gz" in page.split('id="import-file"', 1)[1].split(">", 1)[0], "accept= leaves out .gz"
    form = {"campaign": "web-imports", "format": "auto", "csrf_token": csrf}
    packed = gzip.compress(BODY)
    response = client.post(
        "/admin/imports",
        data=form,
        files={"file": ("rows.jsonl.gz", packed, "application/gzip")},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    assert (count(db, Prompt), count(db, Task)) == (2, 2)
    csv_body = gzip.compress(b"prompt,completion_1,completion_2\nHello?,Hi!,Go away.\n")
    as_csv = client.post(
        "/admin/imports", data=form, files={"file": ("rows.csv.gz", csv_body, "application/gzip")}
    )
    assert as_csv.status_code == 200 and count(db, Task) == 3

    truncated = gzip.compress(BODY + b"\n" + json.dumps(HH_ROW).encode())[:-12]
    refused = client.post(
        "/admin/imports", data=form, files={"file": ("cut.jsonl.gz", truncated, "application/gzip")}
    )
    assert refused.status_code == 422 and "not a readable gzip file" in refused.text
    assert count(db, Task) == 3


def test_a_gzip_upload_unpacks_to_no_more_than_the_upload_limit(
    client: TestClient, as_role, db: Session, monkeypatch
) -> None:
    """A few KiB of gzip can hold gigabytes: past the upload limit it is refused whole."""
    make_campaign(db)
    csrf = as_role("admin")
    monkeypatch.setattr(client.app.state.settings, "max_upload_bytes", 64 << 10)
    bomb = gzip.compress(b"\n" * (4 << 20) + BODY)  # 4 MiB of newlines first: ~4 KiB packed
    assert len(bomb) < 16 << 10
    form = {"campaign": "web-imports", "format": "auto", "csrf_token": csrf}
    refused = client.post(
        "/admin/imports", data=form, files={"file": ("bomb.jsonl.gz", bomb, "application/gzip")}
    )
    assert refused.status_code == 422
    assert (
        "unpacks to more than the upload limit (PREFLOOP_MAX_UPLOAD_BYTES = 65,536" in refused.text
    )
    assert count(db, Prompt) == 0
    small = gzip.compress(b"\n" * 100 + BODY)  # leading blank lines are fine under the limit
    done = client.post(
        "/admin/imports", data=form, files={"file": ("ok.jsonl.gz", small, "application/gzip")}
    )
    assert done.status_code == 200 and count(db, Prompt) == 2


# --- the API --------------------------------------------------------------------------------


def test_api_imports_a_raw_body_with_a_token(
    client: TestClient, db: Session, users: Accounts
) -> None:
    make_campaign(db)
    headers = bearer(db, users.admin)
    client.cookies.clear()
    response = client.post(
        "/api/v1/imports?campaign=web-imports&filename=rows.jsonl",
        content=BODY,
        headers={**headers, "Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert {k: result[k] for k in ("lines", "prompts", "completions", "tasks", "duplicates")} == {
        "lines": 2, "prompts": 2, "completions": 5, "tasks": 2, "duplicates": 0
    }  # fmt: skip
    assert result["file_name"] == "rows.jsonl" and result["formats"] == {"prompt": 2}
    assert count(db, Task) == 2

    # CSV, and a multipart upload with pairs imported as judged.
    csv_body = b"prompt,completion_1,completion_2\nHello?,Hi!,Go away.\n"
    as_csv = client.post(
        "/api/v1/imports?campaign=web-imports",
        content=csv_body,
        headers={**headers, "Content-Type": "text/csv"},
    )
    assert as_csv.status_code == 200 and as_csv.json()["tasks"] == 1
    judged = client.post(
        "/api/v1/imports?campaign=web-imports&as_judged=true",
        files={"file": ("hh.jsonl", json.dumps(HH_ROW).encode(), "application/x-ndjson")},
        headers=headers,
    )
    assert judged.status_code == 200, judged.text
    assert (judged.json()["comparisons"], judged.json()["file_name"]) == (1, "hh.jsonl")
    assert count(db, Comparison) == 1 and count(db, Task) == 3


def test_api_errors(client: TestClient, db: Session, users: Accounts) -> None:
    make_campaign(db)
    admin = bearer(db, users.admin)
    client.cookies.clear()
    body = BODY + b"\n" + b'{"prompt": 1}\n' + b'{"chosen": "x"}\n'
    bad = client.post("/api/v1/imports?campaign=web-imports", content=body, headers=admin)
    assert bad.status_code == 422
    assert bad.json() == {
        "detail": "2 bad lines; nothing was imported.",
        "errors": [
            {"line": 3, "message": '"prompt" must be a string, not a whole number'},
            {"line": 4, "message": 'missing "rejected"'},
        ],
        "more_errors": 0,
    }
    assert count(db, Prompt) == 0

    empty = client.post("/api/v1/imports?campaign=web-imports", content=b"", headers=admin)
    assert empty.status_code == 422 and empty.json()["errors"] == [
        {"line": None, "message": "the file has no data lines"}
    ]
    missing = client.post("/api/v1/imports?campaign=nope", content=BODY, headers=admin)
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    no_campaign = client.post("/api/v1/imports", content=BODY, headers=admin)
    assert no_campaign.status_code == 422

    researcher = bearer(db, users.researcher)
    denied = client.post("/api/v1/imports?campaign=web-imports", content=BODY, headers=researcher)
    assert denied.status_code == 403
    assert client.post("/api/v1/imports?campaign=web-imports", content=BODY).status_code == 401
    assert count(db, Prompt) == 0


def test_api_with_a_browser_session_needs_the_csrf_header(
    client: TestClient, as_role, db: Session
) -> None:
    make_campaign(db)
    csrf = as_role("admin")
    url = "/api/v1/imports?campaign=web-imports"
    assert client.post(url, content=BODY).status_code == 403
    ok = client.post(url, content=BODY, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 200 and ok.json()["tasks"] == 2
    assert csrf_from(client.get("/admin/imports").text) == csrf


def test_api_is_documented(client: TestClient) -> None:
    schema = client.get("/api/openapi.json").json()
    operation = schema["paths"]["/api/v1/imports"]["post"]
    assert operation["summary"] == "Import a dataset into a campaign"
    assert {"application/x-ndjson", "text/csv", "multipart/form-data"} <= set(
        operation["requestBody"]["content"]
    )
    assert {p["name"] for p in operation["parameters"]} >= {"campaign", "format", "as_judged"}
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    refused = operation["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/ImportResultOut") and refused.endswith("/ImportErrorOut")
    fields = schema["components"]["schemas"]["ImportResultOut"]["properties"]
    assert {"prompts", "completions", "tasks", "comparisons", "duplicates"} <= fields.keys()
