"""apple/corenet's KV-prediction models (projects/kv-prediction) as a kvcli bundle.

corenet's ``KVPredictionLLM`` holds an OpenELM base (``base.*``), an OpenELM auxiliary
(``auxiliary.*``) and ``predicter.auxkv_to_basekv.{key,value}_transforms.{i}``: per base
layer i, a Linear (with bias) from the merged heads of aux layer ``map[i]`` to base layer i.
Its inputs are the auxiliary's raw keys (straight out of ``qkv_proj``: before the key norm and
before RoPE) and raw values; the base applies its own key norm, then RoPE, to predicted keys
(corenet's ``apply_k_norm_before_cache_write=False`` for the auxiliary and
``apply_k_norm_to_past_keys_before_cache_write=True`` for the base).

Model shapes come from the YAML: ``general_gpt.model_name`` names one of corenet's
configurations (the OpenELM table below, from corenet general_gpt.py ``gpt_configs`` and, for
the paper's layer-pruned KVP-LP auxiliaries, kv_prediction.py ``layer_pruned_gpt_configs``),
or the ``general_gpt`` block gives GPTConfig's fields itself (num_transformer_layers,
model_dim, head_dim, num_gqa_groups, qkv_multipliers, ffn_multipliers, ffn_dim_divisor,
select_layers, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcli.errors import KvcliError, ModelFileError
from kvcli.models.openelm import OpenELMShape, make_divisible

# corenet general_gpt.py gpt_configs: the OpenELM entries (the rest are GPTConfig defaults
# or the OpenELM-wide settings below)
OPENELM_CONFIGS = {
    "OpenELM-270M": {"num_transformer_layers": 16, "model_dim": 1280, "head_dim": 64},
    "OpenELM-450M": {"num_transformer_layers": 20, "model_dim": 1536, "head_dim": 64},
    "OpenELM-1_1B": {"num_transformer_layers": 28, "model_dim": 2048, "head_dim": 64},
    "OpenELM-3B": {"num_transformer_layers": 36, "model_dim": 3072, "head_dim": 128},
}
OPENELM_COMMON = {
    "num_gqa_groups": 4,
    "normalize_qk_projections": True,
    "share_input_output_layers": True,
    "ffn_multipliers": (0.5, 4.0),
    "qkv_multipliers": (0.5, 1.0),
}


def _pruned(full: str, n: int, kind: str) -> dict:
    """corenet kv_prediction.py ``layer_pruned_gpt_configs``: the paper's KVP-LP auxiliaries."""
    base = {**OPENELM_COMMON, **OPENELM_CONFIGS[full]}
    if kind == "0.25l":
        return {**base, "select_layers": list(range(0, n, 4))}
    if kind == "0.75l":
        return {**base, "select_layers": [i for i in range(n) if i % 4 != 3]}
    return {
        **base,
        "num_transformer_layers": n // 2,  # 0.50l: its own, shorter linspace
        "ffn_multipliers": (0.5, 4.0 - (1 / (n - 1)) * (4.0 - 0.5)),
        "qkv_multipliers": (0.5, 1.0 - (1 / (n - 1)) * (1.0 - 0.5)),
    }


OPENELM_CONFIGS.update(
    {
        f"{full}-{kind}": _pruned(full, OPENELM_CONFIGS[full]["num_transformer_layers"], kind)
        for full in ("OpenELM-1_1B", "OpenELM-3B")
        for kind in ("0.25l", "0.50l", "0.75l")
    }
)
GPT_DEFAULTS = {
    "vocab_size": 32000,
    "max_context_length": 2048,
    "num_transformer_layers": 12,
    "model_dim": 2048,
    "head_dim": 128,
    "qkv_multipliers": 1.0,
    "num_gqa_groups": 1,
    "ffn_multipliers": 4.0,
    "ffn_dim_divisor": 256,
    "normalize_qk_projections": False,
    "share_input_output_layers": False,
    "rope_freq_constant": 10000,
}
SUPPORTED_FIELDS = set(GPT_DEFAULTS) | {
    "ffn_with_glu",
    "activation_fn_name",
    "select_layers",
    "normalization_layer_name",
    "rope_max_length",
}


class CorenetError(KvcliError):
    """A corenet checkpoint, config or tokenizer kvcli cannot import."""


def _per_layer(value, n: int) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return [round(float(v), 2) for v in np.linspace(float(value[0]), float(value[1]), num=n)]
    raise CorenetError(f"a multiplier must be a number or a pair, not {value!r}")


def gpt_shape(fields: dict) -> OpenELMShape:
    """corenet's GPTConfig.__post_init__ (layer-wise scaling) for these fields."""
    unknown = set(fields) - SUPPORTED_FIELDS - {"model_name"}
    if unknown:
        raise CorenetError(f"unknown general_gpt fields: {', '.join(sorted(unknown))}")
    cfg = {**GPT_DEFAULTS, **fields}
    for key, want in (
        ("ffn_with_glu", True),
        ("activation_fn_name", "swish"),
        ("normalization_layer_name", "rms_norm"),
        ("normalize_qk_projections", True),
        ("share_input_output_layers", True),
    ):
        if cfg.get(key, want) != want:
            raise CorenetError(f"general_gpt {key} = {cfg[key]!r} is not supported (OpenELM: {want!r})")
    n, d, hd, groups, divisor = (
        int(cfg[k])
        for k in ("num_transformer_layers", "model_dim", "head_dim", "num_gqa_groups", "ffn_dim_divisor")
    )
    if min(n, d, hd, groups, divisor, int(cfg["vocab_size"])) < 1:
        raise CorenetError(
            "num_transformer_layers, model_dim, head_dim, num_gqa_groups, "
            "ffn_dim_divisor and vocab_size must be positive integers"
        )
    q_heads = [make_divisible(d * m, hd * groups) // hd for m in _per_layer(cfg["qkv_multipliers"], n)]
    ffn = [make_divisible(m * d, divisor) for m in _per_layer(cfg["ffn_multipliers"], n)]
    if min(q_heads) < 1 or min(ffn) < 1:
        raise CorenetError("the multipliers give a layer with no heads or no FFN width")
    select = cfg.get("select_layers")
    if select is not None:  # a layer-pruned model: these layers of the full one
        if not select or not all(0 <= int(i) < n for i in select):
            raise CorenetError(f"select_layers {select!r} must lie in 0..{n - 1}")
        q_heads, ffn = [q_heads[int(i)] for i in select], [ffn[int(i)] for i in select]
    return OpenELMShape(
        n_embd=d,
        head_dim=hd,
        n_head=tuple(q_heads),
        n_head_kv=tuple(q // groups for q in q_heads),
        n_ff=tuple(ffn),
        n_vocab=int(cfg["vocab_size"]),
        rope_freq_base=float(cfg["rope_freq_constant"]),
        context_length=int(cfg["max_context_length"]),
    )


def _general_gpt_fields(block: dict, shared: dict) -> dict:
    fields = {**shared, **(block or {})}
    name = fields.get("model_name")
    if name is not None:
        if name not in OPENELM_CONFIGS:
            raise CorenetError(
                f"model_name {name!r} is not one kvcli knows (one of "
                f"{', '.join(OPENELM_CONFIGS)}); give the general_gpt fields instead"
            )
        given = {k: v for k, v in fields.items() if k in ("vocab_size", "max_context_length")}
        fields = {**OPENELM_COMMON, **OPENELM_CONFIGS[name], **given}
    fields.pop("padding_index", None)
    return fields


@dataclass(frozen=True)
class KVPConfig:
    base: OpenELMShape
    aux: OpenELMShape
    layer_map: tuple[int, ...]  # per base layer: the aux layer that predicts it
    base_name: str
    aux_name: str


def _dig(d: dict, *keys, what: str):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            raise CorenetError(f"the config lacks {'.'.join(keys)} ({what})")
        d = d[k]
    return d


def read_config(path: str | Path) -> KVPConfig:
    """The base, auxiliary and layer map of a corenet kv_prediction YAML."""
    try:
        return _read_config(path)
    except CorenetError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ArithmeticError) as exc:
        raise CorenetError(
            f"the config {path} has a value of the wrong kind ({type(exc).__name__}: {exc})"
        ) from None


def _read_config(path: str | Path) -> KVPConfig:
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CorenetError(f"cannot read the config {path}: {' '.join(str(exc).split())}") from None
    lm = _dig(doc, "model", "language_modeling", what="a corenet model config")
    if lm.get("name") != "kv_prediction":
        raise CorenetError(f"the config's model is {lm.get('name')!r}, not kv_prediction: {path}")
    kvp = _dig(lm, "kv_prediction", what="the KV-prediction settings")
    shared = {k: v for k, v in (lm.get("general_gpt") or {}).items() if k != "model_name"}
    shapes, names = {}, {}
    for role, key in (("base", "base_model"), ("aux", "auxiliary_model")):
        entry = kvp.get(key)
        if isinstance(entry, list) and len(entry) == 1:
            entry = entry[0]
        sub = _dig(entry or {}, "model", "language_modeling", what=f"the {role} model")
        if sub.get("name", "general_gpt") not in ("general_gpt", "layer_pruned_general_gpt"):
            raise CorenetError(
                f"the {role} model is {sub.get('name')!r}; kvcli imports general_gpt "
                "and layer_pruned_general_gpt (OpenELM) models"
            )
        fields = _general_gpt_fields(sub.get("general_gpt") or {}, shared)
        shapes[role], names[role] = gpt_shape(fields), str(fields.get("model_name", "general_gpt"))
    layer_map = tuple(
        int(x) for x in _dig(kvp, "auxkv_num_layers_to_basekv_num_layers", what="the layer map")
    )
    if len(layer_map) != shapes["base"].n_layer or not all(0 <= a < shapes["aux"].n_layer for a in layer_map):
        raise CorenetError(
            f"auxkv_num_layers_to_basekv_num_layers needs {shapes['base'].n_layer} "
            f"entries in 0..{shapes['aux'].n_layer - 1}, not {list(layer_map)}"
        )
    return KVPConfig(
        base=shapes["base"],
        aux=shapes["aux"],
        layer_map=layer_map,
        base_name=names["base"],
        aux_name=names["aux"],
    )


def split_checkpoint(state: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """``base.``, ``auxiliary.`` and ``predicter.`` entries, each without its prefix."""
    parts: dict[str, dict[str, np.ndarray]] = {"base": {}, "auxiliary": {}, "predicter": {}}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head not in parts:
            raise CorenetError(
                f"unexpected checkpoint entry {key!r} (a KV-prediction checkpoint "
                "holds base.*, auxiliary.* and predicter.*)"
            )
        parts[head][rest] = value
    for head, entries in parts.items():
        if not entries:
            raise CorenetError(f"the checkpoint has no {head}.* entries: not a KV-prediction model")
    return parts


def predictor_matrices(
    pred: dict[str, np.ndarray], cfg: KVPConfig
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per base layer i: (Wk, bk, Wv, bv), checked against the config's shapes."""
    out = {}
    for i, a in enumerate(cfg.layer_map):
        n_in = cfg.aux.n_head_kv[a] * cfg.aux.head_dim
        n_out = cfg.base.n_head_kv[i] * cfg.base.head_dim
        mats = []
        for kind in ("key_transforms", "value_transforms"):
            for part, shape in (("weight", (n_out, n_in)), ("bias", (n_out,))):
                name = f"auxkv_to_basekv.{kind}.{i}.{part}"
                if name not in pred:
                    raise CorenetError(f"the checkpoint lacks predicter.{name}")
                if tuple(pred[name].shape) != shape:
                    raise CorenetError(
                        f"predicter.{name} has shape {tuple(pred[name].shape)}, the config says {shape}"
                    )
                mats.append(pred[name].astype(np.float32))
        out[i] = tuple(mats)
    extra = set(pred) - {
        f"auxkv_to_basekv.{k}.{i}.{p}"
        for i in range(cfg.base.n_layer)
        for k in ("key_transforms", "value_transforms")
        for p in ("weight", "bias")
    }
    if extra:
        raise CorenetError(f"unexpected predictor entries: predicter.{sorted(extra)[0]}")
    return out


def check_model_keys(state: dict[str, np.ndarray], prefix: str, shape: OpenELMShape) -> None:
    """Every key of an OpenELM of ``shape`` is there (shapes are checked as they are read)
    and nothing else."""
    expected = {"token_embeddings.weight", "norm.weight"}
    for i in range(shape.n_layer):
        expected |= {
            f"layers.{i}.{k}.weight"
            for k in (
                "attn.qkv_proj",
                "attn.q_norm",
                "attn.k_norm",
                "attn.out_proj",
                "ffn.proj_1",
                "ffn.proj_2",
                "ffn_norm",
                "attn_norm",
            )
        }
    missing, extra = expected - set(state), set(state) - expected
    if missing:
        raise ModelFileError(
            f"the checkpoint lacks {prefix}{sorted(missing)[0]}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    if extra:
        raise ModelFileError(
            f"the checkpoint has {prefix}{sorted(extra)[0]}, which the config's "
            f"{shape.n_layer}-layer model does not"
        )
