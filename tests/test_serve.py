"""kvcli serve: the real server in a subprocess on a free loopback port, talked to with the
real ``openai`` client (and raw HTTP for what a client library would not send)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import kvcli  # noqa: E402

DOC = " ".join(
    f"Record {i}: the courier from Lisbon delivered parcel {1000 + 7 * i} on day {i % 28 + 1}."
    for i in range(40)
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-c",
            "from kvcli.cli.app import main; main()",
            "serve",
            "--port",
            str(self.port),
            *args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if json.load(r) == {"status": "ok"}:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            raise RuntimeError("the server did not start")
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=300)

    def post(self, path: str, body: bytes | dict) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data, {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(gemma_path):
    s = Server("--model", str(gemma_path), "--ctx", "1024")
    yield s
    s.stop()


def test_chat_completions_and_usage(server):
    r = server.client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Say hi."}], max_tokens=5, temperature=0
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 5 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    timings = r.model_extra["timings"]
    assert timings["cache_n"] + timings["prompt_n"] == r.usage.prompt_tokens and timings["ttft_ms"] > 0
    assert [m.id for m in server.client.models.list().data] == ["gemma-3-270m-q4_k_m"]


def test_streamed_chat_matches_the_whole_one(server):
    messages = [{"role": "user", "content": "Count from one to ten."}]
    whole = server.client.chat.completions.create(model="x", messages=messages, max_tokens=12, temperature=0)
    chunks = list(
        server.client.chat.completions.create(
            model="x",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_with_stop_strings(server):
    r = server.client.completions.create(model="x", prompt="1, 2, 3, 4, 5,", max_tokens=16, temperature=0)
    assert " 7," in r.choices[0].text
    s = server.client.completions.create(
        model="x", prompt="1, 2, 3, 4, 5,", max_tokens=16, temperature=0, stop=[" 7"]
    )
    assert s.choices[0].finish_reason == "stop" and " 7" not in s.choices[0].text
    assert r.choices[0].text.startswith(s.choices[0].text)


def test_a_follow_up_reuses_the_prefix_and_answers_as_a_fresh_prefill(server, gemma_path):
    first = [{"role": "user", "content": DOC + "\nWhich parcel came on day 3?"}]
    a = server.client.chat.completions.create(model="x", messages=first, max_tokens=8, temperature=0)
    follow = [
        *first,
        {"role": "assistant", "content": a.choices[0].message.content},
        {"role": "user", "content": "And on day 9?"},
    ]
    b = server.client.chat.completions.create(model="x", messages=follow, max_tokens=8, temperature=0)
    timings = b.model_extra["timings"]
    assert timings["cache_n"] > 0.8 * b.usage.prompt_tokens and timings["prefilled_by"] == "base"
    with kvcli.load(model=gemma_path, ctx=1024) as fresh:  # nothing to reuse: a plain prefill
        assert fresh.chat(follow, max_tokens=8).text == b.choices[0].message.content


@pytest.mark.parametrize(
    "body,needle",
    [
        (b'{"messages": [', "not valid JSON"),
        ({"messages": [{"role": "user", "content": "hi"}], "colour": "red"}, "unknown field: colour"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
        ({"messages": [{"role": "user", "content": 7}]}, "content"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "word " * 1500}]}, "context holds 1024"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ],
)
def test_bad_requests_get_one_line_in_openais_error_shape(server, body, needle):
    status, reply = server.post("/v1/chat/completions", body)
    assert status == 400, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"} and needle in reply["error"]["message"]
    assert "\n" not in reply["error"]["message"]


def test_a_client_that_hangs_up_mid_stream_frees_the_server(server):
    body = json.dumps(
        {"prompt": "Once upon a time", "max_tokens": 200, "stream": True, "temperature": 0}
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        head = (
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        seen = b""
        while b"data: " not in seen:  # the headers, then the first chunk: hang up
            seen += sock.recv(4096)
    start = time.time()
    r = server.client.completions.create(model="x", prompt="The sky is", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert time.time() - start < 60  # the hung-up reply did not run on to its 200 tokens first


def test_twenty_concurrent_clients_each_answered_once(server):
    def ask(i: int) -> str:
        r = server.client.completions.create(
            model="x", prompt=f"Client {i} says", max_tokens=2, temperature=0
        )
        return r.id

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(ask, range(20)))
    assert len(set(ids)) == 20


def test_a_request_that_waits_too_long_gets_503_and_sigterm_stops_cleanly(gemma_path):
    s = Server("--model", str(gemma_path), "--ctx", "1024", "--timeout", "1")
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            slow = pool.submit(s.post, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 150})
            time.sleep(0.5)
            status, reply = s.post("/v1/completions", {"prompt": "Hi", "max_tokens": 1})
            assert status == 503 and "busy" in reply["error"]["message"]
            assert slow.result()[0] == 200
    finally:
        assert s.stop() == 0


def test_kvp_serves_a_long_document_by_prediction(gemma_bundle):
    s = Server("--bundle", str(gemma_bundle.folder), "--ctx", "1024")
    try:
        messages = [{"role": "user", "content": DOC + "\nWhich parcel came on day 3?"}]
        r = s.client.chat.completions.create(model="x", messages=messages, max_tokens=4, temperature=0)
        timings = r.model_extra["timings"]
        assert timings["prefilled_by"] == "kvp" and timings["kvp_predicted_n"] > 300
    finally:
        s.stop()


def test_serve_without_the_extra_says_how_to_get_it(tmp_path):
    # a Python that cannot import fastapi: its module path shadowed by an empty package error
    (tmp_path / "fastapi").mkdir()
    (tmp_path / "fastapi" / "__init__.py").write_text("raise ImportError('no', name='fastapi')\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(kvcli.__file__).parent.parent)]),
    }
    out = subprocess.run(
        [sys.executable, "-c", "from kvcli.cli.app import main; main()", "serve", "--port", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode != 0 and "pip install 'kvcli[serve]'" in out.stderr
    assert "Traceback" not in out.stderr
