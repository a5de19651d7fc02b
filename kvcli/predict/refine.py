"""Refine a bundle's predictor layer by layer against the base's attention output.

One calibration run (kvcli.predict.calibration_run) prefills the calibration prompts through
the base and the auxiliary, capturing besides the caches the base's own queries of every
predicted layer (before RoPE). Each predicted layer is then trained on its own from its
closed-form fit (kvcli.predict.attention_fit): no step runs the base. A factored layer
trains its per-layer matrix over the shared basis, which stays as it is; a layer computed
from the base's own weights (kvcli.predict.exact_layer) is left alone. Every fifth prompt is
held out: a layer keeps the weights with the lowest held-out error, the fit it started from
if training never beat it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from kvcli.errors import KvcliError
from kvcli.models.gguf_header import read_tensors
from kvcli.models.model_info import ModelInfo, key_norm_weights
from kvcli.predict.attention_fit import LayerAttention, Sample, layer_attention, train_layer
from kvcli.predict.calibration_run import DEFAULT_TOKENS, CalibrationRun
from kvcli.predict.corpus import CalibrationText
from kvcli.predict.plan import make_plan
from kvcli.predict.predictor import Predictor

DEFAULT_STEPS = 150
DEFAULT_LR = 3e-4


@dataclasses.dataclass(frozen=True)
class LayerRefinement:
    layer: int
    before: float  # held-out relative error of the attention output, the closed-form fit
    after: float  # ... the weights kept


@dataclasses.dataclass(frozen=True)
class RefineResult:
    predictor: Predictor
    layers: list[LayerRefinement]
    steps: int
    calibration_tokens: int
    source: str

    def to_json(self) -> dict:
        return {
            "layers": [dataclasses.asdict(r) for r in self.layers],
            "steps": self.steps,
            "calibration_tokens": self.calibration_tokens,
            "source": self.source,
        }


class BaseQueries:
    """The base's queries of some layers, before RoPE, from tensors its graph names.

    Gemma 3 names them after their norm (``Qcur_normed-L``). Llama and Qwen 2 name several
    tensors ``Qcur-L`` (before and after the bias, after RoPE), so their queries are computed
    from the attention norm's output (``attn_norm-L``) with the layer's own Q projection
    (dequantized, bias added)."""

    def __init__(self, base: ModelInfo, layers: list[int]):
        self.base = base
        self.projections: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if base.arch == "gemma3":
            self.names = {il: f"Qcur_normed-{il}" for il in layers}
        elif base.arch in ("qwen2", "llama"):
            self.names = {il: f"attn_norm-{il}" for il in layers}
            wanted = {f"blk.{il}.attn_q.{part}" for il in layers for part in ("weight", "bias")}
            tensors = read_tensors(base.path, wanted)
            for il in layers:
                w = tensors[f"blk.{il}.attn_q.weight"]  # (n_head * head_dim, n_embd)
                b = tensors.get(f"blk.{il}.attn_q.bias", np.zeros(len(w), np.float32))
                self.projections[il] = (np.ascontiguousarray(w.T), b)
        else:
            raise KvcliError(
                f"refining needs the base's queries before RoPE, which kvcli reads from gemma3, "
                f"qwen2 and llama models, not {base.arch}"
            )

    def of(self, rows: dict[str, np.ndarray], layer: int, n: int) -> np.ndarray:
        """(n, n_head, head_dim) float16 (the largest part of a sample: kept in half)."""
        x = rows[self.names[layer]]
        if layer in self.projections:
            w, b = self.projections[layer]
            x = x @ w + b
        return x.reshape(n, self.base.n_head[layer], self.base.head_dim_k).astype(np.float16)


def trainable_layers(pred: Predictor) -> list[int]:
    """The predicted layers that are fits (a computed layer's penalties are recorded as 0)."""
    alphas = dict(zip(pred.predicted_layers, zip(pred.alphas[0::2], pred.alphas[1::2])))
    return [il for il in pred.predicted_layers if alphas.get(il) != (0.0, 0.0)]


def collect_samples(
    base: ModelInfo, aux: ModelInfo, pred: Predictor, layers: list[int], progress=None, **run_options
) -> tuple[dict[int, list[Sample]], dict[int, list[Sample]], int, str]:
    """Per layer, the (train, held-out) samples of one calibration run; the tokens; the source."""
    plan = make_plan(base, aux, layer_map=pred.layer_map, hidden=pred.hidden_kinds or False)
    if plan.copied_layers != pred.copied_layers or plan.feature_kinds != pred.feature_kinds:
        raise KvcliError("the calibration's layers or features differ from the predictor's")
    queries = BaseQueries(base, layers)
    run = CalibrationRun(base, aux, plan, base_tensors=tuple(queries.names.values()), **run_options)
    train: dict[int, list[Sample]] = {il: [] for il in layers}
    held: dict[int, list[Sample]] = {il: [] for il in layers}
    n_tokens = 0
    for prompt in run.prompts(progress):
        n = len(prompt.tokens)
        n_tokens += n
        inputs = {}  # per source: its features, or their columns in the basis (shared by its layers)
        for il in layers:
            src = pred.layer_map[il]
            key = (src, il in pred.factored_layers)
            if key not in inputs:
                x = prompt.features[src]
                inputs[key] = np.ascontiguousarray(x @ pred.bases[src] if key[1] else x, np.float32)
            k, v = prompt.base_kv[il]
            q = queries.of(prompt.base_rows, il, n)
            sample = Sample(inputs[key], np.asarray(k, np.float32), np.asarray(v, np.float32), q)
            (held if prompt.heldout else train)[il].append(sample)
    return train, held, n_tokens, run.source


def refine_predictor(
    base: ModelInfo,
    aux: ModelInfo,
    pred: Predictor,
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    n_tokens: int | None = None,
    corpus=None,
    text: CalibrationText = CalibrationText.MIXED,
    settings=None,
    progress: Callable[[str, int, int], None] | None = None,
) -> RefineResult:
    """``pred`` with each trainable layer trained ``steps`` steps against the base's attention."""
    if pred.origin or pred.raw_keys:
        raise KvcliError(f"kvcli refines its own fits, not a predictor {pred.origin or 'fed raw keys'}")
    if steps < 1:
        raise KvcliError(f"--steps must be at least 1, not {steps}")
    layers = trainable_layers(pred)
    train, held, n_seen, source = collect_samples(
        base,
        aux,
        pred,
        layers,
        progress=(lambda i, n: progress("calibrate", i, n)) if progress else None,
        n_tokens=n_tokens or DEFAULT_TOKENS,
        corpus=corpus,
        text=text,
        settings=settings,
    )
    norms = key_norm_weights(base)
    weights, biases, report = dict(pred.weights), dict(pred.biases), []
    total = steps * len(layers)
    for j, il in enumerate(layers):
        attention: LayerAttention = layer_attention(base, il, norms)
        fit = train_layer(
            train[il],
            held[il],
            pred.weights[il],
            pred.biases[il],
            attention,
            steps=steps,
            lr=lr,
            seed=il,
            progress=(lambda i, n, j=j: progress("refine", j * steps + i, total)) if progress else None,
        )
        weights[il], biases[il] = fit.weight, fit.bias
        report.append(LayerRefinement(il, round(fit.before, 4), round(fit.after, 4)))
        del train[il], held[il]  # free this layer's queries
    refined = dataclasses.replace(pred, weights=weights, biases=biases)
    return RefineResult(refined, report, steps, n_seen, source)
