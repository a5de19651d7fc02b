"""kvcli eval on the embedded model: the pipeline and the scoring are right."""

import json

from test_cli import kvcli


def test_quick_eval_scores_what_it_should(gemma_bundle, tmp_path):
    res = kvcli("eval", "--quick", "--json", "--bundle", gemma_bundle.folder, "--out", tmp_path,
                "--plot", tmp_path / "pareto.png")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(res.stdout)
    assert json.loads((tmp_path / "results.json").read_text()) == result
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"base", "kvp", "truncate", "aux"}
    assert rows["base"]["accuracy"] >= 2 / 3  # the base retrieves the pass key at 512 tokens
    assert rows["aux"]["accuracy"] == 0.0  # a 5-layer prefix cannot answer alone
    assert rows["truncate"]["accuracy"] == 0.0  # matched to kvp's TTFT, it cuts the key away
    assert rows["truncate"]["keep"] < 512 * 0.6
    assert rows["base"]["kl_mean"] == 0.0 and rows["base"]["top1_agreement"] == 1.0
    assert rows["aux"]["kl_mean"] > rows["kvp"]["kl_mean"] > 0
    assert 0 < rows["kvp"]["ttft_ratio"] < 1
