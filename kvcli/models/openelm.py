"""OpenELM (apple/corenet's GeneralGPT) as llama.cpp runs it: the GGUF a state dict becomes,
and a numpy forward used as the reference in tests.

Layer-wise scaling: every layer has its own query heads, KV heads and FFN width. Per layer:
RMSNorm -> fused QKV projection (query heads, then key heads, then value heads) -> per-head
RMSNorm of queries and keys -> NEOX RoPE -> causal grouped-query attention -> output
projection -> residual; RMSNorm -> SwiGLU FFN (``proj_1`` holds [gate; up]) -> residual.
The output head is tied to the token embedding. llama.cpp names: src/models/openelm.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcli.errors import ModelFileError

ARCH = "openelm"
RMS_EPS = 1e-6  # OpenELM's, as llama.cpp's converter writes it


@dataclass(frozen=True)
class OpenELMShape:
    n_embd: int
    head_dim: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    n_ff: tuple[int, ...]
    n_vocab: int
    rope_freq_base: float = 10000.0
    context_length: int = 2048

    @property
    def n_layer(self) -> int:
        return len(self.n_head)


def make_divisible(v: float, divisor: int) -> int:
    """corenet's (and HF OpenELM's) rounding of a layer's FFN width."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def gguf_tensors(
    state: dict[str, np.ndarray], shape: OpenELMShape, prefix: str = ""
) -> dict[str, np.ndarray]:
    """llama.cpp's tensor names for a corenet OpenELM state dict (keys under ``prefix``),
    checked against ``shape``; arrays keep PyTorch's (out, in) layout, which gguf-py writes
    as llama.cpp's (in, out)."""

    def get(key: str, expected: tuple[int, ...]) -> np.ndarray:
        name = prefix + key
        if name not in state:
            raise ModelFileError(f"the checkpoint lacks {name}")
        a = state[name]
        if tuple(a.shape) != expected:
            raise ModelFileError(f"{name} has shape {tuple(a.shape)}, the config says {expected}")
        return a

    d, hd = shape.n_embd, shape.head_dim
    out = {
        "token_embd.weight": get("token_embeddings.weight", (shape.n_vocab, d)),
        "output_norm.weight": get("norm.weight", (d,)),
    }
    for i in range(shape.n_layer):
        nq, nkv, ff = shape.n_head[i], shape.n_head_kv[i], shape.n_ff[i]
        p = f"layers.{i}."
        proj_1 = get(p + "ffn.proj_1.weight", (2 * ff, d))
        out.update(
            {
                f"blk.{i}.attn_norm.weight": get(p + "attn_norm.weight", (d,)),
                f"blk.{i}.attn_qkv.weight": get(p + "attn.qkv_proj.weight", ((nq + 2 * nkv) * hd, d)),
                f"blk.{i}.attn_q_norm.weight": get(p + "attn.q_norm.weight", (hd,)),
                f"blk.{i}.attn_k_norm.weight": get(p + "attn.k_norm.weight", (hd,)),
                f"blk.{i}.attn_output.weight": get(p + "attn.out_proj.weight", (d, nq * hd)),
                f"blk.{i}.ffn_norm.weight": get(p + "ffn_norm.weight", (d,)),
                f"blk.{i}.ffn_gate.weight": proj_1[:ff],
                f"blk.{i}.ffn_up.weight": proj_1[ff:],
                f"blk.{i}.ffn_down.weight": get(p + "ffn.proj_2.weight", (d, ff)),
            }
        )
    return out


def write_gguf(
    path: Path,
    shape: OpenELMShape,
    tensors: dict[str, np.ndarray],
    vocab,
    *,
    name: str,
    outtype: str = "f16",
    extra: dict | None = None,
) -> Path:
    """An OpenELM GGUF llama.cpp loads. ``vocab``: a tokenizer.SentencePieceVocab; norms stay
    float32, matrices are ``outtype`` (f32 or f16). Written atomically."""
    import gguf

    from kvcli.atomic import write_atomically

    if outtype not in ("f32", "f16"):
        raise ModelFileError(f"unknown outtype {outtype!r} (f32 or f16; quantize afterwards)")

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), ARCH)
        w.add_name(name)
        w.add_block_count(shape.n_layer)
        w.add_context_length(shape.context_length)
        w.add_embedding_length(shape.n_embd)
        w.add_feed_forward_length(list(shape.n_ff))
        w.add_head_count(list(shape.n_head))
        w.add_head_count_kv(list(shape.n_head_kv))
        w.add_rope_freq_base(shape.rope_freq_base)
        w.add_layer_norm_rms_eps(RMS_EPS)
        w.add_rope_dimension_count(shape.head_dim)
        w.add_key_length(shape.head_dim)
        w.add_value_length(shape.head_dim)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
        vocab.add_to(w)
        for key, value in (extra or {}).items():
            if isinstance(value, str):
                w.add_string(key, value)
            elif isinstance(value, list):
                w.add_array(key, value)
            else:
                w.add_uint32(key, int(value))
        for tname, a in tensors.items():
            matrix = a.ndim == 2
            w.add_tensor(
                tname,
                np.ascontiguousarray(a.astype(np.float16 if matrix and outtype == "f16" else np.float32)),
            )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return write_atomically(Path(path), write)


# -- numpy reference ---------------------------------------------------------------------


def _rms(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS) * w


def rope_neox(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """(T, heads, d) rotated as GPT-NeoX does: the first half pairs with the second."""
    half = x.shape[-1] // 2
    inv = base ** (-np.arange(half, dtype=np.float64) * 2 / x.shape[-1])
    ang = positions[:, None].astype(np.float64) * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


@dataclass
class LayerCache:
    """One layer's keys and values per position: ``k_pre`` (after the projection, before
    the key norm and RoPE), ``k`` (as llama.cpp caches it: normed and roped), ``v``."""

    k_pre: np.ndarray
    k: np.ndarray
    v: np.ndarray


def layer_kv(x: np.ndarray, w: dict[str, np.ndarray], shape: OpenELMShape, il: int, positions: np.ndarray):
    """Q (normed, roped), and the layer's LayerCache for the residual stream ``x``."""
    nq, nkv, hd = shape.n_head[il], shape.n_head_kv[il], shape.head_dim
    h = _rms(x, w[f"blk.{il}.attn_norm.weight"])
    qkv = (h @ w[f"blk.{il}.attn_qkv.weight"].T.astype(np.float64)).reshape(len(x), nq + 2 * nkv, hd)
    q, k_pre, v = qkv[:, :nq], qkv[:, nq : nq + nkv], qkv[:, nq + nkv :]
    q = rope_neox(_rms(q, w[f"blk.{il}.attn_q_norm.weight"]), positions, shape.rope_freq_base)
    return q, LayerCache(k_pre=k_pre, k=normed_roped_keys(k_pre, w, shape, il, positions), v=v)


def normed_roped_keys(
    k_pre: np.ndarray, w: dict[str, np.ndarray], shape: OpenELMShape, il: int, positions: np.ndarray
) -> np.ndarray:
    return rope_neox(_rms(k_pre, w[f"blk.{il}.attn_k_norm.weight"]), positions, shape.rope_freq_base)


def attend_and_ffn(
    x: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    positions: np.ndarray,
    key_positions: np.ndarray,
    w: dict[str, np.ndarray],
    shape: OpenELMShape,
    il: int,
) -> np.ndarray:
    """The rest of layer ``il`` for queries at ``positions`` over keys/values at
    ``key_positions`` (causal): the new residual stream."""
    nq, nkv, hd = shape.n_head[il], shape.n_head_kv[il], shape.head_dim
    group = nq // nkv
    kk, vv = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # (S, nq, hd)
    scores = np.einsum("thd,shd->hts", q, kk) / np.sqrt(hd)
    scores = np.where(key_positions[None, None, :] <= positions[None, :, None], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    att = np.einsum("hts,shd->thd", p, vv).reshape(len(x), nq * hd)
    x = x + att @ w[f"blk.{il}.attn_output.weight"].T.astype(np.float64)
    h = _rms(x, w[f"blk.{il}.ffn_norm.weight"])
    gate = h @ w[f"blk.{il}.ffn_gate.weight"].T.astype(np.float64)
    up = h @ w[f"blk.{il}.ffn_up.weight"].T.astype(np.float64)
    return x + (gate / (1 + np.exp(-gate)) * up) @ w[f"blk.{il}.ffn_down.weight"].T.astype(np.float64)


def logits(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    return _rms(x, w["output_norm.weight"]) @ w["token_embd.weight"].T.astype(np.float64)


def forward(
    w: dict[str, np.ndarray], shape: OpenELMShape, tokens: list[int]
) -> tuple[np.ndarray, list[LayerCache]]:
    """Logits at every position (float64) and every layer's cache, for a whole prompt."""
    positions = np.arange(len(tokens))
    x = w["token_embd.weight"][np.asarray(tokens)].astype(np.float64)
    caches = []
    for il in range(shape.n_layer):
        q, cache = layer_kv(x, w, shape, il, positions)
        caches.append(cache)
        x = attend_and_ffn(x, q, cache.k, cache.v, positions, positions, w, shape, il)
    return logits(x, w), caches


@dataclass
class SentencePieceVocab:
    """A sentencepiece tokenizer.model as llama.cpp's "llama" (SPM) tokenizer: its pieces,
    scores and types, padded with unused ``[PAD{i}]`` pieces to the embedding's row count
    (OpenELM pads its 32000-piece Llama 2 tokenizer to 32128 rows; llama.cpp's own converter
    pads the same way)."""

    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    bos: int
    eos: int
    unk: int
    n_pieces: int

    @classmethod
    def from_file(cls, path: str | Path, n_rows: int) -> SentencePieceVocab:
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"tokenizer not found: {path}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromFile(str(path))
        except (OSError, RuntimeError) as exc:
            raise ModelFileError(f"not a sentencepiece tokenizer.model ({exc}): {path}") from None
        n = sp.vocab_size()
        if n > n_rows:
            raise ModelFileError(
                f"the tokenizer has {n} pieces but the embedding only {n_rows} rows: "
                f"{path} is not this model's tokenizer"
            )
        tokens = [f"[PAD{i}]".encode() for i in range(n_rows)]
        scores, types = [-10000.0] * n_rows, [5] * n_rows  # 5: unused
        for i in range(n):
            tokens[i] = sp.IdToPiece(i).encode("utf-8")
            scores[i] = sp.GetScore(i)
            types[i] = (
                2
                if sp.IsUnknown(i)
                else 3
                if sp.IsControl(i)
                else 5
                if sp.IsUnused(i)
                else 6
                if sp.IsByte(i)
                else 1
            )
        return cls(tokens, scores, types, bos=sp.bos_id(), eos=sp.eos_id(), unk=sp.unk_id(), n_pieces=n)

    def add_to(self, w) -> None:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(self.tokens)
        w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        for setter, value in (
            (w.add_bos_token_id, self.bos),
            (w.add_eos_token_id, self.eos),
            (w.add_unk_token_id, self.unk),
        ):
            if value >= 0:
                setter(value)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)


def kvp_forward(
    base_w: dict[str, np.ndarray],
    base: OpenELMShape,
    aux_w: dict[str, np.ndarray],
    aux: OpenELMShape,
    matrices: dict[int, tuple],
    layer_map,
    tokens: list[int],
) -> np.ndarray:
    """corenet's KV-prediction generation step in numpy (float64): the auxiliary prefills
    tokens[:-1]; per base layer i, its raw keys and values of layer ``layer_map[i]`` go through
    the Linears ``matrices[i] = (Wk, bk, Wv, bv)``; the base applies its key norm and RoPE to
    the predicted keys and runs the last token over them. Returns the base's logits for it."""
    n = len(tokens)
    _, aux_caches = forward(aux_w, aux, tokens[:-1])
    positions = np.arange(n - 1)
    predicted = []
    for il, a in enumerate(layer_map):
        wk, bk, wv, bv = (np.asarray(m, np.float64) for m in matrices[il])
        k_raw = aux_caches[a].k_pre.reshape(n - 1, -1) @ wk.T + bk
        v = aux_caches[a].v.reshape(n - 1, -1) @ wv.T + bv
        hd, kv_heads = base.head_dim, base.n_head_kv[il]
        k = normed_roped_keys(k_raw.reshape(n - 1, kv_heads, hd), base_w, base, il, positions)
        predicted.append((k, v.reshape(n - 1, kv_heads, hd)))
    last = np.array([n - 1])
    x = base_w["token_embd.weight"][np.asarray(tokens[-1:])].astype(np.float64)
    for il in range(base.n_layer):
        q, own = layer_kv(x, base_w, base, il, last)
        k = np.concatenate([predicted[il][0], own.k])
        v = np.concatenate([predicted[il][1], own.v])
        x = attend_and_ffn(x, q, k, v, last, np.arange(n), base_w, base, il)
    return logits(x, base_w)[0]
