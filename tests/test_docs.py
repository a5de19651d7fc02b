"""The README and docs/commands.md cannot drift from the code: every command they name exists,
every option they show belongs to it, every option a command has is documented, and the
command lines they give to run do run (on the embedded model, or a tiny model in place of
"my-model.gguf")."""

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import typer

from kvcli.cli import app as cli_app
from kvcli.eval.haystack import prose_sentences

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "docs" / "commands.md"]


@functools.cache
def commands() -> dict[str, object]:
    """'generate', 'convert bundle', ...: every command kvcli has, by the words that call it
    ('' is kvcli itself, its options)."""
    cli_app._register()  # as kvcli's main() does: each command module imported on first use
    root = typer.main.get_command(cli_app.app)
    found = {"": root}

    def walk(cmd: object, words: list[str]) -> None:
        if hasattr(cmd, "commands"):  # a group (typer >= 0.26 has its own copy of click)
            for name, sub in cmd.commands.items():
                walk(sub, [*words, name])
        else:
            found[" ".join(words)] = cmd

    walk(root, [])
    return found


def options(cmd: object) -> set[str]:
    return {opt for p in cmd.params for opt in [*p.opts, *p.secondary_opts]}


def command_lines(text: str) -> list[str]:
    """Every kvcli command line shown: inline code spans and lines of shell blocks."""
    spans = [" ".join(s.split()) for s in re.findall(r"`(kvcli [^`]+)`", text)]
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            spans += [part.strip() for part in line.split("&&") if part.strip().startswith("kvcli ")]
    return spans


def resolve(line: str, known: dict[str, object]) -> tuple[str, object] | None:
    words = line.split()[1:]
    for n in (2, 1, 0):  # 'convert bundle' before 'convert', kvcli itself last
        name = " ".join(words[:n])
        if name in known:
            return name, known[name]
    return None


def test_every_command_and_option_the_docs_show_exists():
    known = commands()
    wrong = []
    for page in PAGES:
        for line in command_lines(page.read_text()):
            found = resolve(line, known)
            if found is None:
                group = line.split()[1]
                if group in ("convert",) and "|" in line:  # `kvcli convert bundle|make-aux|...`
                    subs = line.split()[2].split("|")
                    wrong += [f"{page.name}: kvcli convert {s}" for s in subs if f"convert {s}" not in known]
                    continue
                wrong.append(f"{page.name}: {line}")
                continue
            name, cmd = found
            shown = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])\b", line))
            wrong += [f"{page.name}: kvcli {name} {opt}" for opt in sorted(shown - options(cmd))]
    assert not wrong, "the docs show what the code does not have:\n" + "\n".join(wrong)


def test_every_option_of_every_command_is_in_the_command_reference():
    text = (ROOT / "docs" / "commands.md").read_text()

    def shown(word: str) -> bool:
        return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None

    missing = []
    for name, cmd in commands().items():
        last = name.split()[-1] if name else ""
        if name and not (f"kvcli {name}" in text or re.search(rf"`{re.escape(last)}[ `]", text)):
            missing.append(f"kvcli {name}")
            continue
        for param in cmd.params:  # documented under any of its names (-n or --n-predict)
            names = [*param.opts, *param.secondary_opts]
            if param.param_type_name == "option" and "--help" not in names and not any(map(shown, names)):
                missing.append(" ".join(["kvcli", name, names[0]]).replace("  ", " "))
    assert not missing, "docs/commands.md does not document:\n" + "\n".join(missing)


def runnable_lines() -> list[str]:
    """The lines of the README's shell blocks a reader is told to run."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S):
        for line in block.splitlines():
            lines += [p.strip() for p in line.split(" #")[0].split("&&") if p.strip().startswith("kvcli ")]
    return lines


def test_the_readme_shows_lines_to_run():
    assert len(runnable_lines()) >= 3


def test_the_readmes_command_lines_run_in_order(gemma_bundle, tiny_gemma3, tmp_path):
    """As a reader runs them: "my-model.gguf" is a tiny model (its bundle is made by the line
    before the one that uses it), the rest runs on the embedded model's bundle."""
    (tmp_path / "notes.txt").write_text(" ".join(prose_sentences("moby_dick")[:60]))
    for line in runnable_lines():
        if line.startswith("kvcli serve"):  # runs until stopped: tests/test_serve.py runs it
            continue
        args = [
            str(tiny_gemma3) if a == "my-model.gguf" else str(tmp_path / a) if a == "my-bundle" else a
            for a in shlex.split(line)[1:]
        ]
        if args[0] == "bench-ttft":  # the quick start's full run takes minutes: one short length
            args += ["-p", "256", "-r", "1", "--modes", "base,kvp"]
        if args[0] in ("chat", "generate") and "-n" not in args:  # a short answer will do
            args += ["-n", "8"]
        if args[:2] == ["convert", "bundle"]:
            args += ["--tokens", "600", "--no-check"]
        elif "--bundle" not in args:
            args += ["--bundle", str(gemma_bundle.folder)]
        res = subprocess.run(  # in a folder of the reader's, with a notes.txt to read
            [sys.executable, "-m", "kvcli.cli.app", *args],
            input="What is this text about?\n" if args[0] == "chat" else None,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert res.returncode == 0, (line, res.stderr[-2000:])
        assert res.stdout.strip(), line


def test_the_readmes_python_runs(gemma_bundle, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks
    (tmp_path / "notes.txt").write_text(" ".join(prose_sentences("moby_dick")[:60]))
    for code in blocks:
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert "TTFT" in res.stdout
