"""Every number's noise floor and the paired test between two models, against scipy and a hand-written loop."""
import numpy as np
import pytest
from scipy.stats import binomtest

from d2v_plugin.evaluation import statistics as st


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 10), (10, 10), (3, 10), (180, 360), (352, 360), (40000, 50000),
                                 (0, 50000), (50000, 50000), (1, 7500)])
def test_the_wilson_interval_is_scipys(k, n):
    lo, hi = st.wilson(k, n)
    expected = binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert lo == pytest.approx(expected.low, abs=1e-12) and hi == pytest.approx(expected.high, abs=1e-12)


def test_the_orders_of_magnitude_the_issue_quotes():
    lo, hi = st.wilson(40000, 50000)  # 80% of ImageNet's val: about +-0.35 points
    assert 0.0034 < (hi - lo) / 2 < 0.0036
    lo, hi = st.wilson(8000, 10000)  # ImageNet-V2: about +-0.8
    assert 0.0077 < (hi - lo) / 2 < 0.0080


@pytest.mark.parametrize("b,c", [(0, 0), (1, 0), (0, 5), (5, 5), (7, 20), (60, 0), (300, 250), (5000, 5100), (3, 400)])
def test_exact_mcnemar_is_scipys_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert st.mcnemar(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_the_paired_bootstrap_is_a_hand_written_numpy_loop_with_the_same_seed():
    rng = np.random.default_rng(7)
    a, b = rng.random(2000) < 0.8, rng.random(2000) < 0.75
    got = st.paired_bootstrap(a, b, resamples=500, seed=3)
    draws, stats = np.random.default_rng(3), []
    for _ in range(500):
        idx = draws.integers(0, 2000, 2000)
        stats.append(a[idx].mean() - b[idx].mean())
    assert got["difference"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    assert got["low"] == pytest.approx(np.percentile(stats, 2.5), abs=1e-12)
    assert got["high"] == pytest.approx(np.percentile(stats, 97.5), abs=1e-12)
    assert got["resamples"] == 500 and got["seed"] == 3


def test_a_model_against_itself_is_within_noise_and_60_of_10000_all_one_way_is_a_difference():
    a = np.random.default_rng(0).random(10000) < 0.8
    same = st.paired_bootstrap(a, a, resamples=200)
    assert same["difference"] == same["low"] == same["high"] == 0.0
    assert st.mcnemar(0, 0) == 1.0 and st.verdict(0, 0, 1.0) == "within noise at 95%"
    b = a.copy()
    wrong = np.flatnonzero(a)[:60]  # 60 images only A gets right
    b[wrong] = False
    p = st.mcnemar(int((a & ~b).sum()), int((~a & b).sum()))
    assert p < 1e-15 and st.verdict(60, 0, p) == "A better" and st.verdict(0, 60, p) == "B better"
    assert st.paired_bootstrap(a, b, resamples=500)["low"] > 0


def test_holm_adjusts_as_its_definition_says():
    p = [0.01, 0.04, 0.03, 0.5]
    # sorted 0.01, 0.03, 0.04, 0.5: x4, x3, x2, x1, running maximum
    assert st.holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_the_mean_of_few_tries_has_a_student_t_interval():
    from scipy.stats import t

    got = st.mean_interval([0.5, 0.6, 0.7])
    half = t.ppf(0.975, 2) * np.std([0.5, 0.6, 0.7], ddof=1) / np.sqrt(3)
    assert got["mean"] == pytest.approx(0.6) and got["low"] == pytest.approx(0.6 - half)
    assert st.mean_interval([0.5])["low"] is None
