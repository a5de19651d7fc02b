"""kvcli bench-ttft: time to first token of each prefill mode, side by side, llama-bench style."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvcli.atomic import check_writable
from kvcli.choices import parse_list
from kvcli.cli.options import BundleOpt, JsonOpt, ThreadsOpt
from kvcli.errors import IncompatibleError, KvcliError

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


DEFAULT_MODES = "base,kvp,truncate,select"


def _settings_info(settings, bundle) -> dict:
    from kvcli.llama.library import llama_cpp_version, system_info
    from kvcli.predict.predictor import load_predictor

    return {
        "n_threads": settings.resolved_threads(),
        "n_batch": settings.n_batch,
        "n_ubatch": settings.n_ubatch,
        "type_k": settings.type_k,
        "type_v": settings.type_v,
        "flash_attn": settings.flash_attn,
        "n_ctx": settings.n_ctx,
        "llama_cpp_python": llama_cpp_version(),
        "build_info": system_info(),
        "base": bundle.base.name,
        "aux": bundle.aux.name if bundle.aux else f"base layers 0-{bundle.aux_prefix - 1}",
        "predictor_type": load_predictor(bundle.predictor).storage_type,
    }


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def _print_table(result: dict) -> None:
    from kvcli.cli import ui

    rows = []
    for r in result["rows"]:
        b = r.get("breakdown_ms")
        breakdown = (
            "/".join(
                f"{b[k]:.0f}"
                for k in (
                    "aux_prefill_ms",
                    "state_get_ms",
                    "predict_ms",
                    "state_set_ms",
                    "recompute_ms",
                    "base_decode_ms",
                )
            )
            if b
            else "-"
        )
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
                _fmt(r["ttft_ratio"], ".3f"),
                breakdown,
                _fmt(r.get("floor_ms"), ".1f"),
                _fmt(r.get("floor_ratio"), ".3f"),
                _fmt(r["first_token_agreement"]),
                _fmt(r["kl_mean"], ".3f"),
                _fmt(r["peak_rss_mib"], ".0f"),
                _fmt(r.get("peak_pss_mib"), ".0f"),
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
    from kvcli.cli.common import notice_aux_load, resolve_bundle
    from kvcli.engine.engine import Engine
    from kvcli.eval.ttft import BENCH_MODES
    from kvcli.llama.runtime import ContextSettings

    length_list = parse_list(lengths, "-p", int, minimum=16)
    tail_list = parse_list(tails, "--tails", int, minimum=0) if tails is not None else None
    span_list = parse_list(spans, "--spans", int, minimum=0) if spans is not None else None
    mode_list = parse_list(modes or DEFAULT_MODES, "--modes", choices=BENCH_MODES)
    loads = _aux_loads(aux_load)
    if repeats < 1 or warmup < 0:
        raise KvcliError("need -r >= 1 and --warmup >= 0")
    if plot is not None:
        check_writable(plot)
    b = resolve_bundle(bundle)
    settings = ContextSettings(n_ctx=max(length_list) + 64, n_threads=threads)
    engines = []
    try:
        engine = notice_aux_load(Engine.from_bundle(b, settings=settings, aux_load=loads[0]))
        engines.append(engine)
        if "select" in mode_list:
            from kvcli.engine.token_select import resolve_select_by

            try:
                resolve_select_by(engine, "auto")
            except IncompatibleError:
                if modes is not None:
                    raise
                mode_list.remove("select")  # by default, only where this bundle can rank
        default = engine.kvp_settings()
        tail_list = [default.tail] if tail_list is None else tail_list
        if span_list is None:
            kvp = [(t, 0) for t in tail_list]
            if (default.tail, default.spans) not in kvp:
                kvp.append((default.tail, default.spans))
        else:
            kvp = [(t, s) for s in span_list for t in tail_list]
        n_methods = len(mode_list) + (len(kvp) - 1 if "kvp" in mode_list else 0)
        extra = {}
        for load in loads[1:]:
            if load == engine.aux_load:
                continue
            try:
                extra[load] = Engine.from_bundle(b, settings=settings, aux_load=load)
            except IncompatibleError:
                if aux_load != "all":
                    raise
                continue  # "all": only the loads this bundle and build can use
            engines.append(extra[load])
        n_methods += len(extra)
        rows, prompts, keeps = _run(engine, extra, length_list, mode_list, kvp, repeats, warmup, n_methods)
    finally:
        for e in engines:
            e.close()
    if memory:
        from kvcli.eval.memory import measure_in_child

        # (mode, aux_load, tail, spans): every kvp setting on the main engine's load, tail 0
        # on the others, as timed
        targets = [(m, engine.aux_load, 0, 0) for m in mode_list if m != "kvp"]
        targets += [("kvp", engine.aux_load, t, sp) for t, sp in kvp] if "kvp" in mode_list else []
        targets += [("kvp", load, 0, 0) for load in extra]
        for mode, load, t, sp in targets:
            measured = measure_in_child(
                mode,
                b.folder,
                length_list,
                prompts,
                settings.__dict__,
                keep=keeps.get(mode),
                aux_load=load,
                tail=t,
                spans=sp,
            )
            for r in rows:
                if (
                    r["mode"] == mode
                    and r.get("aux_load") in (None, load)
                    and (mode != "kvp" or (r["tail"], r["spans"]) == (t, sp))
                ):
                    r.update(measured[r["n_prompt"]])
    for r in rows:  # the setting generate and chat use without options
        r["default"] = (
            r["mode"] == "kvp"
            and r["aux_load"] == engine.aux_load
            and (r["tail"], r["spans"]) == (default.tail, default.spans)
        )
    result = {"settings": {**_settings_info(settings, b), "repeats": repeats, "warmup": warmup}, "rows": rows}
    if plot is not None:
        from kvcli.cli.plot import bench_ttft

        bench_ttft(rows, plot)
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


def _run(engine, extra, length_list, mode_list, kvp, repeats, warmup, n_methods):
    from kvcli.cli import ui
    from kvcli.eval.ttft import bench_length, summarize

    rows, prompts, keeps = [], {}, {}
    with ui.progress_reporter() as report:
        for n in length_list:
            stage, done = f"pp{n}", [0]

            def tick(stage=stage, done=done) -> None:
                done[0] += 1
                report(stage, done[0], repeats * n_methods)

            runs, ps = bench_length(
                engine,
                n,
                modes=mode_list,
                kvp=kvp,
                repeats=repeats,
                warmup=warmup,
                progress=tick,
                extra_engines=extra,
            )
            prompts[n] = ps[0]
            for m in runs:
                if m.mode in ("truncate", "select"):
                    keeps.setdefault(m.mode, {})[n] = m.keep
            for r in summarize(n, runs):
                if r["mode"] == "kvp" and r["aux_load"] is None:
                    r["aux_load"] = engine.aux_load
                rows.append(r)
    return rows, prompts, keeps
