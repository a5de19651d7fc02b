"""The text kvcli train learns from and is measured on: sequences of one length from the
user's corpus or the calibration part of the standard library's sources, and held-out
sequences (the part kvcli eval and bench-ttft use) for validation only."""

from __future__ import annotations

from pathlib import Path

from kvcli.errors import KvcliError

# consecutive training sequences cut from one file of the standard library: with only each
# file's first 1024 tokens (364 sequences) a second epoch memorised them (README)
FILE_CHUNKS = 8


def training_sequences(
    base: Path, n_tokens: int, corpus: Path | None = None, limit: int = 4000
) -> tuple[list[tuple[str, list[int]]], str]:
    """(file name, tokens) of sequences of exactly ``n_tokens`` tokens (BOS first where the
    model adds one to its prompts) and the name of their source:
    the user's text, else the calibration part of the standard library's sources (predict/corpus.py),
    which the evaluation never uses."""
    from kvcli.llama.runtime import Model
    from kvcli.predict.corpus import named_chunks

    model = Model(base, what="base model")
    try:

        def tokenize(text: str) -> list[int]:
            return model.tokenize(text, add_special=False)

        seqs, source = named_chunks(
            corpus,
            tokenize,
            chunk_tokens=n_tokens,
            n_chunks=limit,
            bos=model.prompt_bos,
            per_file=FILE_CHUNKS,
        )
    finally:
        model.close()
    if not seqs:
        raise KvcliError(
            f"the training text gave no sequence of {n_tokens} tokens "
            f"({corpus or 'the standard library'}); give more text or fewer --tokens"
        )
    return seqs, source


def validation_sequences(base: Path, n_tokens: int, n: int) -> list[list[int]]:
    """``n`` sequences from the corpus' held-out part, to measure training by (never trained on)."""
    from kvcli.llama.runtime import Model
    from kvcli.predict.corpus import token_chunks

    model = Model(base, what="base model")
    try:
        return [
            t
            for _, t in token_chunks(
                "heldout",
                lambda s: model.tokenize(s, add_special=False),
                chunk_tokens=n_tokens,
                n_chunks=n,
                bos=model.prompt_bos,
            )
        ]
    finally:
        model.close()
