"""The real-size pair (Qwen2.5-Coder 1.5B Instruct, 0.5B Instruct), when fetched with
tools/fetch_models.py; skipped with a one-line reason otherwise (CI does not fetch it)."""

import numpy as np
import pytest
from test_engine import true_cache_engine

from kvcli.bundles.build import build_bundle
from kvcli.engine.engine import Engine
from kvcli.engine.prefill_types import KvpSettings
from kvcli.eval.quality import base_reference, forced_scores
from kvcli.eval.tasks import make_examples
from kvcli.llama.runtime import ContextSettings

pytestmark = pytest.mark.realsize
SETTINGS = ContextSettings(n_ctx=1024)


@pytest.fixture(scope="module")
def qwen_prefix_bundle(qwen_base, tmp_path_factory):
    """A prefix bundle of the 1.5B with a short calibration (~1 minute here)."""
    return build_bundle(
        qwen_base, tmp_path_factory.mktemp("qwen") / "b", n_aux_layers=7, n_tokens=2048, reference_base=True
    )


def test_kvp_fed_the_true_cache_is_exact_on_qwen(qwen_base, tmp_path):
    """Qwen2's plain (non-iSWA) cache, no BOS at position 0: the state written back is the
    base's own, to the bit."""
    with true_cache_engine(qwen_base, tmp_path) as eng:
        tokens = eng.tokenize("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 8)
        assert tokens[0] != eng.model.bos
        logits = eng.prefill(tokens, mode="kvp", kvp=KvpSettings(tail=3)).logits
        eng.base.clear()
        eng.base.decode(tokens[:-4])
        eng.base.decode(tokens[-4:], start=len(tokens) - 4, logits_last=True)
        np.testing.assert_array_equal(logits, eng.base.last_logits())


def test_qwen_prefix_bundle_continues_text_not_garbage(qwen_prefix_bundle):
    """With position 0 predicted, the base's output was garbage on this pair (KL 13.5 over
    its next tokens); with it exact, kvp's KL is within a few nats of truncation's."""
    with Engine.from_bundle(qwen_prefix_bundle, settings=SETTINGS) as eng:
        (ex,) = make_examples("prose", n=1, n_tokens=400, tokenize=eng.tokenize, seed=3)
        tokens = eng.tokenize(ex.prompt)
        ref, _, _ = base_reference(eng, tokens)
        result = eng.prefill(tokens, mode="kvp", kvp=KvpSettings(tail=0))
        kl, top1 = forced_scores(result.context, result.logits, ref)
        assert kl < 3.0 and top1 > 0.3, (kl, top1)


def test_qwen_chat_template_sinks_are_recomputed(qwen_prefix_bundle):
    """A chat-templated prompt's first newlines are attention sinks with massive residuals;
    predicted, their cells made the base's output garbage (KL 11 over its next tokens)."""
    from kvcli.eval.self_check import check_prompts

    with Engine.from_bundle(qwen_prefix_bundle, settings=SETTINGS) as eng:
        tokens = check_prompts(eng, 400, 1)["conversation"][0]
        ref, _, _ = base_reference(eng, tokens)
        result = eng.prefill(tokens, mode="kvp", kvp=KvpSettings(tail=0))
        assert result.recomputed and result.recomputed[0][0] < 16  # the template's sinks
        kl, _ = forced_scores(result.context, result.logits, ref)
        assert kl < 3.0, kl
