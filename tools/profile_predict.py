"""Where kvp's predict step spends its time, piece by piece, on the default bundle.

    python tools/profile_predict.py [N ...] [--bundle DIR] [--repeats 5]

Runs the auxiliary on a held-out prompt of N tokens, then times each piece of the path from
its state to the base's (serially, one layer after another, so the pieces add up; the
engine runs the per-layer pieces on a 2-thread pool), and the engine's own predict step.
Medians over the repeats after the first.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np

from kvcli.bundles.default import default_bundle
from kvcli.engine.aux_load import take_captured
from kvcli.engine.bundle import load_bundle
from kvcli.engine.engine import Engine
from kvcli.eval.ttft import bench_prompts
from kvcli.llama.runtime import ContextSettings
from kvcli.predict.apply import (
    PredictorInputs,
    needed_positions,
    predicted_state_bytes,
    rescale_to_key_norm,
)
from kvcli.predict.predictor import build_features
from kvcli.state.codec import parse_seq_state, write_seq_state
from kvcli.state.layout import layers_by_index
from kvcli.state.rope import rotate, unrotate


def profile(e: Engine, n: int, repeats: int) -> dict[str, float]:
    tokens = bench_prompts(e, n, 1)[0]
    layout, first_cell = e.base_layout(), e.first_cell(tokens[0])
    n_pred, pred, times = n - 1, e.predictor, {}
    if pred.raw_keys:
        raise SystemExit(
            "profile_predict breaks down kvcli's own (ridge) predictors; this one reads "
            "raw keys (an imported corenet predictor)"
        )

    def timed(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        times.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
        return out

    for _ in range(repeats + 1):
        e.aux.clear()
        if e.aux.capture is not None:
            e.aux.capture.clear()
        e.aux.decode(tokens[:n_pred])
        hidden, _ = take_captured(e.aux, pred, e.aux_info, n_pred)
        raw = timed("state get", e.aux.get_state, -1)
        state = timed("parse", parse_seq_state, raw)
        aux_layers = layers_by_index(state, e.aux_state_info)
        positions = needed_positions(e.base_info, n_pred, first_query=n_pred)
        rows = {il: p for g, p in zip(e.base_info.cache_layer_groups, positions) for il in g}
        src = pred.feature_layers[0]
        c = aux_layers[src]
        k0 = timed("un-RoPE features", unrotate, c.k[:n_pred], c.positions[:n_pred], e.aux_info.rope[src])
        x = timed("build features", build_features, {src: (k0, c.v[:n_pred])}, src, hidden)
        reduced = timed("basis product", np.matmul, x, pred.bases[src]) if src in pred.bases else None
        kv = {}
        for il in pred.predicted_layers:
            feats = reduced if il in pred.factored_layers else x
            k, v = timed("matmul", pred.predict_layer, feats, il, rows[il])
            if e.key_norms is not None:
                k = timed(
                    "key-norm rescale",
                    rescale_to_key_norm,
                    np.ascontiguousarray(k),
                    e.key_norms[il],
                    e.base_info.head_dim_k,
                )
            kv[il] = (timed("RoPE", rotate, k, rows[il], e.base_info.rope[il]), v)
        for il in pred.copied_layers:
            kv[il] = (aux_layers[il].k[rows[il]], aux_layers[il].v[rows[il]])
        built = layout.build_state(positions, kv)
        data = timed("write state", write_seq_state, built)
        timed("state set", e.base.set_state, data, 0)
        timed(
            "engine predict step (pool)",
            partial(
                predicted_state_bytes,
                layout,
                PredictorInputs(
                    aux_layers,
                    e.aux_info,
                    e.base_info,
                    pred,
                    first_cell=first_cell,
                    key_norms=e.key_norms,
                    hidden=hidden,
                ),
                positions,
            ),
        )
    # per repeat: sum over layers
    n_runs = repeats + 1
    return {
        k: float(np.median(np.add.reduceat(v, np.arange(0, len(v), len(v) // n_runs))[1:]))
        for k, v in times.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lengths", nargs="*", type=int, default=[512, 2048])
    ap.add_argument("--bundle")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    b = load_bundle(args.bundle) if args.bundle else default_bundle()
    with Engine.from_bundle(b, settings=ContextSettings(n_ctx=max(args.lengths) + 64)) as e:
        for n in args.lengths:
            print(f"N = {n} (auxiliary: {e.aux_load})")
            for name, ms in profile(e, n, args.repeats).items():
                print(f"  {name:28s} {ms:8.1f} ms")


if __name__ == "__main__":
    main()
