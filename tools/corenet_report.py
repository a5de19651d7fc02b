#!/usr/bin/env python3
"""Measure `import-corenet` on a random checkpoint in corenet's format: import time and bundle
size per --outtype, and how closely llama.cpp's logits follow the numpy reference of
corenet's forward (the base alone, and KV prediction's first token).

    python tools/corenet_report.py                 # OpenELM-270M base, a 4-layer auxiliary
    python tools/corenet_report.py --tiny          # the tests' small pair (seconds)

The checkpoint and its tokenizer are written by the tests' fixtures (tests/corenet_fixture.py):
random weights, corenet's key names and shapes, a small sentencepiece model padded to the
embedding's rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from corenet_fixture import AUX, BASE, LAYER_MAP, write_corenet_kvp

from kvcli.bundles.corenet_import import import_checkpoint
from kvcli.engine.engine import Engine
from kvcli.llama.runtime import ContextSettings
from kvcli.models.corenet import predictor_matrices, read_config, split_checkpoint
from kvcli.models.openelm import forward, gguf_tensors, kvp_forward
from kvcli.models.torch_checkpoint import load_checkpoint, state_dict_of

OPENELM_270M = {"model_name": "OpenELM-270M"}
AUX_4_LAYERS = {
    "num_transformer_layers": 4,
    "model_dim": 1280,
    "head_dim": 64,
    "num_gqa_groups": 4,
    "qkv_multipliers": [0.5, 1.0],
    "ffn_multipliers": [0.5, 4.0],
    "normalize_qk_projections": True,
    "share_input_output_layers": True,
}


def agreement(bundle, files, n_prompts: int, n_tokens: int, type_k: str) -> dict:
    cfg = read_config(files["config"])
    parts = split_checkpoint(state_dict_of(load_checkpoint(files["checkpoint"])))
    base_w, aux_w = gguf_tensors(parts["base"], cfg.base), gguf_tensors(parts["auxiliary"], cfg.aux)
    matrices = predictor_matrices(parts["predicter"], cfg)
    rng = np.random.default_rng(1)
    settings = ContextSettings(n_ctx=n_tokens + 64, type_k=type_k, type_v=type_k)
    worst = {"base": 0.0, "kvp": 0.0, "logit_scale": 0.0, "kvp_vs_base": np.inf, "top1": 0}
    with Engine.from_bundle(bundle, settings=settings) as engine:
        for _ in range(n_prompts):
            tokens = [1, *rng.integers(3, 300, n_tokens - 1).tolist()]
            ref_base = forward(base_w, cfg.base, tokens)[0][-1]
            ref_kvp = kvp_forward(base_w, cfg.base, aux_w, cfg.aux, matrices, cfg.layer_map, tokens)
            base = engine.prefill(tokens, mode="base").logits
            kvp = engine.prefill(tokens, mode="kvp").logits
            worst["base"] = max(worst["base"], float(np.abs(base - ref_base).max()))
            worst["kvp"] = max(worst["kvp"], float(np.abs(kvp - ref_kvp).max()))
            worst["logit_scale"] = max(worst["logit_scale"], float(np.abs(ref_kvp).max()))
            worst["kvp_vs_base"] = min(worst["kvp_vs_base"], float(np.abs(ref_kvp - ref_base).max()))
            worst["top1"] += int(kvp.argmax() == ref_kvp.argmax())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tests' small pair instead of 270M")
    ap.add_argument("--outtypes", default="f32,f16,q8_0")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base, aux = (BASE, AUX) if args.tiny else (OPENELM_270M, AUX_4_LAYERS)
    layer_map = LAYER_MAP if args.tiny else [i // 4 for i in range(16)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvcli-corenet-") as tmp:
        start = time.perf_counter()
        files = write_corenet_kvp(
            Path(tmp) / "ckpt",
            base=base,
            aux=aux,
            layer_map=layer_map,
            vocab_rows=320 if args.tiny else 32128,
        )
        ckpt_mb = files["checkpoint"].stat().st_size / 1e6
        print(
            f"random checkpoint: {ckpt_mb:.1f} MB, written in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
        for outtype in args.outtypes.split(","):
            start = time.perf_counter()
            b = import_checkpoint(
                files["checkpoint"],
                files["config"],
                files["tokenizer"],
                Path(tmp) / f"b-{outtype}",
                outtype=outtype,
            )
            seconds = time.perf_counter() - start
            sizes = {role: b.path(role).stat().st_size for role in b.file_roles}
            row = {
                "outtype": outtype,
                "import_s": round(seconds, 2),
                "checkpoint_mb": round(ckpt_mb, 1),
                "bundle_mb": round(sum(sizes.values()) / 1e6, 1),
                "files_mb": {r: round(s / 1e6, 1) for r, s in sizes.items()},
            }
            for type_k in ("f16", "f32"):
                row[f"max_abs_dlogit_kv_{type_k}"] = agreement(b, files, args.prompts, args.tokens, type_k)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
