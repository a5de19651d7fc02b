"""kvcli bench-ttft: the JSON schema, ratios from the same run, the plot. No timing asserted."""

import json

import pytest
from test_cli import assert_one_line_error, kvcli

from kvcli.bundles.build import build_bundle
from kvcli.engine.recompute import DEFAULT_SPANS, DEFAULT_SPANS_TAIL
from kvcli.llama.library import prefix_view_supported

ROW_KEYS = {
    "n_prompt",
    "mode",
    "tail",
    "ttft_ms_mean",
    "ttft_ms_std",
    "ttft_ms_median",
    "peak_rss_mib",
    "peak_pss_mib",
    "pss_mib",
    "first_token_agreement",
    "kl_mean",
    "ttft_ratio",
}
KVP_KEYS = {"breakdown_ms", "floor_ms", "floor_ratio", "overhead_share"}
SETTINGS = {
    "n_threads",
    "n_batch",
    "n_ubatch",
    "type_k",
    "type_v",
    "flash_attn",
    "llama_cpp_python",
    "build_info",
    "repeats",
    "warmup",
}


@pytest.fixture(scope="module")
def tiny_bundle(tiny_gemma3, tmp_path_factory):
    return build_bundle(tiny_gemma3, tmp_path_factory.mktemp("bench") / "b", n_aux_layers=2, n_tokens=600)


def test_json_rows_ratios_and_plot(tiny_bundle, tmp_path):
    plot = tmp_path / "bench.png"
    res = kvcli(
        "bench-ttft",
        "--bundle",
        tiny_bundle.folder,
        "-p",
        "64,96",
        "-r",
        "2",
        "--tails",
        "0,8",
        "--aux-load",
        "all",
        "--json",
        "--plot",
        plot,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert SETTINGS <= set(out["settings"]) and out["settings"]["repeats"] == 2
    rows = out["rows"]
    main, *others = ["partial", "view", "file"] if prefix_view_supported() else ["view", "file"]
    assert [(r["n_prompt"], r["mode"], r["tail"], r["aux_load"]) for r in rows] == [
        (n, *method)
        for n in (64, 96)
        for method in (
            ("base", 0, None),
            ("kvp", 0, main),
            ("kvp", 8, main),
            *(("kvp", 0, load) for load in others),
            ("truncate", 0, None),
        )
    ]
    for r in rows:
        assert ROW_KEYS <= set(r), r
        assert r["repeats"] == 2 and r["ttft_ms_mean"] > 0 and r["peak_rss_mib"] > 0
        base = next(b for b in rows if b["n_prompt"] == r["n_prompt"] and b["mode"] == "base")
        # from rows of this same run (means are rounded to 0.01 ms, tiny models take ~1 ms)
        assert r["ttft_ratio"] == pytest.approx(r["ttft_ms_mean"] / base["ttft_ms_mean"], rel=0.02)
        if r["mode"] == "kvp":
            assert KVP_KEYS <= set(r)
            parts = r["breakdown_ms"]
            assert r["floor_ms"] == pytest.approx(parts["aux_prefill_ms"] + parts["base_decode_ms"], abs=0.02)
            assert sum(parts.values()) <= r["ttft_ms_mean"] * 1.01
        if r["mode"] == "truncate":
            assert 16 <= r["keep"] < r["n_prompt"]
    assert base["first_token_agreement"] == 1.0 and base["kl_mean"] == 0.0
    # the setting generate uses without options, once per N, on the main load
    defaults = [r for r in rows if r["default"]]
    assert [r["n_prompt"] for r in defaults] == [64, 96]
    assert all(r["mode"] == "kvp" and r["aux_load"] == main for r in defaults)
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_bad_options(tiny_bundle):
    assert_one_line_error(kvcli("bench-ttft", "--bundle", tiny_bundle.folder, "--modes", "fast"), "--modes")
    assert_one_line_error(kvcli("bench-ttft", "--bundle", tiny_bundle.folder, "-p", "a,b"), "comma-separated")


def test_prefix_auxiliary_from_the_base_weights_saves_the_cut_files_memory(gemma_bundle):
    """On the embedded model: kvp with the cut file also holds its 178 MB embedding copy."""
    from kvcli.engine.engine import Engine
    from kvcli.eval.memory import measure_in_child
    from kvcli.eval.ttft import bench_prompts
    from kvcli.llama.runtime import ContextSettings

    settings = ContextSettings(n_ctx=320)
    with Engine(gemma_bundle.base, settings=settings) as base:
        prompts = {256: bench_prompts(base, 256, 1)[0]}
    loads = ["partial", "view", "file"] if prefix_view_supported() else ["view", "file"]
    pss = {
        load: measure_in_child("kvp", gemma_bundle.folder, [256], prompts, settings.__dict__, aux_load=load)[
            256
        ]["peak_pss_mib"]
        for load in loads
    }
    for load in loads[:-1]:
        assert pss["file"] - pss[load] > 100, pss


def test_spans_rows_and_a_bundle_that_cannot_choose_them(tiny_bundle, gemma_bundle):
    """The embedded bundle times kvp with its default tail alone beside the default; the tiny
    bundle (its first layer after the prefix is a sliding-window one) has no spans row, and
    asking it for spans is a one-line error."""
    res = kvcli(
        "bench-ttft",
        "--bundle",
        gemma_bundle.folder,
        "-p",
        "300",
        "-r",
        "1",
        "--warmup",
        "0",
        "--modes",
        "kvp",
        "--no-memory",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["rows"]
    # the predicted cache with the default tail alone, then the default (spans, the opening)
    assert [(r["tail"], r["spans"], r["default"]) for r in rows] == [
        (DEFAULT_SPANS_TAIL, 0, False),
        (DEFAULT_SPANS_TAIL, DEFAULT_SPANS, True),
    ]
    assert rows[1]["breakdown_ms"]["recompute_ms"] > rows[0]["breakdown_ms"]["recompute_ms"]
    res = kvcli(
        "bench-ttft",
        "--bundle",
        tiny_bundle.folder,
        "-p",
        "64",
        "-r",
        "1",
        "--warmup",
        "0",
        "--modes",
        "kvp",
        "--no-memory",
        "--json",
    )
    assert [(r["tail"], r["spans"]) for r in json.loads(res.stdout)["rows"]] == [(0, 0)]
    assert_one_line_error(
        kvcli("generate", "the cat sat on the mat " * 8, "--spans", "1", "--bundle", tiny_bundle.folder),
        "sliding-window",
    )
