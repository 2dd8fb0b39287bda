"""fairseq-hydra-train with the plugin, as a user runs it, on tiny generated data."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import REPO, exception_line, json_records, run, train_cmd

pytestmark = pytest.mark.slow


def train(tmp_path, data, *overrides, init=None):
    """Run fairseq-hydra-train on the demo recipe scaled down; returns the completed process."""
    return run(train_cmd(tmp_path, data, tmp_path / "run", "common.log_format=json", *overrides, init=init,
                         batch_size=8, max_update=6))


def evaluate(checkpoint, data, *extra):
    cmd = [sys.executable, "-m", "d2v_plugin.cli.evaluate", str(checkpoint), "--data", str(data), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_two_epochs_validate_checkpoint_and_evaluate_agrees(tmp_path, image_root):
    run = train(tmp_path, image_root)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    valid = json_records(log, "val")
    assert [r["epoch"] for r in valid] == [1, 2]  # a validation pass each epoch
    assert all(0 <= r["val_accuracy"] <= 100 and 0 <= r["val_top5"] <= 100 for r in valid)
    run_dir = tmp_path / "run"
    assert {"checkpoint_best.pt", "checkpoint_last.pt"} <= set(os.listdir(run_dir))
    best = torch.load(run_dir / "checkpoint_best.pt", weights_only=True)
    best_acc = max(r["val_accuracy"] for r in valid)
    assert best["extra_state"]["best"] == pytest.approx(best_acc)  # chosen by accuracy, maximised
    # the evaluate command reproduces the trainer's validation accuracy for that checkpoint
    result = evaluate(run_dir / "checkpoint_best.pt", image_root, "--split", "val")
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["n"] == 12
    assert scores["top1"] * 100 == pytest.approx(best["extra_state"]["val_loss"], abs=1e-6)
    assert best["cfg"]["model"]["num_heads"] == 4  # the architecture read from init.pt was recorded


def add_bad_files(folder):
    Image.new("RGB", (30, 20), (250, 0, 0)).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    Image.new("L", (30, 20), 128).save(folder / "grey.png")
    Image.new("RGBA", (30, 20), (0, 0, 250, 128)).save(folder / "rgba.png")
    Image.new("RGB", (30, 20), (0, 250, 0)).save(folder / "png_named.JPEG", format="PNG")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "whole.jpg", quality=90)
    (folder / "corrupt.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:150])
    (folder / "whole.jpg").unlink()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "readme.txt").write_text("not an image")


def test_bad_images_are_converted_or_skipped_and_logged(tmp_path, image_root):
    add_bad_files(image_root / "train" / "class_1")
    run = train(tmp_path, image_root, "optimization.max_epoch=1", "optimization.max_update=4")
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    skipped = [line for line in log.splitlines() if "skipping unreadable image" in line]
    assert sorted(os.path.basename(line.split("unreadable image ")[1].split(":")[0]) for line in skipped) == [
        "corrupt.jpg", "empty.jpg"]
    assert "ignored 1 files without an image extension" in log and "readme.txt" in log
    train_stats = json_records(log, "train")
    assert train_stats[-1]["train_bad_images"] == 2


def test_on_bad_image_error_stops_naming_the_file(tmp_path, image_root):
    add_bad_files(image_root / "train" / "class_1")
    run = train(tmp_path, image_root, "task.on_bad_image=error")
    assert run.returncode != 0
    assert "unreadable image" in run.stderr and ("corrupt.jpg" in run.stderr or "empty.jpg" in run.stderr)


@pytest.mark.parametrize("case,expected", [
    ("empty_split", "val: no image files found"),
    ("missing_split", "split folder not found"),
    ("val_class_not_in_train", "class folders not in the train split: extra"),
    ("class_count", "model.num_classes=5 but"),
    ("missing_data", "task.data=/no/such/folder does not exist"),
])
def test_data_problems_stop_with_one_clear_error(tmp_path, image_root, case, expected):
    overrides = []
    if case == "empty_split":
        for d in (image_root / "val").iterdir():
            for f in d.iterdir():
                f.unlink()
    elif case == "missing_split":
        overrides.append("dataset.valid_subset=test")
    elif case == "val_class_not_in_train":
        (image_root / "val" / "extra").mkdir()
        Image.new("RGB", (8, 8)).save(image_root / "val" / "extra" / "x.png")
    elif case == "class_count":
        overrides.append("model.num_classes=5")
    elif case == "missing_data":
        overrides.append("task.data=/no/such/folder")
    run = train(tmp_path, image_root, *overrides)
    assert run.returncode != 0
    line = exception_line(run.stderr)
    assert line.startswith("d2v_plugin.data.index.DataError: ") and expected in line, run.stderr[-2000:]
