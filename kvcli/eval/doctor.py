"""Checks that kvcli's KV path is exact on this machine's llama.cpp and a given model.

(a) codec: parse then write a real state gives back the same bytes (seq 0 and seq -1);
(b) exact re-injection: the base's own cache, parsed, un-roped, re-roped and written back,
    gives logits identical to the bit (flash attention off);
(c) RoPE: numpy's rotation matches llama.cpp's own position shift (``llama_memory_seq_add``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kvcli.llama.runtime import Context, ContextSettings, Model
from kvcli.models.model_info import ModelInfo, read_model_info
from kvcli.state.codec import parse_seq_state, write_seq_state
from kvcli.state.layout import CacheLayout, layers_by_index
from kvcli.state.rope import rotate, unrotate

ROPE_SHIFT = 7
# f16 keys: numpy's exact rotation and llama.cpp's (rounded to f16 twice) differ by ulps
ROPE_TOLERANCE = 2e-2


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    value: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def check_prompt(model: Model, info: ModelInfo, n_tokens: int, seed: int = 0) -> list[int]:
    """A deterministic prompt of ``n_tokens`` ids (BOS first) from the model's own vocabulary."""
    rng = np.random.default_rng(seed)
    low = min(1000, model.n_vocab // 4)
    ids = rng.integers(low, model.n_vocab, size=n_tokens - 1)
    ids = [int(i) for i in ids if not model.is_eog(int(i))]
    while len(ids) < n_tokens - 1:
        ids.append(low)
    return [model.bos, *ids]


def check_codec(ctx: Context, tokens: list[int]) -> CheckResult:
    ctx.clear()
    ctx.decode(tokens)
    sizes = []
    for seq_id in (0, -1):
        raw = ctx.get_state(seq_id)
        if write_seq_state(parse_seq_state(raw)) != raw:
            return CheckResult("codec round trip", False, f"seq {seq_id}: bytes differ")
        sizes.append(len(raw))
    return CheckResult(
        "codec round trip", True, f"{len(tokens)} tokens; seq 0 {sizes[0]} B, seq -1 {sizes[1]} B identical"
    )


def _reinjected_state(raw: bytes, info: ModelInfo, layout: CacheLayout) -> bytes:
    state = parse_seq_state(raw)
    layers = layers_by_index(state, info)
    kv = {
        il: (rotate(unrotate(c.k, c.positions, info.rope[il]), c.positions, info.rope[il]), c.v)
        for il, c in layers.items()
    }
    group_positions = [
        np.sort(b.streams[0].positions) if b.streams[0] else np.zeros(0, np.int32) for b in state.blobs
    ]
    return write_seq_state(layout.build_state(group_positions, kv))


def check_reinjection(ctx: Context, info: ModelInfo, prompts: list[list[int]]) -> CheckResult:
    """Max |logit difference| between the base's own cache and the re-injected one, over prompts.

    Both decode t[N-1] alone over a cache of t[0..N-2]: a different batch split alone changes
    the logits (by up to ~0.9 on Gemma 3 270M), so the reference takes the same path.
    """
    ctx.clear()
    ctx.decode(prompts[0][:1])
    layout = CacheLayout.probe(parse_seq_state(ctx.get_state(0)), info)
    worst = 0.0
    for tokens in prompts:
        ctx.clear()
        ctx.decode(tokens[:-1])
        state = _reinjected_state(ctx.get_state(-1), info, layout)
        ctx.decode(tokens[-1:], logits_last=True)
        want = ctx.last_logits()
        ctx.clear()
        ctx.set_state(state, 0, n_past=len(tokens) - 1)
        ctx.decode(tokens[-1:], start=len(tokens) - 1, logits_last=True)
        worst = max(worst, float(np.max(np.abs(ctx.last_logits() - want))))
    ok = worst == 0.0
    return CheckResult(
        "exact re-injection",
        ok,
        f"{len(prompts)} prompts of {len(prompts[0])} tokens, max |dlogit| {worst:g}",
        worst,
    )


def check_rope(ctx: Context, info: ModelInfo, tokens: list[int]) -> CheckResult:
    """Shift a sequence by +ROPE_SHIFT in llama.cpp and compare with numpy's rotation."""
    ctx.clear()
    ctx.decode(tokens)
    before = layers_by_index(parse_seq_state(ctx.get_state(-1)), info)
    ctx.shift(ROPE_SHIFT)
    ctx.decode(tokens[-1:], start=len(tokens) + ROPE_SHIFT)  # applies the pending shift
    after = layers_by_index(parse_seq_state(ctx.get_state(-1)), info)
    worst = 0.0
    for il, c in before.items():
        # the sliding cache may reuse an out-of-window cell for the new token: match positions
        shifted = c.positions + ROPE_SHIFT
        keep = np.isin(shifted, after[il].positions)
        rows = np.searchsorted(after[il].positions, shifted[keep])
        expect = rotate(unrotate(c.k[keep], c.positions[keep], info.rope[il]), shifted[keep], info.rope[il])
        got = np.asarray(after[il].k[rows], np.float32)
        scale = max(1.0, float(np.max(np.abs(expect))))
        worst = max(worst, float(np.max(np.abs(got - expect))) / scale)
    ok = worst <= ROPE_TOLERANCE
    return CheckResult(
        "RoPE vs llama.cpp shift",
        ok,
        f"shift +{ROPE_SHIFT} over {len(before)} layers, max rel error {worst:.2e}",
        worst,
    )


def run_doctor(
    model_path: str | Path, *, n_tokens: int | None = None, n_prompts: int = 20, threads: int = 0
) -> list[CheckResult]:
    info = read_model_info(model_path)
    if n_tokens is None:
        n_tokens = max(64, info.n_swa + 88) if info.n_swa else 256  # past the sliding window
    settings = ContextSettings(n_ctx=n_tokens + 2 * ROPE_SHIFT + 16, n_threads=threads)
    model = Model(info.path)
    try:
        ctx = Context(model, settings)
        try:
            prompts = [check_prompt(model, info, n_tokens, seed) for seed in range(n_prompts)]
            return [
                check_codec(ctx, prompts[0]),
                check_reinjection(ctx, info, prompts),
                check_rope(ctx, info, prompts[0]),
            ]
        finally:
            ctx.close()
    finally:
        model.close()


def check_bundle(folder: str | Path) -> CheckResult:
    """The bundle's three files are whole (sha256) and fit together (fingerprints, tokenizer)."""
    from kvcli.engine.bundle import check_compatible, load_bundle, verify_bundle
    from kvcli.errors import KvcliError

    try:
        b = load_bundle(folder)
        bad = [role for role, good in verify_bundle(b).items() if not good]
        if bad:
            return CheckResult("bundle", False, f"sha256 differs from the manifest: {', '.join(bad)}")
        _, aux, pred = check_compatible(b.base, b.aux_source, b.predictor)
    except KvcliError as exc:
        return CheckResult("bundle", False, str(exc))
    return CheckResult(
        "bundle",
        True,
        f"sha256 ok; predictor fits base and {aux.n_layer}-layer "
        f"auxiliary ({len(pred.copied_layers)} layers copied, "
        f"{len(pred.predicted_layers)} predicted, {pred.storage_type})",
    )


def check_view(folder: str | Path, n_tokens: int = 200) -> CheckResult | None:
    """For a prefix auxiliary run from the base's own weights (engine/aux_load.py: partial or
    view): it caches exactly what the base itself caches in layers 0..k-1."""
    from kvcli.engine.bundle import load_bundle
    from kvcli.engine.engine import Engine

    b = load_bundle(folder)
    settings = ContextSettings(n_ctx=n_tokens + 16)
    with Engine.from_bundle(b, settings=settings) as eng:
        if not eng.view_layers:
            return None
        k, how = eng.view_layers, eng.aux_load
        tokens = check_prompt(eng.model, eng.base_info, n_tokens)
        cells = []
        for ctx, info in ((eng.aux, eng.aux_state_info), (eng.base, eng.base_info)):
            ctx.clear()
            if ctx.capture is not None:
                ctx.capture.clear()
            ctx.decode(tokens)
            cells.append(layers_by_index(parse_seq_state(ctx.get_state(0)), info))
        view, base = cells
        same = all(
            np.array_equal(view[il].k, base[il].k) and np.array_equal(view[il].v, base[il].v)
            for il in range(k)
        )
    where = (
        "the base's file loaded as its first k layers (patched llama.cpp)"
        if how == "partial"
        else "the base's own model, stopped after layer k-1"
    )
    return CheckResult(
        f"auxiliary as a view ({how})",
        same,
        f"{where}: layers 0..{k - 1}, {n_tokens} tokens: K, V "
        + ("identical to the bit" if same else "DIFFER from the base's"),
    )
