"""Writing a bundle's manifest: the parts checked against each other, each file's size, sha256
and fingerprint, and the measured entries a bundle carries; packing three given files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kvcli import __version__, keys
from kvcli.atomic import building_folder, write_text_atomically
from kvcli.engine.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    MANIFEST,
    ROLES,
    Bundle,
    check_compatible,
    load_bundle,
    sha256_file,
)


def _manifest(folder: Path, files: dict[str, Path | int]) -> dict:
    """``files[role]``: a path (relative to ``folder`` or absolute); for aux, k for a prefix."""
    full = {role: f if isinstance(f, int) or f.is_absolute() else folder / f for role, f in files.items()}
    base_info, aux_info, pred = check_compatible(full["base"], full["aux"], full["predictor"])
    manifest = {
        keys.MANIFEST_FORMAT: BUNDLE_FORMAT,
        keys.MANIFEST_VERSION: BUNDLE_VERSION,
        keys.MANIFEST_KVCLI: __version__,
    }
    for role in ROLES:
        if isinstance(files[role], int):
            entry = {keys.PREFIX_OF_BASE: files[role]}
        else:
            entry = {
                keys.FILE_PATH: str(files[role]),
                keys.FILE_SIZE: full[role].stat().st_size,
                keys.FILE_SHA256: sha256_file(full[role]),
            }
        if role == "base":
            entry.update({keys.FILE_FINGERPRINT: base_info.fingerprint, keys.FILE_ARCH: base_info.arch})
        elif role == "aux":
            entry.update({keys.FILE_FINGERPRINT: aux_info.fingerprint, keys.FILE_ARCH: aux_info.arch})
        else:
            entry.update(
                {
                    keys.FILE_STORAGE_TYPE: pred.storage_type,
                    keys.FILE_BASE_FINGERPRINT: pred.base_fingerprint,
                    keys.FILE_AUX_FINGERPRINT: pred.aux_fingerprint,
                }
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


def record_in_manifest(bundle: Bundle, entries: dict) -> Bundle:
    """Store measured entries in the bundle's manifest (keys.MANIFEST_SPANS, _BREAK_EVEN,
    _CHECK: what kvcli.bundles.make measures)."""
    manifest = {**bundle.manifest, **entries}
    write_text_atomically(bundle.folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return load_bundle(bundle.folder)
