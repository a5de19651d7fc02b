"""kvcli bench-ttft's run: the modes and kvp settings to time, the engines per load of the
auxiliary, the timed rounds (kvcli.eval.ttft) and each mode's peak memory in a process of its
own (kvcli.eval.memory); returns the rows the command prints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvcli.engine.bundle import Bundle, Progress
from kvcli.engine.engine import Engine
from kvcli.engine.prefill_types import KvpSettings
from kvcli.errors import IncompatibleError
from kvcli.eval.ttft import bench_length, summarize
from kvcli.llama.runtime import ContextSettings

DEFAULT_MODES = ("base", "kvp", "truncate", "select")


@dataclass(frozen=True)
class BenchRequest:
    lengths: tuple[int, ...]
    modes: tuple[str, ...] | None = None  # None: all four, select only where the bundle can rank
    tails: tuple[int, ...] | None = None  # None: the bundle's default tail
    spans: tuple[int, ...] | None = None  # None: each tail without spans, then the default setting
    aux_loads: tuple[str, ...] = ("auto",)  # the main engine's load of the auxiliary, then more
    usable_loads_only: bool = False  # skip the further loads this bundle and build cannot use
    repeats: int = 3
    warmup: int = 1
    memory: bool = True


def bench_ttft(
    bundle: Bundle,
    settings: ContextSettings,
    request: BenchRequest,
    *,
    progress: Progress | None = None,
    opened: Callable[[Engine], object] | None = None,
) -> dict:
    """``{"settings": ..., "rows": [...]}``: per prompt length and method, TTFT and its
    breakdown, the ratio to the base, agreement with the base and (``request.memory``) the
    peak RSS and PSS. ``opened`` sees the main engine as soon as it is open (the CLI's note
    on how it loaded the auxiliary)."""
    engine = Engine.from_bundle(bundle, settings=settings, aux_load=request.aux_loads[0])
    extra: dict[str, Engine] = {}
    try:
        if opened:
            opened(engine)
        modes = _modes(engine, request.modes)
        default = engine.kvp_settings()
        kvp = _kvp_grid(default, request.tails, request.spans)
        extra = _more_engines(engine, bundle, request)
        n_methods = len(modes) + (len(kvp) - 1 if "kvp" in modes else 0) + len(extra)
        rows, prompts, keeps = _time(engine, extra, request, modes, kvp, n_methods, progress)
    finally:  # closed before the memory runs: an open model here would share pages with theirs
        for e in (engine, *extra.values()):
            e.close()
    if request.memory:
        _add_memory(rows, engine, bundle, modes, kvp, list(extra), prompts, keeps, request.lengths)
    for r in rows:  # the setting generate and chat use without options
        r["default"] = (
            r["mode"] == "kvp"
            and r["aux_load"] == engine.aux_load
            and (r["tail"], r["spans"]) == (default.tail, default.spans)
        )
    info = settings_info(settings, bundle)
    return {"settings": {**info, "repeats": request.repeats, "warmup": request.warmup}, "rows": rows}


def settings_info(settings: ContextSettings, bundle: Bundle) -> dict:
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


def _modes(engine: Engine, asked: tuple[str, ...] | None) -> list[str]:
    """The modes asked for; by default all four, select only where this bundle can rank."""
    modes = list(asked or DEFAULT_MODES)
    if "select" in modes:
        from kvcli.engine.token_select import resolve_select_by

        try:
            resolve_select_by(engine, "auto")
        except IncompatibleError:
            if asked is not None:
                raise
            modes.remove("select")
    return modes


def _kvp_grid(default: KvpSettings, tails, spans) -> list[tuple[int, int]]:
    """(tail, spans) per kvp setting timed: each tail with each number of spans, or without
    spans (the predicted cache's own quality) and then the bundle's default setting."""
    tails = [default.tail] if tails is None else list(tails)
    if spans is not None:
        return [(t, s) for s in spans for t in tails]
    kvp = [(t, 0) for t in tails]
    if (default.tail, default.spans) not in kvp:
        kvp.append((default.tail, default.spans))
    return kvp


def _more_engines(engine: Engine, bundle: Bundle, request: BenchRequest) -> dict[str, Engine]:
    """An engine per further load of the auxiliary (closed again if one fails to open)."""
    extra: dict[str, Engine] = {}
    try:
        for load in request.aux_loads[1:]:
            if load == engine.aux_load or load in extra:
                continue
            try:
                extra[load] = Engine.from_bundle(bundle, settings=engine.settings, aux_load=load)
            except IncompatibleError:
                if not request.usable_loads_only:
                    raise
    except BaseException:
        for e in extra.values():
            e.close()
        raise
    return extra


def _time(engine, extra, request: BenchRequest, modes, kvp, n_methods, progress):
    """The timed rounds per prompt length: the summarized rows, each length's first prompt and
    the M that truncation and selection kept (for the memory runs)."""
    rows, prompts, keeps = [], {}, {}
    for n in request.lengths:
        stage, done = f"pp{n}", [0]

        def tick(stage=stage, done=done) -> None:
            done[0] += 1
            if progress:
                progress(stage, done[0], request.repeats * n_methods)

        runs, ps = bench_length(
            engine,
            n,
            modes=modes,
            kvp=kvp,
            repeats=request.repeats,
            warmup=request.warmup,
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


def _add_memory(rows, engine, bundle, modes, kvp, more_loads, prompts, keeps, lengths) -> None:
    """Each timed setting's peak RSS and PSS, measured in a process of its own, into its rows:
    every kvp setting on the main engine's load, tail 0 on the others, as timed."""
    from kvcli.eval.memory import measure_in_child

    targets = [(m, engine.aux_load, 0, 0) for m in modes if m != "kvp"]
    targets += [("kvp", engine.aux_load, t, sp) for t, sp in kvp] if "kvp" in modes else []
    targets += [("kvp", load, 0, 0) for load in more_loads]
    for mode, load, t, sp in targets:
        measured = measure_in_child(
            mode,
            bundle.folder,
            list(lengths),
            prompts,
            engine.settings.__dict__,
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
