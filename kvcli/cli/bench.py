"""kvcli bench-ttft: time to first token of each prefill mode, side by side, llama-bench style."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvcli.atomic import check_writable
from kvcli.choices import parse_list
from kvcli.cli.options import BundleOpt, JsonOpt, ThreadsOpt
from kvcli.errors import KvcliError

HELP = """Measure time to first token (TTFT) of the base alone, of predicted prefill (kvp), of
truncation and of token selection, on prompts of exactly N tokens of held-out text, the
modes interleaved round by round so that machine noise hits all alike.

Per N and mode: TTFT mean, standard deviation and median; the ratio to the base of the same
run; kvp's breakdown (auxiliary prefill, state get, predict, state set, base decode), its
floor (auxiliary prefill + base decode) and its distance to it; first-token agreement with
the base and mean KL(base || mode) over the base's next 32 tokens (the full quality suite
is kvcli eval); peak RSS and PSS of each mode measured in a process of its own.

Truncation keeps the last M tokens, token selection the M the auxiliary ranks highest (with
BOS and the last 32); each M matched to kvp's TTFT from timings taken after the warm-up."""


def _print_table(result: dict) -> None:
    from kvcli.cli import ui

    rows = []
    for r in result["rows"]:
        breakdown = ui.breakdown_text(r["breakdown_ms"]) if r.get("breakdown_ms") else "-"
        mode = (
            r["mode"]
            + (f" ({r['aux_load']})" if r.get("aux_load") else "")
            + (f" tail {r['tail']}" if r["tail"] else "")
            + (f" spans {r['spans']}" if r.get("spans") else "")
            + (f" keep {r['keep']}" if r["keep"] else "")
            + (" (default)" if r.get("default") else "")
        )
        rows.append(
            [
                str(r["n_prompt"]),
                mode,
                f"{r['ttft_ms_mean']:.1f} ± {r['ttft_ms_std']:.1f}",
                f"{r['ttft_ms_median']:.1f}",
                ui.fmt(r["ttft_ratio"], 3),
                breakdown,
                ui.fmt(r.get("floor_ms"), 1),
                ui.fmt(r.get("floor_ratio"), 3),
                ui.fmt(r["first_token_agreement"]),
                ui.fmt(r["kl_mean"], 3),
                ui.fmt(r["peak_rss_mib"], 0),
                ui.fmt(r.get("peak_pss_mib"), 0),
            ]
        )
    s = result["settings"]
    title = (
        f"kvcli bench-ttft: {s['base']} + {s['aux']} | n_threads {s['n_threads']} n_batch "
        f"{s['n_batch']} n_ubatch {s['n_ubatch']} type_k {s['type_k']} type_v {s['type_v']} "
        f"flash_attn {int(s['flash_attn'])} | llama-cpp-python {s['llama_cpp_python']}"
    )
    ui.out.print(
        ui.table(
            title,
            [
                "N",
                "mode",
                "TTFT ms",
                "median",
                "x base",
                "aux/get/pred/set/spans/dec ms",
                "floor ms",
                "x floor",
                "first tok",
                "KL",
                "peak RSS MiB",
                "peak PSS MiB",
            ],
            rows,
        )
    )
    ui.err.print(f"[dim]build: {s['build_info']}[/dim]")


def command(
    lengths: Annotated[
        str, typer.Option("-p", "--n-prompt", help="Prompt lengths N in tokens.")
    ] = "512,1024,2048",
    repeats: Annotated[
        int, typer.Option("-r", "--repetitions", help="Timed rounds per N (each on its own prompt).")
    ] = 3,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed rounds per N.")] = 1,
    modes: Annotated[
        Optional[str],
        typer.Option(
            "--modes",
            help="Comma list of base, kvp, truncate, select (default: all four; select only where "
            "the bundle can rank positions).",
        ),
    ] = None,
    tails: Annotated[
        Optional[str],
        typer.Option(
            "--tails",
            help="kvp tails: prompt tokens the base recomputes itself (default: the bundle's default tail).",
        ),
    ] = None,
    spans: Annotated[
        Optional[str],
        typer.Option(
            "--spans",
            help="Numbers of spans the base recomputes, each with each tail (default: kvp at "
            "each tail without spans, the predicted cache's own quality, then the bundle's "
            "default setting, marked as such).",
        ),
    ] = None,
    aux_load: Annotated[
        str,
        typer.Option(
            "--aux-load",
            help="How kvp loads a prefix auxiliary: auto (partial if this build has "
            "kvcli's patch, else view), partial (the base's file loaded as its first k layers), view "
            "(the base's own model, its graph stopped after layer k-1), file (the cut file), a comma "
            "list of these side by side, or all.",
        ),
    ] = "auto",
    memory: Annotated[
        bool,
        typer.Option(
            "--memory/--no-memory", help="Measure each mode's peak RSS and PSS in a process of its own."
        ),
    ] = True,
    plot: Annotated[
        Optional[Path],
        typer.Option("--plot", help="PNG of TTFT against N per mode, kvp's breakdown stacked (matplotlib)."),
    ] = None,
    threads: ThreadsOpt = 0,
    bundle: BundleOpt = None,
    json_out: JsonOpt = False,
) -> None:
    from kvcli.cli import ui
    from kvcli.cli.common import notice_aux_load, resolve_bundle
    from kvcli.eval.bench import BenchRequest, bench_ttft
    from kvcli.eval.ttft import BENCH_MODES
    from kvcli.llama.runtime import ContextSettings

    length_list = parse_list(lengths, "-p", int, minimum=16)
    request = BenchRequest(
        lengths=tuple(length_list),
        modes=tuple(parse_list(modes, "--modes", choices=BENCH_MODES)) if modes is not None else None,
        tails=tuple(parse_list(tails, "--tails", int, minimum=0)) if tails is not None else None,
        spans=tuple(parse_list(spans, "--spans", int, minimum=0)) if spans is not None else None,
        aux_loads=tuple(_aux_loads(aux_load)),
        usable_loads_only=aux_load == "all",
        repeats=repeats,
        warmup=warmup,
        memory=memory,
    )
    if repeats < 1 or warmup < 0:
        raise KvcliError("need -r >= 1 and --warmup >= 0")
    if plot is not None:
        check_writable(plot)
    b = resolve_bundle(bundle)
    settings = ContextSettings(n_ctx=max(length_list) + 64, n_threads=threads)
    with ui.progress_reporter() as report:
        result = bench_ttft(b, settings, request, progress=report, opened=notice_aux_load)
    if plot is not None:
        from kvcli.cli.plot import bench_ttft as plot_bench_ttft

        plot_bench_ttft(result["rows"], plot)
    if json_out:
        typer.echo(json.dumps(result))
    else:
        _print_table(result)


def _aux_loads(text: str) -> list[str]:
    """--aux-load: one load, a comma list (the first is the main engine's), or all."""
    from kvcli.engine.aux_load import AUX_LOADS
    from kvcli.llama.library import prefix_view_supported

    if text == "all":  # the main engine picks its own; the others are tried beside it
        return ["auto", *(["partial"] if prefix_view_supported() else []), "view", "file"]
    return parse_list(text, "--aux-load", choices=AUX_LOADS, distinct=True)
