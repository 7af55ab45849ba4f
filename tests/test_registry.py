"""The model registry: register a base or SFT policy (or an outside reward model) by folder or
hub id through the service, the page, the API and `prefloop model add|list`; the generation
form and `prefloop generate` queue a checked `generate` job."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sqlalchemy import select

from app.audit.models import AuditEvent
from app.auth import service as auth_service
from app.jobs import registry
from app.jobs.models import Job, ModelKind, ModelVersion
from app.jobs.specs import GenerateJobSpec, SpecError, canonical_base_url, parse_generate_spec
from tests.factories import make_campaign, make_task
from tests.test_cli import cli_env, run_cli, run_cli_together


def model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


# --- the service -------------------------------------------------------------------------------


def test_paths_are_folders_with_a_config_or_hub_ids(tmp_path):
    data = tmp_path / "data"
    model_folder(data / "models" / "sft-1")
    outside = model_folder(tmp_path / "elsewhere" / "base")
    (data / "empty").mkdir()
    assert registry.check_path("models/sft-1", data) == "models/sft-1"
    assert registry.check_path(" models/sft-1/ ", data) == "models/sft-1"
    assert registry.check_path(str(outside), data) == str(outside)
    assert registry.check_path("Qwen/Qwen2.5-0.5B-Instruct", data) == "Qwen/Qwen2.5-0.5B-Instruct"
    assert registry.check_path("gpt2", data) == "gpt2"
    with pytest.raises(registry.RegistryError, match="there is no folder"):
        registry.check_path("models/sft-2", data)  # under an existing folder: a typo, not a hub id
    with pytest.raises(registry.RegistryError, match=r"no config\.json"):
        registry.check_path("empty", data)
    with pytest.raises(registry.RegistryError, match="there is no folder"):
        registry.check_path(str(tmp_path / "missing"), data)
    with pytest.raises(registry.RegistryError, match=r"no '\.\.'"):
        registry.check_path("./models/../../elsewhere/base", data)
    with pytest.raises(registry.RegistryError, match="neither a folder"):
        registry.check_path("not a/hub id/at all", data)
    with pytest.raises(registry.RegistryError, match="give a model folder"):
        registry.check_path("  ", data)


def test_register_records_a_policy_version_and_an_audit_event(db, tmp_path, users):
    data = tmp_path / "data"
    model_folder(data / "models" / "base")
    base = registry.register(
        db, name="tiny base", path="models/base", data_dir=data, actor_id=users.admin.id
    )
    sft = registry.register(
        db,
        name="tiny sft",
        path="org/tiny-sft",
        data_dir=data,
        algorithm="sft",
        parent_id=base.id,
        actor_id=users.admin.id,
    )
    reward = registry.register(
        db, name="outside rm", path="org/rm", kind="reward", data_dir=data, actor_id=None
    )
    assert (base.kind, base.algorithm, base.path) == (ModelKind.policy, "base", "models/base")
    assert (sft.algorithm, sft.parent_id) == ("sft", base.id)
    assert (reward.kind, reward.algorithm) == (ModelKind.reward, "reward")
    events = db.scalars(
        select(AuditEvent).where(
            AuditEvent.action == "model.register", AuditEvent.entity_id == str(base.id)
        )
    ).all()
    assert len(events) == 1 and events[0].after["path"] == "models/base"
    assert [m.id for m in registry.list_versions(db, kind="policy")][:2] == [sft.id, base.id]
    with pytest.raises(registry.RegistryError, match="parent: there is no model version"):
        registry.register(db, name="x", path="gpt2", data_dir=data, parent_id=999999, actor_id=None)
    with pytest.raises(registry.RegistryError, match="algorithm"):
        registry.register(db, name="x", path="gpt2", data_dir=data, algorithm="ppo", actor_id=None)
    with pytest.raises(registry.RegistryError, match="kind"):
        registry.register(db, name="x", path="gpt2", data_dir=data, kind="critic", actor_id=None)
    with pytest.raises(registry.RegistryError, match="name"):
        registry.register(db, name=" ", path="gpt2", data_dir=data, actor_id=None)


def test_generation_specs_are_checked_before_queueing(db, tmp_path):
    campaign = make_campaign(db, slug="gen-spec", k=3)
    policy = registry.register(db, name="p", path="org/p", data_dir=tmp_path, actor_id=None)
    reward = registry.register(
        db, name="r", path="org/r", kind="reward", data_dir=tmp_path, actor_id=None
    )
    with pytest.raises(SpecError, match="or an endpoint, not both"):
        parse_generate_spec({"campaign": "gen-spec"})
    with pytest.raises(SpecError, match="or an endpoint, not both"):
        parse_generate_spec(
            {"campaign": "x", "model_id": 1, "endpoint": {"base_url": "http://h/v1", "model": "m"}}
        )
    with pytest.raises(SpecError, match="top_p"):
        parse_generate_spec({"campaign": "x", "model_id": 1, "top_p": 0})
    with pytest.raises(SpecError, match="api_key_env"):
        parse_generate_spec(
            {
                "campaign": "x",
                "endpoint": {"base_url": "http://h/v1", "model": "m", "api_key_env": "sk-123 oops"},
            }
        )
    with pytest.raises(SpecError, match="no policy model version"):
        registry.queue_generation(
            db, GenerateJobSpec(campaign="gen-spec", model_id=reward.id), actor_id=None
        )
    with pytest.raises(SpecError, match="no campaign 'nope'"):
        registry.queue_generation(
            db, GenerateJobSpec(campaign="nope", model_id=policy.id), actor_id=None
        )
    with pytest.raises(SpecError, match="greedily"):
        registry.queue_generation(
            db,
            GenerateJobSpec(campaign="gen-spec", model_id=policy.id, temperature=0),
            actor_id=None,
        )
    job = registry.queue_generation(
        db, GenerateJobSpec(campaign=campaign.slug, model_id=policy.id), actor_id=None
    )
    assert job.kind == "generate" and job.campaign_id == campaign.id
    assert job.config["model_id"] == policy.id and "endpoint" not in job.config


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
        (" HTTPS://API.Example.com/openai/ ", "https://api.example.com/openai/v1"),
        ("https://api.example.com/openai/v1", "https://api.example.com/openai/v1"),
    ],
)
def test_an_endpoint_has_one_spelling(spelling, canonical):
    assert canonical_base_url(spelling) == canonical
    spec = parse_generate_spec(
        {"campaign": "x", "endpoint": {"base_url": spelling.strip(), "model": "m"}}
    )
    assert spec.endpoint.base_url == canonical


def test_due_prompts_lack_an_open_task_and_this_models_k(db, tmp_path):
    """Prompt-only imports and prompts whose tasks are done are due; prompts being labeled,
    and prompts this model already answered K times, are not."""
    from app.labeling.models import Prompt, TaskStatus

    campaign = make_campaign(db, slug="gen-due", k=2)
    policy = registry.register(db, name="p", path="org/p", data_dir=tmp_path, actor_id=None)
    other = registry.register(db, name="q", path="org/q", data_dir=tmp_path, actor_id=None)
    bare = Prompt(campaign_id=campaign.id, text="bare", content_hash="h-bare")
    db.add(bare)
    labeling = make_task(db, campaign, completions=["a", "b"])
    done = make_task(db, campaign, completions=["c", "d"])
    done.status = TaskStatus.complete
    answered = make_task(db, campaign, completions=["e", "f"])
    answered.status = TaskStatus.complete
    db.flush()
    spec = GenerateJobSpec(campaign=campaign.slug, model_id=policy.id)
    assert registry.due_prompts(db, campaign, spec) == sorted(
        [bare.id, done.prompt_id, answered.prompt_id]
    )
    task = registry.add_generated_task(
        db,
        campaign=campaign,
        prompt_id=answered.prompt_id,
        texts=["g", "h"],
        params=[{"backend": "hf", "model_id": policy.id}] * 2,
        model_version_id=policy.id,
    )
    task.status = TaskStatus.complete
    db.flush()
    assert registry.due_prompts(db, campaign, spec) == sorted([bare.id, done.prompt_id])
    assert labeling.prompt_id not in registry.due_prompts(db, campaign, spec)
    # another model has not answered it yet
    assert answered.prompt_id in registry.due_prompts(
        db, campaign, GenerateJobSpec(campaign=campaign.slug, model_id=other.id)
    )
    assert registry.due_prompts(db, campaign, spec.model_copy(update={"max_prompts": 1})) == [
        min(bare.id, done.prompt_id)
    ]
    # an endpoint is told apart by its base URL and model
    endpoint = GenerateJobSpec(
        campaign=campaign.slug, endpoint={"base_url": "http://vllm:8000/v1", "model": "m"}
    )
    registry.add_generated_task(
        db,
        campaign=campaign,
        prompt_id=bare.id,
        texts=["i", "j"],
        # spelled as completions were stored before base URLs were made canonical
        params=[registry.generator_key(endpoint) | {"base_url": "http://VLLM:8000/"}] * 2,
        model_version_id=None,
    ).status = TaskStatus.retired
    db.flush()
    assert endpoint.endpoint.base_url == "http://vllm:8000/v1"
    assert bare.id not in registry.due_prompts(db, campaign, endpoint)
    respelled = GenerateJobSpec(
        campaign=campaign.slug, endpoint={"base_url": "http://vllm:8000", "model": "m"}
    )
    assert bare.id not in registry.due_prompts(db, campaign, respelled)
    assert bare.id in registry.due_prompts(
        db,
        campaign,
        endpoint.model_copy(
            update={"endpoint": endpoint.endpoint.model_copy(update={"model": "n"})}
        ),
    )


# --- the pages and the API -------------------------------------------------------------------


def test_admins_register_models_on_the_page_researchers_see_them(client, as_role, settings, db):
    model_folder(Path(settings.data_dir) / "models" / "base")
    csrf = as_role("admin")
    page = client.get("/models")
    assert page.status_code == 200 and 'data-testid="register-form"' in page.text
    bad = client.post(
        "/models", data={"name": "x", "path": "models/none/../..", "csrf_token": csrf}
    )
    assert bad.status_code == 422 and "Nothing was registered" in bad.text
    done = client.post(
        "/models",
        data={"name": "tiny base", "path": "models/base", "kind": "policy", "csrf_token": csrf},
        follow_redirects=False,
    )
    assert done.status_code == 303 and done.headers["location"] == "/models"
    model = db.scalars(select(ModelVersion).where(ModelVersion.name == "tiny base")).one()
    listed = client.get("/models")
    assert "Registered model version" in listed.text
    assert f'href="/generate?model={model.id}"' in listed.text
    assert 'data-testid="generate-from"' in client.get(f"/models/{model.id}").text

    as_role("researcher")
    seen = client.get("/models")
    assert seen.status_code == 200 and "tiny base" in seen.text
    assert 'data-testid="register-form"' not in seen.text
    form = client.get(f"/generate?model={model.id}")
    assert form.status_code == 200 and 'data-testid="generate-form"' in form.text


def test_the_generation_form_queues_a_job(client, as_role, db):
    campaign = make_campaign(db, slug="gen-form", k=2)
    make_task(db, campaign, completions=[])  # a prompt without completions... and a task
    policy = registry.register(db, name="p", path="org/p", data_dir=Path("."), actor_id=None)
    db.commit()
    csrf = as_role("researcher")
    page = client.get(f"/generate?campaign=gen-form&model={policy.id}")
    assert 'data-testid="due-count"' in page.text
    fields = {
        "campaign": "gen-form",
        "source": "model",
        "model_id": str(policy.id),
        "temperature": "0.7",
        "top_p": "0.9",
        "max_new_tokens": "32",
        "max_prompts": "",
        "csrf_token": csrf,
    }
    bad = client.post("/generate", data={**fields, "top_p": "2"})
    assert bad.status_code == 422 and "top_p" in bad.text
    endpoint = client.post(
        "/generate", data={**fields, "source": "endpoint", "endpoint_base_url": "ftp://x"}
    )
    assert endpoint.status_code == 422 and "base_url" in endpoint.text
    done = client.post("/generate", data=fields, follow_redirects=False)
    assert done.status_code == 303
    job = db.get(Job, int(done.headers["location"].rsplit("/", 1)[1]))
    assert job.kind == "generate" and job.config["temperature"] == 0.7
    assert job.config["max_new_tokens"] == 32 and "max_prompts" not in job.config


def test_the_api_registers_models_and_queues_generation(client, db, users, tmp_path):
    admin = auth_service.create_api_token(db, users.admin, name="a").secret
    researcher = auth_service.create_api_token(db, users.researcher, name="r").secret
    make_campaign(db, slug="gen-api", k=2)
    db.commit()
    as_admin = {"Authorization": f"Bearer {admin}"}
    made = client.post(
        "/api/v1/models", json={"name": "hub base", "path": "org/base"}, headers=as_admin
    )
    assert made.status_code == 201, made.text
    model = made.json()
    assert (model["kind"], model["algorithm"], model["path"]) == ("policy", "base", "org/base")
    refused = client.post(
        "/api/v1/models",
        json={"name": "x", "path": "org/base"},
        headers={"Authorization": f"Bearer {researcher}"},
    )
    assert refused.status_code == 403
    bad = client.post(
        "/api/v1/models", json={"name": "x", "path": "/no/such/folder"}, headers=as_admin
    )
    assert bad.status_code == 422 and "no folder" in bad.json()["detail"]
    orphan = client.post(
        "/api/v1/models", json={"name": "x", "path": "gpt2", "parent_id": 999999}, headers=as_admin
    )
    assert orphan.status_code == 404
    as_researcher = {"Authorization": f"Bearer {researcher}"}
    config = {"campaign": "gen-api", "model_id": model["id"], "temperature": 0.8}
    queued = client.post(
        "/api/v1/jobs", json={"kind": "generate", "config": config}, headers=as_researcher
    )
    assert queued.status_code == 201, queued.text
    assert queued.json()["kind"] == "generate" and queued.json()["state"] == "queued"
    missing = client.post(
        "/api/v1/jobs",
        json={"kind": "generate", "config": {**config, "campaign": "nope"}},
        headers=as_researcher,
    )
    assert missing.status_code == 404
    wrong = client.post(
        "/api/v1/jobs",
        json={"kind": "generate", "config": {**config, "temperature": -1}},
        headers=as_researcher,
    )
    assert wrong.status_code == 422 and "temperature" in wrong.json()["detail"]


# --- the command line --------------------------------------------------------------------------


def test_model_add_list_and_generate_from_the_command_line(fresh_database_url, tmp_path):
    from app.db import Database

    database = Database(fresh_database_url)
    with database.session() as db:
        make_campaign(db, slug="gen-cli", k=2)
        db.commit()
    database.dispose()
    data = tmp_path / "data"
    model_folder(data / "models" / "base")
    env = cli_env(fresh_database_url, data)
    added = run_cli("model", "add", "tiny-base", "--path", "models/base", env=env, cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    match = re.search(r"registered model version (\d+) \(policy, base\)", added.stdout)
    assert match, added.stdout
    base_id = match.group(1)
    results = run_cli_together(
        ("model", "add", "x", "--path", "models/missing"),
        ("model", "add", "x", "--path", "gpt2", "--kind", "critic"),
        (
            "model",
            "add",
            "tiny-sft",
            "--path",
            "org/sft",
            "--algorithm",
            "sft",
            "--parent",
            base_id,
        ),
        ("generate", "--campaign", "gen-cli", "--model", "tiny-base", "--temperature", "0.5"),
        ("generate", "--campaign", "gen-cli", "--model", "nope"),
        ("generate", "--campaign", "gen-cli", "--endpoint", "http://127.0.0.1:1/v1"),
        ("generate", "--campaign", "gen-cli", "--model", base_id, "--top-p", "0"),
        env=env,
        cwd=tmp_path,
    )
    missing, critic, sft, queued, unknown, no_model, bad_top_p = results
    assert missing.returncode == 2 and "there is no folder" in missing.stderr
    assert critic.returncode == 2 and "--kind" in critic.stderr
    assert sft.returncode == 0, sft.stderr
    assert queued.returncode == 0 and "queued job" in queued.stdout, queued.stderr
    assert unknown.returncode == 1 and "no policy model version 'nope'" in unknown.stderr
    assert no_model.returncode == 2 and "--endpoint-model" in no_model.stderr
    assert bad_top_p.returncode == 2 and "top_p" in bad_top_p.stderr
    for failed in (missing, critic, unknown, no_model, bad_top_p):
        assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    listed = run_cli("model", "list", env=env, cwd=tmp_path)
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert "tiny-sft" in lines[1] and "sft" in lines[1] and "tiny-base" in lines[2]
    assert "models/base" in lines[2]
