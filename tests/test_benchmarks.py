"""Other ImageNet sets, each scored its own way, on tiny sets built in each layout with a model whose logits
are fixed by construction (each image's colour says which logit row it gets)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from d2v_plugin.data.config import DataConfig
from d2v_plugin.evaluation import benchmarks
from d2v_plugin.evaluation.loop import evaluate
from d2v_plugin.evaluation.runtime import start

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


class FixedLogits(torch.nn.Module):
    """Image with red value 10 * c (c = 0, 1, ...) -> logits row c of ``table``."""

    def __init__(self, table, classes=None):
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float32)
        self.data_cfg = DataConfig(image_size=8, crop_ratio=1.0)
        self.classes = classes or []
        self.cfg = type("cfg", (), {"num_classes": self.table.shape[1]})

    def forward(self, images):
        red = images[:, 0].mean(dim=(1, 2)) * self.data_cfg.std[0] + self.data_cfg.mean[0]
        return self.table[(red * 255 / 10).round().long()]


def image(path, code):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), (10 * code, 0, 0)).save(path)


def scores(model, root, name, real=None, cache=None):
    index, scorer, details = benchmarks.prepare(name, str(root), model.classes, model.cfg.num_classes, real, cache)
    return evaluate(model, index, start("cpu"), batch_size=4, workers=0, scorer=scorer), index, details


def test_v2s_integer_folders_are_the_class_indices(tmp_path):
    root = tmp_path / "imagenetv2"
    for k, folder in enumerate(("0", "1", "2", "10")):  # a sort by name would give 10 the index 2
        image(root / folder / "a.jpeg", k)
    table = np.zeros((4, 11))
    for k, cls in enumerate((0, 1, 2, 10)):
        table[k, cls] = 1.0  # the model says each image's own class
    result, index, _ = scores(FixedLogits(table), root, "imagenet-v2", cache=str(tmp_path / "c"))
    assert sorted(index.labels.tolist()) == [0, 1, 2, 10] and result["top1"] == 1.0 and result["n"] == 4
    assert benchmarks.detect(str(root))[0] == "imagenet-v2"


def test_real_counts_a_prediction_in_the_label_set_and_leaves_out_images_without_one(tmp_path):
    root = tmp_path / "val"
    # six val images (file numbers 1..6) in their wnid folders; the model predicts class (code % 4)
    for number, wnid in zip(range(1, 7), (0, 1, 2, 3, 0, 1)):
        image(root / WNIDS[wnid] / f"ILSVRC2012_val_{number:08d}.JPEG", number - 1)
    real = [[0], [1, 3], [0], [], [2, 1], []]  # image 1: right; 2: 1 is in {1, 3}; 3: 2 not in {0}; 5: 0 not in {2, 1}
    (root / "real.json").write_text(json.dumps(real))
    table = np.zeros((6, 4))
    for code in range(6):
        table[code, code % 4] = 1.0
    model = FixedLogits(table, WNIDS)
    result, _, details = scores(model, root, "imagenet-real", cache=str(tmp_path / "c"))
    assert result["n"] == 4 and details["empty_label_sets"] == 2  # images 4 and 6 left out
    assert result["top1"] == pytest.approx(2 / 4)  # by hand: images 1 and 2 of 1, 2, 3, 5
    assert benchmarks.detect(str(root))[0] == "imagenet-real"
    (root / "real.json").write_text(json.dumps(real[:5]))
    with pytest.raises(benchmarks.BenchmarkError, match=r"real.json holds label sets for 5 images but .* has 6"):
        scores(model, root, "imagenet-real", cache=str(tmp_path / "c"))


def test_an_r_style_subset_is_scored_on_its_own_classes_logits_only(tmp_path):
    root = tmp_path / "imagenet-r"
    for code, wnid in enumerate((1, 1, 3, 3)):  # 2 of the model's 4 classes
        image(root / WNIDS[wnid] / f"art_{code}.jpg", code)
    table = np.array([[5.0, 2.0, 0, 1.0],   # argmax class 0 (not in the set); among 1 and 3: 1, right
                      [0.0, 1.0, 9, 3.0],   # argmax 2; among 1, 3: 3, wrong (label 1)
                      [0.0, 1.0, 7, 4.0],   # argmax 2; among 1, 3: 3, right
                      [8.0, 0.5, 0, 0.1]])  # argmax 0; among 1, 3: 1, wrong (label 3)
    model = FixedLogits(table, WNIDS)
    result, index, details = scores(model, root, "imagenet-r", cache=str(tmp_path / "c"))
    assert details["classes_used"] == 2 and result["top1"] == 0.5
    by_hand = torch.tensor(table)[:, [1, 3]].argmax(1)
    assert torch.equal(torch.tensor([1, 3])[by_hand], torch.tensor([1, 3, 3, 1]))  # the slice by hand: 2 of 4 right
    plain = evaluate(model, index, start("cpu"), batch_size=4, workers=0)
    assert plain["top1"] == 0.0  # unrestricted: every argmax is a class the set does not have
    assert benchmarks.detect(str(root))[0] == "imagenet-r"


def test_a_1000_class_sketch_style_set_reads_normally(tmp_path):
    wnids = [f"n{i:08d}" for i in range(1000)]
    root = tmp_path / "sketch"
    for k in range(0, 1000, 100):
        image(root / wnids[k] / "sketch_0.JPEG", k // 100)
    for k in range(1000):
        os.makedirs(root / wnids[k], exist_ok=True)
        if not os.listdir(root / wnids[k]):
            image(root / wnids[k] / "sketch_0.JPEG", 25)
    table = np.zeros((26, 1000))
    for code in range(10):
        table[code, 100 * code] = 1.0
    table[25, 1] = 1.0  # the other images: wrong except class 1's
    result, index, details = scores(FixedLogits(table, wnids), root, "imagenet-sketch", cache=str(tmp_path / "c"))
    assert len(index) == 1000 and details["classes_used"] == 1000
    assert result["top1"] == pytest.approx(11 / 1000)  # the 10 coded images and class 1's


def test_each_error_is_one_line_naming_the_fix(tmp_path):
    root = tmp_path / "imagenet-a"
    image(root / "n09999999" / "x.jpg", 0)
    not_wnids = FixedLogits(np.eye(4), ["cat", "dog", "fish", "bird"])
    with pytest.raises(benchmarks.BenchmarkError, match="the model's class names are not ImageNet wnids"):
        scores(not_wnids, root, "imagenet-a")
    with pytest.raises(benchmarks.BenchmarkError, match=r"folder\(s\) n09999999 name wnids the model was not trained on"):
        scores(FixedLogits(np.eye(4), WNIDS), root, "imagenet-a")
    for err in (benchmarks.BenchmarkError("x"),):
        assert isinstance(err, ValueError)  # the commands print it as one line (cli.common.fail_cleanly)


def test_a_true_in_real_json_is_no_class_and_an_odd_folder_is_named(tmp_path):
    root = tmp_path / "val"
    for number, wnid in zip(range(1, 3), (0, 1)):
        image(root / WNIDS[wnid] / f"ILSVRC2012_val_{number:08d}.JPEG", number - 1)
    (root / "real.json").write_text(json.dumps([[True], [1]]))  # (true was taken as class 1)
    with pytest.raises(benchmarks.BenchmarkError, match=r"entry 1 holds labels outside 0..3"):
        scores(FixedLogits(np.eye(4), WNIDS), root, "imagenet-real", cache=str(tmp_path / "c"))
    odd = tmp_path / "odd"
    for name in ("0", "1", "²"):  # '²'.isdigit() is True: it was taken for a V2 index, then int('²') failed
        image(odd / name / "x.png", 0)
    with pytest.raises(benchmarks.BenchmarkError, match=r"\(folders ² are neither\)"):
        benchmarks.detect(str(odd))
    with pytest.raises(benchmarks.BenchmarkError, match=r"folders ² are not class indices"):
        scores(FixedLogits(np.eye(4)), odd, "imagenet-v2", cache=str(tmp_path / "c"))
