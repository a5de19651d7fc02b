"""A kvcli bundle from apple/corenet's KV-prediction checkpoint (``kvcli convert import-corenet``):
the base and the auxiliary written as OpenELM GGUFs, the predictor from its per-layer Linears."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvcli import keys
from kvcli.atomic import building_folder
from kvcli.bundles.pack import write_manifest
from kvcli.engine.bundle import load_bundle, sha256_file
from kvcli.models.corenet import (
    CorenetError,
    KVPConfig,
    check_model_keys,
    predictor_matrices,
    read_config,
    split_checkpoint,
)
from kvcli.models.model_info import read_model_info
from kvcli.models.openelm import SentencePieceVocab, gguf_tensors, write_gguf
from kvcli.models.torch_checkpoint import load_checkpoint, state_dict_of
from kvcli.predict.predictor import Predictor, save_predictor

OUTTYPES = ("f32", "f16", "q8_0", "q4_k_m")


def import_checkpoint(
    checkpoint: str | Path,
    config: str | Path,
    tokenizer: str | Path,
    output: str | Path,
    *,
    outtype: str = "f16",
    progress=None,
):
    """A kvcli bundle from a corenet KV-prediction checkpoint: the base and the auxiliary as
    OpenELM GGUFs llama.cpp loads, the predictor (keys predicted before the base's key norm,
    from the auxiliary's raw keys) and a manifest naming the checkpoint as the origin."""
    if outtype not in OUTTYPES:
        raise CorenetError(f"unknown --outtype {outtype!r} (one of {', '.join(OUTTYPES)})")
    report = progress or (lambda stage, done, total: None)
    checkpoint = Path(checkpoint)
    cfg = read_config(config)
    report("read checkpoint", 0, 1)
    parts = split_checkpoint(state_dict_of(load_checkpoint(checkpoint), checkpoint))
    report("read checkpoint", 1, 1)
    for role, shape in (("base", cfg.base), ("auxiliary", cfg.aux)):
        check_model_keys(parts[role], f"{role}.", shape)
    if cfg.aux.n_vocab != cfg.base.n_vocab:
        raise CorenetError(
            f"the auxiliary's vocabulary ({cfg.aux.n_vocab}) differs from the base's ({cfg.base.n_vocab})"
        )
    tensors = {
        role: gguf_tensors(parts[role], shape, prefix="")
        for role, shape in (("base", cfg.base), ("auxiliary", cfg.aux))
    }
    matrices = predictor_matrices(parts["predicter"], cfg)
    vocab = SentencePieceVocab.from_file(tokenizer, cfg.base.n_vocab)
    origin = f"corenet:{checkpoint.name}"
    with building_folder(Path(output)) as work:
        files = {}
        for i, (role, shape, name) in enumerate(
            (("base", cfg.base, cfg.base_name), ("auxiliary", cfg.aux, cfg.aux_name))
        ):
            report("write models", i, 2)
            stem = "base" if role == "base" else "aux"
            write_type = outtype if outtype in ("f32", "f16") else "f16"
            path = write_gguf(
                work / f"{stem}-{write_type}.gguf",
                shape,
                tensors[role],
                vocab,
                name=f"{name} ({origin})",
                outtype=write_type,
                extra={keys.MODEL_ORIGIN: origin},
            )
            if write_type != outtype:
                from kvcli.llama.quantize import quantize_model

                quantized = quantize_model(path, work / f"{stem}-{outtype}.gguf", outtype)
                path.unlink()
                path = quantized
            files["base" if role == "base" else "aux"] = Path(path.name)
        report("write models", 2, 2)
        base_info = read_model_info(work / files["base"])
        aux_info = read_model_info(work / files["aux"])
        pred = corenet_predictor(matrices, cfg, base_info.fingerprint, aux_info.fingerprint, origin)
        files["predictor"] = Path(save_predictor(pred, work / "predictor.gguf", "f32").name)
        write_manifest(
            work,
            files,
            {
                keys.MANIFEST_ORIGIN: {
                    "kind": "corenet",
                    "checkpoint": checkpoint.name,
                    "checkpoint_sha256": sha256_file(checkpoint),
                    "config": Path(config).name,
                    "base_model": cfg.base_name,
                    "aux_model": cfg.aux_name,
                    "tokenizer_pieces": vocab.n_pieces,
                    "outtype": outtype,
                }
            },
        )
    return load_bundle(output)


def corenet_predictor(matrices, cfg: KVPConfig, base_fingerprint: str, aux_fingerprint: str, origin: str):
    """kvcli's Predictor for corenet's per-layer key and value Linears: one block-diagonal
    matrix per base layer over [raw aux keys, aux values] -> [pre-norm keys, values]."""
    weights, biases, k_widths = {}, {}, {}
    for il, (wk, bk, wv, bv) in matrices.items():
        w = np.zeros((wk.shape[1] + wv.shape[1], wk.shape[0] + wv.shape[0]), np.float32)
        w[: wk.shape[1], : wk.shape[0]] = wk.T
        w[wk.shape[1] :, wk.shape[0] :] = wv.T
        weights[il], biases[il], k_widths[il] = w, np.concatenate([bk, bv]), wk.shape[0]
    return Predictor(
        base_fingerprint=base_fingerprint,
        aux_fingerprint=aux_fingerprint,
        base_n_layer=cfg.base.n_layer,
        aux_n_layer=cfg.aux.n_layer,
        copied_layers=[],
        layer_map=list(cfg.layer_map),
        weights=weights,
        biases=biases,
        k_widths=k_widths,
        feature_kinds=(keys.FEATURE_AUX_K_RAW, keys.FEATURE_AUX_V),
        key_space=keys.KEY_SPACE_PRE_NORM,
        origin=origin,
    )
