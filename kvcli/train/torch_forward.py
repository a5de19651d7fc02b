"""A PyTorch forward of a GGUF model as llama.cpp computes it (src/models/gemma3.cpp,
llama.cpp, qwen2.cpp): the starting point for training a predictor through the frozen base.

Weights are read from the GGUF with gguf-py and dequantized to float32 once; llama.cpp
multiplies by the quantized weights (and quantized activations), so the two agree closely
but not to the bit: `python tools/torch_forward_report.py` measures how closely.
Needs the optional extra ``kvcli[train]`` (PyTorch).
"""

from __future__ import annotations

import math
from pathlib import Path

from kvcli.errors import KvcliError
from kvcli.models.gguf_header import read_tensors
from kvcli.models.model_info import read_model_info


def _torch():
    try:
        import torch
    except ImportError:
        raise KvcliError("this needs PyTorch: pip install 'kvcli[train]'") from None
    return torch


class TorchModel:
    """Gemma 3 (iSWA, query/key norms, post-norms, GELU FFN, scaled embeddings), Llama and
    Qwen 2 (QKV biases) in PyTorch, the output tied where the file has no ``output``."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        torch = _torch()
        self.info = read_model_info(path, "model")
        if self.info.arch not in ("gemma3", "llama", "qwen2"):
            raise KvcliError(f"the PyTorch forward supports gemma3, llama and qwen2, not {self.info.arch}")
        self.gemma = self.info.arch == "gemma3"
        self.device = device
        self.w = {k: torch.tensor(v, device=device) for k, v in read_tensors(self.info.path).items()}
        for p in self.w.values():
            p.requires_grad_(False)
        from kvcli.models.gguf_header import read_header

        header = read_header(self.info.path)
        self.softcap = float(header.get(f"{self.info.arch}.final_logit_softcapping", 0.0) or 0.0)
        self.eps = self.info.rms_eps
        self.attn_scale = 1.0 / math.sqrt(self.info.head_dim_k)

    def _norm(self, x, w):
        torch = _torch()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def _rope(self, x, positions, il: int):
        """RoPE of (T, heads, d) with layer ``il``'s parameters: NEOX pairs i with i + n/2,
        the normal layout 2i with 2i + 1; dimensions past n_rot are left as they are."""
        torch = _torch()
        p = self.info.rope[il]
        half = p.n_rot // 2
        inv = p.freq_base ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2 / p.n_rot)
        ang = (positions.to(torch.float64)[:, None] * p.freq_scale) * inv[None, :]
        cos, sin = ang.cos().to(x.dtype)[:, None, :], ang.sin().to(x.dtype)[:, None, :]
        if p.neox:
            a, b = x[..., :half], x[..., half : 2 * half]
            rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
        else:
            a, b = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
            rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
        return torch.cat([rotated, x[..., 2 * half :]], dim=-1)

    def _proj(self, h, il: int, name: str):
        out = h @ self.w[f"blk.{il}.{name}.weight"].T
        bias = self.w.get(f"blk.{il}.{name}.bias")
        return out if bias is None else out + bias

    def layer_kv(self, x, il: int, positions, trace: dict | None = None):
        """K (normed, roped) and V of layer ``il`` for residual rows ``x``: (T, kv heads, d)."""
        info, w = self.info, self.w
        h = self._norm(x, w[f"blk.{il}.attn_norm.weight"])
        k = self._proj(h, il, "attn_k").view(len(x), info.n_head_kv[il], info.head_dim_k)
        v = self._proj(h, il, "attn_v").view(len(x), info.n_head_kv[il], info.head_dim_v)
        if self.gemma:
            k = self._norm(k, w[f"blk.{il}.attn_k_norm.weight"])
        if trace is not None:
            trace[f"k_pre_rope-{il}"], trace[f"v-{il}"] = k.reshape(len(x), -1), v.reshape(len(x), -1)
        return h, self._rope(k, positions, il), v

    def forward(
        self,
        tokens,
        n_logits: int = 1,
        kv_override=None,
        trace: dict | None = None,
        n_layers: int | None = None,
        past: dict | None = None,
    ):
        """Logits (float32) of the last ``n_logits`` positions of ``tokens`` (a 1-D sequence
        starting at position 0), and every layer's (K, V). ``kv_override[il] = (K, V)``
        replaces layer il's K and V at every position (a predicted cache). ``trace``: filled
        per layer with the residual entering it (``l_in-N``, llama.cpp's l_out-(N-1); the
        last layer run also gives ``l_in-`` of the next), its K before RoPE and V
        (``k_pre_rope-N``, ``v-N``) and its attention output before the output projection
        (``kqv_out-N``). ``n_layers``: run only the first layers (no logits).

        ``past[il] = (K, V)``: every layer's cache (K roped) of positions 0..P-1, as kvp
        leaves it; ``tokens`` are then positions P.. and attend to it as to their own. The
        returned caches are those of ``tokens`` alone."""
        torch = _torch()
        info, w = self.info, self.w
        tokens = torch.as_tensor(tokens, device=self.device)
        n = len(tokens)
        start = 0 if not past else len(past[0][0])
        positions = torch.arange(start, start + n, device=self.device)
        x = w["token_embd.weight"][tokens] * (math.sqrt(info.n_embd) if self.gemma else 1.0)
        dist = positions[:, None] - torch.arange(start + n, device=self.device)[None, :]
        causal = dist >= 0
        caches = []
        for il in range(info.n_layer if n_layers is None else n_layers):
            if trace is not None:
                trace[f"l_in-{il}"] = x
            h, k, v = self.layer_kv(x, il, positions, trace)
            if kv_override is not None and il in kv_override:
                k, v = kv_override[il]
            caches.append((k, v))
            if past:
                k, v = torch.cat([past[il][0], k]), torch.cat([past[il][1], v])
            q = self._proj(h, il, "attn_q").view(n, info.n_head[il], info.head_dim_k)
            if self.gemma:
                q = self._norm(q, w[f"blk.{il}.attn_q_norm.weight"])
            q = self._rope(q, positions, il)
            group = info.n_head[il] // info.n_head_kv[il]
            kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = torch.einsum("thd,shd->hts", q * self.attn_scale, kk)
            allowed = causal & (dist < info.n_swa) if info.n_swa and info.is_swa[il] else causal
            scores = scores.masked_fill(~allowed, float("-inf"))
            att = torch.einsum("hts,shd->thd", scores.softmax(-1), vv).reshape(n, -1)
            if trace is not None:
                trace[f"kqv_out-{il}"] = att
            att = self._proj(att, il, "attn_output")
            x = x + (self._norm(att, w[f"blk.{il}.post_attention_norm.weight"]) if self.gemma else att)
            h = self._norm(x, w[f"blk.{il}.ffn_norm.weight"])
            act = (
                torch.nn.functional.gelu(self._proj(h, il, "ffn_gate"), approximate="tanh")
                if self.gemma
                else torch.nn.functional.silu(self._proj(h, il, "ffn_gate"))
            )
            ffn = self._proj(act * self._proj(h, il, "ffn_up"), il, "ffn_down")
            x = x + (self._norm(ffn, w[f"blk.{il}.post_ffw_norm.weight"]) if self.gemma else ffn)
        if trace is not None:
            trace[f"l_in-{len(caches)}"] = x
        if n_layers is not None:
            return None, caches
        out = self._norm(x[-n_logits:], w["output_norm.weight"])
        logits = out @ w.get("output.weight", w["token_embd.weight"]).T
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits, caches
