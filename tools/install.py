#!/usr/bin/env python3
"""Set up kvcli: build llama-cpp-python with kvcli's patches to its vendored llama.cpp, then
install kvcli.

    python tools/install.py            # kvcli, ready for `kvcli bench-ttft`
    python tools/install.py --test     # kvcli and its test dependencies

The pinned llama-cpp-python sdist is downloaded from PyPI and checked against its sha256, each
file in patches/ is applied to it in name order, and the result is built (a plain native
source build, 4-5 minutes on 2 cores here) into a wheel cached under $XDG_CACHE_HOME/kvcli/wheels,
so that a second run installs in seconds. The wheel's version carries a local label,
0.3.36+kvcli.<digest of the patches and of the build variables set, e.g. CMAKE_ARGS>: kvcli
reads it to know its prefix view is available, and it still satisfies kvcli's own
`llama-cpp-python==0.3.36`, so `pip install .` keeps it.

Only the standard library is used: this runs before anything else is installed. CMAKE_ARGS
and other llama-cpp-python build variables in the environment are passed through.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "patches"


def say(message: str) -> None:
    print(f"[install] {message}", flush=True)


def fail(message: str) -> None:
    print(f"[install] error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvcli"


def patch_files() -> list[Path]:
    return sorted(PATCHES.glob("*.patch"))


# llama-cpp-python's build reads these; a wheel built under other values is another build
BUILD_VARIABLES = ("CMAKE_ARGS", "FORCE_CMAKE", "CMAKE_BUILD_TYPE", "CC", "CXX")


def patched_version() -> str:
    """The version label of this build: the patches and the build variables set."""
    digest = hashlib.sha256()
    for path in patch_files():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for name in BUILD_VARIABLES:
        if os.environ.get(name):
            digest.update(f"{name}={os.environ[name]}".encode())
    return f"{LLAMA_CPP_PYTHON}+kvcli.{digest.hexdigest()[:10]}"


def installed_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def run(cmd: list[str], **kwargs) -> None:
    result = subprocess.run(cmd, **kwargs)
    if result.returncode != 0:
        fail(f"command failed (exit {result.returncode}): {' '.join(cmd)}")


def pip(*args: str) -> None:
    run([sys.executable, "-m", "pip", *args])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist(downloads: Path) -> Path:
    sdist = downloads / SDIST_NAME
    if not sdist.exists() or sha256_of(sdist) != SDIST_SHA256:
        sdist.unlink(missing_ok=True)  # pip would keep a damaged file of that name
        say(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON} (source)")
        pip(
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--dest",
            str(downloads),
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
        )
    if sha256_of(sdist) != SDIST_SHA256:
        fail(f"{sdist} does not have the pinned sha256 {SDIST_SHA256}")
    return sdist


def apply_patch(patch: Path, source: Path) -> None:
    if shutil.which("patch"):
        cmd = ["patch", "-p1", "--forward", "--batch", "-d", str(source), "-i", str(patch)]
    elif shutil.which("git"):
        cmd = ["git", "apply", "-p1", f"--directory={source.relative_to(source.parent)}", str(patch)]
        run(cmd, cwd=source.parent)
        return
    else:
        fail("neither `patch` nor `git` is on PATH; one is needed to apply patches/")
    run(cmd)


def set_version(source: Path, version: str) -> None:
    init = source / "llama_cpp" / "__init__.py"
    text = init.read_text()
    old = f'__version__ = "{LLAMA_CPP_PYTHON}"'
    if old not in text:
        fail(f"{init} does not declare {old}")
    init.write_text(text.replace(old, f'__version__ = "{version}"'))


def build_wheel(version: str, wheels: Path) -> Path:
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    sdist = fetch_sdist(downloads)
    with tempfile.TemporaryDirectory(prefix="kvcli-llama-build-") as tmp:
        with tarfile.open(sdist) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                tar.extractall(tmp, filter="data")
            else:
                tar.extractall(tmp)
        source = Path(tmp) / SDIST_NAME.removesuffix(".tar.gz")
        for patch in patch_files():
            say(f"applying {patch.relative_to(ROOT)}")
            apply_patch(patch, source)
        set_version(source, version)
        say(f"building llama-cpp-python {version} (5 to 8 minutes on 2 cores)")
        env = dict(os.environ)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        built = Path(tmp) / "wheel"
        start = time.monotonic()
        run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(built), str(source)],
            env=env,
        )
        say(f"built in {time.monotonic() - start:.0f} s")
        (wheel,) = built.glob("llama_cpp_python-*.whl")
        wheels.mkdir(parents=True, exist_ok=True)
        target = wheels / wheel.name
        shutil.move(str(wheel), target.with_suffix(".partial"))
        os.replace(target.with_suffix(".partial"), target)
        return target


def ensure_llama(force: bool) -> None:
    version = patched_version()
    if installed_version() == version and not force:
        say(f"llama-cpp-python {version} is installed")
        return
    wheels = cache_dir() / "wheels"
    local = version.split("+", 1)[1]
    cached = sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}+{local}-*.whl"))
    wheel = cached[0] if cached and not force else build_wheel(version, wheels)
    say(f"installing {wheel.name}")
    pip("install", "--force-reinstall", "--no-deps", str(wheel))
    # its runtime dependencies (numpy, typing-extensions, diskcache, jinja2)
    pip("install", str(wheel))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test", action="store_true", help="also install the test dependencies")
    parser.add_argument("--force", action="store_true", help="rebuild llama-cpp-python even if cached")
    parser.add_argument("--llama-only", action="store_true", help="only build and install llama-cpp-python")
    parser.add_argument("--editable", action="store_true", help="install kvcli in editable mode")
    args = parser.parse_args()
    ensure_llama(args.force)
    if args.llama_only:
        return
    target = f"{ROOT}[test]" if args.test else str(ROOT)
    say(f"installing kvcli{' with test dependencies' if args.test else ''}")
    pip("install", *(["-e"] if args.editable else []), target)


if __name__ == "__main__":
    main()
