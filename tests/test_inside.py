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


def minibatch_cka(x, y, batch=256):
    from d2v_plugin.evaluation.runtime import Runtime
    from d2v_plugin.evaluation.similarity import cka_of_views

    return cka_of_views([x], [y], np.arange(len(x)), Runtime(torch.device("cpu"), "fp32"), batch)[0][0, 0]


def full_batch_linear_cka(x, y):
    """Kornblith et al.'s linear CKA on all the images at once, written out in numpy."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_linear_ckas_known_answers_and_its_minibatch_estimate_against_the_full_batch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 48)) @ rng.standard_normal((48, 48)) + rng.standard_normal(48) * 3
    assert minibatch_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = np.linalg.qr(rng.standard_normal((48, 48)))
    assert minibatch_cka(x, 3.7 * x @ q) == pytest.approx(1.0, abs=1e-9)  # orthogonal and isotropic scaling
    skew = np.eye(48) + np.diag(rng.uniform(0, 5, 48))  # invertible, not orthogonal
    assert minibatch_cka(x, x @ skew) < 0.98
    y = np.tanh(x @ rng.standard_normal((48, 32)) / 4) + 0.5 * rng.standard_normal((2000, 32))
    assert abs(minibatch_cka(x, y) - full_batch_linear_cka(x, y)) < 0.02
    assert 0.05 < full_batch_linear_cka(x, y) < 0.95  # (neither end of the scale)


def test_a_student_of_its_teachers_first_4_blocks_matches_them_and_two_ranks_give_one_ranks_matrix(runs, tmp_path):
    import subprocess
    import sys

    from conftest import REPO, VENV_BIN, free_port, one_thread, together

    def similarity(ranks):
        cmd = ["-m", "d2v_plugin.cli.similarity", str(runs["student"]), str(runs["init"]), "--data", str(runs["data"]),
               "--images", "300", "--minibatch", "64", "--workers", "1", "--cache", str(tmp_path / f"f{ranks}"),
               "--out", str(tmp_path / f"sim{ranks}")]
        if ranks == 1:
            return subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=600,
                                  env=one_thread())
        launcher = [os.path.join(VENV_BIN, "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}"]
        return subprocess.run([*launcher, *cmd],
                              cwd=REPO, capture_output=True, text=True, timeout=600, env=one_thread())

    out = {}
    for ranks, result in zip((1, 2), together(lambda: similarity(1), lambda: similarity(2))):  # side by side
        assert result.returncode == 0, result.stderr[-3000:]
        out[ranks] = json.loads((tmp_path / f"sim{ranks}" / "similarity.json").read_text())
    matrix = np.array(out[1]["matrix"])
    assert matrix.shape == (4, 6) and out[1]["images"] == 300 and out[1]["b"]["blocks"] == 6
    assert all(matrix[i, i] >= 0.999 for i in range(4)), matrix  # convert --depth 4 kept the teacher's first 4
    assert np.abs(matrix - np.array(out[2]["matrix"])).max() < 1e-6
    from PIL import Image

    with Image.open(tmp_path / "sim1" / "similarity.png") as img:
        img.verify()
