"""Importing apple/corenet's KV-prediction checkpoints (issue 8): the bundle run through
llama.cpp against a numpy reference of corenet's forward, and bad input."""

import json
import pickle

import numpy as np
import pytest
from corenet_fixture import VOCAB_ROWS, write_corenet_kvp
from test_cli import assert_one_line_error, kvcli
from test_convert import convert, ok
from torch_zip import save_torch_zip

from kvcli.bundles.corenet_import import import_checkpoint
from kvcli.engine.bundle import load_bundle
from kvcli.engine.engine import Engine
from kvcli.errors import IncompatibleError
from kvcli.llama.library import prefix_view_supported
from kvcli.llama.runtime import ContextSettings
from kvcli.models.corenet import (
    OPENELM_CONFIGS,
    _general_gpt_fields,
    gpt_shape,
    predictor_matrices,
    read_config,
    split_checkpoint,
)
from kvcli.models.openelm import forward, gguf_tensors, kvp_forward
from kvcli.models.torch_checkpoint import load_checkpoint, state_dict_of

SETTINGS = ContextSettings(n_ctx=128, n_batch=64, n_ubatch=64)


@pytest.fixture(scope="module")
def corenet_files(tmp_path_factory):
    return write_corenet_kvp(tmp_path_factory.mktemp("corenet"))


def test_openelm_layer_wise_scaling_is_corenets():
    """Per-layer heads and FFN widths of OpenELM-270M, as corenet's GPTConfig computes them
    (and as the published HF configs list them)."""
    s = gpt_shape(_general_gpt_fields({"model_name": "OpenELM-270M"}, {"vocab_size": 32128}))
    assert s.n_head == (12,) * 5 + (16,) * 7 + (20,) * 4
    assert s.n_head_kv == tuple(q // 4 for q in s.n_head)
    assert s.n_ff == (
        768,
        1024,
        1280,
        1536,
        1792,
        2048,
        2560,
        2816,
        3072,
        3328,
        3584,
        3840,
        4352,
        4608,
        4864,
        5120,
    )
    assert (s.n_embd, s.head_dim, s.n_vocab) == (1280, 64, 32128)
    big = gpt_shape(_general_gpt_fields({"model_name": "OpenELM-1_1B"}, {}))
    assert big.n_ff[13] == big.n_ff[14] == 4608 and len(OPENELM_CONFIGS) == 4 + 6  # + KVP-LP auxiliaries


def _reference(files):
    cfg = read_config(files["config"])
    parts = split_checkpoint(state_dict_of(load_checkpoint(files["checkpoint"])))
    return (
        cfg,
        gguf_tensors(parts["base"], cfg.base),
        gguf_tensors(parts["auxiliary"], cfg.aux),
        predictor_matrices(parts["predicter"], cfg),
    )


@pytest.mark.parametrize("outtype, tolerance", [("f32", 0.02), ("f16", 0.05)])
def test_imported_bundle_matches_the_numpy_reference(corenet_files, tmp_path, outtype, tolerance):
    """The base alone through llama.cpp's OpenELM matches the numpy forward, and kvp's first
    token (aux prefill, corenet's predictor, base key norm + RoPE, base decode) matches the
    numpy KV-prediction forward; logits are ~12 in magnitude and kvp's differ from the base's
    by ~12, so the tolerance separates a right path from a wrong one."""
    b = import_checkpoint(
        corenet_files["checkpoint"],
        corenet_files["config"],
        corenet_files["tokenizer"],
        tmp_path / "b",
        outtype=outtype,
    )
    cfg, base_w, aux_w, matrices = _reference(corenet_files)
    rng = np.random.default_rng(1)
    with Engine.from_bundle(b, settings=SETTINGS) as engine:
        assert engine.aux_load == "file" and engine.predictor.raw_keys
        for tokens in ([1, *rng.integers(3, 300, 40).tolist()], rng.integers(3, 300, 25).tolist()):
            ref_base = forward(base_w, cfg.base, tokens)[0][-1]
            base = engine.prefill(tokens, mode="base").logits
            assert np.abs(base - ref_base).max() < tolerance
            ref_kvp = kvp_forward(base_w, cfg.base, aux_w, cfg.aux, matrices, cfg.layer_map, tokens)
            kvp = engine.prefill(tokens, mode="kvp").logits
            assert np.abs(kvp - ref_kvp).max() < tolerance
            assert np.abs(ref_kvp - ref_base).max() > 1.0  # the prediction is what is compared


def test_import_through_the_converter_then_generate_and_inspect(corenet_files, tmp_path):
    out = ok(
        convert(
            "import-corenet",
            corenet_files["checkpoint"],
            "--config",
            corenet_files["config"],
            "--tokenizer",
            corenet_files["tokenizer"],
            "-o",
            tmp_path / "b",
            "--outtype",
            "q8_0",
        )
    )
    assert "wrote bundle" in out.stdout
    info = json.loads(ok(kvcli("inspect", tmp_path / "b", "--json", "--verify")).stdout)
    assert info["origin"]["kind"] == "corenet" and info["origin"]["tokenizer_pieces"] == 310
    assert info["predictor"]["key_space"] == "pre_norm_pre_rope"
    assert info["predictor"]["origin"] == "corenet:training_checkpoint_last.pt"
    assert info["base"]["arch"] == "openelm" and info["base"]["n_head"] == [2, 4, 4, 4]
    assert info["base"]["file_type"] == "Q8_0" and all(info["sha256_ok"].values())
    assert "kind=corenet" in ok(kvcli("inspect", tmp_path / "b")).stdout  # the table shows the origin
    gen = json.loads(
        ok(kvcli("generate", "the fox and the dog", "-n", "4", "--json", "--bundle", tmp_path / "b")).stdout
    )
    assert gen["mode"] == "kvp" and gen["n_gen"] == 4
    bench = json.loads(
        ok(
            kvcli(
                "bench-ttft",
                "--bundle",
                tmp_path / "b",
                "-p",
                "32",
                "-r",
                "1",
                "--aux-load",
                "all",
                "--no-memory",
                "--json",
            )
        ).stdout
    )
    assert {r["mode"] for r in bench["rows"]} == {"base", "kvp", "truncate"}
    chat = ok(kvcli("chat", "--bundle", tmp_path / "b", "-n", "3", input="hello fox\n"))
    assert "TTFT" in chat.stderr + chat.stdout
    assert load_bundle(tmp_path / "b").manifest["origin"]["outtype"] == "q8_0"


def _import(files, out):
    return convert(
        "import-corenet",
        files["checkpoint"],
        "--config",
        files["config"],
        "--tokenizer",
        files["tokenizer"],
        "-o",
        out,
        "--outtype",
        "f32",
    )


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_bad_input(corenet_files, tmp_path):
    # a pickle that asks for code
    evil = save_torch_zip(tmp_path / "evil.pt", {}, raw_pickle=pickle.dumps(_Evil(), protocol=2))
    assert_one_line_error(_import({**corenet_files, "checkpoint": evil}, tmp_path / "o1"), "posix.system")
    # a missing tensor
    missing = write_corenet_kvp(tmp_path / "m", drop="base.layers.2.attn.k_norm.weight")
    assert_one_line_error(_import(missing, tmp_path / "o2"), "lacks base.layers.2.attn.k_norm.weight")
    missing = write_corenet_kvp(tmp_path / "p", drop="predicter.auxkv_to_basekv.value_transforms.3.bias")
    assert_one_line_error(_import(missing, tmp_path / "o3"), "lacks predicter.auxkv_to_basekv")
    # a config that does not match the tensors' shapes
    other = write_corenet_kvp(tmp_path / "c")
    other["config"].write_text(other["config"].read_text().replace("model_dim: 64", "model_dim: 96"))
    assert_one_line_error(_import(other, tmp_path / "o4"), "the config says")
    other["config"].write_text("model: {language_modeling: {name: general_gpt}}\n")
    assert_one_line_error(_import(other, tmp_path / "o5"), "not kv_prediction")
    good = corenet_files["config"].read_text()
    for broken in (
        good.replace("num_transformer_layers: 4", "num_transformer_layers: four"),
        good.replace(
            "auxkv_num_layers_to_basekv_num_layers:", "auxkv_num_layers_to_basekv_num_layers: 3\n      other:"
        ),
        "model: [1, 2\n",
        good.replace("head_dim: 16", "head_dim: 0"),
    ):
        other["config"].write_text(broken)
        res = _import(other, tmp_path / "o5")
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith("Error: ")
    # a tokenizer larger than the embedding (another model's)
    from corenet_fixture import train_tokenizer

    big = train_tokenizer(tmp_path / "t", vocab_size=VOCAB_ROWS + 20)
    assert_one_line_error(
        _import({**corenet_files, "tokenizer": big}, tmp_path / "o6"), "not this model's tokenizer"
    )
    assert_one_line_error(
        _import({**corenet_files, "tokenizer": corenet_files["config"]}, tmp_path / "o7"),
        "not a sentencepiece",
    )
    # a plain model, not a KV-prediction one
    plain = save_torch_zip(tmp_path / "plain.pt", {"token_embeddings.weight": np.zeros((4, 4), np.float32)})
    assert_one_line_error(
        _import({**corenet_files, "checkpoint": plain}, tmp_path / "o8"), "unexpected checkpoint entry"
    )
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 9))


def test_kvcli_own_bundle_on_an_imported_openelm_base(corenet_files, tmp_path):
    """kvcli's prefix auxiliary and closed-form fit work on an OpenELM base too; its per-layer
    head counts keep llama.cpp from loading it as k layers, so the auxiliary runs as a view."""
    b = import_checkpoint(
        corenet_files["checkpoint"],
        corenet_files["config"],
        corenet_files["tokenizer"],
        tmp_path / "imported",
        outtype="f32",
    )
    ok(
        convert(
            "bundle",
            "--base",
            b.base,
            "-o",
            tmp_path / "own",
            "--tokens",
            "600",
            "--aux-layers",
            "2",
            "--no-check",
        )
    )
    info = json.loads(ok(kvcli("inspect", tmp_path / "own", "--json")).stdout)
    assert info["aux_load"] == "view" and info["base"]["arch"] == "openelm"
    doctor = json.loads(
        ok(kvcli("doctor", "--bundle", tmp_path / "own", "--prompts", "2", "--json", "--no-quality")).stdout
    )
    assert doctor["ok"] and doctor["checks"][-1]["name"] == "auxiliary as a view (view)"
    if prefix_view_supported():
        with pytest.raises(IncompatibleError, match="per-layer metadata arrays"):
            Engine.from_bundle(load_bundle(tmp_path / "own"), settings=SETTINGS, aux_load="partial")


KVP_LP_YAML = """\
# the model section of apple/corenet projects/kv-prediction/openelm/openelm_1_1B_kvp_lp_0_25.yaml
taskname: '+ OpenELM-1.1B KVP-LP-0.25'
_anchor_context_length: &_anchor_context_length 2048
_anchor_vocab_size: &_anchor_vocab_size 32128
_anchor_padding_index: &_anchor_padding_index 32000
model:
  activation_checkpointing: true
  freeze_modules: ["base.*"]
  language_modeling:
    name: "kv_prediction"
    kv_prediction:
      auxkv_num_layers_to_basekv_num_layers: [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,
                                              4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6]
      base_model:
       - model:
          language_modeling:
            name: "general_gpt"
            pretrained: "https://example.invalid/1.1B/checkpoint_average.pt"
            general_gpt:
              model_name: "OpenELM-1_1B"
      auxiliary_model:
       - model:
          language_modeling:
            name: "layer_pruned_general_gpt"
            pretrained: "https://example.invalid/1.1B/checkpoint_average.pt"
            general_gpt:
              model_name: "OpenELM-1_1B-0.25l"
          rename_scopes_map:
            - ["layers\\\\.4\\\\.", "layers.1."]
    general_gpt:
      model_name: "OpenELM-1_1B"
      vocab_size: *_anchor_vocab_size
      max_context_length: *_anchor_context_length
      padding_index: *_anchor_padding_index
"""


def test_the_papers_kvp_lp_config_reads(tmp_path):
    """A KVP-LP auxiliary is corenet's layer_pruned_general_gpt: layers 0, 4, ..., 24 of the
    1.1B (their own head counts and FFN widths); "-0.50l" equals the even layers."""
    (tmp_path / "lp.yaml").write_text(KVP_LP_YAML)
    cfg = read_config(tmp_path / "lp.yaml")
    full = gpt_shape(_general_gpt_fields({"model_name": "OpenELM-1_1B"}, {}))
    assert cfg.base == gpt_shape(_general_gpt_fields({"model_name": "OpenELM-1_1B"}, {"vocab_size": 32128}))
    assert cfg.aux.n_layer == 7 and cfg.aux.n_vocab == 32128 and cfg.layer_map[-1] == 6
    assert cfg.aux.n_head == tuple(full.n_head[i] for i in range(0, 28, 4))
    assert cfg.aux.n_ff == tuple(full.n_ff[i] for i in range(0, 28, 4))
    half = gpt_shape(_general_gpt_fields({"model_name": "OpenELM-1_1B-0.50l"}, {}))
    assert (half.n_head, half.n_ff) == (full.n_head[::2], full.n_ff[::2])
