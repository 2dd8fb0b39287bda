"""Looking inside a student: label-free measures of its features (RankMe, alpha-ReQ), its blocks against its
teacher's (linear CKA), known answers first."""
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import tiny_encoder
from d2v_plugin.demo_data import write_random_images
from d2v_plugin.evaluation import spectrum


def test_rankme_of_a_matrix_with_chosen_singular_values_is_the_formula_by_hand():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((500, 6)))
    v, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    s = np.array([10.0, 5.0, 2.0, 1.0, 0.5, 0.1])
    x = u @ np.diag(s) @ v.T
    p = s / s.sum() + 1e-7
    assert spectrum.rankme(x) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert spectrum.rankme(np.outer(rng.standard_normal(300), rng.standard_normal(40))) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("alpha", [0.8, 1.0, 1.5])
def test_alpha_req_recovers_the_exponent_of_a_power_law_spectrum(alpha):
    rng = np.random.default_rng(1)
    dim = 256
    scale = np.arange(1, dim + 1) ** (-alpha / 2)  # covariance eigenvalues i^-alpha
    x = rng.standard_normal((40_000, dim)) * scale
    fit = spectrum.alpha_req(x)
    assert abs(fit["alpha"] - alpha) < 0.05, fit
    assert (fit["fit_first"], fit["fit_last"]) == (11, 100) and fit["r2"] > 0.99


def test_the_label_free_probes_run_on_a_folder_of_unlabelled_images(tmp_path, capsys):
    from d2v_plugin.cli import probe as probe_cli
    from d2v_plugin.testing.checkpoints import save_data2vec_checkpoint

    write_random_images(str(tmp_path / "data"), classes=2, per_class={"val": 20}, size=24)
    flat = tmp_path / "photos" / "unlabelled"
    flat.mkdir(parents=True)
    for k, path in enumerate(sorted((tmp_path / "data" / "val").rglob("*.png"))):
        os.link(path, flat / f"{k:03d}.png")  # images, no class folders, and no train split
    save_data2vec_checkpoint(tiny_encoder(), str(tmp_path / "init.pt"), prenet_depth=0)
    assert probe_cli.main([str(tmp_path / "init.pt"), "--data", str(tmp_path / "photos"), "--val-split", "unlabelled",
                           "--probes", "rankme,alphareq", "--cache", "none", "--workers", "0"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["probe"] for r in lines] == ["rankme", "alphareq"] and all(r["n"] == 40 for r in lines)
    assert 1.0 <= lines[0]["value"] <= 32 and lines[0]["max_possible"] == 32
    assert lines[1]["value"] is not None and lines[1]["fit_last"] == 22  # 32 dims: the range ends 10 before the last
