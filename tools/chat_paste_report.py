"""A pasted file in kvcli chat: TTFT of that turn with kvp and with base, side by side.

After a short first exchange, a held-out Python file of about N tokens is sent as the next
message (as /file does). Per repeat, kvp and base run the same two-turn conversation in
turn on one engine; prints TTFT of the paste turn, the tokens predicted, and whether the
replies agree (first token, and the first 32 greedy tokens).

    python tools/chat_paste_report.py [--bundle DIR] [--tokens 1500] [-r 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics

from kvcli.bundles.default import default_bundle
from kvcli.engine.bundle import load_bundle
from kvcli.engine.conversation import Conversation
from kvcli.engine.engine import Engine
from kvcli.llama.runtime import ContextSettings
from kvcli.predict.corpus import corpus_texts


def paste_text(engine: Engine, n_tokens: int) -> str:
    for _, text in corpus_texts("heldout"):
        tokens = engine.model.tokenize(text, add_special=False)
        if len(tokens) >= n_tokens:
            return engine.model.detokenize(tokens[:n_tokens])
    raise SystemExit(f"no held-out file of {n_tokens} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle")
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    b = load_bundle(args.bundle) if args.bundle else default_bundle()
    out = {"kvp": [], "base": []}
    with Engine.from_bundle(b, settings=ContextSettings(n_ctx=args.tokens + 512)) as engine:
        paste = paste_text(engine, args.tokens)
        for _ in range(args.repeats + 1):  # the first round warms up
            for mode in ("kvp", "base"):
                conv = Conversation(engine, mode=mode, n_predict=32)
                conv.reset()
                conv.send("Here is a file I am working on.")
                reply, stats = conv.send(paste)
                out[mode].append(
                    {
                        "ttft_ms": stats.ttft_ms,
                        "n_new": stats.n_new,
                        "n_predicted": stats.n_predicted,
                        "reply": reply,
                    }
                )
    kvp, base = out["kvp"][1:], out["base"][1:]
    result = {
        "paste_tokens": args.tokens,
        "repeats": args.repeats,
        "turn_prompt_tokens": kvp[0]["n_new"],
        "predicted": kvp[0]["n_predicted"],
        "kvp_ttft_ms_median": statistics.median(r["ttft_ms"] for r in kvp),
        "base_ttft_ms_median": statistics.median(r["ttft_ms"] for r in base),
        "same_reply": kvp[0]["reply"] == base[0]["reply"],
        "same_first_word": kvp[0]["reply"].split()[:1] == base[0]["reply"].split()[:1],
        "kvp_reply": kvp[0]["reply"],
        "base_reply": base[0]["reply"],
    }
    result["ratio"] = result["kvp_ttft_ms_median"] / result["base_ttft_ms_median"]
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"paste turn: {result['turn_prompt_tokens']} prompt tokens "
            f"({result['predicted']} predicted); TTFT kvp {result['kvp_ttft_ms_median']:.0f} ms, "
            f"base {result['base_ttft_ms_median']:.0f} ms ({result['ratio']:.3f}x); "
            f"same reply: {result['same_reply']}"
        )
        print(f"kvp:  {result['kvp_reply']!r}\nbase: {result['base_reply']!r}")


if __name__ == "__main__":
    main()
