#!/usr/bin/env python3
"""How closely kvcli's PyTorch forward (kvcli/train/torch_forward.py) follows llama.cpp on the same
GGUF: per prompt length, top-1 agreement and KL(llama.cpp || torch) of the next-token
distribution after held-out prompts, and the relative error of every layer's cached K and V.

    python tools/torch_forward_report.py [--model GGUF] [--lengths 128,512,1024] [-n 10]

Needs PyTorch (pip install 'kvcli[train]'). The default model is the embedded Gemma 3 270M.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    import torch

    from kvcli.engine.bundle import embedded_model_path
    from kvcli.engine.engine import Engine
    from kvcli.eval.ttft import bench_prompts
    from kvcli.llama.runtime import ContextSettings
    from kvcli.state.codec import parse_seq_state
    from kvcli.state.layout import layers_by_index
    from kvcli.train.torch_forward import TorchModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", default="128,512,1024")
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or embedded_model_path()
    lengths = [int(x) for x in args.lengths.split(",")]
    start = time.perf_counter()
    model = TorchModel(path)
    print(f"loaded and dequantized in {time.perf_counter() - start:.1f} s")
    settings = ContextSettings(n_ctx=max(lengths) + 64, type_k="f32", type_v="f32")
    rows = []
    with Engine(path, settings=settings) as engine:
        for n in lengths:
            agree, kls, k_err, v_err, seconds = 0, [], [], [], []
            for tokens in bench_prompts(engine, n, args.n):
                ref = engine.prefill(tokens, mode="base").logits.astype(np.float64)
                cells = layers_by_index(parse_seq_state(engine.base.get_state(0)), engine.base_info)
                t0 = time.perf_counter()
                with torch.no_grad():
                    ours, caches = model.forward(tokens)
                seconds.append(time.perf_counter() - t0)
                ours = ours[0].numpy().astype(np.float64)
                p, q = (np.exp(x - x.max()) for x in (ref, ours))
                p, q = p / p.sum(), q / q.sum()
                kls.append(float(np.sum(p * (np.log(p + 1e-300) - np.log(q + 1e-300)))))
                agree += int(ref.argmax() == ours.argmax())
                for il, (k, v) in enumerate(caches):
                    rows_il = cells[il].positions
                    for err, ours_kv, theirs in ((k_err, k, cells[il].k), (v_err, v, cells[il].v)):
                        mine = ours_kv.reshape(len(tokens), -1).numpy()[rows_il]
                        err.append(float(np.linalg.norm(mine - theirs) / np.linalg.norm(theirs)))
            row = {
                "n_prompt": n,
                "prompts": args.n,
                "top1_agreement": agree / args.n,
                "kl_mean": float(np.mean(kls)),
                "kl_max": float(np.max(kls)),
                "k_rel_err_mean": float(np.mean(k_err)),
                "v_rel_err_mean": float(np.mean(v_err)),
                "torch_forward_s_mean": float(np.mean(seconds)),
            }
            rows.append(row)
            print(json.dumps(row))


if __name__ == "__main__":
    main()
