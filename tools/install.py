#!/usr/bin/env python3
"""Set up kvcli: build llama-cpp-python with kvcli's patches to its vendored llama.cpp, then
install kvcli.

    python tools/install.py            # kvcli, ready for `kvcli bench-ttft`
    python tools/install.py --test     # kvcli, its server and its test dependencies

Run it inside a virtual environment (`python3 -m venv .venv && . .venv/bin/activate`): it
installs into the running Python, and a Python that refuses installs outside one (PEP 668)
is told so in one line.

Versions: by default every package is held to the version CI last passed with
(constraints.txt, written by `--write-constraints` from a tested environment, for the Python
it names); `--versions newest` installs the newest the bounds in pyproject.toml allow and
`--versions oldest` their lower bounds, so that the bounds are moved on purpose, after the
tests have run on both (.ci/run does).

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
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "patches"
CONSTRAINTS = ROOT / "constraints.txt"
# never held by the constraints: kvcli itself, the patched build's local version, pip's own tools
UNCONSTRAINED = {"kvcli", "llama-cpp-python", "pip", "setuptools", "wheel"}


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


def refuse_externally_managed() -> None:
    """PEP 668: a system Python (Debian's, Homebrew's) refuses installs outside a virtual
    environment with a page of text; say it in one line, before any download."""
    in_venv = sys.prefix != sys.base_prefix
    marker = Path(sysconfig.get_path("stdlib")) / "EXTERNALLY-MANAGED"
    if not in_venv and marker.exists():
        fail(
            "this Python only installs into a virtual environment (PEP 668): "
            "run `python3 -m venv .venv && . .venv/bin/activate`, then this command again"
        )


def python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_lower_bounds() -> list[str]:
    """`name==X` for every `name>=X` in pyproject.toml's dependencies, test and serve extras (a
    regular expression, not tomllib: this runs on Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    sections = re.findall(r"^(?:dependencies|test|serve) = \[(.*?)\]", text, flags=re.M | re.S)
    pins = []
    for section in sections:
        for name, version in re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?>=([0-9][0-9.]*)', section):
            pins.append(f"{name}=={version}")
    return pins


def constraint_args(versions: str, workdir: Path) -> list[str]:
    """pip's `-c FILE` for the chosen versions (none for `newest`)."""
    if versions == "newest":
        return []
    if versions == "oldest":
        path = workdir / "oldest.txt"
        path.write_text("\n".join(declared_lower_bounds()) + "\n")
        return ["-c", str(path)]
    if not CONSTRAINTS.exists():
        fail(f"{CONSTRAINTS.name} is missing; use --versions newest")
    tested = re.search(r"^# python (\d+\.\d+)", CONSTRAINTS.read_text(), flags=re.M)
    if tested and tested.group(1) != python_tag():
        say(
            f"{CONSTRAINTS.name} was tested on Python {tested.group(1)}, this is {python_tag()}: "
            "installing the newest versions pyproject.toml's bounds allow"
        )
        return []
    return ["-c", str(CONSTRAINTS)]


def write_constraints() -> None:
    """Record this environment's versions (kvcli's closure, once its tests passed here)."""
    from importlib import metadata

    pins = sorted(
        {
            f"{normalized(dist.metadata['Name'])}=={dist.version}"
            for dist in metadata.distributions()
            if normalized(dist.metadata["Name"]) not in UNCONSTRAINED
        }
    )
    header = [
        "# The versions kvcli's tests last passed with; tools/install.py installs these.",
        "# Remake with `python tools/install.py --write-constraints` in the tested environment.",
        f"# python {python_tag()}",
    ]
    tmp = CONSTRAINTS.with_suffix(".partial")
    tmp.write_text("\n".join(header + pins) + "\n")
    os.replace(tmp, CONSTRAINTS)
    say(f"wrote {CONSTRAINTS.name} ({len(pins)} packages, Python {python_tag()})")


def ensure_llama(force: bool, constraints: list[str]) -> None:
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
    pip("install", *constraints, str(wheel))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--versions",
        choices=("tested", "newest", "oldest"),
        default="tested",
        help="the packages' versions: those CI passed with (constraints.txt), the newest or "
        "the oldest pyproject.toml allows",
    )
    parser.add_argument(
        "--write-constraints", action="store_true", help="record this environment's versions and exit"
    )
    parser.add_argument("--test", action="store_true", help="also install the test dependencies")
    parser.add_argument("--force", action="store_true", help="rebuild llama-cpp-python even if cached")
    parser.add_argument("--llama-only", action="store_true", help="only build and install llama-cpp-python")
    parser.add_argument("--editable", action="store_true", help="install kvcli in editable mode")
    args = parser.parse_args()
    if args.write_constraints:
        write_constraints()
        return
    refuse_externally_managed()
    with tempfile.TemporaryDirectory(prefix="kvcli-install-") as tmp:
        constraints = constraint_args(args.versions, Path(tmp))
        ensure_llama(args.force, constraints)
        if args.llama_only:
            return
        target = f"{ROOT}[test,serve]" if args.test else str(ROOT)
        say(f"installing kvcli{' with test dependencies' if args.test else ''} ({args.versions} versions)")
        pip("install", *constraints, *(["-e"] if args.editable else []), target)


if __name__ == "__main__":
    main()
