import pytest

from kvcli.eval.stats import frontier, method_label, summarize_methods, wilson


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (20, 20, 0.8389, 1.0),  # all right: the interval still admits 0.84
        (18, 20, 0.6990, 0.9721),
        (0, 20, 0.0, 0.1611),
        (5, 10, 0.2366, 0.7634),
        (3, 3, 0.4385, 1.0),
    ],
)
def test_wilson_intervals_match_published_values(k, n, lo, hi):
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_without_prompts_says_nothing():
    assert wilson(0, 0) == (0.0, 1.0)


def test_summary_takes_mean_and_worst_family_per_method_and_length():
    def row(task, method, retention, ratio, n_prompt=1024, **kw):
        return {
            "task": task,
            "method": method,
            "retention": retention,
            "ttft_ratio": ratio,
            "n_prompt": n_prompt,
            **kw,
        }

    rows = [
        row("passkey", "kvp", 1.0, 0.31, tail=24, spans=2),
        row("document", "kvp", 0.5, 0.33, tail=24, spans=2),
        row("passkey", "truncate", 0.0, 0.30, keep=300),
        row("document", "truncate", 0.2, 0.32, keep=280),
        row("passkey", "kvp", 0.9, 0.30, n_prompt=2048, tail=24, spans=2),
        row("passkey", "select", 1.0, 0.30, n_prompt=2048),
        row("document", "select", 3.0, 0.30, n_prompt=2048),  # 0.6 where the base has 0.2
    ]
    by = {(s["method"], s["n_prompt"]): s for s in summarize_methods(rows)}
    kvp = by["kvp tail 24 spans 2", 1024]
    assert (
        kvp["mean_retention"] == 0.75 and kvp["worst_family"] == "document" and kvp["worst_retention"] == 0.5
    )
    assert (kvp["ttft_ratio_min"], kvp["ttft_ratio_max"]) == (0.31, 0.33)
    assert by["truncate", 1024]["mean_retention"] == 0.1  # one label whatever the matched keep
    assert by["kvp tail 24 spans 2", 2048]["families"] == 1
    assert by["select", 2048]["mean_retention"] == 1.0  # capped: beating the base counts as 1
    assert method_label({"method": "aux"}) == "aux"


def test_frontier_keeps_what_no_cheaper_method_beats_per_length():
    def entry(method, retention, ratio, n_prompt=1024):
        return dict(method=method, n_prompt=n_prompt, mean_retention=retention, ttft_ratio_median=ratio)

    summary = [
        entry("base", 1.0, 1.0),
        entry("kvp tail 40 spans 2", 0.9, 0.38),
        entry("kvp", 0.2, 0.30),
        entry("kvp tail 16 spans 1", 0.6, 0.34),
        entry("truncate", 0.5, 0.36),  # slower than spans 1 and keeps less: off the frontier
        entry("select by keys", 0.6, 0.33),  # as good as spans 1 and faster: it takes that place
        entry("aux", 0.0, 0.26),
        entry("aux", 0.0, 0.25, n_prompt=2048),
        entry("base", None, 1.0, n_prompt=2048),  # no family with an accuracy
    ]
    got = [(s["n_prompt"], s["method"]) for s in frontier(summary)]
    assert got == [
        (1024, "aux"),
        (1024, "kvp"),
        (1024, "select by keys"),
        (1024, "kvp tail 40 spans 2"),
        (1024, "base"),
        (2048, "aux"),
    ]
