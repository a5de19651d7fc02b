"""Where kvp starts to pay (kvcli.eval.break_even), and the base's prefill below it in
generate and chat."""

import json

import numpy as np
import pytest
from test_cli import kvcli

from kvcli.bundles.pack import write_manifest
from kvcli.engine.conversation import Conversation
from kvcli.engine.engine import Engine, kvp_from_tokens
from kvcli.engine.generation import generate
from kvcli.eval.break_even import crossing, measure_break_even
from kvcli.llama.runtime import ContextSettings


def test_crossing():
    assert crossing({256: 0.9, 512: 0.6, 1024: 0.4, 2048: 0.3}) == 768  # 0.6 -> 0.4: halfway
    assert crossing({256: 0.45, 512: 0.4}) == 256  # all pay
    assert crossing({256: 0.9, 512: 0.7}) is None  # none pays
    assert crossing({256: 0.4, 512: 0.6, 1024: 0.4}) == 768  # the last crossing counts
    assert crossing({}) is None


def test_kvp_prefills_from_the_break_even_or_past_the_lengths_it_never_paid_on():
    assert kvp_from_tokens({"min_tokens": 738, "ttft_ratio": {"256": 0.9, "1024": 0.45}}) == 738
    assert kvp_from_tokens({"min_tokens": None, "ttft_ratio": {"256": 1.3, "2048": 0.6}}) == 2049
    assert kvp_from_tokens(None) == 0 and kvp_from_tokens({"min_tokens": None, "ttft_ratio": {}}) == 0


def test_measure_on_the_embedded_bundle(gemma_bundle):
    with Engine.from_bundle(gemma_bundle, settings=ContextSettings(n_ctx=1024)) as eng:
        entry = measure_break_even(eng, lengths=(128, 512, 2048))  # 2048 does not fit: left out
    ratios = {int(n): r for n, r in entry["ttft_ratio"].items()}
    assert sorted(ratios) == [128, 512] and all(r > 0 for r in ratios.values())  # exactly the lengths asked
    assert entry["min_tokens"] == crossing(ratios) and entry["kvp_settings"]["tail"] >= 0


def test_under_the_break_even_the_base_prefills(gemma_bundle):
    settings = ContextSettings(n_ctx=512)
    with Engine.from_bundle(gemma_bundle, settings=settings, kvp_min_tokens=10_000) as eng:
        tokens = eng.tokenize("The quick brown fox jumps over the lazy dog. " * 8)
        gen = generate(eng, tokens, mode="kvp", n_predict=2, kvp=eng.kvp_settings())
        assert gen.prefilled_by == "base" and gen.mode == "kvp" and gen.timings.predict_ms == 0
        base_logits = eng.prefill(tokens, mode="base").logits
        np.testing.assert_array_equal(gen.first_logits, base_logits)
        conv = Conversation(eng, mode="kvp", n_predict=2)
        _, stats = conv.send("Say hello to the reader of this text. " * 16)
        assert stats.n_predicted == 0 and stats.n_new > 100
    with Engine.from_bundle(gemma_bundle, settings=settings, kvp_min_tokens=16) as eng:
        gen = generate(eng, tokens, mode="kvp", n_predict=2, kvp=eng.kvp_settings())
        assert gen.prefilled_by == "kvp" and gen.timings.predict_ms > 0
        conv = Conversation(eng, mode="kvp", n_predict=2)
        _, stats = conv.send("Say hello to the reader of this text. " * 16)
        assert stats.n_predicted > 0


@pytest.mark.parametrize(
    "min_tokens,ratios,by",
    [
        (10_000, {}, "base"),
        (8, {}, "kvp"),
        # kvp never paid on the lengths measured: the base prefills up to the longest of them
        (None, {"64": 0.9, "256": 0.8}, "base"),
        (None, {"16": 0.9, "32": 0.8}, "kvp"),
    ],
)
def test_generate_json_says_who_prefilled(gemma_bundle, tmp_path, min_tokens, ratios, by):
    folder = tmp_path / "bundle"
    folder.mkdir()
    files = {"base": gemma_bundle.base.resolve(), "aux": gemma_bundle.aux_source}
    files["predictor"] = gemma_bundle.predictor.resolve()
    write_manifest(
        folder, files, {"break_even": {"min_tokens": min_tokens, "pays_ratio": 0.5, "ttft_ratio": ratios}}
    )
    prompt = "The quick brown fox jumps over the lazy dog. " * 8  # longer than kvp's tail
    res = kvcli("generate", prompt, "-n", "2", "--json", "--bundle", folder)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["mode"] == "kvp" and out["prefilled_by"] == by
    assert (out["breakdown"]["predict_ms"] > 0) == (by == "kvp")
