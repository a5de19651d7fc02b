"""Measure kvp against the base on held-out prompts, side by side in one run.

For each prompt length N: TTFT of base and kvp (interleaved per prompt), kvp's breakdown,
and kvp's first-token agreement with the base, over prompts from the held-out corpus part
(never used for calibration). Prints a table and, with --json, one JSON object.

    python tools/e2e_report.py [--bundle DIR] [-p 512,2048] [--n 40] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics

from kvcli.bundles.default import default_bundle
from kvcli.engine.bundle import load_bundle
from kvcli.engine.engine import Engine
from kvcli.engine.generation import generate
from kvcli.engine.prefill_types import KvpSettings
from kvcli.llama.runtime import ContextSettings
from kvcli.predict.corpus import token_chunks


def measure(engine: Engine, n_prompt: int, n: int, tail: int = 0) -> dict:
    model = engine.model
    prompts = [
        t
        for _, t in token_chunks(
            "heldout",
            lambda s: model.tokenize(s, add_special=False),
            chunk_tokens=n_prompt,
            n_chunks=n,
            bos=model.prompt_bos,
        )
    ]
    base_ms, kvp_ms, agree, parts = [], [], 0, []
    for tokens in prompts:
        base = generate(engine, tokens, mode="base", n_predict=1)
        kvp = generate(engine, tokens, mode="kvp", n_predict=1, kvp=KvpSettings(tail=tail))
        base_ms.append(base.ttft_ms)
        kvp_ms.append(kvp.ttft_ms)
        agree += int(base.first_logits.argmax() == kvp.first_logits.argmax())
        parts.append(kvp.timings.as_dict())
    breakdown = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    overhead = breakdown["state_get_ms"] + breakdown["predict_ms"] + breakdown["state_set_ms"]
    return {
        "n_prompt": n_prompt,
        "n_prompts": len(prompts),
        "tail": tail,
        "base_ttft_ms_median": statistics.median(base_ms),
        "kvp_ttft_ms_median": statistics.median(kvp_ms),
        "kvp_over_base": statistics.median(k / b for k, b in zip(kvp_ms, base_ms)),
        "kvp_breakdown_ms_median": breakdown,
        "get_predict_set_share": overhead / statistics.median(kvp_ms),
        "first_token_agreement": agree / len(prompts),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle")
    ap.add_argument("-p", "--lengths", default="512,2048")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--tail", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    bundle = load_bundle(args.bundle) if args.bundle else default_bundle()
    lengths = [int(x) for x in args.lengths.split(",")]
    settings = ContextSettings(n_ctx=max(lengths) + 64, n_threads=args.threads)
    with Engine.from_bundle(bundle, settings=settings) as engine:
        rows = [measure(engine, n, args.n, args.tail) for n in lengths]
    if args.json:
        print(json.dumps({"settings": settings.__dict__, "rows": rows}, indent=2))
        return
    for r in rows:
        b = r["kvp_breakdown_ms_median"]
        print(
            f"pp{r['n_prompt']}: base {r['base_ttft_ms_median']:.0f} ms, kvp "
            f"{r['kvp_ttft_ms_median']:.0f} ms ({r['kvp_over_base']:.3f}x); kvp breakdown "
            + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in b.items())
            + f" ms; get+predict+set {100 * r['get_predict_set_share']:.1f}% of kvp; "
            f"first-token agreement {r['first_token_agreement']:.2f} over {r['n_prompts']}"
        )


if __name__ == "__main__":
    main()
