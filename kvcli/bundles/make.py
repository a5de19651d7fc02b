"""A bundle from start to finish: its files (calibrated from a base, or three given files
packed), then what it measures of itself on this machine and stores in its manifest: which
base layers choose kvp's spans, where kvp starts to pay (the break-even), and its check of
itself against cheaper fallbacks. ``kvcli convert bundle``, the default bundle's fallback and
the Python API all call ``make_bundle``; nothing here prints (the CLI shows ``MadeBundle``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvcli import keys
from kvcli.bundles.build import build_bundle
from kvcli.bundles.pack import pack_bundle, record_in_manifest
from kvcli.engine.bundle import Bundle, Progress
from kvcli.engine.engine import Engine
from kvcli.eval import break_even
from kvcli.eval.self_check import check_engine
from kvcli.eval.span_layers import measure_layer
from kvcli.models.model_info import read_model_info

CHECK_TOKENS = 512  # the self-check's prompt length, unless kvp pays only on longer prompts


@dataclass(frozen=True)
class MadeBundle:
    """A bundle and what was measured of it here (each also stored in its manifest)."""

    bundle: Bundle
    spans: dict | None = None  # None: not measured (a base with sliding-window layers)
    break_even: dict | None = None  # None: not measured (no check asked for)
    check: dict | None = None
    check_tokens: int | None = None  # the prompt length the check ran at


def _stage(progress: Progress | None, name: str):
    """``progress`` as the ``(done, total)`` callback of one named stage."""
    return (lambda i, n: progress(name, i, n)) if progress else None


def measure_spans(b: Bundle, progress: Progress | None = None) -> MadeBundle:
    """For a base without sliding-window layers: which of its layers chooses kvp's spans from
    the tail (kvcli.eval.span_layers), stored in the manifest. Gemma 3's chooser needs none."""
    if read_model_info(b.base, "base model").n_swa:
        return MadeBundle(b)
    entry = measure_layer(b, progress=_stage(progress, "spans"))
    return MadeBundle(record_in_manifest(b, {keys.MANIFEST_SPANS: entry}), spans=entry)


def measure_break_even(b: Bundle, progress: Progress | None = None) -> MadeBundle:
    """Where kvp starts to pay for this bundle on this machine (kvcli.eval.break_even), stored
    in its manifest."""
    with Engine.from_bundle(b) as engine:
        entry = break_even.measure_break_even(engine, progress=_stage(progress, "kvp's break-even"))
    return MadeBundle(record_in_manifest(b, {keys.MANIFEST_BREAK_EVEN: entry}), break_even=entry)


def check_bundle_itself(
    b: Bundle, n_tokens: int = CHECK_TOKENS, progress: Progress | None = None
) -> MadeBundle:
    """The break-even (``measure_break_even``), then the bundle's check of itself
    (kvcli.eval.self_check) at that length or ``n_tokens``, both stored in its manifest."""
    measured = measure_break_even(b, progress)
    # judged where kvp is used: at the break-even's length if that is longer
    # (where kvp never paid on the lengths measured, at n_tokens: past them is unmeasured)
    n_tokens = max(n_tokens, measured.break_even[keys.BREAK_EVEN_MIN_TOKENS] or 0)
    with Engine.from_bundle(measured.bundle) as engine:
        result = check_engine(engine, n_tokens=n_tokens, progress=_stage(progress, "check"))
    b = record_in_manifest(measured.bundle, {keys.MANIFEST_CHECK: result})
    return MadeBundle(b, break_even=measured.break_even, check=result, check_tokens=n_tokens)


def make_bundle(
    base: str | Path,
    folder: str | Path,
    *,
    aux: Path | None = None,
    predictor: Path | None = None,
    reference_base: bool = False,
    check: bool = True,
    check_tokens: int = CHECK_TOKENS,
    progress: Progress | None = None,
    **calibration,
) -> MadeBundle:
    """A bundle in ``folder``: ``base`` with ``aux`` and ``predictor`` packed, or without them
    a prefix auxiliary and a predictor calibrated for it and factored (``build_bundle``, which
    ``calibration`` goes to: n_aux_layers, n_tokens, corpus, text, storage_type, aux_file,
    rank); then its span chooser measured, and with ``check`` its break-even and its check of
    itself. ``reference_base``: name the base by its path instead of placing it inside.
    ``progress(stage, done, total)`` follows every step."""
    if (aux is None) != (predictor is None):
        raise ValueError("give both aux and predictor, or neither (to build them)")
    if aux is not None:
        if calibration:
            raise ValueError(f"{', '.join(calibration)}: for a built bundle, not a packed one")
        b = pack_bundle(folder, base=Path(base), aux=aux, predictor=predictor, reference_base=reference_base)
    else:
        b = build_bundle(base, folder, reference_base=reference_base, progress=progress, **calibration)
    spans = measure_spans(b, progress)
    if not check:
        return spans
    checked = check_bundle_itself(spans.bundle, check_tokens, progress)
    return MadeBundle(
        checked.bundle,
        spans=spans.spans,
        break_even=checked.break_even,
        check=checked.check,
        check_tokens=checked.check_tokens,
    )
