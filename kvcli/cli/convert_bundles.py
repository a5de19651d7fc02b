"""kvcli convert factor, bundle and import-corenet: whole bundles, from a base alone, from
another bundle, from a corenet checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kvcli.choices import parse_list
from kvcli.cli.convert_app import Corpus, PredictorType, Text, Tokens, command
from kvcli.cli.options import BundleOpt, JsonOpt, ThreadsOpt
from kvcli.errors import KvcliError
from kvcli.predict.corpus import CalibrationText
from kvcli.predict.predictor import StorageType


@command("factor")
def factor_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle folder to create.")],
    rank: Annotated[int, typer.Option("--rank", help="Columns of the shared basis.")] = 512,
    bundle: BundleOpt = None,
    keep_full: Annotated[
        Optional[str],
        typer.Option(
            "--keep-full", help="Predicted layers to leave unfactored, comma-separated (default: none)."
        ),
    ] = None,
    corpus: Corpus = None,
    text: Text = CalibrationText.MIXED,
    tokens: Tokens = None,
    predictor_type: Annotated[
        Optional[str],
        typer.Option(
            "--predictor-type",
            help="How the per-layer matrices are stored: f32, f16, q8_0 or q4_0 "
            "(default: as the bundle's; the basis is kept F32).",
        ),
    ] = None,
    json_out: JsonOpt = False,
    threads: ThreadsOpt = 0,
) -> None:
    """Factor a bundle's predictor through one shared basis per auxiliary source layer
    (reduced-rank regression over calibration text): its layers then read --rank columns
    instead of every feature, which makes the predict step cheaper at some loss of accuracy.
    Prints each layer's held-out relative error of K and V before and after; writes a
    bundle with the base, the same auxiliary and the factored predictor."""
    import json

    from kvcli.bundles.build import factor_bundle
    from kvcli.cli import ui
    from kvcli.cli.common import resolve_bundle
    from kvcli.llama.runtime import ContextSettings

    full = parse_list(keep_full, "--keep-full", int, distinct=True) if keep_full else []
    b = resolve_bundle(bundle)
    with ui.progress_reporter() as report:
        result = factor_bundle(
            b,
            output,
            rank=rank,
            full_layers=full,
            n_tokens=tokens,
            corpus=corpus,
            text=text,
            storage=predictor_type,
            settings=ContextSettings(n_threads=threads),
            progress=lambda i, n: report("calibrate", i, n),
        )
    if json_out:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    errors = result.heldout_rel_error
    for il, e in errors.items():
        typer.echo(
            f"layer {il:3d}: K {e['before'][0]:.3f} -> {e['after'][0]:.3f}   "
            f"V {e['before'][1]:.3f} -> {e['after'][1]:.3f}"
        )
    means = {
        (when, i): sum(e[when][i] for e in errors.values()) / max(len(errors), 1)
        for when in ("before", "after")
        for i in (0, 1)
    }
    typer.echo(
        f"wrote bundle {output} (rank {rank}, {len(result.factored_layers)} layers "
        f"factored; held-out mean K {means['before', 0]:.3f} -> {means['after', 0]:.3f}, "
        f"V {means['before', 1]:.3f} -> {means['after', 1]:.3f})"
    )


@command("refine")
def refine_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle folder to create.")],
    bundle: BundleOpt = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps per layer (4 prompts each).")] = 150,
    lr: Annotated[
        float, typer.Option("--lr", help="Adam's step, relative to each layer's weight scale.")
    ] = 3e-4,
    corpus: Corpus = None,
    text: Text = CalibrationText.MIXED,
    tokens: Tokens = None,
    json_out: JsonOpt = False,
    threads: ThreadsOpt = 0,
) -> None:
    """Train a bundle's predictor layer by layer for what the base does with it: each
    predicted layer's attention output for the base's own queries (captured once over
    calibration text) with the predicted cache, against the same with the true cache. No
    step runs the whole base, so it takes minutes on a CPU, in numpy (no PyTorch). Starts
    from the closed-form fit; every fifth prompt is held out and a layer keeps the weights
    that did best there. Prints each layer's held-out attention error before and after;
    writes a bundle with the base, the same auxiliary and the refined predictor (Gemma 3,
    Qwen 2 and Llama bases). The new bundle's break-even is measured by kvcli doctor --bundle."""
    import json

    from kvcli.bundles.build import refine_bundle
    from kvcli.cli import ui
    from kvcli.cli.common import resolve_bundle
    from kvcli.llama.runtime import ContextSettings

    if steps < 1:
        raise KvcliError(f"--steps must be at least 1, not {steps}")
    b = resolve_bundle(bundle)
    with ui.progress_reporter() as report:
        result = refine_bundle(
            b,
            output,
            steps=steps,
            lr=lr,
            n_tokens=tokens,
            corpus=corpus,
            text=text,
            settings=ContextSettings(n_threads=threads),
            progress=report,
        )
    if json_out:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    for r in result.layers:
        typer.echo(f"layer {r.layer:3d}: attention output error {r.before:.3f} -> {r.after:.3f}")
    n = max(len(result.layers), 1)
    typer.echo(
        f"wrote bundle {output} ({len(result.layers)} layers refined, {steps} steps each; "
        f"held-out mean {sum(r.before for r in result.layers) / n:.3f} -> "
        f"{sum(r.after for r in result.layers) / n:.3f})"
    )


@command("bundle")
def bundle_cmd(
    base: Annotated[Path, typer.Option("--base", help="Base model GGUF.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle folder to create.")],
    aux: Annotated[Optional[Path], typer.Option("--aux", help="Auxiliary GGUF (with --predictor).")] = None,
    predictor: Annotated[Optional[Path], typer.Option("--predictor", help="Predictor GGUF.")] = None,
    aux_layers: Annotated[
        Optional[int],
        typer.Option(
            "--aux-layers",
            help="Without --aux: layers of the prefix auxiliary to cut (default: "
            "a quarter of the base's, rounded up).",
        ),
    ] = None,
    corpus: Corpus = None,
    text: Text = CalibrationText.MIXED,
    tokens: Tokens = None,
    predictor_type: PredictorType = StorageType.F32,
    reference_base: Annotated[
        bool,
        typer.Option(
            "--reference-base",
            help="Name the base by its path instead of linking or copying it into the folder.",
        ),
    ] = False,
    aux_file: Annotated[
        bool,
        typer.Option(
            "--aux-file",
            help="Without --aux: keep the prefix auxiliary's cut file in the bundle. "
            "By default the bundle records it as the base's first k layers and kvcli runs it from "
            "the base's own weights (a cut is made into the cache only if --aux-load file or mode "
            "aux asks for one on a stock llama-cpp-python).",
        ),
    ] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check/--no-check",
            help="End with the bundle's check of itself (kvcli.eval.self_check): "
            "on held-out prose, code and a conversation, kvp's KL and top-1 agreement with the "
            "base against truncation at the same TTFT and the auxiliary alone; the verdict is "
            "stored in the manifest, and generate and chat repeat its warning.",
        ),
    ] = True,
    check_tokens: Annotated[int, typer.Option("--check-tokens", help="Prompt length of the check.")] = 512,
    rank: Annotated[
        Optional[int],
        typer.Option(
            "--rank",
            help="Without --aux: factor the predictor through a shared basis of this "
            "many columns where its features are wider than twice that (a cheaper predict step; "
            "0: never).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Pack a base, an auxiliary and a predictor into one folder with a manifest (sizes,
    sha256, fingerprints). With --base alone: a prefix auxiliary (no file of its own unless
    --aux-file), a predictor calibrated for it, packed. Then the bundle checks itself."""
    from kvcli.bundles.build import DEFAULT_RANK
    from kvcli.bundles.make import make_bundle
    from kvcli.cli import ui
    from kvcli.cli.common import show_measured

    if (aux is None) != (predictor is None):
        raise KvcliError("give both --aux and --predictor, or neither (to build them)")
    if aux is not None and (aux_layers or corpus or tokens or aux_file or rank is not None):
        raise KvcliError(
            "--aux-layers, --corpus, --tokens, --aux-file and --rank build an "
            "auxiliary and a predictor; they do not apply with --aux and --predictor"
        )
    if rank is not None and rank < 0:
        raise KvcliError("--rank must be >= 0")
    calibration = dict(
        n_aux_layers=aux_layers,
        n_tokens=tokens,
        corpus=corpus,
        text=text,
        storage_type=predictor_type,
        aux_file=aux_file,
        rank=DEFAULT_RANK if rank is None else rank,
    )
    with ui.progress_reporter() as report:
        made = make_bundle(
            base,
            output,
            aux=aux,
            predictor=predictor,
            reference_base=reference_base,
            check=check,
            check_tokens=check_tokens,
            progress=report,
            **(calibration if aux is None else {}),
        )
    b = made.bundle
    aux_text = b.aux.name if b.aux else f"the base's layers 0-{b.aux_prefix - 1}, no file"
    typer.echo(f"wrote bundle {b.folder} (base {b.base.name}, aux {aux_text}, predictor {b.predictor.name})")
    show_measured(made)


@command("import-corenet")
def import_corenet_cmd(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="corenet checkpoint (.pt): a KV-prediction model's state dict, or a training_checkpoint*.pt."
        ),
    ],
    config: Annotated[
        Path,
        typer.Option("--config", help="The training YAML (projects/kv-prediction): models and layer map."),
    ],
    tokenizer: Annotated[
        Path, typer.Option("--tokenizer", help="The sentencepiece tokenizer.model (OpenELM: Llama 2's).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle folder to create.")],
    outtype: Annotated[
        str,
        typer.Option(
            "--outtype",
            help="Model weights: f32, f16, q8_0 or q4_k_m (the last two through llama.cpp's quantizer).",
        ),
    ] = "f16",
) -> None:
    """Import apple/corenet's KV-prediction model (OpenELM base, auxiliary, predictor) as a
    kvcli bundle that generate, chat and bench-ttft run. The checkpoint is read without
    torch: its pickle may only rebuild tensors; anything else is refused."""
    import time

    from kvcli.bundles.corenet_import import import_checkpoint
    from kvcli.cli import ui

    start = time.perf_counter()
    with ui.progress_reporter() as report:
        b = import_checkpoint(checkpoint, config, tokenizer, output, outtype=outtype, progress=report)
    size = sum(b.path(role).stat().st_size for role in b.file_roles)
    typer.echo(
        f"wrote bundle {b.folder} (base {b.base.name}, aux {b.aux.name}, predictor "
        f"{b.predictor.name}; {size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s"
    )
