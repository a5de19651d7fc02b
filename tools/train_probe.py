#!/usr/bin/env python3
"""What training a predictor through the frozen base costs on this machine (issue 9): the
paper's loss (apple/corenet cross_entropy_for_kv_prediction: the base's cross-entropy on the
next tokens with the predicted cache in place of its own + lambda * L1 between predicted and
true K, V) on the default bundle's closed-form predictor, a few AdamW steps, and tokens/s.

    python tools/train_probe.py [--tokens 256] [--steps 4] [--logits 64] [--lambda 0.055]

A probe, not `kvcli train`: no checkpoints or resume; `--save DIR` writes a bundle with the
trained predictor so that `kvcli eval --bundle DIR` can judge it. Needs PyTorch (kvcli[train]).
The auxiliary's features are computed in PyTorch too (the base's first k layers, which is
what the default bundle's prefix auxiliary is), so gradients reach only the predictor.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    import numpy as np
    import torch

    from kvcli import keys
    from kvcli.bundle import default_bundle
    from kvcli.corpus import token_chunks
    from kvcli.model_info import key_norm_weights
    from kvcli.predictor import load_predictor
    from kvcli.runtime import Model
    from kvcli.torch_forward import TorchModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256, help="tokens per training sequence")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--logits", type=int, default=64, help="positions scored by the cross-entropy")
    ap.add_argument("--lambda", dest="lam", type=float, default=1 / 18, help="weight of the KV L1")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="write a bundle with the trained predictor here")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    b = default_bundle()
    pred = load_predictor(b.predictor)
    if not b.aux_prefix or pred.raw_keys or set(pred.hidden_kinds) != set(keys.HIDDEN_FEATURES):
        raise SystemExit("the probe reproduces the default bundle's features only")
    model = TorchModel(b.base)
    info, k_aux = model.info, b.aux_prefix
    norms = {il: torch.tensor(w) for il, w in key_norm_weights(info).items()}
    params = {il: (torch.tensor(pred.weights[il], requires_grad=True),
                   torch.tensor(pred.biases[il], requires_grad=True)) for il in pred.predicted_layers}
    opt = torch.optim.AdamW([p for pair in params.values() for p in pair], lr=args.lr)
    tokenizer = Model(b.base, what="base model")
    chunks = [t for _, t in token_chunks("calibration", lambda s: tokenizer.tokenize(s, add_special=False),
                                         chunk_tokens=args.tokens, n_chunks=args.steps, bos=tokenizer.bos)]
    tokenizer.close()

    def predicted_cache(tokens):
        trace = {}
        with torch.no_grad():
            model.forward(tokens, trace=trace, n_layers=k_aux)
        src = k_aux - 1
        feats = torch.cat([trace[f"k_pre_rope-{src}"], trace[f"v-{src}"], trace[f"l_in-{src}"],
                           trace[f"kqv_out-{src}"]], dim=1)
        positions = torch.arange(len(tokens))
        cache = {}
        for il, (w, bias) in params.items():
            y = feats @ w + bias
            kw = pred.k_widths[il]
            k = y[:, :kw].view(len(tokens), info.n_head_kv[il], info.head_dim_k)
            # the base's key-norm scale (kvcli's rescale): rms of k / w over each head is 1
            inv = torch.where(norms[il].abs() > 1e-3, 1 / norms[il], torch.zeros_like(norms[il]))
            k = k / (k * inv).pow(2).mean(-1, keepdim=True).clamp_min(1e-12).sqrt()
            cache[il] = (model._rope(k, positions, il),
                         y[:, kw:].view(len(tokens), info.n_head_kv[il], info.head_dim_v))
        return cache

    rows = []
    for step, tokens in enumerate(chunks):
        start = time.perf_counter()
        with torch.no_grad():
            base_logits, true_caches = model.forward(tokens, n_logits=args.logits + 1)
            ce_base = torch.nn.functional.cross_entropy(base_logits[:-1],
                                                        torch.as_tensor(tokens[-args.logits:]))
        cache = predicted_cache(tokens)
        logits, _ = model.forward(tokens, n_logits=args.logits + 1, kv_override=cache)
        target = torch.as_tensor(tokens[-args.logits:])
        ce = torch.nn.functional.cross_entropy(logits[:-1], target)
        l1 = sum((cache[il][0] - true_caches[il][0]).abs().mean() + (cache[il][1] - true_caches[il][1])
                 .abs().mean() for il in cache)
        loss = ce + args.lam * l1
        opt.zero_grad()
        loss.backward()
        opt.step()
        seconds = time.perf_counter() - start
        rows.append({"step": step, "ce": round(ce.item(), 4), "ce_base": round(ce_base.item(), 4),
                     "kv_l1": round(l1.item(), 4),
                     "seconds": round(seconds, 2), "tokens_per_s": round(len(tokens) / seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if args.save:
        save_bundle(b, pred, params, args.save)
    tps = [r["tokens_per_s"] for r in rows[1:]] or [rows[0]["tokens_per_s"]]
    print(json.dumps({"tokens": args.tokens, "steps": args.steps,
                      "median_tokens_per_s_after_first": float(np.median(tps))}))


def save_bundle(bundle, pred, params, folder) -> None:
    """The bundle's base and auxiliary with the trained matrices as its predictor."""
    import dataclasses
    from pathlib import Path

    from kvcli.atomic import building_folder
    from kvcli.bundle import write_manifest
    from kvcli.predictor import save_predictor

    trained = dataclasses.replace(
        pred, weights={il: w.detach().numpy().copy() for il, (w, _) in params.items()},
        biases={il: b.detach().numpy().copy() for il, (_, b) in params.items()},
        calibration_source=pred.calibration_source + " + train_probe")
    with building_folder(Path(folder)) as work:
        save_predictor(trained, work / "predictor.gguf", "f32")
        files = {"base": bundle.base.resolve(), "aux": bundle.aux_source, "predictor": Path("predictor.gguf")}
        write_manifest(work, files)


if __name__ == "__main__":
    main()
