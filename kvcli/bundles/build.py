"""Making a bundle's files: from a base alone (a prefix auxiliary and a predictor calibrated
for it), and from another bundle with a new predictor (factored, refined or trained). Every
bundle is built in a temporary folder and appears whole; kvcli.bundles.make adds the
measurements a bundle carries (the span chooser, the break-even, the self-check)."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from pathlib import Path

from kvcli import keys
from kvcli.atomic import building_folder
from kvcli.bundles.pack import place_file, write_manifest
from kvcli.engine.bundle import Bundle, Progress, check_compatible, default_aux_layers, load_bundle
from kvcli.errors import KvcliError
from kvcli.models.aux_cut import cut_auxiliary, prefix_layers
from kvcli.models.model_info import read_model_info
from kvcli.predict.calibrate import DEFAULT_TOKENS, collect, fit_predictor
from kvcli.predict.corpus import CalibrationText
from kvcli.predict.factor import factor_calibrated
from kvcli.predict.predictor import StorageType, load_predictor, save_predictor, storage_block

# The predictor's shared basis where the auxiliary's features are wide (kvcli.predict.factor). On
# Qwen2.5-Coder 1.5B with a 7-layer prefix (3584 features, 21 layers): held-out K error
# 0.275 -> 0.295, V 0.562 -> 0.610, the same answers on kvcli eval at 1024 tokens (pass key,
# register, code; n = 6: 0.67 / 0.83 / 0.00 with either), the predict step 0.06x -> 0.017x
# of the base's TTFT at 1024 and 2048 tokens (docs/real-size.md).
DEFAULT_RANK = 512


def build_bundle(
    base_path: str | Path,
    folder: str | Path,
    *,
    n_aux_layers: int | None = None,
    n_tokens: int | None = None,
    corpus: Path | None = None,
    text: CalibrationText = CalibrationText.MIXED,
    storage_type: str = "f32",
    reference_base: bool = False,
    aux_file: bool = False,
    rank: int = DEFAULT_RANK,
    progress: Progress | None = None,
) -> Bundle:
    """From a base alone: a prefix auxiliary, a predictor calibrated for it, packed atomically.
    The auxiliary is recorded as the base's first k layers, with no file of its own, unless
    ``aux_file`` (its cut is then kept, for a llama.cpp that should load it as a file).
    ``rank``: the predictor is factored through a shared basis of that many columns
    (kvcli.predict.factor) where its features are wider than twice that; 0: never."""
    storage_type = StorageType.parse(storage_type, "predictor type")
    if rank < 0 or rank % storage_block(storage_type):
        raise KvcliError(
            f"the rank must be >= 0 and divisible by {storage_block(storage_type)} "
            f"(predictor type {storage_type}), not {rank}"
        )
    base_info = read_model_info(base_path, "base model")
    if base_info.n_layer < 2:
        raise KvcliError("a base of one layer has no prefix to cut an auxiliary from")
    n_aux = n_aux_layers or default_aux_layers(base_info.n_layer)
    if not 1 <= n_aux < base_info.n_layer:
        raise KvcliError(f"the auxiliary needs 1..{base_info.n_layer - 1} layers, not {n_aux}")
    with building_folder(folder) as work:
        if progress:
            progress("cut auxiliary", 0, 1)
        aux = cut_auxiliary(base_info.path, work / "aux.gguf", prefix_layers(n_aux))
        if progress:
            progress("cut auxiliary", 1, 1)
        data = collect(
            base_info.path,
            aux,
            n_tokens=n_tokens or DEFAULT_TOKENS,
            corpus=corpus,
            text=text,
            progress=(lambda i, n: progress("calibrate", i, n)) if progress else None,
        )
        pred = fit_predictor(data)
        widest = max((pred.n_features(il) for il in pred.predicted_layers), default=0)
        if rank and widest > 2 * rank:
            # the computed layer keeps the base's own matrices: a basis would blur them
            pred, _ = factor_calibrated(pred, data, rank, full_layers=list(data.computed.computed))
        predictor = save_predictor(pred, work / "predictor.gguf", storage_type)
        files = {"aux": Path(aux.name), "predictor": Path(predictor.name)}
        if not aux_file:
            aux.unlink()
            files["aux"] = n_aux
        if reference_base:
            files["base"] = base_info.path
        else:
            files["base"] = Path(base_info.path.name)
            place_file(base_info.path, work / files["base"])
        write_manifest(work, files)
    return load_bundle(folder)


def bundle_with_predictor(
    bundle: Bundle,
    pred,
    output: Path,
    storage: str | None = None,
    aux_weights: dict | None = None,
    extra: dict | None = None,
) -> None:
    """A bundle of ``bundle``'s base (named by absolute path) and auxiliary (the prefix, the
    same file, or, with ``aux_weights``, a copy of its file with those tensors trained) with
    ``pred`` as its predictor, built atomically. The spans chooser measured for ``bundle``
    (its manifest's ``spans``) is kept: the same base and auxiliary; the self-check is not
    (another predictor: run it again, ``kvcli doctor --bundle``)."""

    aux = bundle.aux_source if isinstance(bundle.aux_source, int) else Path(bundle.aux_source).resolve()
    with building_folder(output) as work:
        if aux_weights:
            n_layer = read_model_info(aux).n_layer
            aux = cut_auxiliary(aux, work / "aux.gguf", list(range(n_layer)), replace=aux_weights)
            pred = dataclasses.replace(pred, aux_fingerprint=read_model_info(aux).fingerprint)
            aux = Path(aux.name)
        save_predictor(pred, work / "predictor.gguf", storage)
        spans = bundle.manifest.get(keys.MANIFEST_SPANS)
        write_manifest(
            work,
            {"base": bundle.base.resolve(), "aux": aux, "predictor": Path("predictor.gguf")},
            {**({keys.MANIFEST_SPANS: spans} if spans else {}), **(extra or {})} or None,
        )


@dataclasses.dataclass(frozen=True)
class FactorResult:
    """What ``factor_bundle`` did (``kvcli convert factor --json`` prints ``to_json()``): per
    factored layer, the held-out relative error of K and V before and after."""

    rank: int
    factored_layers: list[int]
    heldout_rel_error: dict[int, dict[str, tuple[float, float]]]
    calibration_tokens: int
    source: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def factor_bundle(
    bundle,
    output,
    *,
    rank: int,
    full_layers: list[int] = (),
    n_tokens: int | None = None,
    corpus=None,
    text=None,
    storage: str | None = None,
    settings=None,
    progress=None,
) -> FactorResult:
    """Factor ``bundle``'s predictor (``factor_predictor``) with feature statistics over
    calibration text, and write a bundle with it to ``output``. Returns held-out relative
    errors per layer before and after (the basis is fit on the other calibration prompts)."""
    check_compatible(bundle.base, bundle.aux_source, bundle.predictor)
    pred = load_predictor(bundle.predictor)
    if pred.factored_layers:
        raise KvcliError("this bundle's predictor is already factored")
    if pred.raw_keys or pred.origin:
        raise KvcliError(f"kvcli factors its own fits, not a predictor {pred.origin or 'fed raw keys'}")
    storage = storage or pred.storage_type
    storage = StorageType.parse(storage, "predictor type")
    block = storage_block(storage)
    if rank % block:
        raise KvcliError(f"predictor type {storage} needs a rank divisible by {block}, not {rank}")
    widest = max((pred.n_features(il) for il in pred.predicted_layers), default=0)
    if not 0 < rank < widest:
        raise KvcliError(f"the rank must be between 1 and {widest - 1}, not {rank}")
    unknown = sorted(set(full_layers) - set(pred.predicted_layers))
    if unknown:
        raise KvcliError(
            f"layer {unknown[0]} is not a predicted layer of this predictor "
            f"({pred.predicted_layers[0]}..{pred.predicted_layers[-1]})"
        )
    with calibration_aux(bundle) as aux:
        data = collect(
            bundle.base,
            aux,
            n_tokens=n_tokens or DEFAULT_TOKENS,
            corpus=corpus,
            text=text or CalibrationText.MIXED,
            layer_map=pred.layer_map,
            hidden=pred.hidden_kinds or False,
            settings=settings,
            progress=progress,
        )
    if data.plan.copied_layers != pred.copied_layers or data.plan.feature_kinds != pred.feature_kinds:
        raise KvcliError("the calibration's layers or features differ from the predictor's")
    full_layers = sorted({*full_layers, *data.computed.computed})  # the base's own matrices stay whole
    factored, errors = factor_calibrated(pred, data, rank, full_layers)
    bundle_with_predictor(bundle, factored, Path(output), storage)
    return FactorResult(
        rank=rank,
        factored_layers=factored.factored_layers,
        heldout_rel_error=errors,
        calibration_tokens=sum(s.n_rows for s in data.fit.values()),
        source=data.source,
    )


@contextlib.contextmanager
def calibration_aux(bundle):
    """The path of ``bundle``'s auxiliary for a calibration run: its file, or for a prefix of
    the base a cut file in a temporary folder (calibration reads the prefix's metadata)."""
    aux = bundle.aux_source
    if not isinstance(aux, int):
        yield aux
        return
    with tempfile.TemporaryDirectory(prefix="kvcli-aux-") as tmp:
        yield cut_auxiliary(bundle.base, Path(tmp) / "aux.gguf", prefix_layers(aux))


def refine_bundle(bundle, output, *, progress=None, **options):
    """Train ``bundle``'s predictor layer by layer against the base's attention output
    (kvcli.predict.refine; ``options`` go to ``refine_predictor``) and write a bundle with
    it to ``output``. The refinement is recorded in the manifest (``refined``)."""
    from kvcli.predict.refine import refine_predictor

    base_info, _, pred = check_compatible(bundle.base, bundle.aux_source, bundle.predictor)
    with calibration_aux(bundle) as aux:
        result = refine_predictor(
            base_info, read_model_info(aux, "auxiliary"), pred, progress=progress, **options
        )
    bundle_with_predictor(
        bundle, result.predictor, Path(output), extra={keys.MANIFEST_REFINED: result.to_json()}
    )
    return result
