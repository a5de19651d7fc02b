"""What ``kvcli serve`` costs a client, kvp and base side by side in one run.

For each mode a real server starts on a free loopback port; a client streams three chat
requests over HTTP: a first question after a document of ~N tokens of held-out prose, a
follow-up on the same document (the conversation so far reused), and a question after a new
document, after a short warm-up request. Per request: the TTFT the client sees (request
sent to first content chunk), the server's own (its ``timings``), their difference (the
server's overhead: HTTP, JSON, the chat template and tokenizing the prompt), and how the
prompt was covered. Then the new document's prompt once through ``kvcli generate``'s path
(kvcli.engine.generation.generate, in this process, the server stopped) for comparison.

    python tools/serve_report.py [--bundle DIR] [--tokens 2000] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.request

from kvcli.bundles.default import default_bundle
from kvcli.engine.bundle import load_bundle
from kvcli.engine.engine import Engine
from kvcli.engine.generation import generate
from kvcli.eval.haystack import prose_sentences
from kvcli.llama.chat_template import apply_chat_template, chat_template_for
from kvcli.llama.runtime import ContextSettings

CTX = 4096
ANSWER = 8


def document(engine: Engine, source: str, n_tokens: int) -> str:
    sentences, text = prose_sentences(source), ""
    for s in sentences:
        if len(engine.tokenize(text + " " + s)) > n_tokens:
            break
        text += " " + s
    return text.strip()


def start_server(bundle: str, mode: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "kvcli.cli.app", "serve", "--bundle", bundle, "--mode", mode]
    proc = subprocess.Popen([*cmd, "--port", str(port), "--ctx", str(CTX)], stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start")


def ask(port: int, messages: list[dict]) -> dict:
    """One streamed chat request: the client's TTFT and the server's timings."""
    body = json.dumps({"messages": messages, "max_tokens": ANSWER, "temperature": 0, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    first, text, timings = None, "", {}
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None:
            first = (time.perf_counter() - sent) * 1e3
        if chunk.get("choices"):
            text += chunk["choices"][0]["delta"].get("content") or ""
        timings = chunk.get("timings", timings)
    conn.close()
    return {
        "client_ttft_ms": round(first, 1),
        "server_ttft_ms": round(timings["ttft_ms"], 1),
        "overhead_ms": round(first - timings["ttft_ms"], 1),
        "reused": timings["cache_n"],
        "prefilled": timings["prompt_n"],
        "predicted": timings["kvp_predicted_n"],
        "prefilled_by": timings["prefilled_by"],
        "text": text,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="a bundle folder (default: the embedded default)")
    ap.add_argument("--tokens", type=int, default=2000, help="document length in tokens")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    bundle = load_bundle(args.bundle) if args.bundle else default_bundle()
    with Engine.from_bundle(bundle, settings=ContextSettings(n_ctx=CTX)) as engine:
        docs = [document(engine, source, args.tokens) for source in ("moby_dick", "state_of_the_union")]
    question = "\n\nIn one sentence, what is the text above about?"
    first = [{"role": "user", "content": docs[0] + question}]
    new = [{"role": "user", "content": docs[1] + question}]
    rows = {}
    for mode in ("kvp", "base"):
        proc, port = start_server(str(bundle.folder), mode)
        try:
            ask(port, [{"role": "user", "content": "Hello."}])  # warm-up: the first decode pays more
            a = ask(port, first)
            follow = [
                *first,
                {"role": "assistant", "content": a["text"]},
                {"role": "user", "content": "Who wrote it?"},
            ]
            rows[mode] = {"first": a, "follow-up": ask(port, follow), "new document": ask(port, new)}
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    with Engine.from_bundle(bundle, settings=ContextSettings(n_ctx=CTX)) as engine:
        template = chat_template_for(engine.model, engine.base_info.arch)
        tokens = engine.model.tokenize(apply_chat_template(template, new))
        generate(engine, engine.tokenize("Hello."), mode="base", n_predict=1)  # warm-up
        for mode in ("kvp", "base"):
            kvp = engine.kvp_settings() if mode == "kvp" else None
            gen = generate(engine, tokens, mode=mode, n_predict=1, kvp=kvp)
            rows[mode]["generate, new document"] = {
                "server_ttft_ms": round(gen.ttft_ms, 1),
                "prefilled_by": gen.prefilled_by,
            }
    if args.json:
        print(json.dumps(rows))
        return
    print(
        f"documents of ~{args.tokens} tokens; TTFT in ms (client: sent to first chunk; server: its timings)"
    )
    print(
        f"{'mode':5} {'request':24} {'client':>8} {'server':>8} {'overhead':>8} "
        f"{'reused':>7} {'prefilled':>9} {'predicted':>9}"
    )
    for mode, reqs in rows.items():
        for name, r in reqs.items():
            print(
                f"{mode:5} {name:24} {r.get('client_ttft_ms', '-'):>8} {r['server_ttft_ms']:>8} "
                f"{r.get('overhead_ms', '-'):>8} {r.get('reused', '-'):>7} {r.get('prefilled', '-'):>9} "
                f"{r.get('predicted', '-'):>9}  {r['prefilled_by']}"
            )


if __name__ == "__main__":
    main()
