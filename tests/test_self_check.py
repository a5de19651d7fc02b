"""kvcli.eval.self_check's verdict: the one line a user reads before trusting a bundle."""

from kvcli.eval.self_check import summary_line, verdict


def row(kvp, trunc, aux, kvp_ttft=0.35, aux_ttft=0.25):
    return {
        "base_ttft_ms": 1000.0,
        "kvp": {"kl": kvp, "top1": 0.9, "ttft_ratio": kvp_ttft},
        "truncate": {"kl": trunc, "top1": 0.9, "ttft_ratio": kvp_ttft, "keep": 100},
        "aux": {"kl": aux, "top1": 0.0, "ttft_ratio": aux_ttft},
    }


def check(**kinds):
    return verdict({"n_tokens": 512, "n": 2, "kvp_settings": {"tail": 24, "spans": 1}, "kinds": kinds})


def test_a_bundle_ahead_of_truncation_has_no_warning_though_its_prefix_alone_is_cheaper():
    c = check(prose=row(0.2, 0.5, 10.0), code=row(0.3, 0.4, 11.0))
    assert c["warning"] is None and c["losing_kinds"] == []
    assert summary_line(c).startswith("auxiliary alone: 0.25x the base's TTFT; kvp: 0.35x;")


def test_losing_to_truncation_on_one_kind_is_said_with_its_figures():
    c = check(prose=row(0.2, 0.5, 10.0), code=row(0.9, 0.1, 11.0))
    assert c["losing_kinds"] == ["code"] and "code (KL 0.900 vs 0.100 on code)" in c["warning"]
    assert "Warning: kvp loses to truncation" in summary_line(c)


def test_an_auxiliary_of_its_own_that_is_closer_and_cheaper_is_named():
    c = check(prose=row(1.0, 0.8, 0.2, kvp_ttft=0.8, aux_ttft=0.6))
    assert "the auxiliary alone is closer to the base on prose and cheaper" in c["warning"]


def test_kvp_slower_than_the_base_is_said_first():
    c = check(prose=row(1.0, 0.001, 0.2, kvp_ttft=1.1, aux_ttft=0.7))
    assert c["warning"].startswith("kvp takes 1.10x the base's TTFT: slower than the base alone")
