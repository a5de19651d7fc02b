"""The default bundle: the embedded Gemma 3 270M with its first layers as the auxiliary and the
predictor the package ships, made on first use into the user's cache folder
($XDG_CACHE_HOME/kvcli, else ~/.cache/kvcli) and reused afterwards. It refers to the embedded
base by its path rather than copying it."""

from __future__ import annotations

from pathlib import Path

from kvcli import keys
from kvcli.atomic import building_folder
from kvcli.bundles.make import make_bundle
from kvcli.bundles.pack import write_manifest
from kvcli.engine.bundle import (
    DEFAULT_AUX_LAYERS,
    MANIFEST,
    Bundle,
    Progress,
    cache_dir,
    embedded_model_path,
    load_bundle,
    sha256_file,
)
from kvcli.errors import KvcliError, ModelFileError
from kvcli.models.gguf_header import read_header
from kvcli.models.model_info import prefix_view_info, read_model_info

# names the default bundle's recipe: change it when the default fit changes, so caches rebuild
DEFAULT_RECIPE = f"prefix{DEFAULT_AUX_LAYERS}-ridge-kv1-hidden-v3"  # v3: no aux file

SHIPPED_PREDICTOR = "gemma3-270m-predictor.gguf"  # in kvcli/data: the default's predictor


def shipped_predictor() -> Path | None:
    """The predictor the package installs for the embedded model, if present."""
    path = Path(__file__).parent.parent / "data" / SHIPPED_PREDICTOR
    return path if path.is_file() else None


def shipped_predictor_fits(base: Path, predictor: Path | None) -> bool:
    """Whether ``predictor`` was made for ``base`` with the default prefix auxiliary."""
    if predictor is None:
        return False
    try:
        header = read_header(predictor)
    except KvcliError:
        return False
    return (
        header.get(keys.BASE_FINGERPRINT) == read_model_info(base).fingerprint
        and header.get(keys.AUX_FINGERPRINT) == prefix_view_info(base, DEFAULT_AUX_LAYERS).fingerprint
    )


def default_bundle(progress: Progress | None = None) -> Bundle:
    """The bundle for the embedded model, made on first use, reused afterwards: the base's
    first layers as auxiliary and the predictor the package ships (kvcli/data), or, where
    that file is absent or made for another base, a bundle made here by ``make_bundle``
    (calibrated, then measured and checked as ``kvcli convert bundle`` does)."""
    base = embedded_model_path()
    fingerprint = read_model_info(base).fingerprint
    shipped = shipped_predictor()
    use_shipped = shipped_predictor_fits(base, shipped)
    recipe = (
        f"prefix{DEFAULT_AUX_LAYERS}-shipped-{sha256_file(shipped)[:12]}" if use_shipped else DEFAULT_RECIPE
    )
    folder = cache_dir() / "bundles" / f"gemma3-270m-{fingerprint}-{recipe}"
    if (folder / MANIFEST).is_file():
        try:
            bundle = load_bundle(folder)
            if bundle.base.resolve() == base.resolve():
                return bundle
        except ModelFileError:
            pass  # damaged or stale: rebuild it
    if use_shipped:
        with building_folder(folder) as work:
            write_manifest(
                work, {"base": base.resolve(), "aux": DEFAULT_AUX_LAYERS, "predictor": shipped.resolve()}
            )
        return load_bundle(folder)
    made = make_bundle(
        base, folder, n_aux_layers=DEFAULT_AUX_LAYERS, reference_base=True, rank=0, progress=progress
    )
    return made.bundle
