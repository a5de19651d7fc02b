"""kvcli eval on the embedded model: the pipeline and the scoring are right."""

import json
from itertools import pairwise

import numpy as np
import pytest
from test_cli import kvcli

from kvcli.eval.quality import kv_relative_errors
from kvcli.state.layout import LayerCells


def test_quick_eval_scores_what_it_should(gemma_bundle, tmp_path):
    res = kvcli(
        "eval",
        "--quick",
        "--json",
        "--bundle",
        gemma_bundle.folder,
        "--out",
        tmp_path,
        "--plot",
        tmp_path / "pareto.png",
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(res.stdout)
    assert json.loads((tmp_path / "results.json").read_text()) == result
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"base", "kvp", "truncate", "select", "aux"}
    assert rows["select"]["select_by"] == "keys" and 1 + 32 + 8 <= rows["select"]["keep"] < 512
    assert rows["base"]["accuracy"] >= 2 / 3  # the base retrieves the pass key at 512 tokens
    assert rows["aux"]["accuracy"] == 0.0  # a 5-layer prefix cannot answer alone
    # truncation keeps the last M tokens, M matched to kvp's measured TTFT (so it varies with
    # the machine): the pass key sits in the first 30% of the prompt, so M below 0.6 of it
    # cuts the key away (0.6: the key's two sentences and the head after 30% of the filler)
    keep = rows["truncate"]["keep"]
    assert 16 <= keep < 512  # matched.MIN_KEEP
    if keep < 512 * 0.6:
        assert rows["truncate"]["accuracy"] == 0.0
    assert rows["base"]["kl_mean"] == 0.0 and rows["base"]["top1_agreement"] == 1.0
    assert rows["aux"]["kl_mean"] > rows["kvp"]["kl_mean"] > 0
    for r in rows.values():  # each ratio is to the base's median TTFT measured in the same run
        assert r["ttft_ms_median"] > 0
        assert r["ttft_ratio"] == pytest.approx(r["ttft_ms_median"] / rows["base"]["ttft_ms_median"])
    k_err, v_err = rows["kvp"]["k_rel_err"], rows["kvp"]["v_rel_err"]
    assert len(k_err) == len(v_err) == 18
    assert max(k_err[:5] + v_err[:5]) < 1e-3  # the prefix auxiliary's own layers: exact
    assert min(k_err[5:]) > 0.01 and min(v_err[5:]) > 0.01  # predicted
    assert rows["kvp"]["kv_rel_err_predicted_layers"] == [
        round(float(np.mean(k_err[5:])), 4),
        round(float(np.mean(v_err[5:])), 4),
    ]
    assert all(h == "noise" for h in rows["base"]["haystacks"]) and rows["base"]["seed"] == 0
    for r in rows.values():  # 95% Wilson intervals over the 3 prompts, holding the accuracy
        assert r["correct"] == round(r["accuracy"] * 3) and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
    assert rows["aux"]["ci95"] == [0.0, 0.5615]  # 0 of 3 still admits 0.56
    summary = {s["method"]: s for s in result["summary"]}
    assert summary["aux"]["mean_retention"] == 0.0 and summary["aux"]["worst_family"] == "passkey"
    # --quick runs kvp at tail 0 without spans: the default only where the bundle's is that
    quick_is_default = result["settings"]["kvp_default"] == {"tail": 0, "spans": 0}
    assert [m for m, s in summary.items() if s["default"]] == (["kvp"] if quick_is_default else [])
    front = result["frontier"]  # cheapest first, each keeping more than the ones before
    assert front[0]["ttft_ratio_median"] == min(s["ttft_ratio_median"] for s in summary.values())
    assert front[-1]["mean_retention"] == max(s["mean_retention"] for s in summary.values())
    assert all(a["mean_retention"] < b["mean_retention"] for a, b in pairwise(front))
    assert all(a["ttft_ratio_median"] <= b["ttft_ratio_median"] for a, b in pairwise(front))


def test_kv_relative_errors_over_shared_positions_below_the_tail():
    def cells(positions, k, v):
        return LayerCells(np.array(positions), np.array(k, np.float32), np.array(v, np.float32), 1, 1)

    want = {0: cells([0, 1, 2, 3], [[1.0], [1.0], [1.0], [1.0]], [[2.0], [2.0], [2.0], [2.0]])}
    got = {0: cells([1, 2, 3, 4], [[1.0], [3.0], [9.0], [0.0]], [[2.0], [2.0], [0.0], [5.0]])}
    k_err, v_err = kv_relative_errors(got, want, below=3)  # positions 1 and 2 only
    assert np.allclose(k_err, [2.0 / np.sqrt(2.0)]) and v_err == [0.0]
