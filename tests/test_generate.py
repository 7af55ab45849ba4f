"""Sampling on a tiny Llama built from config (left padding: batched greedy decoding equals
one prompt at a time; EOS stops a row; the chat template), re-sampling duplicates, and the
`generate` job end to end: a registered policy (or an OpenAI-compatible server) answers the
campaign's prompts that lack completions, and the labeling service serves the new tasks."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.auth import service as auth_service
from app.auth.models import Role, User
from app.campaigns.models import Campaign
from app.jobs import registry
from app.jobs import service as job_service
from app.jobs.models import Job, JobState
from app.jobs.specs import GenerateJobSpec
from app.labeling import importer
from app.labeling import service as labeling
from app.labeling.models import Completion, CompletionSource, Prompt, Task, TaskStatus
from app.labeling.schemas import JudgmentIn
from app.main import create_app
from tests.factories import make_campaign, make_labeler, make_task
from tests.test_openai_client import vllm  # noqa: F401  (the fixture)
from tests.tiny_models import causal_lm, tokenizer_for
from trainer.generate import HFSampler, as_text, sample_distinct, text_hash
from trainer.worker import run_worker

FAST = {"lease_seconds": 30.0, "heartbeat_seconds": 0.3, "poll_interval": 0.05}
WORDS = (
    "why is the sky blue because light scatters more at short wavelengths "
    "what makes grass green chlorophyll absorbs red and reflects it tell me a joke "
    "about cats they sleep all day and night hello there friend"
)
PROMPTS = [
    "why is the sky blue",
    "what makes grass green",
    "tell me a joke about cats",
    "hello there",
    "why do cats sleep all day",
    "what is light",
]


def tiny_policy(folder: Path, *, seed: int = 0, template: bool = True) -> Path:
    tokenizer = tokenizer_for([WORDS, *PROMPTS])
    if not template:
        tokenizer.chat_template = None
    causal_lm(tokenizer, seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sampler(tmp_path_factory) -> HFSampler:
    return HFSampler(tiny_policy(tmp_path_factory.mktemp("policy") / "m"), "cpu")


# --- the sampler ---------------------------------------------------------------------------------


def test_batched_greedy_decoding_equals_one_prompt_at_a_time(sampler):
    """Left padding with its attention mask changes nothing: every row decodes exactly as it
    would alone (the prompts differ in length, so the short ones are padded)."""
    lengths = {len(sampler.encode(p)) for p in PROMPTS}
    assert len(lengths) > 1
    batched = sampler.sample(PROMPTS, 1, temperature=0, max_new_tokens=8)
    alone = [sampler.sample([p], 1, temperature=0, max_new_tokens=8)[0] for p in PROMPTS]
    assert batched == alone
    assert len({group[0][0] for group in batched}) > 1  # the prompts do lead somewhere else
    # n copies of a prompt decode greedily to the same text
    assert len(set(sampler.sample(PROMPTS[:1], 3, temperature=0, max_new_tokens=8)[0])) == 1


def test_a_row_stops_at_eos_and_the_rest_is_cut(sampler):
    prompt = PROMPTS[0]
    free = sampler.sample([prompt], 1, temperature=0, max_new_tokens=8)[0][0]
    assert free[1] == "length"
    # make the token greedy decoding emits third the EOS: generation must stop right before it
    input_ids = sampler.encode(prompt)
    import torch

    with torch.inference_mode():
        out = sampler.model.generate(
            input_ids=torch.tensor([input_ids]),
            attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=sampler.eos_ids,
            pad_token_id=sampler.tokenizer.pad_token_id,
        )
    new = out[0, len(input_ids) :].tolist()
    cut = next(j for j in range(1, len(new)) if new[j] not in new[:j])
    saved = sampler.eos_ids
    sampler.eos_ids = [new[cut]]
    try:
        # a second prompt runs longer in the same batch: the first is cut at its own EOS
        [[(text, reason)], [(other, other_reason)]] = sampler.sample(
            [prompt, PROMPTS[1]], 1, temperature=0, max_new_tokens=8
        )
    finally:
        sampler.eos_ids = saved
    assert reason == "stop"
    assert text == sampler.tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    assert other_reason in ("stop", "length") and isinstance(other, str)
    # each text keeps the ids the policy sampled, the stop token with them
    assert text.tokens == (*new[:cut], new[cut])
    assert free[0].tokens == tuple(new)
    import copy
    import pickle

    for kept in (pickle.loads(pickle.dumps(free[0])), copy.deepcopy(free[0])):  # noqa: S301
        assert kept == free[0] and kept.tokens == free[0].tokens
    assert free[0] == sampler.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_a_samples_log_ratio_is_taken_on_the_tokens_it_was_sampled_as(sampler, tmp_path):
    """The log-ratio to a reference is of the sampled ids, not of the stored text tokenized
    again: a text whose ids say otherwise is scored as those ids."""
    from trainer.generate import SampledText
    from trainer.policy_eval import SampleEvaluator

    reference = tiny_policy(tmp_path / "reference", seed=1)
    evaluator = SampleEvaluator(sampler, reference=reference)
    tokenizer = sampler.tokenizer
    eos = tokenizer.eos_token_id
    [sky] = tokenizer("sky", add_special_tokens=False)["input_ids"]
    prompts = [PROMPTS[0]] * 3
    disguised = SampledText("blue", [sky, eos])  # stored as "blue", sampled as "sky" + EOS
    [(as_sampled, n), (sky_text, _), (blue_text, _)] = evaluator.log_ratios(
        prompts, [disguised, "sky", "blue"], [True, True, True]
    )
    assert n == 2
    assert as_sampled == pytest.approx(sky_text, abs=1e-6)
    assert abs(as_sampled - blue_text) > 1e-4  # the two models tell the words apart


def test_sampling_is_exactly_softmax_over_temperature(tmp_path):
    """Nothing narrows the distribution: neither transformers' default top_k=50 nor the
    model's own generation_config.json (here top_k=3 and a repetition penalty)."""
    import torch
    from transformers import GenerationConfig

    folder = tiny_policy(tmp_path / "m", template=False)
    GenerationConfig(top_k=3, repetition_penalty=1.5, do_sample=True).save_pretrained(folder)
    sampler = HFSampler(folder, "cpu")
    prompt, temperature, n = "why is the sky", 1.5, 3000
    draws = sampler.sample([prompt], n=n, temperature=temperature, max_new_tokens=1, seed=0)[0]
    with torch.no_grad():
        logits = sampler.model(torch.tensor([sampler.encode(prompt)])).logits[0, -1]
    expected: dict[str, float] = {}  # by text: EOS and other special tokens decode to ""
    for token_id, p in enumerate((logits / temperature).softmax(-1).tolist()):
        text = sampler.tokenizer.decode([token_id], skip_special_tokens=True).strip()
        expected[text] = expected.get(text, 0.0) + p
    seen = {text: count / n for text, count in Counter(text for text, _ in draws).items()}
    distance = 0.5 * sum(abs(seen.get(t, 0.0) - expected.get(t, 0.0)) for t in {*seen, *expected})
    assert len(seen) > 10 and distance < 0.1  # sampling noise: ~0.05; with top_k=3: ~0.8


def test_the_chat_template_or_bos_frames_the_prompt(sampler, tmp_path):
    ids = sampler.encode("hello there")
    tokens = sampler.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<user>" and tokens[-1] == "<assistant>"
    chat = sampler.encode(
        [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    )
    assert sampler.tokenizer.convert_ids_to_tokens(chat)[0] == "<system>"
    plain = HFSampler(tiny_policy(tmp_path / "plain", template=False), "cpu")
    assert not plain.chat_template
    assert plain.tokenizer.convert_ids_to_tokens(plain.encode("hello there"))[-2:] == [
        "hello",
        "there",
    ]
    short = HFSampler(tmp_path / "plain", "cpu", max_prompt_tokens=3)
    assert len(short.encode(PROMPTS[4])) == 3  # the start is cut, the end kept
    assert short.tokenizer.convert_ids_to_tokens(short.encode(PROMPTS[4]))[-1] == "day"


def test_duplicates_are_resampled_until_k_distinct():
    calls: list[tuple[int, int]] = []
    script = {0: ["same", "same", "same"], 1: ["same", "new"], 2: ["newer"]}

    def fake(prompts, n, round_number):
        calls.append((len(prompts), n))
        return [[(text, "stop") for text in script[round_number][:n]] for _ in prompts]

    got = sample_distinct(fake, ["p"], 3, max_rounds=4)
    assert [text for text, _ in got.completions[0]] == ["same", "new", "newer"]
    assert got.duplicates == 3 and got.rounds == 2 and got.short == [] and got.sampled == 6
    assert calls == [(1, 3), (1, 2), (1, 1)]
    # the prompt's stored completions count as seen; an empty text is dropped too
    existing = [{text_hash("same")}]
    script = {0: ["same", "", "a"], 1: ["a", "b"], 2: ["a"]}
    got = sample_distinct(fake, ["p"], 3, existing=existing, max_rounds=2)
    assert [text for text, _ in got.completions[0]] == ["a", "b"]
    assert got.short == [0] and got.rounds == 2


def test_a_tiny_model_resamples_its_repeats(sampler):
    """One new token from a small vocabulary repeats often: the repeats are drawn again."""
    prompts = PROMPTS[:3]
    got = sample_distinct(
        lambda ps, n, r: sampler.sample(ps, n, temperature=1.5, max_new_tokens=1, seed=r),
        prompts,
        5,
        max_rounds=20,
    )
    assert got.duplicates > 0 and got.short == []
    for group in got.completions:
        texts = [text for text, _ in group]
        assert len(texts) == 5 and len(set(texts)) == 5 and all(texts)


# --- the job, end to end -------------------------------------------------------------------------


def seed_campaign(db, slug: str):
    """Prompts without completions (text and chat), one being labeled, one whose task is done."""
    campaign = make_campaign(db, slug=slug, k=3, overlap=2)
    lines = [json.dumps({"prompt": p}) for p in PROMPTS[:4]]
    lines.append(json.dumps({"messages": [{"role": "user", "content": PROMPTS[4]}]}))
    importer.import_stream(db, campaign, io.BytesIO("\n".join(lines).encode()), file_name="p.jsonl")
    busy = make_task(db, campaign, prompt="busy prompt", completions=["x", "y", "z"])
    done = make_task(db, campaign, prompt=PROMPTS[5], completions=["dup", "light is fast", "w"])
    done.status = TaskStatus.complete
    return campaign, busy, done


def test_a_policy_answers_the_prompts_that_lack_completions(live):
    database, settings = live
    folder = tiny_policy(Path(settings.data_dir) / "models" / "tiny-policy")
    with database.session() as db:
        campaign, busy, done = seed_campaign(db, "gen-live")
        policy = registry.register(
            db, name="tiny", path="models/tiny-policy", data_dir=settings.data_dir, actor_id=None
        )
        researcher = auth_service.create_user(
            db, username="gen-r", role=Role.researcher, password=None
        )
        token = auth_service.create_api_token(db, researcher, name="gen").secret
        labeler = make_labeler(db, "gen-labeler")
        db.commit()
        ids = {
            "campaign": campaign.id,
            "policy": policy.id,
            "busy": busy.prompt_id,
            "done": done.prompt_id,
            "labeler": labeler.id,
        }
    assert folder.is_dir()
    client = TestClient(create_app(settings, database))
    auth = {"Authorization": f"Bearer {token}"}
    config = {
        "campaign": "gen-live",
        "model_id": ids["policy"],
        "temperature": 1.0,
        "top_p": 0.95,
        "max_new_tokens": 6,
        "batch_size": 2,
        "max_prompts": 4,
        "resample_rounds": 10,
        "seed": 7,
    }
    created = client.post("/api/v1/jobs", json={"kind": "generate", "config": config}, headers=auth)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    assert (
        run_worker(
            settings, "gen-worker", once=True, database=database, install_signals=False, **FAST
        )
        == 1
    )

    job = client.get(f"/api/v1/jobs/{job_id}", headers=auth).json()
    assert job["state"] == "succeeded", job["error"]
    result = job["result"]
    assert result["prompts_planned"] == 4 and result["prompts_done"] == 4
    assert result["tasks_created"] == 4 and result["completions"] == 12, result
    assert result["completions_per_second"] > 0
    series = client.get(f"/api/v1/jobs/{job_id}/metrics", headers=auth).json()["series"]
    assert {"generate/completions_per_second", "generate/duplicates_resampled"} <= series.keys()
    assert len(series["generate/tasks_created"]) == 2  # two batches of two prompts

    with database.session() as db:
        new_tasks = db.scalars(
            select(Task)
            .join(Prompt)
            .where(
                Task.campaign_id == ids["campaign"],
                Task.prompt_id != ids["busy"],
                Task.status == TaskStatus.open,
            )
            .order_by(Task.id)
        ).all()
        assert len(new_tasks) == 4
        for task in new_tasks:
            assert task.required_judgments == 2 and len(task.items) == 3
            made = [item.completion for item in task.items]
            assert len({c.content_hash for c in made}) == 3
            for c in made:
                assert c.source is CompletionSource.model and c.model_version_id == ids["policy"]
                assert c.content_hash == text_hash(c.text) and c.text
                params = c.generation_params
                assert params["temperature"] == 1.0 and params["top_p"] == 0.95
                assert params["max_new_tokens"] == 6 and params["job_id"] == job_id
                assert params["backend"] == "hf" and params["chat_template"] is True
                assert params["finish_reason"] in ("stop", "length")
        # the labeling service serves them, like any imported task
        user = db.get_one(User, ids["labeler"])
        campaign = db.get_one(Campaign, ids["campaign"])
        served = set()
        rng = random.Random(1)
        while (lease := labeling.next_task(db, user=user, campaign=campaign, rng=rng)) is not None:
            served.add(lease.task_id)
            ranking = [[cid] for cid in lease.display_order]
            labeling.submit(
                db, user=user, submit_key=lease.submit_key, answer=JudgmentIn(ranking=ranking)
            )
        db.commit()
        assert {t.id for t in new_tasks} <= served

    # a second job takes the prompts left: the fifth (a chat prompt) and the one whose task was
    # judged, never the one being labeled, nor those answered already
    again = client.post(
        "/api/v1/jobs",
        json={"kind": "generate", "config": {**config, "max_prompts": None}},
        headers=auth,
    )
    assert again.status_code == 201
    assert (
        run_worker(
            settings, "gen-worker", once=True, database=database, install_signals=False, **FAST
        )
        == 1
    )
    second = client.get(again.json()["url"], headers=auth).json()
    assert second["state"] == "succeeded", second["error"]
    assert second["result"]["prompts_planned"] == 2 and second["result"]["tasks_created"] == 2
    with database.session() as db:
        texts = db.scalars(select(Completion.text).where(Completion.prompt_id == ids["done"])).all()
        assert len(texts) == 6 and len(set(texts)) == 6  # none repeats the judged task's
        assert (
            db.scalar(
                select(Task.id).where(Task.prompt_id == ids["busy"], Task.status == TaskStatus.open)
            )
            is not None
        )
        assert len(db.scalars(select(Task).where(Task.prompt_id == ids["busy"])).all()) == 1

    # nothing is left: a third job plans nothing and succeeds
    third = client.post("/api/v1/jobs", json={"kind": "generate", "config": config}, headers=auth)
    run_worker(settings, "gen-worker", once=True, database=database, install_signals=False, **FAST)
    assert client.get(third.json()["url"], headers=auth).json()["result"]["prompts_planned"] == 0


def test_an_endpoint_answers_with_retries_and_resampled_repeats(live, vllm, monkeypatch):  # noqa: F811
    database, settings = live
    asked: dict[str, int] = {}

    def answer(body, count):
        prompt = body["messages"][-1]["content"]
        asked[prompt] = asked.get(prompt, 0) + 1
        # The first answer repeats itself (one duplicate per prompt), and the judged task's
        # stored "dup" too (a second duplicate for that prompt).
        if asked[prompt] == 1:
            return ["dup", "dup", f"{prompt} one"][: body["n"]]
        return [f"{prompt} {asked[prompt]}.{i}" for i in range(body["n"])]

    vllm.answer = answer
    vllm.failures = [500, (429, {"Retry-After": "0"})]
    monkeypatch.setenv("GEN_TEST_KEY", "sk-secret")
    with database.session() as db:
        _, _, done = seed_campaign(db, "gen-endpoint")
        job = registry.queue_generation(
            db,
            GenerateJobSpec(
                campaign="gen-endpoint",
                endpoint={
                    "base_url": vllm.base_url,
                    "model": "served-tiny",
                    "api_key_env": "GEN_TEST_KEY",
                    "max_retries": 3,
                    "concurrency": 2,
                    "timeout_seconds": 5,
                },
                temperature=0.8,
                max_new_tokens=12,
                batch_size=4,
            ),
            actor_id=None,
        )
        db.commit()
        job_id, done_prompt = job.id, done.prompt_id
        assert "sk-secret" not in json.dumps(job.config)
    assert (
        run_worker(
            settings, "gen-worker", once=True, database=database, install_signals=False, **FAST
        )
        == 1
    )
    with database.session() as db:
        finished = db.get_one(Job, job_id)
        assert finished.state is JobState.succeeded, finished.error
        assert (
            finished.result["tasks_created"] == 6
            and finished.result["duplicates_resampled"] == 5 + 2
        )
        made = db.scalars(
            select(Completion)
            .where(Completion.source == CompletionSource.model)
            .order_by(Completion.id)
        ).all()
        assert len(made) == 18
        assert all(c.model_version_id is None for c in made)
        params = made[0].generation_params
        assert params["backend"] == "openai" and params["model"] == "served-tiny"
        assert params["base_url"] == vllm.base_url and params["api"] == "chat"
        assert "sk-secret" not in json.dumps(params)
        judged = db.scalars(
            select(Completion.text).where(Completion.prompt_id == done_prompt)
        ).all()
        assert judged.count("dup") == 1  # the stored "dup" is never sampled again
        latest = job_service.latest_metrics(db, job_id)
        assert "generate/duplicates_resampled" in latest
    assert all(r["auth"] == "Bearer sk-secret" for r in vllm.requests)
    assert len(vllm.requests) > 6  # the 500 and the 429 were retried


def test_a_missing_api_key_variable_fails_the_job_clearly(live, monkeypatch):
    database, settings = live
    monkeypatch.delenv("GEN_MISSING_KEY", raising=False)
    with database.session() as db:
        seed_campaign(db, "gen-nokey")
        job = registry.queue_generation(
            db,
            GenerateJobSpec(
                campaign="gen-nokey",
                endpoint={
                    "base_url": "http://127.0.0.1:9/v1",
                    "model": "m",
                    "api_key_env": "GEN_MISSING_KEY",
                },
            ),
            actor_id=None,
        )
        job.max_attempts = 1
        db.commit()
        job_id = job.id
    run_worker(settings, "gen-worker", once=True, database=database, install_signals=False, **FAST)
    with database.session() as db:
        failed = db.get_one(Job, job_id)
        assert failed.state is JobState.dead and "GEN_MISSING_KEY is not set" in failed.error


def test_one_prompt_format_for_sft_the_generate_job_ppo_and_rloo(tmp_path):
    """What SFT trains on is what the generate job and PPO/RLOO sample from: the chat
    template's generation prompt, else BOS + the plain text, for text and chat prompts."""
    from tokenizers.processors import TemplateProcessing

    from trainer import rollout
    from trainer.sft import SFTFormatter

    chat = tokenizer_for([WORDS, *PROMPTS])
    plain = tokenizer_for([WORDS, *PROMPTS])
    plain.chat_template = None
    bos = plain.bos_token_id
    plain._tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)]
    )
    folder = tmp_path / "plain"
    causal_lm(plain).save_pretrained(folder)
    plain.save_pretrained(folder)
    sampler = HFSampler(folder, "cpu", max_prompt_tokens=4)
    conversation = [{"role": "user", "content": "hello there"}]
    for tokenizer in (chat, plain):
        for prompt in ("why is the sky blue", conversation):
            sft = SFTFormatter(tokenizer, 64).encode(prompt, "because light")
            policy_side = rollout.encode_prompt(tokenizer, prompt, 64)
            assert sft.input_ids[: sft.prompt_length] == policy_side
    assert plain.decode(rollout.encode_prompt(plain, "why is the sky blue", 64)) == (
        "<bos> why is the sky blue"
    )  # no separator, no trailing space
    written_out = plain(as_text(conversation), add_special_tokens=False)["input_ids"]
    assert rollout.encode_prompt(plain, conversation, 64) == [bos, *written_out]
    # A long prompt keeps BOS and its end.
    assert plain.decode(sampler.encode("why is the sky blue")) == "<bos> the sky blue"


def test_every_stop_token_ends_a_response(tmp_path):
    """The policy's generation config may name stop tokens beyond its tokenizer's EOS (a
    chat model's end of turn): the generate job and PPO/RLOO stop at every one."""
    import torch
    from transformers import GenerationConfig

    from trainer import rollout

    folder = tiny_policy(tmp_path / "m")
    tokenizer = tokenizer_for([WORDS, *PROMPTS])
    turn_end = tokenizer.convert_tokens_to_ids("<assistant>")
    GenerationConfig(eos_token_id=[tokenizer.eos_token_id, turn_end]).save_pretrained(folder)
    stops = sorted([tokenizer.eos_token_id, turn_end])
    assert HFSampler(folder, "cpu").eos_ids == stops
    config = rollout.OnPolicyConfig(policy=str(folder), reward_model="unused")
    assert rollout.sampling_config(config, tokenizer).eos_token_id == stops
    a, b, c, d = tokenizer.convert_tokens_to_ids(["why", "is", "the", "sky"])
    eos = tokenizer.eos_token_id
    response = torch.tensor([[a, turn_end, c, d], [a, b, eos, d], [a, b, c, d]])
    mask, contains_eos = rollout.response_mask(response, stops)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert contains_eos.tolist() == [True, True, False]
