"""kvcli train: train a bundle's predictor through the frozen base (needs kvcli[train])."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvcli.cli.options import BundleOpt, JsonOpt, ThreadsOpt

HELP = """Train a bundle's predictor through the frozen base, as the KV Prediction paper
does: each step runs one sequence of --tokens tokens as kvp does (the predicted cache for
all but its last --tail positions, which the base computes itself over it) and lowers the
base's cross-entropy on those positions plus --l1-weight times the L1 distance between the
predicted and the base's own K and V. The predictor starts from the bundle's closed-form
fit; the base stays frozen, and the auxiliary too unless --train-aux. Writes a bundle with
the trained predictor (and auxiliary) to -o (judge it with kvcli eval --bundle).

Training text: the calibration part of the standard library's sources (never used by kvcli
eval), or --corpus. Progress is measured on --validate sequences of the held-out part
(never trained on): the cross-entropy over their tails. A checkpoint is saved every
--save-every steps and on Ctrl-C (default: beside -o); --resume continues it, up to
--steps in all. Deterministic for a --seed on one device and thread count. Needs PyTorch:
pip install 'kvcli\\[train]'."""


def command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle folder to write.")],
    bundle: BundleOpt = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps in all (one sequence each).")] = 200,
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens per training sequence.")] = 1024,
    tail: Annotated[
        int,
        typer.Option(
            "--tail", help="Last positions of each sequence the base computes itself and is scored on."
        ),
    ] = 64,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate.")] = 1e-6,
    l1_weight: Annotated[
        Optional[float],
        typer.Option("--l1-weight", help="Weight of the K/V L1 term (default: 1 / the base's layers)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the order of the sequences.")] = 0,
    corpus: Annotated[
        Optional[Path], typer.Option("--corpus", help="Train on this text file or folder instead.")
    ] = None,
    checkpoint: Annotated[
        Optional[Path],
        typer.Option("--checkpoint", help="Checkpoint file (default: OUTPUT.checkpoint.pt beside -o)."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint.")] = False,
    save_every: Annotated[int, typer.Option("--save-every", help="Steps between checkpoints.")] = 25,
    validate: Annotated[
        int,
        typer.Option(
            "--validate",
            help="Held-out sequences scored at the start, every --validate-every steps "
            "and at the end (0: none).",
        ),
    ] = 4,
    validate_every: Annotated[int, typer.Option("--validate-every", help="Steps between validations.")] = 100,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    train_aux: Annotated[
        bool,
        typer.Option(
            "--train-aux",
            help="Train the auxiliary too (its layers that are not copies of the base's), "
            "with its own cross-entropy over the tail added to the loss; written back as a GGUF "
            "(trained matrices F16). Not for a prefix auxiliary.",
        ),
    ] = False,
    outtype: Annotated[
        Optional[str],
        typer.Option("--outtype", help="Predictor storage: f32, f16, q8_0, q4_0 (default: the bundle's)."),
    ] = None,
    threads: ThreadsOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    from kvcli.atomic import check_writable
    from kvcli.cli import ui
    from kvcli.cli.common import resolve_bundle
    from kvcli.errors import KvcliError
    from kvcli.llama.library import default_threads
    from kvcli.train.loop import train_bundle
    from kvcli.train.torch_forward import _torch
    from kvcli.train.train import TrainSettings

    if device != "cpu" and not device.startswith("cuda"):
        raise KvcliError(f"--device is cpu or cuda, not {device!r}")
    check_writable(output, folder=True)
    torch = _torch()
    torch.set_num_threads(threads or default_threads())
    torch.manual_seed(seed)
    settings = TrainSettings(tokens=tokens, tail=tail, lr=lr, l1_weight=l1_weight, seed=seed)
    b = resolve_bundle(bundle)
    with ui.training_progress(steps) as report:
        summary = train_bundle(
            b,
            output,
            settings=settings,
            steps=steps,
            corpus=corpus,
            checkpoint=checkpoint,
            resume=resume,
            save_every=max(1, save_every),
            device=device,
            storage=outtype,
            validate=validate,
            validate_every=validate_every,
            train_aux=train_aux,
            report=report,
            notice=lambda text: ui.err.print(text, soft_wrap=True),
        )
    if json_out:
        typer.echo(json.dumps(summary.to_json(), indent=2))
        return
    ui.out.print(
        f"trained {summary.steps_this_run} steps (step {summary.step} of the run) on "
        f"{summary.source}, {summary.tokens_per_s} tokens/s"
    )
    ui.out.print(
        f"cross-entropy over the tail: {summary.ce_first_10} (first 10 steps) -> "
        f"{summary.ce_last_10} (last 10; the base over its own cache: "
        f"{summary.ce_base_last_10}); K/V L1 {summary.kv_l1_first_10} -> "
        f"{summary.kv_l1_last_10}"
    )
    if summary.validation:
        first, last = summary.validation[0], summary.validation[-1]
        ui.out.print(
            f"held-out cross-entropy over the tail: {first['ce']} (step {first['step']}) -> "
            f"{last['ce']} (step {last['step']}; the base over its own cache: {last['ce_base']})"
        )
    ui.out.print(f"bundle: {summary.output}  (checkpoint: {summary.checkpoint})")
