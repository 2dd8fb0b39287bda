"""fairseq-hydra-train with the plugin, as a user runs it, on tiny generated data."""
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from conftest import exception_line, json_records, one_thread, run, together, train_cmd
from d2v_plugin.data import ImageFolderDataset

pytestmark = pytest.mark.slow


def train(tmp_path, data, *overrides, init=None, env=None):
    """Run fairseq-hydra-train on the demo recipe scaled down; returns the completed process."""
    return run(train_cmd(tmp_path, data, tmp_path / "run", "common.log_format=json", *overrides, init=init,
                         batch_size=8, max_update=6), env=env)


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


DATA_PROBLEMS = [
    ("empty_split", "val: no image files found"),
    ("missing_split", "split folder not found"),
    ("val_class_not_in_train", "class folders not in the train split: extra"),
    ("class_count", "model.num_classes=5 but"),
    ("missing_data", "task.data=/no/such/folder does not exist"),
]


@pytest.fixture(scope="module")
def runs_side_by_side(tmp_path_factory):
    """This module's short runs, each on its own copy of the tiny images, started side by side (two at a time):
    name -> (its folder, its data, the completed process)."""
    from test_device_decode import write_jpeg_folders

    from d2v_plugin.demo_data import write_random_images

    cases = {}
    for name in ["two_epochs", "bad_images", "bad_image_error", "fast_decode", *(c for c, _ in DATA_PROBLEMS)]:
        tmp = tmp_path_factory.mktemp(name)
        data = tmp / "images"
        write_random_images(str(data), classes=3, per_class={"train": 8, "val": 4}, size=24)
        overrides = []
        if name == "bad_images":
            add_bad_files(data / "train" / "class_1")
            (data / "val" / "class_2" / "text.jpg").write_text("not an image")
            overrides.append("optimization.max_update=8")  # 2 whole epochs of 4 updates, 2 workers
        elif name == "bad_image_error":
            add_bad_files(data / "train" / "class_1")
            overrides.append("task.on_bad_image=error")
        elif name == "fast_decode":
            data = write_jpeg_folders(tmp / "jpegs")  # 40-90 px JPEGs: 1/2-scale decoding applies at 16 px
            overrides += ["task.fast_decode=true", "task.image_size=16", "model.num_classes=3"]
        elif name == "empty_split":
            for d in (data / "val").iterdir():
                for f in d.iterdir():
                    f.unlink()
        elif name == "missing_split":
            overrides.append("dataset.valid_subset=test")
        elif name == "val_class_not_in_train":
            (data / "val" / "extra").mkdir()
            Image.new("RGB", (8, 8)).save(data / "val" / "extra" / "x.png")
        elif name == "class_count":
            overrides.append("model.num_classes=5")
        elif name == "missing_data":
            overrides.append("task.data=/no/such/folder")
        train_cmd(tmp, data, tmp / "run")  # its init checkpoint, written before the runs start
        cases[name] = (tmp, data, overrides)
    done = together(*(lambda c=c: train(c[0], c[1], *c[2], env=one_thread()) for c in cases.values()))
    return {name: (tmp, data, result) for (name, (tmp, data, _)), result in zip(cases.items(), done)}


def evaluated(checkpoint, data, capsys, *extra) -> dict:
    """cli.evaluate's JSON line for ``checkpoint`` on ``data``."""
    from d2v_plugin.cli import evaluate as evaluate_cli

    capsys.readouterr()
    assert evaluate_cli.main([str(checkpoint), "--data", str(data), *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_two_epochs_validate_checkpoint_and_evaluate_agrees(runs_side_by_side, capsys):
    tmp, data, run = runs_side_by_side["two_epochs"]
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    valid = json_records(log, "val")
    assert [r["epoch"] for r in valid] == [1, 2]  # a validation pass each epoch
    assert all(0 <= r["val_accuracy"] <= 100 and 0 <= r["val_top5"] <= 100 for r in valid)
    run_dir = tmp / "run"
    assert {"checkpoint_best.pt", "checkpoint_last.pt"} <= set(os.listdir(run_dir))
    best = torch.load(run_dir / "checkpoint_best.pt", weights_only=True)
    best_acc = max(r["val_accuracy"] for r in valid)
    assert best["extra_state"]["best"] == pytest.approx(best_acc)  # chosen by accuracy, maximised
    # the evaluate command reproduces the trainer's validation accuracy for that checkpoint
    scores = evaluated(run_dir / "checkpoint_best.pt", data, capsys, "--split", "val")
    assert scores["n"] == 12
    assert scores["top1"] * 100 == pytest.approx(best["extra_state"]["val_loss"], abs=1e-6)
    assert best["cfg"]["model"]["num_heads"] == 4  # the architecture read from init.pt was recorded


def test_bad_images_are_converted_or_skipped_and_each_reported_once(runs_side_by_side):
    _, _, run = runs_side_by_side["bad_images"]
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    skipped = [line for line in log.splitlines() if "skipping unreadable image" in line]
    # once per file for the whole run (not per worker, epoch or retry), with its path and the reason in words
    assert sorted(os.path.basename(line.split("unreadable image ")[1].split(":")[0]) for line in skipped) == [
        "corrupt.jpg", "empty.jpg", "text.jpg"]
    reasons = {os.path.basename(line.split("unreadable image ")[1].split(":")[0]): line for line in skipped}
    assert "the file is empty" in reasons["empty.jpg"] and "truncated" in reasons["corrupt.jpg"].lower()
    assert "not an image" in reasons["text.jpg"] and not any("0x" in line for line in skipped)
    assert "ignored 1 files without an image extension" in log and "readme.txt" in log
    train_stats = json_records(log, "train")
    assert [r["train_bad_images"] for r in train_stats] == [2, 2]  # every epoch meets both again ...
    assert [r["train_bad_images_total"] for r in train_stats] == [2, 4]  # ... and the run's total grows
    assert all("val_bad_images" not in r for r in json_records(log, "val"))  # a training statistic only
    assert {r["val_n"] for r in json_records(log, "val")} == {12}  # 13 val files, the text one left out


def test_on_bad_image_error_stops_naming_the_file(runs_side_by_side):
    _, _, run = runs_side_by_side["bad_image_error"]
    assert run.returncode != 0
    assert "unreadable image" in run.stderr and ("corrupt.jpg" in run.stderr or "empty.jpg" in run.stderr)


@pytest.mark.parametrize("case,expected", DATA_PROBLEMS)
def test_data_problems_stop_with_one_clear_error(runs_side_by_side, case, expected):
    _, _, run = runs_side_by_side[case]
    assert run.returncode != 0
    line = exception_line(run.stderr)
    assert line.startswith("d2v_plugin.data.index.DataError: ") and expected in line, run.stderr[-2000:]


# --- validation computes what cli.evaluate computes --------------------------------------------

def test_validation_with_fast_decode_equals_evaluate_on_the_best_checkpoint(runs_side_by_side, capsys):
    tmp, root, result = runs_side_by_side["fast_decode"]
    assert result.returncode == 0, result.stderr[-3000:]
    valid = json_records(result.stdout + result.stderr, "val")
    best = torch.load(tmp / "run" / "checkpoint_best.pt", weights_only=True)
    top1 = evaluated(tmp / "run" / "checkpoint_best.pt", root, capsys)["top1"]
    # fairseq logs accuracies rounded to 3 decimals
    assert round(top1 * 100, 3) == best["extra_state"]["val_loss"] == max(r["val_accuracy"] for r in valid)


def test_validation_images_are_the_evaluation_transforms_even_with_fast_decode(tmp_path):
    from test_device_decode import write_jpeg_folders

    from d2v_plugin.data.transforms import ResizeCenterCrop
    from d2v_plugin.tasks.image_folder_classification import (ImageFolderClassificationConfig,
                                                               ImageFolderClassificationTask)

    root = write_jpeg_folders(tmp_path / "jpegs")
    task = ImageFolderClassificationTask.setup_task(ImageFolderClassificationConfig(
        data=str(root), image_size=16, eval_crop_ratio=1.0, fast_decode=True, seed=1, cache_dir=str(tmp_path / "c")))
    task.load_dataset("val")
    val = task.datasets["val"]
    exact, drafted = (ImageFolderDataset(val.index, ResizeCenterCrop(16, 1.0, fast_decode=f), shuffle=False)
                      for f in (False, True))
    images = [val[i]["image"] for i in range(len(val))]
    assert all(torch.equal(a, exact[i]["image"]) for i, a in enumerate(images))  # what evaluate computes
    assert any(not torch.equal(a, drafted[i]["image"]) for i, a in enumerate(images))  # fast_decode would differ


# --- a run needs only its own checkpoints once it has started ---------------------------------

@pytest.fixture(scope="module")
def run_without_its_pretrained_file(tmp_path_factory):
    """A finished demo run whose model.pretrained_checkpoint was moved away afterwards (a cluster
    job's scratch copy of the teacher, cleaned)."""
    from d2v_plugin.demo_data import write_random_images

    tmp = tmp_path_factory.mktemp("moved")
    write_random_images(str(tmp / "images"), classes=3, per_class={"train": 8, "val": 4}, size=24)
    cmd = train_cmd(tmp, tmp / "images", tmp / "run", "common.log_format=json", batch_size=8, max_update=3)
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    os.rename(tmp / "init.pt", tmp / "elsewhere.pt")
    # what follows, side by side: the run resumed (to update 6) and rerun as another model, each in a copy
    for name in ("resumed", "other"):
        shutil.copytree(tmp / "run", tmp / name)
    resume = [a.replace(f"checkpoint.save_dir={tmp / 'run'}", f"checkpoint.save_dir={tmp / 'resumed'}")
              .replace("optimization.max_update=3", "optimization.max_update=6") for a in cmd]
    other = [a.replace(f"checkpoint.save_dir={tmp / 'run'}", f"checkpoint.save_dir={tmp / 'other'}")
             for a in cmd] + ["model.depth=2"]
    resumed, rerun = together(lambda: run(resume, env=one_thread()), lambda: run(other, env=one_thread()))
    return tmp, {"resumed": resumed, "other": rerun}


def test_resume_needs_only_the_runs_own_checkpoint(run_without_its_pretrained_file):
    tmp, done = run_without_its_pretrained_file
    result = done["resumed"]
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "model.pretrained_checkpoint is not read" in log and "Loaded checkpoint" in log
    last = torch.load(tmp / "resumed" / "checkpoint_last.pt", weights_only=True)
    assert last["optimizer_history"][-1]["num_updates"] == 6
    assert last["cfg"]["model"]["pretrained_checkpoint"] == str(tmp / "init.pt")  # the run's record is kept


def test_evaluate_needs_only_the_runs_checkpoint(run_without_its_pretrained_file, capsys):
    tmp, _ = run_without_its_pretrained_file
    assert evaluated(tmp / "run" / "checkpoint_best.pt", tmp / "images", capsys)["n"] == 12


def test_export_needs_only_the_runs_checkpoint(run_without_its_pretrained_file):
    from d2v_plugin import load_classifier

    tmp, _ = run_without_its_pretrained_file
    from d2v_plugin.cli import export

    assert export.main([str(tmp / "run" / "checkpoint_best.pt"), "--out", str(tmp / "export")]) == 0
    assert load_classifier(tmp / "export").classes == ["class_0", "class_1", "class_2"]


def test_rerun_into_a_folder_of_another_models_run_stops_naming_it(run_without_its_pretrained_file):
    _, done = run_without_its_pretrained_file
    result = done["other"]
    assert result.returncode != 0
    line = exception_line(result.stderr)
    assert "checkpoint_last.pt holds a run of another model (model.depth=2 here, 5 there)" in line
    assert "train into another checkpoint.save_dir" in line
