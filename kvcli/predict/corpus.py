"""Text available offline on any machine with Python: the standard library's own sources.

Files are split by a hash of their relative path into a calibration part and a held-out
part, so that the predictor is never judged on the text it was fit on. Calibration text is
either the sources alone (``code``) or, by default, a mix that matches use (``mixed``):
sources, their docstrings (English prose) and conversations (one file's docstrings pasted
into a user turn of the model's own chat template, the next file's as the reply), in turn.
"""

from __future__ import annotations

import sysconfig
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from kvcli.choices import Choice

HELDOUT_FILE_EVERY = 5  # one file in five is held out
# a pasted text this short leaves room in a calibration prompt for the template's turn
# boundaries and the reply
PASTED_CHARS = 1000
SKIP_DIRS = {"test", "tests", "site-packages", "idle_test", "__pycache__", "lib2to3", "turtledemo"}


class CalibrationText(Choice):
    CODE = "code"
    MIXED = "mixed"


Render = Callable[[list[dict]], str]  # chat messages -> the model's templated text


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(part: str, root: Path | None = None) -> list[Path]:
    """Sorted .py files of the calibration (``"calibration"``) or held-out part."""
    if part not in ("calibration", "heldout"):
        raise ValueError(f"unknown corpus part {part!r}")
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        heldout = zlib.crc32(str(rel).encode()) % HELDOUT_FILE_EVERY == 0
        if heldout == (part == "heldout"):
            files.append(path)
    return files


def corpus_texts(part: str, root: Path | None = None) -> Iterator[tuple[str, str]]:
    """(relative name, text) of each readable file of ``part``, in a fixed order."""
    root = root or stdlib_root()
    for path in corpus_files(part, root):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) > 2000:
            yield str(path.relative_to(root)), text


def docstring_texts(part: str, root: Path | None = None) -> Iterator[tuple[str, str]]:
    """(relative name, prose) of each file of ``part`` whose docstrings (module, classes,
    functions), joined by blank lines, run past 2000 characters: English prose, not code."""
    import ast
    import warnings

    root = root or stdlib_root()
    for path in corpus_files(part, root):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes in old sources
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        docs = [
            ast.get_docstring(node)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        text = "\n\n".join(d for d in docs if d and len(d) > 200)
        if len(text) > 2000:
            yield str(path.relative_to(root)), text


def _paragraphs(text: str, chars: int = PASTED_CHARS) -> str:
    """The leading paragraphs of ``text`` up to about ``chars`` characters (one at least)."""
    out: list[str] = []
    for para in text.split("\n\n"):
        if out and sum(map(len, out)) + len(para) > chars:
            break
        out.append(para)
    return "\n\n".join(out)


def mixed_texts(part: str, render: Render, root: Path | None = None) -> Iterator[tuple[str, str]]:
    """Code, prose and a conversation in turn, until one kind runs out. Each docstring file
    is used once: as prose, or as one side of a conversation."""
    code, docs = corpus_texts(part, root), docstring_texts(part, root)
    while True:
        try:
            source, prose = next(code), next(docs)
            (name, pasted), (_, reply) = next(docs), next(docs)
        except StopIteration:
            return
        yield source
        yield prose
        yield (
            f"{name}:conversation",
            render(
                [
                    {"role": "user", "content": f"{_paragraphs(pasted)}\n\nWhat does this text describe?"},
                    {"role": "assistant", "content": reply},
                ]
            ),
        )


def token_chunks(
    part: str,
    tokenize: Callable[[str], list[int]],
    *,
    chunk_tokens: int,
    n_chunks: int,
    bos: int | None,
    root: Path | None = None,
    per_file: int = 1,
    render: Render | None = None,
) -> Iterator[tuple[str, list[int]]]:
    """Up to ``n_chunks`` prompts of exactly ``chunk_tokens`` tokens (BOS first, if given).

    Each comes from the start of one text, so chunks are distinct text; ``per_file`` > 1
    cuts up to that many consecutive chunks from each (named ``name@offset`` past the
    first). The texts are the sources, or the mixed text where ``render`` is given."""
    body = chunk_tokens - (1 if bos is not None else 0)
    made = 0
    texts = corpus_texts(part, root) if render is None else mixed_texts(part, render, root)
    for name, text in texts:
        if made >= n_chunks:
            return
        # tokenizing a whole large file is slow; a prefix of ~8 chars per token is plenty
        tokens = tokenize(text[: body * 8 * per_file])
        for i in range(min(per_file, len(tokens) // body)):
            if made >= n_chunks:
                return
            yield (
                (f"{name}@{i * body}" if i else name),
                ([bos] if bos is not None else []) + tokens[i * body : (i + 1) * body],
            )
            made += 1


def user_texts(corpus: Path) -> Iterator[tuple[str, str]]:
    """(name, text) of a text file, or of every UTF-8 text file under a folder (sorted)."""
    corpus = Path(corpus)
    paths = [corpus] if corpus.is_file() else sorted(p for p in corpus.rglob("*") if p.is_file())
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            yield str(path), text


def user_token_chunks(
    corpus: Path, tokenize: Callable[[str], list[int]], *, chunk_tokens: int, n_chunks: int, bos: int | None
) -> Iterator[tuple[str, list[int]]]:
    """Up to ``n_chunks`` prompts of ``chunk_tokens`` tokens cut one after another from the
    user's text (a long document gives many)."""
    body = chunk_tokens - (1 if bos is not None else 0)
    made = 0
    for name, text in user_texts(corpus):
        tokens = tokenize(text[: (n_chunks - made) * body * 8])
        for at in range(0, len(tokens) - body + 1, body):
            if made >= n_chunks:
                return
            yield f"{name}@{at}", ([bos] if bos is not None else []) + tokens[at : at + body]
            made += 1


def named_chunks(
    corpus: Path | None,
    tokenize: Callable[[str], list[int]],
    *,
    chunk_tokens: int,
    n_chunks: int,
    bos: int | None,
    per_file: int = 1,
    render: Render | None = None,
) -> tuple[list[tuple[str, list[int]]], str]:
    """Up to ``n_chunks`` (name, tokens) prompts from the user's ``corpus``, else from the
    calibration part of the standard library (its sources, or with ``render`` the mixed
    text), and the name of their source."""
    if corpus is not None:
        chunks = list(
            user_token_chunks(corpus, tokenize, chunk_tokens=chunk_tokens, n_chunks=n_chunks, bos=bos)
        )
        return chunks, f"{Path(corpus).name}:{len(chunks)}x{chunk_tokens}"
    chunks = list(
        token_chunks(
            "calibration",
            tokenize,
            chunk_tokens=chunk_tokens,
            n_chunks=n_chunks,
            bos=bos,
            per_file=per_file,
            render=render,
        )
    )
    kind = "sources" if render is None else "mixed"
    return chunks, f"python-stdlib-{kind}:{len(chunks)}x{chunk_tokens}"
