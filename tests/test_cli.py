"""The command line: one-line errors with a non-zero exit, JSON output, the batch mode."""

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from test_predictor import small_predictor

from kvcli.engine.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, MANIFEST
from kvcli.engine.recompute import DEFAULT_SPANS, DEFAULT_SPANS_TAIL
from kvcli.llama.library import prefix_view_supported
from kvcli.predict.predictor import save_predictor


def kvcli(*args, input=None, env=None):
    """``env``: variables set on top of this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "kvcli.cli.app", *map(str, args)],
        input=input,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env} if env else None,
    )


def assert_one_line_error(res, pattern):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: ") and pattern in lines[-1], res.stderr


def test_missing_non_gguf_and_truncated_files(tmp_path, tiny_llama):
    assert_one_line_error(
        kvcli("generate", "hi", "--mode", "base", "--model", tmp_path / "no.gguf"), "not found"
    )
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"hello world, not a model")
    assert_one_line_error(kvcli("generate", "hi", "--mode", "base", "--model", junk), "not a GGUF")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_llama.read_bytes()[: tiny_llama.stat().st_size // 2])
    assert_one_line_error(kvcli("generate", "hi", "--mode", "base", "--model", cut), "truncated")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(path, "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert_one_line_error(
        kvcli("generate", "hi", "--mode", "base", "--model", path), "architecture 'mamba' is not supported"
    )


def test_prompt_longer_than_the_context(tiny_llama):
    assert_one_line_error(
        kvcli("generate", "the cat " * 200, "--mode", "base", "--model", tiny_llama, "--ctx", "64"),
        "context holds 64",
    )


def tiny_kvcli_bundle(folder, base, aux, predictor):
    """A hand-written manifest: kvcli's own packer refuses files that do not fit together."""
    folder.mkdir(exist_ok=True)
    manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION}
    for role, path in (("base", base), ("aux", aux), ("predictor", predictor)):
        manifest[role] = {"path": str(path), "size": path.stat().st_size, "sha256": ""}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_predictor_for_other_models_and_mismatched_tokenizer(tmp_path, tiny_llama):
    from tiny_gguf import write_tiny_llama

    aux = write_tiny_llama(tmp_path / "aux.gguf", n_layer=1)
    pred = save_predictor(small_predictor(), tmp_path / "pred.gguf")
    bundle = tiny_kvcli_bundle(tmp_path / "b1", tiny_llama, aux, pred)
    assert_one_line_error(kvcli("generate", "the cat", "--bundle", bundle), "fit for base")
    other = write_tiny_llama(tmp_path / "other.gguf", n_layer=1, vocab="other")
    bundle = tiny_kvcli_bundle(tmp_path / "b2", tiny_llama, other, pred)
    assert_one_line_error(kvcli("generate", "the cat", "--bundle", bundle), "tokenizer differs")


def test_quantized_kv_type_is_refused_for_kvp(tiny_llama):
    assert_one_line_error(kvcli("generate", "the cat", "--cache-type-k", "q8_0"), "quantized")


def test_json_and_batch_on_the_embedded_bundle(gemma_bundle, tmp_path):
    res = kvcli("generate", "def fibonacci(n):", "-n", "8", "--json", "--bundle", gemma_bundle.folder)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["mode"] == "kvp" and out["n_prompt"] > 1 and out["ttft_ms"] > 0
    assert set(out["breakdown"]) == {
        "aux_prefill_ms",
        "state_get_ms",
        "predict_ms",
        "state_set_ms",
        "recompute_ms",
        "base_decode_ms",
    }
    assert (out["tail"], out["spans"]) == (DEFAULT_SPANS_TAIL, DEFAULT_SPANS)  # where spans can be chosen
    assert len(out["tokens"]) == out["n_gen"] <= 8 and isinstance(out["text"], str)

    batch = tmp_path / "prompts.jsonl"
    batch.write_text(
        '{"id": "a", "prompt": "Monday, Tuesday,"}\n{"id": 7, "prompt": "1, 2, 3,", "mode": "base"}\n'
    )
    res = kvcli("generate", "--batch", batch, "-n", "3", "--bundle", gemma_bundle.folder)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["id"], r["mode"]) for r in rows] == [("a", "kvp"), (7, "base")]


@pytest.mark.parametrize(
    "args", [["--help"], ["generate", "--help"], ["doctor", "--help"], ["train", "--help"]]
)
def test_help(args):
    res = kvcli(*args)
    assert res.returncode == 0 and "Usage" in res.stdout


def test_doctor_json_on_a_tiny_model(tiny_gemma3):
    res = kvcli("doctor", "--model", tiny_gemma3, "--prompts", "3", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and [c["ok"] for c in report["checks"]] == [True, True, True]


def test_stock_build_notice(tiny_llama, tmp_path):
    """On a llama-cpp-python without kvcli's patch, kvp says in one line that the prefix
    auxiliary runs as the eval-callback view (simulated: the patch check says no)."""
    from kvcli.bundles.build import build_bundle

    b = build_bundle(tiny_llama, tmp_path / "b", n_aux_layers=2, n_tokens=600)
    code = (
        # the patch check reads the version: a stock build's says no patch, everywhere
        "import sys, kvcli.llama.library as lib; lib.llama_cpp_version = lambda: '0.3.36'; "
        "from kvcli.cli.app import main; "
        f"sys.argv = ['kvcli', 'generate', 'the cat', '-n', '2', '--bundle', {str(b.folder)!r}]; main()"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "tools/install.py" in notes[0]
    if prefix_view_supported():  # with the patch: partial, and no note
        plain = kvcli("generate", "the cat", "-n", "2", "--bundle", b.folder)
        assert plain.returncode == 0 and "note:" not in plain.stderr


def test_train_without_pytorch_says_how_to_get_it(tmp_path):
    """PyTorch is an optional extra (absent in CI): kvcli train says so in one line
    (simulated here by hiding torch from the import system)."""
    code = (
        "import sys; sys.modules['torch'] = None; from kvcli.cli.app import main; "
        f"sys.argv = ['kvcli', 'train', '-o', {str(tmp_path / 'out')!r}]; main()"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert_one_line_error(res, "kvcli[train]")
    assert not (tmp_path / "out").exists()
