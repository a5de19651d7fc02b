"""Where kvp's error comes from, per predicted base layer: the prompt tail's attention output
under kvp against the base's own, split into what the predicted keys, the predicted values and
the tail's perturbed queries each cost.

On held-out prose of N tokens, the base prefills the prompt (the reference: its cache and the
queries of the last W+1 tokens, captured before RoPE), then kvp prefills it with a tail of W and
no spans (the predicted cache, the queries the base computes over it). For each predicted layer
the attention output of the tail's rows is recomputed in numpy over every pairing:

  keys only     true queries over predicted keys, true values
  values only   true queries over true keys, predicted values
  local         true queries over the predicted cache (what a layer-local loss sees)
  queries only  the tail's queries under kvp over the true cache (errors compounded from below)
  as run        the queries under kvp over the predicted cache (what the base computes)

each as ||o - o_base|| / ||o_base||, averaged over the prompts; and "as run" once more from
llama.cpp's own attention output (``kqv_out``), which the numpy one must match.

    python tools/kv_error_report.py [--bundle DIR] [--tokens 1024] [--tail 32] [--prompts 3] [--json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import kvcli.llama.handles as handles
from kvcli.bundles.default import default_bundle
from kvcli.engine.bundle import load_bundle
from kvcli.engine.engine import Engine
from kvcli.engine.prefill_types import KvpSettings
from kvcli.eval.break_even import prose_tokens
from kvcli.llama.capture import TensorCapture
from kvcli.predict.refine import BaseQueries
from kvcli.state.codec import parse_seq_state
from kvcli.state.layout import layers_by_index
from kvcli.state.rope import rotate

PAIRINGS = ("keys only", "values only", "local", "queries only", "as run")
COLUMNS = (*PAIRINGS, "llama.cpp")  # as run, from llama.cpp's own attention output: checks ours


def attention(info, il: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, qpos, kpos) -> np.ndarray:
    """Rows (T, n_head * dv): q (T, n_head, d) before RoPE over roped cells k, v at kpos."""
    d = info.head_dim_k
    qr = rotate(q.reshape(len(q), -1), qpos, info.rope[il]).reshape(q.shape)
    n_kv = k.shape[1] // d
    keys_, values = k.reshape(len(k), n_kv, d), v.reshape(len(v), n_kv, -1)
    hidden = kpos[None, :] > qpos[:, None]
    if info.is_swa[il]:
        hidden |= (qpos[:, None] - kpos[None, :]) >= info.n_swa
    out = []
    for h in range(q.shape[1]):
        g = h // (q.shape[1] // n_kv)  # the KV head this query head reads (GQA)
        s = np.where(hidden, -np.inf, qr[:, h] @ keys_[:, g].T / np.sqrt(d))
        p = np.exp(s - s.max(1, keepdims=True))
        out.append((p / p.sum(1, keepdims=True)) @ values[:, g])
    return np.concatenate(out, 1)


def cells(engine: Engine, info) -> dict:
    """Per layer, (positions, K, V) of seq 0 in position order."""
    out = {}
    for il, c in layers_by_index(parse_seq_state(engine.base.get_state(0)), info).items():
        order = np.argsort(c.positions)
        out[il] = (c.positions[order], c.k[order].astype(np.float32), c.v[order].astype(np.float32))
    return out


def report(bundle, n_tokens: int, tail: int, n_prompts: int) -> dict:
    captured: list[TensorCapture] = []
    opened = handles.Handles.open

    def open_with_capture(self, path, what, capture=None, **kw):
        # the engine opens its base context here; give that context a capture of the queries
        if what == "base model":
            capture = captured[0]
        return opened(self, path, what, capture, **kw)

    from kvcli.models.model_info import read_model_info

    info = read_model_info(bundle.base, "base model")
    queries = BaseQueries(info, list(range(info.n_layer)))
    outputs = {il: f"kqv_out-{il}" for il in range(info.n_layer)}  # llama.cpp's own, to check ours
    captured.append(TensorCapture([*queries.names.values(), *outputs.values()]))
    handles.Handles.open = open_with_capture
    try:
        engine = Engine.from_bundle(bundle)
    finally:
        handles.Handles.open = opened
    cap, n_q = captured[0], tail + 1
    errors: dict[int, list[list[float]]] = {}
    with engine:
        layers = engine.predictor.predicted_layers
        for i in range(n_prompts):
            tokens = prose_tokens(engine, n_tokens + 40 * i)  # other prose, other lengths
            runs = []
            for mode, kvp in (("base", None), ("kvp", KvpSettings(tail=tail, spans=0))):
                cap.clear()
                engine.prefill(tokens, mode=mode, kvp=kvp)
                rows = {n: cap.rows(n) for n in cap.names}
                q = {il: _tail_queries(queries, rows, il, n_q, info) for il in layers}
                out = {il: rows[outputs[il]][-n_q:] for il in layers}
                runs.append((q, out, cells(engine, info)))
            (q_true, out_true, c_true), (q_kvp, out_kvp, c_kvp) = runs
            for il in layers:
                pos, k, v = c_true[il]
                pos_p, k_p, v_p = c_kvp[il]
                if not np.array_equal(pos, pos_p):
                    raise SystemExit(f"layer {il}: kvp's cells hold other positions than the base's")
                qpos = pos[-n_q:]
                ref = attention(info, il, q_true[il], k, v, qpos, pos)
                pairs = (
                    (q_true[il], k_p, v),
                    (q_true[il], k, v_p),
                    (q_true[il], k_p, v_p),
                    (q_kvp[il], k, v),
                    (q_kvp[il], k_p, v_p),
                )
                errors.setdefault(il, []).append(
                    [
                        float(np.linalg.norm(attention(info, il, *p, qpos, pos) - ref) / np.linalg.norm(ref))
                        for p in pairs
                    ]
                    + [float(np.linalg.norm(out_kvp[il] - out_true[il]) / np.linalg.norm(out_true[il]))]
                )
    return {
        "tokens": n_tokens,
        "tail": tail,
        "prompts": n_prompts,
        "layers": {
            il: dict(zip(COLUMNS, np.round(np.mean(rows, 0), 3).tolist())) for il, rows in errors.items()
        },
        "sliding_window": [il for il in errors if info.is_swa[il]],
    }


def _tail_queries(queries: BaseQueries, rows: dict, il: int, n_q: int, info) -> np.ndarray:
    """The last ``n_q`` tokens' queries of layer ``il`` (n_q, n_head, head_dim)."""
    name = queries.names[il]
    per_token = 1 if il in queries.projections else info.n_head[il]  # Gemma's rows are per head
    tail_rows = {name: rows[name][-n_q * per_token :]}
    return queries.of(tail_rows, il, n_q).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="a bundle folder (default: the embedded default)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--tail", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    bundle = load_bundle(args.bundle) if args.bundle else default_bundle()
    result = report(bundle, args.tokens, args.tail, args.prompts)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.tokens} tokens, tail {args.tail}, {args.prompts} prompts: relative error of the tail's")
    print("attention output against the base's (g: a layer that sees every position)")
    print("layer   " + " | ".join(COLUMNS))
    for il, row in result["layers"].items():
        tag = "  " if il in result["sliding_window"] else " g"
        print(f"{il:5d}{tag} " + "   ".join(f"{row[p]:>{len(p)}.3f}" for p in COLUMNS))


if __name__ == "__main__":
    main()
