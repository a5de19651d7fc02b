"""tools/convert_gguf.py: each subcommand on tiny fixtures, bundles end to end, bad input."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, kvcli
from tiny_gguf import write_tiny_llama

from kvcli.engine.generation import generate
from kvcli.llama.library import prefix_view_supported
from kvcli.models.model_info import read_model_info

CONVERT = Path(__file__).parent.parent / "tools" / "convert_gguf.py"
FAST = ("--tokens", "600", "--chunk", "64")


def convert(*args, timeout=600):
    return subprocess.run(
        [sys.executable, str(CONVERT), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def ok(res):
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    return res


def inspect_json(path):
    return json.loads(ok(kvcli("inspect", path, "--json")).stdout)


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """Another model of tiny_llama's tokenizer with every dimension different (KVP-C)."""
    return write_tiny_llama(
        tmp_path_factory.mktemp("kvpc") / "small.gguf",
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_head_kv=1,
        head_dim=8,
        n_ff=64,
        seed=7,
    )


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (("--layers", "0-1"), [0, 1]),
        (("--layers", "0,2"), [0, 2]),
        (("--stride", "2"), [0, 2, 3]),
        (("--stride", "2", "--no-last"), [0, 2]),
    ],
)
def test_make_aux_keeps_the_chosen_layers_and_their_attention_type(tiny_gemma3, tmp_path, args, want):
    out = tmp_path / "aux.gguf"
    ok(convert("make-aux", tiny_gemma3, "-o", out, *args))
    base, aux = read_model_info(tiny_gemma3), read_model_info(out)
    assert aux.source_layers == tuple(want) and aux.source_fingerprint == base.fingerprint
    assert aux.is_swa == tuple(base.is_swa[i] for i in want)
    assert [r.freq_base for r in aux.rope] == [base.rope[i].freq_base for i in want]
    assert aux.tokenizer_digest == base.tokenizer_digest
    info = inspect_json(out)
    assert info["cut_from"]["base_layers"] == want and info["n_layer"] == len(want)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--layers", "0-9"), "must lie in 0..3"),
        (("--layers", "2,1"), "increasing order"),
        (("--layers", "1,1"), "twice"),
        (("--layers", ","), "is empty"),
        (("--layers", "0,x"), "integers, not 'x'"),
        (("--layers", ""), "--layers is empty"),
        (("--layers", "0-3"), "every layer"),
        (("--stride", "0"), "at least 1"),
        ((), "exactly one of"),
    ],
)
def test_make_aux_refuses_bad_layer_lists(tiny_gemma3, tmp_path, args, message):
    assert_one_line_error(convert("make-aux", tiny_gemma3, "-o", tmp_path / "aux.gguf", *args), message)
    assert not list(tmp_path.iterdir())


def test_bad_input_files_and_output_paths(tmp_path, tiny_llama):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(40))
    assert_one_line_error(convert("make-aux", junk, "-o", tmp_path / "a.gguf", "--layers", "0"), "GGUF")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_llama.read_bytes()[:-1000])
    assert_one_line_error(convert("make-aux", cut, "-o", tmp_path / "a.gguf", "--layers", "0"), "truncated")
    text = tmp_path / "notes.txt"
    text.write_text("not a folder")
    assert_one_line_error(
        convert("make-aux", tiny_llama, "-o", text / "a.gguf", "--layers", "0"),
        "cannot create the output folder",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "junk.gguf", "notes.txt"]


def test_unsupported_architecture_is_refused(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(
        convert("make-aux", path, "-o", tmp_path / "a.gguf", "--layers", "0"), "not supported"
    )


def test_kvp_c_pair_of_other_dimensions_end_to_end(tmp_path, tiny_llama, small_llama):
    pred = tmp_path / "pred.gguf"
    ok(convert("calibrate", tiny_llama, small_llama, "-o", pred, *FAST))
    info = inspect_json(pred)
    assert info["copied_layers"] == [] and info["predicted_layers"] == [0, 1, 2]
    assert info["layer_map"] == [0, 0, 1]  # round(l * (2 - 1) / (3 - 1)), half to even
    assert info["n_features"] == 8 + 8 + 32 + 2 * 8  # K, V of the aux layer, then hidden
    ok(
        convert(
            "calibrate",
            tiny_llama,
            small_llama,
            "-o",
            tmp_path / "p2.gguf",
            *FAST,
            "--layer-map",
            "1,1,1",
            "--hidden",
            "none",
            "--lambda",
            "0.1,1",
        )
    )
    p2 = inspect_json(tmp_path / "p2.gguf")
    assert p2["layer_map"] == [1, 1, 1] and p2["n_features"] == 16
    assert set(p2["ridge_alphas"]) <= {0.1, 1.0}
    bundle = tmp_path / "bundle"
    ok(
        convert(
            "bundle",
            "--base",
            tiny_llama,
            "--aux",
            small_llama,
            "--predictor",
            pred,
            "-o",
            bundle,
            "--no-check",
        )
    )
    # long enough to predict past the default tail (a shorter prompt is all tail: nothing predicted)
    prompt = "the cat and the dog. " * 12
    out = json.loads(ok(kvcli("generate", prompt, "-n", "4", "--json", "--bundle", bundle)).stdout)
    assert out["mode"] == "kvp" and out["breakdown"]["predict_ms"] > 0
    described = inspect_json(bundle)
    assert described["compatible"] and described["aux"]["n_embd"] == 32
    assert_one_line_error(
        convert("calibrate", tiny_llama, small_llama, "-o", tmp_path / "x.gguf", "--layer-map", "0,5,0"),
        "outside 0..1",
    )


def test_strided_aux_end_to_end_with_quantized_predictor(tmp_path, tiny_gemma3):
    aux = tmp_path / "aux.gguf"
    ok(convert("make-aux", tiny_gemma3, "-o", aux, "--stride", "2"))
    pred = tmp_path / "pred.gguf"
    ok(convert("calibrate", tiny_gemma3, aux, "-o", pred, *FAST, "--predictor-type", "q8_0"))
    info = inspect_json(pred)
    # aux layers are base 0, 2, 3: layer 0 is an exact copy; base 1 comes from aux 0 (base 0)
    assert info["copied_layers"] == [0] and info["layer_map"] == [0, 0, 1, 2]
    assert info["storage_type"] == "q8_0"
    ok(convert("quantize", pred, tmp_path / "pred-q4.gguf", "q4_0"))
    assert inspect_json(tmp_path / "pred-q4.gguf")["storage_type"] == "q4_0"
    bundle = tmp_path / "bundle"
    ok(
        convert(
            "bundle",
            "--no-check",
            "--base",
            tiny_gemma3,
            "--aux",
            aux,
            "--predictor",
            tmp_path / "pred-q4.gguf",
            "-o",
            bundle,
        )
    )
    out = json.loads(ok(kvcli("generate", "the cat", "-n", "3", "--json", "--bundle", bundle)).stdout)
    assert out["n_prompt"] > 1


def test_bundle_from_a_base_alone_and_refusals(tmp_path, tiny_gemma3, tiny_llama, small_llama):
    bundle = tmp_path / "bundle"
    built = ok(
        convert("bundle", "--base", tiny_gemma3, "-o", bundle, "--tokens", "600", "--check-tokens", "200")
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    # the bundle checked itself: figures per kind of held-out text, a verdict, one line out
    check, break_even = manifest["check"], manifest["break_even"]
    assert break_even["ttft_ratio"] and all(r > 0 for r in break_even["ttft_ratio"].values())
    # judged at the break-even's length where that is longer than asked
    assert check["n_tokens"] == max(200, break_even["min_tokens"] or 0)
    assert set(check["kinds"]) == {"prose", "code", "conversation"}
    for row in check["kinds"].values():
        assert (
            {"kvp", "truncate", "aux"} <= set(row) and row["kvp"]["kl"] > 0 and 0 <= row["kvp"]["top1"] <= 1
        )
    assert built.stdout.strip().splitlines()[-1].startswith("auxiliary alone: ")
    generated = ok(kvcli("generate", "the cat", "-n", "2", "--bundle", bundle))
    warned = "this bundle's own check" in generated.stderr
    assert warned == bool(check["warning"])
    # the prefix auxiliary is the base's own first layer: no file of its own
    assert manifest["aux"]["prefix_of_base"] == 1 and "path" not in manifest["aux"]
    assert sorted(p.name for p in bundle.iterdir()) == ["gemma3.gguf", "manifest.json", "predictor.gguf"]
    info = json.loads(ok(kvcli("inspect", bundle, "--json", "--verify")).stdout)
    assert info["sha256_ok"] == {"base": True, "predictor": True}
    assert info["aux"]["n_layer"] == 1 and info["aux"]["path"] is None  # a quarter of 4 layers
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert info["check"].startswith("auxiliary alone: ") and info["check_figures"] == check
    doctor = json.loads(ok(kvcli("doctor", "--bundle", bundle, "--prompts", "2", "--json")).stdout)
    assert set(doctor["self_check"]["kinds"]) == {"prose", "code", "conversation"}
    assert doctor["break_even"]["pays_ratio"] == 0.5
    load = "partial" if prefix_view_supported() else "view"
    assert doctor["ok"] and [c["name"] for c in doctor["checks"][-2:]] == [
        "bundle",
        f"auxiliary as a view ({load})",
    ]
    assert info["aux_load"] == load
    assert info["spans"].startswith("no: the predictor does not read")  # 1 layer: no hidden features
    # the auxiliary alone and --aux-load file cut a file into the cache on first use
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    aux_alone = json.loads(
        ok(
            kvcli("generate", "the cat", "-n", "2", "--json", "--mode", "aux", "--bundle", bundle, env=env)
        ).stdout
    )
    assert aux_alone["mode"] == "aux"
    bench = json.loads(
        ok(
            kvcli(
                "bench-ttft",
                "--bundle",
                bundle,
                "-p",
                "32",
                "-r",
                "1",
                "--modes",
                "kvp",
                "--aux-load",
                "file",
                "--no-memory",
                "--json",
                env=env,
            )
        ).stdout
    )
    assert bench["rows"][0]["aux_load"] == "file"
    assert len(list((tmp_path / "cache" / "kvcli" / "aux").glob("*-prefix1.gguf"))) == 1
    # a byte changed in place: same size, so only the sha256 sees it
    pred = bundle / "predictor.gguf"  # written into the bundle, not linked: safe to edit
    data = bytearray(pred.read_bytes())
    data[-1] ^= 0xFF
    pred.write_bytes(bytes(data))
    res = kvcli("doctor", "--bundle", bundle, "--prompts", "2", "--json", "--no-quality")
    assert res.returncode == 1 and "sha256 differs" in res.stdout and "predictor" in res.stdout
    pred.write_bytes(bytes(data) + b"x")
    assert_one_line_error(kvcli("inspect", bundle), "has changed")
    # --aux-file keeps the cut in the bundle
    ok(
        convert(
            "bundle",
            "--base",
            tiny_gemma3,
            "-o",
            tmp_path / "b3",
            "--tokens",
            "600",
            "--aux-file",
            "--no-check",
        )
    )
    assert json.loads((tmp_path / "b3" / "manifest.json").read_text())["aux"]["path"] == "aux.gguf"
    assert inspect_json(tmp_path / "b3")["aux_load"] == load
    # a predictor fit for other models, and an auxiliary of another tokenizer
    pred = tmp_path / "b3" / "predictor.gguf"
    assert_one_line_error(
        convert(
            "bundle", "--base", tiny_llama, "--aux", small_llama, "--predictor", pred, "-o", tmp_path / "b2"
        ),
        "fit for base",
    )
    other = write_tiny_llama(tmp_path / "other.gguf", n_layer=1, vocab="other")
    assert_one_line_error(
        convert("calibrate", tiny_llama, other, "-o", tmp_path / "p.gguf"), "tokenizer differs"
    )
    assert not (tmp_path / "b2").exists() and not (tmp_path / "p.gguf").exists()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_llama_and_qwen2_bundle_and_generate(fixture, request, tmp_path):
    base = request.getfixturevalue(fixture)
    ok(convert("bundle", "--base", base, "-o", tmp_path / "b", "--tokens", "600", "--no-check"))
    info = inspect_json(tmp_path / "b")
    assert info["compatible"] and info["predictor"]["copied_layers"] == [0]
    assert info["base"]["rope"]["layout"] == ("neox" if fixture == "tiny_qwen2" else "normal")
    # long enough to predict past the default tail (DEFAULT_SPANS_TAIL tokens)
    out = json.loads(
        ok(
            kvcli(
                "generate", "the cat sat on the mat. " * 12, "-n", "3", "--json", "--bundle", tmp_path / "b"
            )
        ).stdout
    )
    assert out["mode"] == "kvp" and out["breakdown"]["predict_ms"] > 0


def test_quantize_the_embedded_model(gemma_path, tmp_path):
    out = tmp_path / "q8.gguf"
    assert_one_line_error(convert("quantize", gemma_path, out, "q8_0"), "already quantized")
    ok(convert("quantize", gemma_path, out, "q8_0", "--allow-requantize"))
    assert inspect_json(out)["file_type"] == "Q8_0"
    res = json.loads(
        ok(kvcli("generate", "def add(a, b):", "-n", "4", "--mode", "base", "--model", out, "--json")).stdout
    )
    assert res["n_gen"] > 0
    assert_one_line_error(convert("quantize", gemma_path, tmp_path / "x.gguf", "q9_9"), "unknown")


def test_a_killed_converter_leaves_no_file(gemma_path, tmp_path):
    """SIGKILL at several moments of a quantize: the output is whole or absent, nothing else."""
    args = [sys.executable, str(CONVERT), "quantize", str(gemma_path), "", "q8_0", "--allow-requantize"]
    start = time.perf_counter()
    subprocess.run([*args[:4], str(tmp_path / "timed.gguf"), *args[5:]], check=True, capture_output=True)
    duration = time.perf_counter() - start
    (tmp_path / "timed.gguf").unlink()
    killed_mid_write = 0
    for i, fraction in enumerate((0.5, 0.7, 0.85, 0.95)):
        out = tmp_path / f"k{i}" / "q8.gguf"
        out.parent.mkdir()
        proc = subprocess.Popen(
            [*args[:4], str(out), *args[5:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(duration * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left = list(out.parent.iterdir())
        assert left in ([], [out]), left
        if left:
            assert inspect_json(out)["file_type"] == "Q8_0"
        else:
            killed_mid_write += 1
    assert killed_mid_write > 0  # at least one kill landed before the file was complete


def test_hidden_out_feature_needs_the_view(tmp_path, tiny_gemma3, tiny_llama, small_llama):
    from kvcli.engine.engine import Engine
    from kvcli.errors import IncompatibleError
    from kvcli.llama.runtime import ContextSettings

    aux, pred = tmp_path / "aux.gguf", tmp_path / "pred.gguf"
    ok(convert("make-aux", tiny_gemma3, "-o", aux, "--layers", "0-1"))
    ok(convert("calibrate", tiny_gemma3, aux, "-o", pred, *FAST, "--hidden", "attn,out"))
    info = inspect_json(pred)
    assert info["feature_kinds"][2:] == ["aux_last_layer_attention", "aux_residual_out_of_last_layer"]
    assert info["n_features"] == 16 + 16 + 4 * 16 + 64
    settings = ContextSettings(n_ctx=256)
    with Engine(tiny_gemma3, aux_path=aux, predictor_path=pred, settings=settings) as eng:
        tokens = eng.tokenize("the cat sat on the mat and the dog ate the fish " * 3)
        assert generate(eng, tokens, mode="kvp", n_predict=2).ttft_ms > 0
    with pytest.raises(IncompatibleError, match="view"):
        Engine(tiny_gemma3, aux_path=aux, predictor_path=pred, settings=settings, aux_load="file")
    assert_one_line_error(
        convert("calibrate", tiny_llama, small_llama, "-o", tmp_path / "x.gguf", *FAST, "--hidden", "out"),
        "prefix auxiliary",
    )
    assert_one_line_error(
        convert("calibrate", tiny_gemma3, aux, "-o", tmp_path / "x.gguf", "--hidden", "middle"),
        "unknown 'middle'",
    )


def test_bundle_factors_a_wide_predictor(tmp_path, tiny_llama):
    """--rank R factors the predictor through a shared basis where its features are wider
    than 2R (the default for real-size models: kvcli.bundles.build.DEFAULT_RANK); 0 never does; a
    rank the storage type cannot block is a one-line error."""
    from kvcli.predict.predictor import load_predictor

    for rank, factored in (("8", True), ("0", False)):
        out = tmp_path / f"r{rank}"
        ok(
            convert(
                "bundle",
                "--base",
                tiny_llama,
                "-o",
                out,
                "--tokens",
                "600",
                "--aux-layers",
                "2",
                "--rank",
                rank,
                "--no-check",
            )
        )
        pred = load_predictor(out / "predictor.gguf")
        assert bool(pred.factored_layers) == factored
        if factored:
            assert all(b.shape[1] == 8 for b in pred.bases.values())
    assert_one_line_error(
        convert(
            "bundle",
            "--base",
            tiny_llama,
            "-o",
            tmp_path / "bad",
            "--rank",
            "3",
            "--predictor-type",
            "q8_0",
            "--no-check",
        ),
        "divisible by 32",
    )
    assert not (tmp_path / "bad").exists()
