"""Token selection (mode ``select``), the rival kvp's hybrid is judged against: the auxiliary
prefills the prompt and ranks its positions by the attention of the prompt's last rows; the
base then prefills only the top ones, in chunks, with BOS and the prompt's last tokens, each
at its own position (the positions left out are never in its cache), and generates from
there. In the manner of GemFilter (arXiv 2409.17422: a model's early layers pick the tokens)
and SpecPrefill (arXiv 2502.02789: a small draft model scores them).

Two rankings, both kvcli's span choosers' machinery (``SelectBy``):
- ``attention``: the auxiliary's own attention from its decode of the last tokens, in the
  bundle's tail-focus layers where they are a prefix auxiliary's (kvcli.engine.tail_choice);
- ``keys``: the queries of the prompt's last SELECT_TAIL tokens in base layer k, the first
  after a k-layer prefix auxiliary, over that layer's predicted keys
  (kvcli.engine.span_choice).
"""

from __future__ import annotations

import numpy as np

from kvcli.choices import Choice
from kvcli.engine.aux_load import take_captured
from kvcli.engine.kvp_prefill import predictor_inputs
from kvcli.engine.prefill_types import Prefill
from kvcli.engine.timings import Clock, Timings
from kvcli.errors import IncompatibleError, KvcliError

CHUNK = 8  # positions kept together: a fact and the words around it, not single tokens
SELECT_TAIL = 32  # the prompt's last tokens, always kept: the question
MIN_SELECT_KEEP = 1 + CHUNK + SELECT_TAIL  # BOS, one chosen chunk, the last tokens
DEFAULT_KEEP_SHARE = 0.25  # without --keep: a quarter of the prompt


class SelectBy(Choice):
    """How token selection ranks the prompt's positions: the auxiliary's own attention
    (``attention``), base layer k's attention over predicted keys (``keys``), or the one the
    bundle has (``auto``: attention where the auxiliary's layers choose kvp's spans)."""

    AUTO = "auto"
    ATTENTION = "attention"
    KEYS = "keys"


def kept_positions(scores: np.ndarray, n: int, keep: int, tail: int, chunk: int = CHUNK) -> np.ndarray:
    """The positions the base prefills: 0 (BOS), the last ``tail``, and the chunks of
    ``chunk`` positions among 1..n-tail-1 whose largest ``scores`` are highest, until ``keep``
    positions in all (the last chunk cut to fit); increasing."""
    hi = n - tail
    budget = keep - 1 - tail
    chosen: list[np.ndarray] = []
    if hi > 1 and budget > 0:
        starts = np.arange(1, hi, chunk)
        best = np.maximum.reduceat(np.asarray(scores[1:hi], dtype=np.float64), starts - 1)
        for i in np.argsort(-best, kind="stable"):
            take = min(chunk, hi - starts[i], budget)
            chosen.append(np.arange(starts[i], starts[i] + take))
            budget -= take
            if budget <= 0:
                break
    return np.unique(np.concatenate([[0], *chosen, np.arange(max(1, hi), n)]).astype(np.int64))


def default_keep(n: int) -> int:
    return max(MIN_SELECT_KEEP, round(n * DEFAULT_KEEP_SHARE))


def selection_rankings(engine) -> list[str]:
    """The rankings token selection can use on this engine and build (none without kvcli's
    patches/0002)."""
    if engine.aux is None or not engine.base.gapped_positions_supported():
        return []
    out = [SelectBy.ATTENTION.value] if engine.aux_focus_layers else []
    return out + ([SelectBy.KEYS.value] if engine.spans.by_keys else [])


def resolve_select_by(engine, select_by: str) -> str:
    """``select_by`` for this engine (``auto`` resolved), or an error naming what is missing."""
    if engine.aux is None:
        raise IncompatibleError("token selection needs an auxiliary model (use a bundle)")
    if not engine.base.gapped_positions_supported():
        raise IncompatibleError(
            "token selection needs kvcli's build of llama.cpp, which lets a sequence's "
            "positions jump forward (python tools/install.py)"
        )
    select_by = SelectBy.parse(select_by, "selection ranking")
    if select_by == SelectBy.AUTO:
        select_by = SelectBy.ATTENTION if engine.aux_focus_layers else SelectBy.KEYS
    if select_by == SelectBy.ATTENTION and not engine.aux_focus_layers:
        raise IncompatibleError(
            "selection by the auxiliary's attention needs a bundle whose spans are chosen by "
            "the auxiliary's own layers (a prefix bundle of a model without sliding-window layers)"
        )
    if select_by == SelectBy.KEYS:
        engine.spans.check()
    return select_by


def selection_scores(engine, tokens: list[int], n_pred: int, select_by: str, t: Timings, clock: Clock):
    """The auxiliary prefills ``tokens``; per position < n_pred, how much the prompt's last
    tokens attend to it (``attention``: the last n - n_pred rows; ``keys``: the last one)."""
    aux = engine.aux
    aux.clear()
    if aux.capture is not None:
        aux.capture.clear()
    if select_by == SelectBy.ATTENTION:
        aux.decode(tokens[:n_pred])
        scores = engine.spans.aux_tail_scores(tokens, n_pred)  # decodes the last tokens too
        t.aux_prefill_ms = clock.lap()
        return scores
    aux.decode(tokens)
    t.aux_prefill_ms = clock.lap()
    hidden, raw_kv = take_captured(aux, engine.predictor, engine.aux_info, len(tokens))
    inputs = predictor_inputs(engine, tokens, hidden, raw_kv, t, clock)
    scores, _ = engine.spans.layer_scores(len(tokens), n_pred, inputs)
    t.predict_ms = clock.lap()
    return scores


def select_prefill(
    engine, tokens: list[int], keep: int | None, t: Timings, select_by: str = "auto"
) -> Prefill:
    """Prefill ``tokens`` into ``engine.base`` by token selection, ``keep`` positions in all
    (at least MIN_SELECT_KEEP; ``default_keep`` when None); ``t``: its timings, filled here."""
    select_by = resolve_select_by(engine, select_by)
    n = len(tokens)
    keep = default_keep(n) if keep is None else keep
    if keep < MIN_SELECT_KEEP:
        raise KvcliError(
            f"token selection keeps at least {MIN_SELECT_KEEP} tokens (BOS, a chunk, the last {SELECT_TAIL})"
        )
    base = engine.base
    if keep >= n:
        return Prefill(base, engine.plain_prefill(base, tokens, t), t, selected=np.arange(n))
    clock = Clock()
    scores = selection_scores(engine, tokens, n - SELECT_TAIL, select_by, t, clock)
    positions = kept_positions(scores, n, keep, SELECT_TAIL)
    base.clear()
    base.decode_at([tokens[p] for p in positions], positions, logits_last=True)
    t.base_decode_ms = clock.lap()
    return Prefill(base, base.last_logits(), t, selected=positions)
