"""A small client for OpenAI-compatible servers (vLLM, TGI, llama.cpp, OpenAI itself).

    client = OpenAIClient("http://127.0.0.1:8000/v1", "meta-llama/Llama-3.1-8B-Instruct")
    texts = client.sample("Why is the sky blue?", n=4, temperature=0.7, top_p=0.9)

`api="chat"` posts to /v1/chat/completions with the prompt's messages (a text prompt is one
user message); `api="completions"` posts to /v1/completions with the prompt as text (a chat
prompt is written out as "User: ...\n\nAssistant:"). One request asks for all n samples
(`n`), which vLLM and OpenAI both take.

Every request has a timeout. 429, 5xx, timeouts and connection errors are retried with
exponential backoff and jitter (a 429's or 503's Retry-After is honoured, capped); any other
4xx fails at once. A failure that outlasts the retries is an EndpointError naming the URL,
the status or the cause, and the server's own message. The API key is sent as a bearer
token and never logged.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx

from trainer.generate import Prompt, as_messages, as_text

RETRY_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER = 30.0


class EndpointError(RuntimeError):
    """The endpoint did not give an answer: the message says where and why."""


@dataclass
class OpenAIClient:
    base_url: str
    model: str
    api: str = "chat"  # or "completions"
    api_key: str | None = None
    timeout: float = 120.0
    max_retries: int = 4
    backoff: float = 0.5  # seconds before the first retry; doubles, up to max_backoff
    max_backoff: float = 8.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    log: Callable[[str], None] | None = field(default=None, repr=False)
    _client: httpx.Client | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.api not in ("chat", "completions"):
            raise ValueError(f"api {self.api!r}: use chat or completions")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(self.timeout))

    @property
    def url(self) -> str:
        """The endpoint's URL: base_url with or without its /v1."""
        base = self.base_url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        return f"{base}/{'chat/completions' if self.api == 'chat' else 'completions'}"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> OpenAIClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def payload(
        self,
        prompt: Prompt,
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seed: int | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "n": n,
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
        }
        if seed is not None:
            body["seed"] = seed
        if self.api == "chat":
            body["messages"] = as_messages(prompt)
        else:
            body["prompt"] = as_text(prompt)
        return body

    def sample(
        self,
        prompt: Prompt,
        n: int = 1,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: int | None = None,
    ) -> list[tuple[str, str]]:
        """n completions of one prompt as (text, finish_reason), in the server's index order."""
        body = self.payload(
            prompt, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed
        )
        answer = self.post(body)
        choices = answer.get("choices")
        if not isinstance(choices, list) or len(choices) != n:
            got = len(choices) if isinstance(choices, list) else "no"
            raise EndpointError(f"{self.url}: asked for {n} choices, got {got}")
        out = []
        for choice in sorted(choices, key=lambda c: c.get("index", 0)):
            if self.api == "chat":
                text = (choice.get("message") or {}).get("content")
            else:
                text = choice.get("text")
            if not isinstance(text, str):
                text = ""  # a refusal or a tool call: no text to label
            out.append((text.strip(), str(choice.get("finish_reason") or "")))
        return out

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST the body, retrying what may pass; the JSON answer or EndpointError."""
        assert self._client is not None
        tries = self.max_retries + 1
        for attempt in range(1, tries + 1):
            wait: float | None = None
            try:
                response = self._client.post(self.url, content=json.dumps(body))
            except httpx.TimeoutException as error:
                problem = f"no answer within {self.timeout:g} s ({type(error).__name__})"
            except httpx.TransportError as error:
                problem = f"cannot connect: {error or type(error).__name__}"
            else:
                if response.status_code == 200:
                    return self._json(response)
                problem = f"HTTP {response.status_code}{_server_message(response)}"
                if response.status_code not in RETRY_STATUSES:
                    raise EndpointError(f"{self.url}: {problem}")
                wait = _retry_after(response)
            if attempt == tries:
                raise EndpointError(f"{self.url}: {problem} (gave up after {tries} tries)")
            delay = wait if wait is not None else self._delay(attempt)
            if self.log:
                self.log(
                    f"{self.url}: {problem}; retry {attempt} of {self.max_retries} in {delay:.2f} s"
                )
            self.sleep(delay)
        raise AssertionError("unreachable")

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter (the AWS architecture blog's advice)."""
        ceiling = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311  (jitter, not a secret)

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            answer = response.json()
        except ValueError as error:
            raise EndpointError(
                f"{self.url}: the answer is not JSON: {response.text[:200]!r}"
            ) from error
        if not isinstance(answer, dict):
            raise EndpointError(f"{self.url}: the answer is not a JSON object")
        return answer


def _server_message(response: httpx.Response) -> str:
    """The error message an OpenAI-style server put in its body, briefly."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return f": {text[:200]}" if text else ""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    if error is None and isinstance(body, dict):
        error = body.get("message") or body.get("detail")
    return f": {str(error)[:300]}" if error else ""


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, min(MAX_RETRY_AFTER, float(value)))
    except ValueError:
        return None
