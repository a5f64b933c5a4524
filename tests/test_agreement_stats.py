"""The statistics of benchmarks/llama_bench_agreement.py on hand-made repetitions."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "llama_bench_agreement.py"


@pytest.fixture(scope="module")
def agree():
    spec = importlib.util.spec_from_file_location("llama_bench_agreement", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_ratio_drops_warmup_and_compares_within_a_round(agree):
    # Round 1 is a slow stretch for both programs, round 2 a fast one; the first repetition is warm-up.
    runs = {"llama_bench": [{"samples_ts": [10, 100, 110, 90]}, {"samples_ts": [10, 200, 220, 180]}],
            "bench_py_matched": [{"samples_ts": [50, 95, 105, 85]}, {"samples_ts": [5, 210, 230, 190]}]}
    assert agree.paired_ratios(runs, skip=1) == pytest.approx([95 / 100, 210 / 200])
    assert agree.pooled(runs["llama_bench"], skip=1) == [100, 110, 90, 200, 220, 180]
    # Without the skip the warm-up repetitions count: the median of four is the mean of the middle two.
    assert agree.paired_ratios(runs, skip=0)[0] == pytest.approx(((85 + 95) / 2) / ((90 + 100) / 2))


def test_bootstrap_interval_brackets_the_median_and_is_reproducible(agree):
    values = [0.9, 0.95, 0.97, 1.0, 1.01, 1.02, 1.04, 1.1, 0.99, 1.0]
    low, high = agree.bootstrap_ci(values)
    assert min(values) <= low <= 1.0 <= high <= max(values)
    assert (low, high) == agree.bootstrap_ci(values)
    assert agree.bootstrap_ci([1.0] * 7) == (1.0, 1.0)
