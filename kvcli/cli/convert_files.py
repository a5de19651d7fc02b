"""kvcli convert make-aux, calibrate and quantize: the files a bundle holds, one at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kvcli.atomic import check_writable
from kvcli.choices import parse_list
from kvcli.cli.convert_app import Corpus, OutFile, PredictorType, Text, Tokens, command
from kvcli.cli.options import ThreadsOpt
from kvcli.errors import KvcliError
from kvcli.predict.corpus import CalibrationText
from kvcli.predict.predictor import StorageType


@command("make-aux")
def make_aux(
    base: Annotated[Path, typer.Argument(help="Base model GGUF (gemma3, llama or qwen2).")],
    output: OutFile,
    layers: Annotated[
        Optional[str],
        typer.Option("--layers", help="Base layers to keep: a prefix '0-4' or a list '0,4,8,12,16'."),
    ] = None,
    stride: Annotated[
        Optional[int], typer.Option("--stride", help="Keep every N-th layer from 0 (the paper's KVP-LP).")
    ] = None,
    last: Annotated[
        bool, typer.Option("--last/--no-last", help="With --stride: also keep the base's last layer.")
    ] = True,
) -> None:
    """Cut an auxiliary from a base by keeping some of its layers (tokenizer, output norm
    and LM head kept; Gemma 3's per-layer attention type kept)."""
    from kvcli.models.aux_cut import cut_auxiliary, parse_layers, stride_layers
    from kvcli.models.model_info import read_model_info

    if (layers is None) == (stride is None):
        raise KvcliError("give exactly one of --layers and --stride")
    if layers is not None and not layers.strip():
        raise KvcliError("--layers is empty: give a prefix '0-4' or a list '0,4,8'")
    info = read_model_info(base, "base model")
    kept = (
        parse_layers(layers, info.n_layer)
        if layers is not None
        else stride_layers(info.n_layer, stride, include_last=last)
    )
    if len(kept) == info.n_layer:
        raise KvcliError("the auxiliary would keep every layer of the base")
    out = cut_auxiliary(info.path, output, kept)
    typer.echo(f"wrote {out} ({len(kept)} of {info.n_layer} layers: {','.join(map(str, kept))})")


@command("calibrate")
def calibrate_cmd(
    base: Annotated[Path, typer.Argument(help="Base model GGUF.")],
    aux: Annotated[
        Path,
        typer.Argument(
            help="Auxiliary model GGUF (a cut of the base, or another model of the same tokenizer)."
        ),
    ],
    output: OutFile,
    corpus: Corpus = None,
    text: Text = CalibrationText.MIXED,
    tokens: Tokens = None,
    chunk: Annotated[int, typer.Option("--chunk", help="Tokens per calibration prompt.")] = 512,
    lambdas: Annotated[
        Optional[str],
        typer.Option(
            "--lambda",
            help="Ridge penalties to choose from (relative, comma-separated); the one "
            "with the lowest held-out error is kept per layer.",
        ),
    ] = None,
    layer_map: Annotated[
        Optional[str],
        typer.Option(
            "--layer-map",
            help="Per base layer, the auxiliary layer that feeds it ('0,0,1,1,...'). "
            "Default: a cut's nearest earlier layer; another model's round(l*(La-1)/(Lb-1)).",
        ),
    ] = None,
    hidden: Annotated[
        str,
        typer.Option(
            "--hidden",
            help="The auxiliary's captured hidden tensors to feed: 'default' (the "
            "residual into its last layer and that layer's attention output), 'none', or a comma "
            "list of residual, attn, out, normed ('out', 'normed': the residual leaving its last "
            "layer, raw or RMS-normed; a prefix auxiliary only, run as a view; with 'normed' the "
            "first predicted layer is computed from it with the base's own weights, not fitted).",
        ),
    ] = "default",
    predictor_type: PredictorType = StorageType.F32,
    threads: ThreadsOpt = 0,
) -> None:
    """Fit a predictor (ridge per base layer) from both models' caches over calibration text."""
    from kvcli import keys
    from kvcli.cli import ui
    from kvcli.llama.runtime import ContextSettings
    from kvcli.models.model_info import read_model_info
    from kvcli.predict.calibrate import DEFAULT_TOKENS, calibrate
    from kvcli.predict.plan import parse_layer_map
    from kvcli.predict.predictor import save_predictor

    check_writable(output)
    alphas = None
    if lambdas:
        alphas = tuple(parse_list(lambdas, "--lambda", float))
        if min(alphas) <= 0:
            raise KvcliError("--lambda values must be positive")
    kinds = {
        "residual": keys.FEATURE_AUX_RESIDUAL,
        "attn": keys.FEATURE_AUX_ATTN,
        "out": keys.FEATURE_AUX_OUT,
        "normed": keys.FEATURE_AUX_OUT_NORMED,
    }
    if hidden in ("default", "none"):
        hidden_kinds = hidden == "default"
    else:
        names = parse_list(hidden, "--hidden (default, none, or a list)", choices=kinds, distinct=True)
        hidden_kinds = tuple(kinds[x] for x in names)
    lmap = None
    if layer_map:
        lmap = parse_layer_map(
            layer_map, read_model_info(base, "base model"), read_model_info(aux, "auxiliary")
        )
    options = {"alphas": alphas} if alphas else {}
    with ui.progress_reporter() as report:
        pred = calibrate(
            base,
            aux,
            n_tokens=tokens or DEFAULT_TOKENS,
            chunk_tokens=chunk,
            corpus=corpus,
            text=text,
            layer_map=lmap,
            hidden=hidden_kinds,
            settings=ContextSettings(n_threads=threads),
            progress=lambda i, n: report("calibrate", i, n),
            **options,
        )
    out = save_predictor(pred, output, predictor_type)
    typer.echo(
        f"wrote {out} ({len(pred.predicted_layers)} layers predicted, "
        f"{len(pred.copied_layers)} copied, {pred.calibration_tokens} tokens)"
    )


@command("quantize")
def quantize_cmd(
    src: Annotated[Path, typer.Argument(help="Input GGUF: a base/auxiliary model or a predictor.")],
    dest: Annotated[Path, typer.Argument(help="Output GGUF (written atomically).")],
    qtype: Annotated[
        str,
        typer.Argument(
            help="Model: q4_0, q4_k_m, q8_0, f16, ... (llama.cpp's "
            "quantizer). Predictor: f32, f16, q8_0 or q4_0."
        ),
    ],
    allow_requantize: Annotated[
        bool, typer.Option("--allow-requantize", help="Quantize an already quantized model (loses quality).")
    ] = False,
    threads: ThreadsOpt = 0,
) -> None:
    """Quantize a model with llama.cpp's own quantizer, or re-store a predictor's matrices."""
    from kvcli import keys
    from kvcli.models.gguf_header import read_header
    from kvcli.models.model_info import check_gguf_file

    check_gguf_file(src, "input")
    check_writable(dest)
    if read_header(src).get("general.type") == keys.PREDICTOR_TYPE:
        from kvcli.predict.predictor import load_predictor, save_predictor

        out = save_predictor(load_predictor(src), dest, qtype.lower())
    else:
        from kvcli.llama.quantize import quantize_model

        out = quantize_model(src, dest, qtype, threads=threads, allow_requantize=allow_requantize)
    typer.echo(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
