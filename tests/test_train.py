"""kvcli train (kvcli[train]): the training forward is kvp's, runs are reproducible and resume."""

import json

import numpy as np
import pytest
from conftest import random_prompt
from typer.testing import CliRunner

from kvcli.bundles.build import build_bundle
from kvcli.engine.bundle import load_bundle
from kvcli.engine.engine import Engine
from kvcli.engine.prefill_types import KvpSettings
from kvcli.llama.runtime import ContextSettings
from kvcli.predict.corpus import corpus_texts
from kvcli.predict.predictor import load_predictor

torch = pytest.importorskip("torch", reason="training needs kvcli[train]")

from kvcli.train.data import training_sequences  # noqa: E402
from kvcli.train.loop import train_bundle  # noqa: E402
from kvcli.train.train import PredictorTrainer, TrainSettings, order_of_sequences  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bundle(tiny_gemma3, tmp_path_factory):
    return build_bundle(tiny_gemma3, tmp_path_factory.mktemp("train") / "b", n_aux_layers=2, n_tokens=600)


def test_training_forward_gives_the_logits_kvp_gives(tiny_bundle):
    """The base over the predicted cache in PyTorch (hidden features, key-norm rescale, exact
    BOS cell, RoPE) is what kvcli's llama.cpp path computes for kvp with a tail: the
    trained matrices are judged on the path they were trained on."""
    settings = ContextSettings(n_ctx=256, type_k="f32", type_v="f32")
    with Engine.from_bundle(tiny_bundle, settings=settings) as engine:
        tokens = random_prompt(100, engine.model.n_vocab, engine.model.bos, low=3)
        kvp = engine.prefill(tokens, mode="kvp", kvp=KvpSettings(tail=7)).logits
        base = engine.prefill(tokens, mode="base").logits
    trainer = PredictorTrainer(
        tiny_bundle.base,
        tiny_bundle.aux_source,
        load_predictor(tiny_bundle.predictor),
        TrainSettings(tokens=100, tail=8),
    )
    with torch.no_grad():
        ours = trainer.losses(tokens)["logits"][-1].numpy()
    scale = np.abs(kvp).max()
    assert np.abs(kvp - base).max() > 0.05 * scale  # the prediction is far from exact here
    assert np.abs(ours - kvp).max() < 5e-3 * scale


def test_runs_are_reproducible_and_resume_where_they_stopped(tiny_bundle, tmp_path):
    settings = TrainSettings(tokens=64, tail=16, lr=1e-3, seed=3)
    torch.set_num_threads(1)

    def weights(folder):
        return load_predictor(load_bundle(folder).predictor).weights

    a = train_bundle(tiny_bundle, tmp_path / "a", settings=settings, steps=3)
    b = train_bundle(tiny_bundle, tmp_path / "b", settings=settings, steps=3)
    train_bundle(tiny_bundle, tmp_path / "c", settings=settings, steps=1)
    c = train_bundle(tiny_bundle, tmp_path / "c", settings=settings, steps=3, resume=True)
    assert a.step == c.step == 3 and c.steps_this_run == 2
    start = load_predictor(tiny_bundle.predictor).weights
    wa, wb, wc = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    for il in start:
        assert not np.array_equal(wa[il], start[il])
        np.testing.assert_array_equal(wa[il], wb[il])
        np.testing.assert_array_equal(wa[il], wc[il])
    assert [r["ce"] for r in a.history] == [r["ce"] for r in b.history]


def test_sequence_order_covers_every_sequence_each_epoch():
    for seed in (0, 1):
        epoch = [order_of_sequences(7, step, seed) for step in range(7)]
        assert sorted(epoch) == list(range(7))
        assert epoch != [order_of_sequences(7, step, seed) for step in range(7, 14)]


def test_training_text_is_disjoint_from_the_evaluations(tiny_gemma3):
    """The default training text is the corpus' calibration part; kvcli eval's continuation
    and bench-ttft's prompts come from its held-out part: no file, and no text, in both."""
    seqs, source = training_sequences(tiny_gemma3, 64, limit=30)
    assert len(seqs) == 30 and source.startswith("python-stdlib-sources")
    names = {name.split("@")[0] for name, _ in seqs}
    assert names <= {name for name, _ in corpus_texts("calibration")}
    heldout = dict(corpus_texts("heldout"))
    assert heldout and not names & set(heldout)
    trained_texts = {text for name, text in corpus_texts("calibration") if name in names}
    assert not trained_texts & set(heldout.values())


def test_cli_trains_writes_a_bundle_and_refuses_to_overwrite_a_checkpoint(tiny_bundle, tmp_path):
    from kvcli.cli.app import _register, app

    _register()
    runner = CliRunner()
    args = [
        "train",
        "--bundle",
        str(tiny_bundle.folder),
        "-o",
        str(tmp_path / "t"),
        "--tokens",
        "64",
        "--tail",
        "16",
        "--threads",
        "1",
    ]
    result = runner.invoke(app, [*args, "--steps", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["step"] == 2 and len(summary["history"]) == 2
    assert load_bundle(tmp_path / "t").predictor.is_file()
    with Engine.from_bundle(load_bundle(tmp_path / "t")) as engine:
        tokens = random_prompt(40, engine.model.n_vocab, engine.model.bos, low=3)
        assert np.isfinite(engine.prefill(tokens, mode="kvp").logits).all()
    again = runner.invoke(app, [*args, "--steps", "2"])
    assert again.exit_code != 0 and "--resume" in str(again.exception)
    resumed = runner.invoke(app, [*args, "--steps", "3", "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["step"] == 3


def test_train_aux_writes_back_an_auxiliary_llama_cpp_runs(tiny_gemma3, tiny_bundle, tmp_path):
    """--train-aux on a strided auxiliary (base layers 0, 2, 3): its layers that are not
    copies of the base's learn, layer 0 (a copy) stays bit for bit, the written GGUF runs in
    llama.cpp as PyTorch runs the trained weights, and kvp runs with the new bundle. A prefix
    auxiliary is refused: training it would change the base."""
    from kvcli.bundles.pack import pack_bundle
    from kvcli.errors import KvcliError
    from kvcli.models.aux_cut import cut_auxiliary, stride_layers
    from kvcli.models.gguf_header import read_tensors
    from kvcli.predict.calibrate import calibrate
    from kvcli.predict.predictor import save_predictor
    from kvcli.train.torch_forward import TorchModel

    aux = cut_auxiliary(tiny_gemma3, tmp_path / "aux.gguf", stride_layers(4, 2))
    pred = save_predictor(calibrate(tiny_gemma3, aux, n_tokens=600), tmp_path / "pred.gguf")
    strided = pack_bundle(tmp_path / "strided", base=tiny_gemma3, aux=aux, predictor=pred)
    settings = TrainSettings(tokens=64, tail=16, lr=1e-2)
    summary = train_bundle(strided, tmp_path / "out", settings=settings, steps=2, train_aux=True, validate=0)
    assert summary.aux_ce_last_10 > 0
    out = load_bundle(tmp_path / "out")
    before, after = read_tensors(aux), read_tensors(out.aux)
    np.testing.assert_array_equal(before["blk.0.attn_q.weight"], after["blk.0.attn_q.weight"])
    assert np.abs(before["blk.1.attn_q.weight"] - after["blk.1.attn_q.weight"]).max() > 1e-3

    settings_f32 = ContextSettings(n_ctx=128, type_k="f32", type_v="f32")
    with Engine(out.aux, settings=settings_f32) as engine:
        tokens = random_prompt(40, engine.model.n_vocab, engine.model.bos, low=3)
        logits = engine.prefill(tokens, mode="base").logits
    with torch.no_grad():
        ours = TorchModel(out.aux).forward(tokens)[0][0].numpy()
    assert np.abs(ours - logits).max() < 2e-3 * np.abs(logits).max()
    with Engine.from_bundle(out) as engine:
        assert np.isfinite(engine.prefill(tokens, mode="kvp").logits).all()

    with pytest.raises(KvcliError, match="exact prefix"):
        train_bundle(tiny_bundle, tmp_path / "no", settings=settings, steps=1, train_aux=True, validate=0)


def test_a_factored_predictor_trains_its_basis_on_kvps_path_and_resumes(tiny_bundle, tmp_path):
    """The factored forward (features, shared basis, per-layer matrices) gives kvcli's
    llama.cpp kvp logits; training moves the basis too, and a resumed run restores it."""
    from kvcli.bundles.build import factor_bundle

    factor_bundle(tiny_bundle, tmp_path / "f", rank=16, n_tokens=600)
    factored = load_bundle(tmp_path / "f")
    start = load_predictor(factored.predictor)
    assert start.factored_layers and start.bases
    settings = ContextSettings(n_ctx=256, type_k="f32", type_v="f32")
    with Engine.from_bundle(factored, settings=settings) as engine:
        tokens = random_prompt(100, engine.model.n_vocab, engine.model.bos, low=3)
        kvp = engine.prefill(tokens, mode="kvp", kvp=KvpSettings(tail=7)).logits
    trainer = PredictorTrainer(factored.base, factored.aux_source, start, TrainSettings(tokens=100, tail=8))
    with torch.no_grad():
        ours = trainer.losses(tokens)["logits"][-1].numpy()
    assert np.abs(ours - kvp).max() < 5e-3 * np.abs(kvp).max()

    torch.set_num_threads(1)
    settings = TrainSettings(tokens=64, tail=16, lr=1e-3, seed=3)
    train_bundle(factored, tmp_path / "a", settings=settings, steps=3)
    train_bundle(factored, tmp_path / "c", settings=settings, steps=1)
    train_bundle(factored, tmp_path / "c", settings=settings, steps=3, resume=True)
    a, c = (load_predictor(load_bundle(tmp_path / x).predictor) for x in "ac")
    for src, basis in start.bases.items():
        assert not np.array_equal(a.bases[src], basis)
        np.testing.assert_array_equal(a.bases[src], c.bases[src])
    assert a.factored_layers == start.factored_layers
