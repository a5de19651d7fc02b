"""A small random corenet KV-prediction checkpoint in corenet's exact format: the YAML of
projects/kv-prediction (with the general_gpt fields given inline: layer-wise scaling of heads
and FFN widths), a torch.save zip whose keys are base.*, auxiliary.* and predicter.*, and a
sentencepiece tokenizer.model trained on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch_zip import save_torch_zip

from kvcli.models.corenet import read_config

VOCAB_ROWS = 320  # the embedding's rows: the tokenizer's pieces padded, as OpenELM pads 32000 to 32128
BASE = {
    "num_transformer_layers": 4,
    "model_dim": 64,
    "head_dim": 16,
    "num_gqa_groups": 2,
    "qkv_multipliers": [0.5, 1.0],
    "ffn_multipliers": [0.5, 2.0],
    "ffn_dim_divisor": 16,
    "normalize_qk_projections": True,
    "share_input_output_layers": True,
}
AUX = {
    "num_transformer_layers": 2,
    "model_dim": 48,
    "head_dim": 12,
    "num_gqa_groups": 2,
    "qkv_multipliers": [0.5, 1.0],
    "ffn_multipliers": [1.0, 2.0],
    "ffn_dim_divisor": 16,
    "normalize_qk_projections": True,
    "share_input_output_layers": True,
}
LAYER_MAP = [0, 0, 1, 1]

TEXT = """The quick brown fox jumps over the lazy dog. A tokenizer learns pieces of words from
text like this one, which repeats itself often enough to give it a vocabulary: numbers 0 1 2 3
4 5 6 7 8 9, letters, punctuation, and the words of a short story about a fox and a dog who
meet by a river, talk about the weather, the seasons, the harvest and the long winter nights.
"""


def _yaml(base: dict, aux: dict, layer_map: list[int], vocab_rows: int) -> str:
    import yaml

    doc = {
        "model": {
            "language_modeling": {
                "name": "kv_prediction",
                "kv_prediction": {
                    "auxkv_num_layers_to_basekv_num_layers": layer_map,
                    "base_model": [
                        {"model": {"language_modeling": {"name": "general_gpt", "general_gpt": base}}}
                    ],
                    "auxiliary_model": [
                        {"model": {"language_modeling": {"name": "general_gpt", "general_gpt": aux}}}
                    ],
                },
                "general_gpt": {"vocab_size": vocab_rows, "max_context_length": 512, "padding_index": 310},
            }
        }
    }
    return yaml.safe_dump(doc)


def train_tokenizer(folder: Path, vocab_size: int = 310) -> Path:
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(TEXT * 20)
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return folder / "tokenizer.model"


def _model_state(shape, rng, prefix: str) -> dict[str, np.ndarray]:
    d, hd = shape.n_embd, shape.head_dim

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    state = {f"{prefix}token_embeddings.weight": mat(shape.n_vocab, d) * 4}
    for i in range(shape.n_layer):
        nq, nkv, ff = shape.n_head[i], shape.n_head_kv[i], shape.n_ff[i]
        p = f"{prefix}layers.{i}."
        state.update(
            {  # corenet's construction order
                p + "attn.qkv_proj.weight": mat((nq + 2 * nkv) * hd, d),
                p + "attn.q_norm.weight": norm(hd),
                p + "attn.k_norm.weight": norm(hd),
                p + "attn.out_proj.weight": mat(d, nq * hd),
                p + "ffn.proj_1.weight": mat(2 * ff, d),
                p + "ffn.proj_2.weight": mat(d, ff),
                p + "ffn_norm.weight": norm(d),
                p + "attn_norm.weight": norm(d),
            }
        )
    state[f"{prefix}norm.weight"] = norm(d)
    return state


def write_corenet_kvp(
    folder: Path,
    *,
    seed: int = 0,
    base: dict = BASE,
    aux: dict = AUX,
    layer_map: list[int] = LAYER_MAP,
    training: bool = True,
    drop: str | None = None,
    vocab_rows: int = VOCAB_ROWS,
) -> dict[str, Path]:
    """checkpoint.pt, config.yaml and tokenizer.model in ``folder``. ``training``: wrap the
    state dict as a training_checkpoint (model_state_dict + optimizer state); ``drop``: leave
    that key out."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yaml"
    config.write_text(_yaml(base, aux, layer_map, vocab_rows))
    cfg = read_config(config)
    rng = np.random.default_rng(seed)
    state = {**_model_state(cfg.base, rng, "base."), **_model_state(cfg.aux, rng, "auxiliary.")}
    for i, a in enumerate(cfg.layer_map):
        n_in = cfg.aux.n_head_kv[a] * cfg.aux.head_dim
        n_out = cfg.base.n_head_kv[i] * cfg.base.head_dim
        for kind in ("key_transforms", "value_transforms"):
            p = f"predicter.auxkv_to_basekv.{kind}.{i}."
            state[p + "weight"] = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
            state[p + "bias"] = (0.1 * rng.standard_normal(n_out)).astype(np.float32)
    if drop:
        del state[drop]
    obj = (
        {
            "iterations": 10,
            "epoch": 1,
            "model_state_dict": state,
            "optim_state_dict": {"state": {}, "param_groups": []},
            "best_metric": 0,
            "is_interval_ckpt": False,
        }
        if training
        else state
    )
    checkpoint = save_torch_zip(folder / "training_checkpoint_last.pt", obj)
    return {"checkpoint": checkpoint, "config": config, "tokenizer": train_tokenizer(folder)}
