"""The converter's commands, ``kvcli convert ...`` (and ``python tools/convert_gguf.py ...``,
the same app): thin over kvcli/.

make-aux, calibrate, quantize and bundle build every file a kvcli bundle holds; factor makes a
bundle's predictor cheaper to run; import-corenet
turns a corenet KV-prediction checkpoint into a bundle. Each output
is written atomically: a converter stopped at any moment leaves no partial file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kvcli.atomic import check_writable
from kvcli.choices import parse_list
from kvcli.cli.options import BundleOpt, JsonOpt, ThreadsOpt, paragraphs
from kvcli.cli.runner import run, set_debug
from kvcli.errors import KvcliError
from kvcli.predict.corpus import CalibrationText
from kvcli.predict.predictor import StorageType

app = typer.Typer(
    name="convert_gguf.py",
    help="Build, quantize and pack kvcli's GGUF files: an auxiliary cut from a base, a "
    "calibrated predictor, llama.cpp-quantized models, and bundles of all three.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

OutFile = Annotated[Path, typer.Option("--output", "-o", help="Output file (written atomically).")]
PredictorType = Annotated[
    StorageType,
    typer.Option(
        "--predictor-type",
        help="How the predictor's matrices are stored: f32, f16, q8_0 or q4_0 "
        "(gguf-py's quants; dequantized once at load).",
    ),
]
Tokens = Annotated[
    Optional[int], typer.Option("--tokens", help="Calibration tokens (default 20480: 40 prompts of 512).")
]
Corpus = Annotated[
    Optional[Path],
    typer.Option(
        "--corpus",
        help="A text file or folder to calibrate on (default: the Python standard "
        "library's text, held-out files excluded; see --text).",
    ),
]
Text = Annotated[
    CalibrationText,
    typer.Option(
        "--text",
        help="Without --corpus, the standard library's text to calibrate on: mixed "
        "(its sources, their docstrings and conversations in the base's chat template, in turn) "
        "or code (its sources alone).",
    ),
]


def command(name: str):
    """Register a subcommand whose help is its docstring, unwrapped."""
    return lambda fn: app.command(name, help=paragraphs(fn.__doc__))(fn)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show llama.cpp's log and tracebacks.")] = False,
) -> None:
    set_debug(debug)


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
            "list of residual, attn, out ('out': the residual leaving its last layer; a prefix "
            "auxiliary only).",
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
    from kvcli.predict.calibrate import DEFAULT_TOKENS, calibrate, parse_layer_map
    from kvcli.predict.predictor import save_predictor

    check_writable(output)
    alphas = None
    if lambdas:
        alphas = tuple(parse_list(lambdas, "--lambda", float))
        if min(alphas) <= 0:
            raise KvcliError("--lambda values must be positive")
    if corpus is not None and not corpus.exists():
        raise KvcliError(f"corpus not found: {corpus}")
    kinds = {
        "residual": keys.FEATURE_AUX_RESIDUAL,
        "attn": keys.FEATURE_AUX_ATTN,
        "out": keys.FEATURE_AUX_OUT,
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

    from kvcli.cli import ui
    from kvcli.cli.common import resolve_bundle
    from kvcli.engine.build import factor_bundle
    from kvcli.llama.runtime import ContextSettings

    full = parse_list(keep_full, "--keep-full", int, distinct=True) if keep_full else []
    if corpus is not None and not corpus.exists():
        raise KvcliError(f"corpus not found: {corpus}")
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
    from kvcli.cli import ui
    from kvcli.engine.build import DEFAULT_RANK, build_bundle
    from kvcli.engine.bundle import pack_bundle

    if (aux is None) != (predictor is None):
        raise KvcliError("give both --aux and --predictor, or neither (to build them)")
    if aux is not None:
        if aux_layers or corpus or tokens or aux_file or rank is not None:
            raise KvcliError(
                "--aux-layers, --corpus, --tokens, --aux-file and --rank build an "
                "auxiliary and a predictor; they do not apply with --aux and --predictor"
            )
        b = pack_bundle(output, base=base, aux=aux, predictor=predictor, reference_base=reference_base)
    else:
        if corpus is not None and not corpus.exists():
            raise KvcliError(f"corpus not found: {corpus}")
        if rank is not None and rank < 0:
            raise KvcliError("--rank must be >= 0")
        with ui.progress_reporter() as report:
            b = build_bundle(
                base,
                output,
                n_aux_layers=aux_layers,
                n_tokens=tokens,
                corpus=corpus,
                text=text,
                storage_type=predictor_type,
                reference_base=reference_base,
                aux_file=aux_file,
                rank=DEFAULT_RANK if rank is None else rank,
                progress=report,
            )
    aux_text = b.aux.name if b.aux else f"the base's layers 0-{b.aux_prefix - 1}, no file"
    typer.echo(f"wrote bundle {b.folder} (base {b.base.name}, aux {aux_text}, predictor {b.predictor.name})")
    from kvcli.cli.common import measure_spans, run_self_check

    b = measure_spans(b)
    if check:
        run_self_check(b, check_tokens)


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

    from kvcli.cli import ui
    from kvcli.engine.build import import_checkpoint

    start = time.perf_counter()
    with ui.progress_reporter() as report:
        b = import_checkpoint(checkpoint, config, tokenizer, output, outtype=outtype, progress=report)
    size = sum(b.path(role).stat().st_size for role in b.file_roles)
    typer.echo(
        f"wrote bundle {b.folder} (base {b.base.name}, aux {b.aux.name}, predictor "
        f"{b.predictor.name}; {size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s"
    )


def main() -> None:
    run(app)
