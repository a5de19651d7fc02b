"""kvcli generate: one prompt (or a JSONL batch) through predicted prefill, then the base."""

from __future__ import annotations

import codecs
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvcli.cli.common import open_engine
from kvcli.cli.options import BundleOpt, CtxOpt, JsonOpt, ModelOpt, SeedOpt, ThreadsOpt
from kvcli.engine.engine import Engine, Mode
from kvcli.engine.generation import generate
from kvcli.engine.prefill_types import KvpSettings
from kvcli.engine.recompute import DEFAULT_SPANS, DEFAULT_SPANS_TAIL, OPENING
from kvcli.engine.sampling import Sampler
from kvcli.engine.span_choice import SPAN_MAX
from kvcli.engine.timings import Generation
from kvcli.engine.token_select import SelectBy
from kvcli.errors import KvcliError
from kvcli.llama.runtime import ContextSettings

HELP = """Generate text from a prompt with predicted prefill (mode kvp, the default).


Modes: kvp (auxiliary prefill + predicted cache, the base generates), base (the base alone),
truncate (the base over only the last --keep tokens), select (the base over --keep tokens
the auxiliary ranks highest, at their own positions, with BOS and the last 32), aux (the
auxiliary alone).

--batch FILE.jsonl reads {"id": ..., "prompt": ...} per line, loads the models once, and
writes one JSON object per prompt to stdout."""


def result_json(gen: Generation, **extra) -> dict:
    return {
        **extra,
        "mode": gen.mode,
        "prefilled_by": gen.prefilled_by,  # kvp's prompts under the bundle's break-even: base
        "tail": gen.tail,
        "spans": gen.spans,
        "recomputed": [list(r) for r in gen.recomputed],
        "selected": gen.selected,
        "n_prompt": gen.n_prompt,
        "ttft_ms": round(gen.ttft_ms, 3),
        "breakdown": gen.timings.as_dict(),
        "n_gen": len(gen.tokens),
        "tokens": gen.tokens,
        "text": gen.text,
        "gen_tokens_per_s": round(len(gen.tokens) / (gen.gen_ms / 1e3), 2) if gen.gen_ms else None,
    }


def _stream_printer(engine: Engine, mode: str):
    model = engine.aux.model if mode == "aux" else engine.model
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def on_token(token: int) -> None:
        sys.stdout.write(decoder.decode(model.token_bytes(token)))
        sys.stdout.flush()

    return on_token


def _run_batch(engine: Engine, batch: Path, defaults: dict) -> None:
    try:
        lines = batch.read_text().splitlines()
    except OSError as exc:
        raise KvcliError(f"cannot read the batch file: {exc}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt = item["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise KvcliError(f"{batch}:{lineno}: expected a JSON object with a 'prompt'") from None
        opts = {**defaults, **{k: item[k] for k in ("mode", "n_predict", "keep", "select_by") if k in item}}
        kvp = replace(opts["kvp"], **{k: item[k] for k in ("tail", "spans") if k in item})
        for key, value in (
            ("n_predict", opts["n_predict"]),
            ("tail", kvp.tail),
            ("spans", kvp.spans),
            ("keep", opts["keep"]),
        ):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise KvcliError(f"{batch}:{lineno}: '{key}' must be a whole number >= 0")
        if opts["mode"] == "kvp":
            kvp = engine.kvp_settings(kvp.tail, kvp.spans)
        opts["kvp"] = kvp
        sampler = Sampler(temperature=opts.pop("temp", 0.0))
        try:
            gen = generate(engine, engine.tokenize(prompt), sampler=sampler, **opts)
            record = result_json(gen, id=item.get("id"))
        except KvcliError as exc:
            record = {"id": item.get("id"), "error": str(exc)}
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


def command(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt text.")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Read the prompt from a file.")] = None,
    batch: Annotated[Optional[Path], typer.Option("--batch", help="JSONL file of prompts.")] = None,
    mode: Annotated[Mode, typer.Option("--mode", help="How the prompt is prefilled.")] = Mode.KVP,
    n_predict: Annotated[int, typer.Option("-n", "--n-predict", help="Tokens to generate at most.")] = 64,
    tail: Annotated[
        Optional[int],
        typer.Option(
            "--tail",
            help="kvp: the base recomputes the last W prompt tokens, the question "
            f"(default: {DEFAULT_SPANS_TAIL} with spans, else 0).",
        ),
    ] = None,
    spans: Annotated[
        Optional[int],
        typer.Option(
            "--spans",
            help="kvp: the base also recomputes the S sentences (at most "
            f"{SPAN_MAX} tokens each) the question attends to most, and the prompt's opening "
            f"(positions 1-{OPENING - 1}) (default: {DEFAULT_SPANS}; "
            "0 where the bundle cannot choose them).",
        ),
    ] = None,
    keep: Annotated[
        Optional[int],
        typer.Option(
            "--keep",
            help="truncate: keep the last M prompt tokens; select: keep M tokens in all "
            "(default: a quarter of the prompt).",
        ),
    ] = None,
    select_by: Annotated[
        SelectBy,
        typer.Option(
            "--select-by",
            help="select: rank positions by the auxiliary's own attention, by base layer k's over "
            "predicted keys, or auto (attention where the bundle's auxiliary chooses kvp's spans).",
        ),
    ] = SelectBy.AUTO,
    temp: Annotated[float, typer.Option("--temp", help="Sampling temperature (0: greedy).")] = 0.0,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = 0,
    ctx: CtxOpt = 4096,
    cache_type_k: Annotated[
        str, typer.Option("--cache-type-k", "-ctk", help="KV type of keys (kvp: f16 or f32).")
    ] = "f16",
    cache_type_v: Annotated[
        str, typer.Option("--cache-type-v", "-ctv", help="KV type of values (kvp: f16 or f32).")
    ] = "f16",
    bundle: BundleOpt = None,
    model: ModelOpt = None,
    json_out: JsonOpt = False,
) -> None:
    if sum(x is not None for x in (prompt, file, batch)) != 1:
        raise KvcliError("give exactly one of PROMPT, --file or --batch")
    if n_predict < 1 or temp < 0:
        raise KvcliError("-n must be >= 1 and --temp >= 0")
    if mode == "kvp" and not {cache_type_k, cache_type_v} <= {"f16", "f32"}:
        raise KvcliError(
            f"KV cache type {cache_type_k}/{cache_type_v} is quantized; predicted "
            "prefill needs f16 or f32 caches (--cache-type-k f16 --cache-type-v f16)"
        )
    if file is not None:
        try:
            prompt = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KvcliError(f"cannot read the prompt file: {exc}") from None
    settings = ContextSettings(n_ctx=ctx, n_threads=threads, type_k=cache_type_k, type_v=cache_type_v)
    if (tail is not None and tail < 0) or (spans is not None and spans < 0):
        raise KvcliError("--tail and --spans must be >= 0")
    if keep is not None and keep < 1:
        raise KvcliError("--keep must be >= 1")
    opts = {"mode": mode, "n_predict": n_predict, "keep": keep}
    if mode == "select":
        opts["select_by"] = select_by
    with open_engine(bundle=bundle, model=model, mode=mode, settings=settings) as engine:
        opts["kvp"] = kvp = engine.kvp_settings(tail, spans) if mode == "kvp" else KvpSettings()
        if batch is not None:
            _run_batch(engine, batch, {**opts, "temp": temp})
            return
        tokens = engine.tokenize(prompt)
        if len(tokens) >= ctx:
            raise KvcliError(
                f"the prompt has {len(tokens)} tokens but the context holds {ctx}; "
                "use a shorter prompt or a larger --ctx"
            )
        sampler = Sampler(temperature=temp, seed=seed)
        if json_out:
            gen = generate(engine, tokens, sampler=sampler, **opts)
            typer.echo(json.dumps(result_json(gen)))
            return
        gen = generate(engine, tokens, sampler=sampler, on_token=_stream_printer(engine, mode), **opts)
        sys.stdout.write("\n")
        from kvcli.cli import ui

        breakdown = ui.breakdown_text(vars(gen.timings), labelled=True)
        detail = f" ({breakdown}; tail {kvp.tail}, spans {kvp.spans})" if gen.prefilled_by == "kvp" else ""
        if mode == "kvp" and gen.prefilled_by == "base":
            detail = (
                f" (prefilled by the base: kvp pays from {engine.kvp_min_tokens} tokens on this "
                "bundle, kvcli doctor shows its measurement)"
            )
        ui.err.print(
            f"[dim]{mode}: {gen.n_prompt} prompt tokens, TTFT {gen.ttft_ms:.0f} ms{detail}, "
            f"{len(gen.tokens)} tokens generated[/dim]"
        )
