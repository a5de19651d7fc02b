"""kvcli eval: what kvp keeps of the base's answers, against truncation and the aux alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvcli.atomic import check_writable
from kvcli.choices import parse_list
from kvcli.cli.common import open_engine
from kvcli.cli.options import BundleOpt, JsonOpt, ThreadsOpt
from kvcli.engine.recompute import DEFAULT_SPANS_TAIL
from kvcli.errors import KvcliError
from kvcli.eval.stats import method_label
from kvcli.eval.tasks import DEFAULT_TASKS, TASKS
from kvcli.llama.runtime import ContextSettings

HELP = """The judge of every quality claim: the quality each prefill method keeps, at its measured
TTFT, on task families in the manner of RULER, in repeated noise and in real prose (needles
among look-alikes, several values, variable tracking, frequent words, a question over
documents), on generated code and on held-out text (docs/judge.md).

Per family, prompt length and method (base; kvp at each tail and number of recomputed spans;
truncate, keeping the last M tokens, and select, the M tokens the auxiliary ranks highest by
each ranking the bundle has, each M matched to the measured TTFT of the costliest kvp
setting; the auxiliary alone): strict accuracy with its 95% Wilson interval, retention
(accuracy / base accuracy), first-token agreement with the base, mean KL(base || method)
and top-1 agreement teacher-forced over the base's greedy next 32 tokens, and the measured
TTFT ratio to the base; then per method the mean retention over the families and the worst.
For kvp, K/V err: ||predicted - base's|| / ||base's|| of the cache kvp wrote (spans
included, its tail not), mean over the predicted layers; the JSON has it per layer.

--quick: passkey retrieval at 512 tokens on 3 prompts, kvp without spans: a check of the
pipeline."""


def command(
    tasks: Annotated[str, typer.Option("--tasks", help=f"Comma list of: {', '.join(TASKS)}.")] = ",".join(
        DEFAULT_TASKS
    ),
    lengths: Annotated[str, typer.Option("--lengths", help="Prompt lengths in tokens.")] = "1024",
    n: Annotated[
        int,
        typer.Option(
            "--n",
            help="Prompts per family and length (20: a 0.1 difference in a method's mean over "
            "the families stands out of the noise; docs/judge.md).",
        ),
    ] = 20,
    tails: Annotated[str, typer.Option("--tails", help="kvp tails to evaluate.")] = f"0,{DEFAULT_SPANS_TAIL}",
    spans: Annotated[
        Optional[str],
        typer.Option(
            "--spans",
            help="Numbers of recomputed spans to evaluate (each with each tail); "
            "default 0 and the bundle's default (2) where the bundle can choose spans, else 0.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the task generators.")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="A fast check of the pipeline.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for results.json.")] = None,
    plot: Annotated[
        Optional[Path],
        typer.Option("--plot", help="PNG of accuracy against TTFT per method (needs matplotlib)."),
    ] = None,
    threads: ThreadsOpt = 0,
    bundle: BundleOpt = None,
    json_out: JsonOpt = False,
) -> None:
    from kvcli.cli import ui
    from kvcli.eval.judge import judge

    if quick:
        tasks, lengths, n, tails = "passkey", "512", 3, "0"
        spans = "0"
    task_list = parse_list(tasks, "--tasks", choices=TASKS)
    length_list = parse_list(lengths, "--lengths", int, minimum=16)
    tail_list = parse_list(tails, "--tails", int, minimum=0)
    span_list = None if spans is None else parse_list(spans, "--spans", int, minimum=0)
    if n < 1:
        raise KvcliError("--n must be >= 1")
    if plot is not None:
        check_writable(plot)
    settings = ContextSettings(n_ctx=max(length_list) + 64, n_threads=threads)
    with open_engine(bundle=bundle, model=None, mode="kvp", settings=settings) as engine:
        with ui.progress_reporter() as report:
            result = judge(
                engine,
                task_list,
                length_list,
                n=n,
                tails=tail_list,
                spans=span_list,
                seed=seed,
                progress=report,
            )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    if plot is not None:
        from kvcli.cli.plot import eval_pareto

        eval_pareto(result["rows"], plot)
    if json_out:
        typer.echo(json.dumps(result))
        return
    _print_tables(result)


def _print_tables(result: dict) -> None:
    from kvcli.cli import ui

    table_rows = [
        [
            r["task"],
            str(r["n_prompt"]),
            method_label(r) + (f" keep {r['keep']}" if r["keep"] else ""),
            ui.fmt(r["accuracy"]) + (f" [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r.get("ci95") else ""),
            ui.fmt(r["retention"]),
            ui.fmt(r["first_token_agreement"]),
            ui.fmt(r["kl_mean"], 3),
            ui.fmt(r["top1_agreement"]),
            "/".join(f"{e:.2f}" for e in r["kv_rel_err_predicted_layers"])
            if r.get("kv_rel_err_predicted_layers")
            else "-",
            ui.fmt(r["ttft_ratio"]),
        ]
        for r in result["rows"]
    ]
    ui.out.print(
        ui.table(
            "kvcli eval",
            [
                "task",
                "N",
                "method",
                "accuracy [95% CI]",
                "retention",
                "first token",
                "KL",
                "top-1",
                "K/V err",
                "TTFT / base",
            ],
            table_rows,
        )
    )
    scored = [s for s in result["summary"] if s["families"]]
    if scored:
        ui.out.print(
            ui.table(
                "per method: mean retention over the tasks (each capped at 1), the worst task",
                ["method", "N", "mean retention", "worst task", "TTFT / base (median)"],
                [
                    [
                        s["method"] + (" (default)" if s["default"] else ""),
                        str(s["n_prompt"]),
                        ui.fmt(s["mean_retention"]),
                        f"{s['worst_family']} {ui.fmt(s['worst_retention'])}",
                        f"{s['ttft_ratio_min']:.2f}-{s['ttft_ratio_max']:.2f} ({s['ttft_ratio_median']:.2f})",
                    ]
                    for s in scored
                ],
            )
        )
        ui.out.print(
            ui.table(
                "the frontier: for a TTFT budget, the best method is the last row within it",
                ["N", "TTFT / base (median)", "method", "mean retention"],
                [
                    [
                        str(f["n_prompt"]),
                        ui.fmt(f["ttft_ratio_median"]),
                        f["method"],
                        ui.fmt(f["mean_retention"]),
                    ]
                    for f in result["frontier"]
                ],
            )
        )
