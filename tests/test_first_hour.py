"""What a new user sees in the first hour: quiet consoles, fast --help, runs from any folder, fairseq's
own tools, the demo keeping their files, exported files with ordinary permissions."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, VENV_BIN, json_records, run, train_cmd

COMMANDS = ["evaluate", "export", "predict", "knn", "convert", "compare", "preresize", "where", "pack"]
THIRD_PARTY_NOISE = ("FutureWarning", "UserWarning", "DeprecationWarning", "DEBUG:", "warnings.warn(")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_answers_without_importing_torch_or_fairseq(command):
    probe = (f"import runpy, sys; sys.argv = ['x', '--help']\n"
             f"try:\n    runpy.run_module('d2v_plugin.cli.{command}', run_name='__main__')\n"
             f"except SystemExit:\n    pass\n"
             f"print(json.dumps(sorted(m for m in ('torch', 'fairseq', 'timm', 'numpy') if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", "import json\n" + probe], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m d2v_plugin.cli.{command}")
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch demo run on tiny data, started from another working directory with the paths
    `python -m d2v_plugin.cli.where` prints, as the README shows."""
    from d2v_plugin.demo_data import write_random_images

    tmp = tmp_path_factory.mktemp("first_hour")
    write_random_images(str(tmp / "images"), classes=3, per_class={"train": 8, "val": 4}, size=24)
    where = {k: subprocess.run([sys.executable, "-m", "d2v_plugin.cli.where", k], capture_output=True, text=True,
                               cwd=tmp, check=True).stdout.strip() for k in ("config", "user_dir")}
    cmd = train_cmd(tmp, tmp / "images", tmp / "run", "common.log_format=json", batch_size=8, max_update=6,
                    user_dir=where["user_dir"])
    cmd[cmd.index("--config-dir") + 1] = where["config"]
    elsewhere = tmp / "somewhere_else"
    elsewhere.mkdir()
    result = subprocess.run(cmd, cwd=elsewhere, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, result


def test_a_run_from_another_folder_with_the_printed_paths_works(finished_run):
    tmp, _ = finished_run
    assert (tmp / "run" / "checkpoint_best.pt").is_file()
    assert not (tmp / "somewhere_else" / "outputs").exists()  # hydra kept to the run's folder


def test_the_training_console_has_no_third_party_noise_and_each_record_once(finished_run):
    _, result = finished_run
    console = result.stdout + result.stderr
    noise = [line for line in console.splitlines() if any(n in line for n in THIRD_PARTY_NOISE)]
    assert noise == [], noise
    updates = [r["num_updates"] for r in json_records(console, "train_inner")]
    assert updates == sorted(set(updates)) and len(updates) == 6  # every record printed once


def test_load_classifier_in_a_python_session_prints_nothing(finished_run):
    tmp, _ = finished_run
    code = (f"import d2v_plugin\nm = d2v_plugin.load_classifier({str(tmp / 'run' / 'checkpoint_best.pt')!r})\n"
            f"print(m.classes)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.strip() == "['class_0', 'class_1', 'class_2']"


def test_fairseq_validate_works_with_and_without_the_plugins_criterion(finished_run):
    tmp, _ = finished_run
    ckpt = tmp / "run" / "checkpoint_best.pt"
    evaluate = run([sys.executable, "-m", "d2v_plugin.cli.evaluate", str(ckpt), "--data", str(tmp / "images")])
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert "UserWarning" not in evaluate.stderr and "FutureWarning" not in evaluate.stderr
    top1 = json.loads(evaluate.stdout.strip().splitlines()[-1])["top1"]
    for extra in ([], ["--criterion", "mixup_cross_entropy"]):
        validate = run([os.path.join(VENV_BIN, "fairseq-validate"), str(tmp / "images"), "--user-dir", "d2v_plugin",
                        "--task", "image_folder_classification", "--path", str(ckpt), "--valid-subset", "val",
                        "--batch-size", "8", "--cpu", *extra])
        assert validate.returncode == 0, validate.stderr[-2000:]
        line = next(li for li in (validate.stdout + validate.stderr).splitlines() if "valid on 'val' subset" in li)
        accuracy = float(line.split("| accuracy ")[1].split(" |")[0])
        assert accuracy == round(top1 * 100, 3) and "| n 12 |" in line


def test_exported_files_get_the_permissions_of_any_file_the_user_writes(finished_run, tmp_path):
    tmp, _ = finished_run
    from d2v_plugin.cli import export

    assert export.main([str(tmp / "run" / "checkpoint_best.pt"), "--out", str(tmp_path / "exported")]) == 0
    with open(tmp_path / "plain.txt", "w"):
        pass
    mode = os.stat(tmp_path / "plain.txt").st_mode & 0o777
    for name in ("model.safetensors", "config.json"):
        assert os.stat(tmp_path / "exported" / name).st_mode & 0o777 == mode, name


def test_the_demo_deletes_only_what_it_created(tmp_path):
    import runpy

    demo = runpy.run_path(os.path.join(REPO, "scripts", "demo.py"))
    work = tmp_path / "demo_work"
    (work / "run" / "hydra").mkdir(parents=True)
    (work / "data" / "train").mkdir(parents=True)
    (work / "init.pt").write_bytes(b"old")
    (work / "my_export").mkdir()
    (work / "my_export" / "model.safetensors").write_bytes(b"the user's")
    (work / "notes.md").write_text("the user's")
    (work / "data_wds").mkdir()
    demo["clean_previous"](str(work))
    assert sorted(os.listdir(work)) == ["my_export", "notes.md"]
    assert (work / "my_export" / "model.safetensors").read_bytes() == b"the user's"
