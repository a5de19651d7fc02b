"""tools/install.py's versions: the lower bounds it installs with --versions oldest, the
constraints it installs by default, and its one line for a Python that refuses installs."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_install():
    spec = importlib.util.spec_from_file_location("kvcli_install", ROOT / "tools" / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def declared() -> dict[str, str]:
    """name -> its requirement text, for pyproject's dependencies and test extra."""
    text = (ROOT / "pyproject.toml").read_text()
    sections = re.findall(r"^(?:dependencies|test) = \[(.*?)\]", text, flags=re.M | re.S)
    out = {}
    for section in sections:
        for req in re.findall(r'^\s*"([^"]+)"|, "([^"]+)"|\["([^"]+)"', section, flags=re.M):
            req = next(r for r in req if r)
            out[re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower()] = req
    return out


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def test_oldest_pins_every_lower_bound():
    pins = dict(p.split("==") for p in load_install().declared_lower_bounds())
    for name, req in declared().items():
        if ">=" in req:
            assert pins.get(name) == re.search(r">=([0-9.]+)", req).group(1), name
    assert pins["typer"] == "0.17.5"  # older ones break under the click they let in today


def test_constraints_hold_every_declared_package_within_its_bounds():
    text = (ROOT / "constraints.txt").read_text()
    pinned = dict(line.split("==") for line in text.splitlines() if line and not line.startswith("#"))
    assert re.search(r"^# python \d+\.\d+$", text, flags=re.M)
    for name, req in declared().items():
        if name == "llama-cpp-python":  # the patched local build, never held by the constraints
            assert name not in pinned
            continue
        assert name in pinned, f"constraints.txt does not hold {name}"
        version = version_tuple(pinned[name])
        for op, bound in re.findall(r"(>=|<|==)([0-9][0-9.]*)", req):
            b = version_tuple(bound)
            assert {">=": version >= b, "<": version < b, "==": version[: len(b)] == b}[op], (name, req)


def test_a_python_that_refuses_installs_gets_one_line(tmp_path):
    """PEP 668: outside a virtual environment, with the stdlib's marker file, one line and exit 1."""
    stdlib = tmp_path / "stdlib"
    stdlib.mkdir()
    (stdlib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\n")
    script = str(ROOT / "tools" / "install.py")
    code = (
        "import sys, sysconfig, runpy; sys.base_prefix = sys.prefix; "
        f"sysconfig.get_path = lambda name, *a, **k: {str(stdlib)!r}; "
        f"sys.argv = ['install.py']; runpy.run_path({script!r}, run_name='__main__')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "virtual environment (PEP 668)" in lines[0], res.stderr
