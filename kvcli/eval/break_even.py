"""Where kvp starts to pay: the prompt length from which its TTFT is at most PAYS_RATIO of
the base's.

kvp's costs are not all proportional to the prompt: the first cell's decode, the state's
write, the tail's and the spans' decodes are fixed or nearly, so on short prompts kvp saves
little of the base's prefill while it still loses what the prediction loses. Measured per
bundle (its base, auxiliary and predictor, with this machine's threads) on held-out prose at
several lengths, stored in the bundle's manifest (``break_even``); below ``min_tokens``
``kvcli generate`` and ``chat`` prefill with the base and say so.
"""

from __future__ import annotations

from collections.abc import Callable

from kvcli import keys
from kvcli.engine.engine import Engine
from kvcli.errors import KvcliError
from kvcli.eval.matched import timed_prefill
from kvcli.eval.tasks import make_examples

# kvp is worth its loss of quality where it at least halves the base's TTFT: a choice, not a
# measurement (kvcli eval's frontier shows what each setting keeps at what cost)
PAYS_RATIO = 0.5
LENGTHS = (256, 512, 768, 1024, 1536, 2048)
SEED = 11  # another draw of the held-out prose than the self-check's


def crossing(ratios: dict[int, float], limit: float = PAYS_RATIO) -> int | None:
    """The shortest prompt length from which every measured ratio is <= ``limit``, linear
    between the last measured length above it and the next; the shortest measured length
    where all pay; None where the longest measured does not pay."""
    lengths = sorted(ratios)
    if not lengths or ratios[lengths[-1]] > limit:
        return None
    above = [n for n in lengths if ratios[n] > limit]
    if not above:
        return lengths[0]
    lo = above[-1]
    hi = lengths[lengths.index(lo) + 1]
    frac = (ratios[lo] - limit) / (ratios[lo] - ratios[hi])
    return round(lo + frac * (hi - lo))


def prose_tokens(engine: Engine, n: int) -> list[int]:
    """``n`` tokens of held-out prose: examples of the prose family joined until long enough
    (one example can be shorter than asked), cut to ``n``."""
    tokens: list[int] = []
    for i in range(64):
        (example,) = make_examples("prose", n=1, n_tokens=n, tokenize=engine.tokenize, seed=SEED + i)
        more = engine.tokenize(example.prompt)
        tokens += more[1:] if tokens and more[:1] == [engine.model.bos] else more
        if len(tokens) >= n:
            return tokens[:n]
    raise KvcliError(f"held-out prose gave {len(tokens)} tokens, not {n}")


def measure_break_even(
    engine: Engine, lengths: tuple[int, ...] = LENGTHS, progress: Callable[[int, int], None] | None = None
) -> dict:
    """The manifest's ``break_even`` entry: kvp's TTFT over the base's at each length that fits
    the context (kvp with the bundle's default settings, the faster of two runs each, after a
    warm-up), and ``min_tokens`` (``crossing``)."""
    kvp = engine.kvp_settings()
    lengths = [n for n in lengths if n < engine.settings.n_ctx]
    prompts = {n: prose_tokens(engine, n) for n in lengths}
    if lengths:
        timed_prefill(engine, prompts[lengths[0]], mode="kvp", kvp=kvp)  # warm-up
    ratios = {}
    for i, n in enumerate(lengths):
        tokens = prompts[n]
        base = min(timed_prefill(engine, tokens, mode="base").ms for _ in range(2))
        predicted = min(timed_prefill(engine, tokens, mode="kvp", kvp=kvp).ms for _ in range(2))
        ratios[len(tokens)] = predicted / base
        if progress:
            progress(i + 1, len(lengths))
    return {
        keys.BREAK_EVEN_PAYS_RATIO: PAYS_RATIO,
        "kvp_settings": kvp.recorded(),
        keys.BREAK_EVEN_TTFT_RATIO: {str(n): round(r, 3) for n, r in ratios.items()},
        keys.BREAK_EVEN_MIN_TOKENS: crossing(ratios),
    }
