"""The OpenAI-compatible client against a real HTTP server on 127.0.0.1 that answers like vLLM
(/v1/completions and /v1/chat/completions, `n` choices), and fails on cue: 500s and 429s it
retries through, a stall that times out, a 400 it must not retry, a port nobody listens on."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from trainer.openai_client import EndpointError, OpenAIClient


@dataclass
class FakeVLLM:
    """A vLLM look-alike. `failures` are answered first, one per request: an HTTP status,
    ("status", headers), or ("stall", seconds) before a normal answer."""

    server: ThreadingHTTPServer
    failures: list[Any] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    answer: Any = None  # answer(body, count) -> list of texts; default: distinct texts

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def texts(self, body: dict[str, Any]) -> list[str]:
        if self.answer is not None:
            return self.answer(body, len(self.requests))
        return [f"sample {len(self.requests)}.{i}" for i in range(body.get("n", 1))]


def _handler(fake: FakeVLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            return None

        def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
                pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            fake.requests.append(
                {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
            )
            failure = fake.failures.pop(0) if fake.failures else None
            if isinstance(failure, tuple) and failure[0] == "stall":
                time.sleep(failure[1])
            elif isinstance(failure, tuple):
                status, headers = failure
                self._send(status, {"error": {"message": f"cued {status}"}}, headers)
                return
            elif isinstance(failure, int):
                message = {"object": "error", "message": f"cued {failure}", "code": failure}
                self._send(failure, message)
                return
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                self._send(404, {"detail": "Not Found"})
                return
            chat = self.path.endswith("chat/completions")
            choices = []
            for i, text in enumerate(fake.texts(body)):
                choice: dict[str, Any] = {"index": i, "finish_reason": "stop"}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                choices.append(choice)
            self._send(
                200,
                {
                    "id": "cmpl-1",
                    "object": "chat.completion" if chat else "text_completion",
                    "model": body.get("model"),
                    "choices": choices,
                    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
                },
            )

    return Handler


@pytest.fixture
def vllm() -> Iterator[FakeVLLM]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    fake = FakeVLLM(server)
    server.RequestHandlerClass = _handler(fake)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


def quick(base_url: str, **options: Any) -> OpenAIClient:
    """A client whose backoff sleeps are recorded instead of slept."""
    slept: list[float] = []
    client = OpenAIClient(base_url, "tiny", sleep=slept.append, **options)
    client.slept = slept  # type: ignore[attr-defined]
    return client


def test_chat_completions_with_n_samples_and_a_key(vllm):
    with quick(vllm.base_url, api_key="sk-test") as client:
        got = client.sample(
            [{"role": "user", "content": "hi"}],
            3,
            temperature=0.7,
            top_p=0.9,
            max_tokens=16,
            seed=5,
        )
    assert got == [(f"sample 1.{i}", "stop") for i in range(3)]
    [request] = vllm.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"] == {
        "model": "tiny",
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 16,
        "seed": 5,
        "messages": [{"role": "user", "content": "hi"}],
    }


def test_completions_api_takes_text_and_a_base_url_without_v1(vllm):
    base = vllm.base_url.removesuffix("/v1")
    with quick(base + "/", api="completions") as client:
        assert client.url == vllm.base_url + "/completions"
        got = client.sample([{"role": "user", "content": "hi"}], 2)
    assert [text for text, _ in got] == ["sample 1.0", "sample 1.1"]
    body = vllm.requests[0]["body"]
    assert body["prompt"] == "User: hi\n\nAssistant:" and "messages" not in body
    assert vllm.requests[0]["auth"] is None and "seed" not in body


def test_retries_after_500_and_429_then_succeeds(vllm):
    vllm.failures = [500, (429, {"Retry-After": "0.25"}), 503]
    logged: list[str] = []
    with quick(vllm.base_url, max_retries=3, log=logged.append) as client:
        got = client.sample("hello", 1)
    assert got == [("sample 4.0", "stop")] and len(vllm.requests) == 4
    # exponential backoff with jitter, and the 429's Retry-After as given
    first, second, third = client.slept
    assert 0.25 <= first <= 0.5 and second == 0.25 and 1.0 <= third <= 2.0
    assert "HTTP 500: cued 500" in logged[0] and "retry 1 of 3" in logged[0]


def test_gives_up_after_the_retries_with_the_servers_message(vllm):
    vllm.failures = [503] * 5
    with quick(vllm.base_url, max_retries=2) as client, pytest.raises(EndpointError) as error:
        client.sample("hello", 1)
    assert len(vllm.requests) == 3
    message = str(error.value)
    assert vllm.base_url in message and "HTTP 503: cued 503" in message
    assert "gave up after 3 tries" in message


def test_a_client_error_is_not_retried(vllm):
    vllm.failures = [(400, {})]
    with quick(vllm.base_url, max_retries=4) as client, pytest.raises(EndpointError) as error:
        client.sample("hello", 1)
    assert len(vllm.requests) == 1 and "HTTP 400: cued 400" in str(error.value)


def test_a_stalled_server_times_out_with_a_clear_error(vllm):
    vllm.failures = [("stall", 1.5), ("stall", 1.5)]
    began = time.monotonic()
    with (
        quick(vllm.base_url, timeout=0.3, max_retries=1) as client,
        pytest.raises(EndpointError) as error,
    ):
        client.sample("hello", 1)
    assert time.monotonic() - began < 1.4  # two 0.3 s timeouts, not the stalls
    assert "no answer within 0.3 s" in str(error.value) and "gave up after 2 tries" in str(
        error.value
    )
    assert len(vllm.requests) == 2


def test_a_stall_then_an_answer_is_retried(vllm):
    vllm.failures = [("stall", 1.0)]
    with quick(vllm.base_url, timeout=0.3, max_retries=2) as client:
        assert client.sample("hello", 1) == [("sample 2.0", "stop")]


def test_nobody_listening_is_a_connection_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with (
        quick(f"http://127.0.0.1:{port}/v1", max_retries=2) as client,
        pytest.raises(EndpointError) as error,
    ):
        client.sample("hello", 1)
    assert "cannot connect" in str(error.value) and len(client.slept) == 2


def test_a_wrong_number_of_choices_is_an_error(vllm):
    vllm.answer = lambda body, count: ["only one"]
    with quick(vllm.base_url) as client, pytest.raises(EndpointError, match="asked for 2 choices"):
        client.sample("hello", 2)
