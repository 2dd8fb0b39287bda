"""What a new user sees in the first hour: quiet consoles, fast --help, runs from any folder, fairseq's
own tools, the demo keeping their files, exported files with ordinary permissions."""
import json
import os
import subprocess
import sys

import pytest

from conftest import (REPO, VENV_BIN, doc_block_after, exception_line, json_records, one_thread, run, together,
                      train_cmd)

COMMANDS = ["evaluate", "export", "predict", "knn", "convert", "compare", "preresize", "where", "pack", "probe", "track",
            "recipe", "similarity"]
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
    `python -m d2v_plugin.cli.where` prints, as docs/running.md shows."""
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


RERUNS = [(6, "optimization.max_update=6 (it is at update 6)"), (100, "optimization.max_epoch=2 (it has trained 2 epochs)")]


@pytest.fixture(scope="module")
def after_the_run(finished_run):
    """What a user runs next, side by side: the finished run's command again (into copies of the run, with
    max_update 6 and 100), a typo in an override, load_classifier in a Python session, a run from the parent
    folder of a clone named d2v_plugin."""
    import shutil

    tmp, _ = finished_run
    commands = {}
    for max_update, _ in RERUNS:
        shutil.copytree(tmp / "run", tmp / f"rerun_{max_update}")
        commands[max_update] = train_cmd(tmp, tmp / "images", tmp / f"rerun_{max_update}", "common.log_format=json",
                                         batch_size=8, max_update=max_update)
    commands["typo"] = train_cmd(tmp, tmp / "images", tmp / "typo", f"+task.dta={tmp / 'images'}", "+model.dept=2")
    commands["session"] = [sys.executable, "-c", f"import d2v_plugin\nm = d2v_plugin.load_classifier("
                           f"{str(tmp / 'run' / 'checkpoint_best.pt')!r})\nprint(m.classes)"]
    calls = {name: (lambda c=c: run(c, env=one_thread())) for name, c in commands.items()}
    session = commands["session"]  # from the user's folder, not the repository
    calls["session"] = lambda: subprocess.run(session, cwd=tmp, capture_output=True, text=True, timeout=120,
                                              env=one_thread())
    # and a clone named d2v_plugin seen from its parent folder
    from d2v_plugin.demo_data import write_random_images

    write_random_images(str(tmp / "few"), classes=3, per_class={"train": 4, "val": 2}, size=24)
    parent = tmp / "parent"
    parent.mkdir()
    os.symlink(REPO, parent / "d2v_plugin")
    cmd = train_cmd(tmp, tmp / "few", tmp / "from_parent", "dataset.num_workers=0", max_update=1)
    cmd[cmd.index("--config-dir") + 1] = os.path.join(REPO, "config")
    calls["parent"] = lambda: subprocess.run(cmd, cwd=parent, capture_output=True, text=True, timeout=600,
                                             env=one_thread())
    return dict(zip(calls, together(*calls.values())))


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
    pace = [line for line in console.splitlines() if "training at " in line]  # the measured pace, said once
    assert len(pace) == 1 and "(measured over updates 2-3)" in pace[0], pace


def test_load_classifier_in_a_python_session_prints_nothing(after_the_run):
    result = after_the_run["session"]
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.strip() == "['class_0', 'class_1', 'class_2']"


def test_fairseq_validate_works_with_and_without_the_plugins_criterion(finished_run):
    tmp, _ = finished_run
    ckpt = tmp / "run" / "checkpoint_best.pt"
    validate = [[os.path.join(VENV_BIN, "fairseq-validate"), str(tmp / "images"), "--user-dir", "d2v_plugin", "--task",
                 "image_folder_classification", "--path", str(ckpt), "--valid-subset", "val", "--batch-size", "8",
                 "--cpu", *extra] for extra in ([], ["--criterion", "mixup_cross_entropy"])]
    evaluate = [sys.executable, "-m", "d2v_plugin.cli.evaluate", str(ckpt), "--data", str(tmp / "images")]
    evaluated, *done = together(*(lambda c=c: run(c, env=one_thread()) for c in (evaluate, *validate)))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "UserWarning" not in evaluated.stderr and "FutureWarning" not in evaluated.stderr
    top1 = json.loads(evaluated.stdout.strip().splitlines()[-1])["top1"]
    for result in done:
        assert result.returncode == 0, result.stderr[-2000:]
        line = next(li for li in (result.stdout + result.stderr).splitlines() if "valid on 'val' subset" in li)
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


@pytest.mark.parametrize("max_update,reached", RERUNS)
def test_rerunning_a_finished_run_says_so_and_trains_nothing_more(finished_run, after_the_run, max_update, reached):
    """fairseq alone trains one update past max_update and saves it over the finished run, every rerun."""
    import torch

    tmp, _ = finished_run
    rerun = tmp / f"rerun_{max_update}"
    before = torch.load(tmp / "run" / "checkpoint_last.pt", weights_only=True)
    result = after_the_run[max_update]
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-3000:]
    warning = next(line for line in console.splitlines() if "has already reached" in line)
    assert f"checkpoint.save_dir={rerun} has already reached {reached}" in warning
    assert "to start another run, give another checkpoint.save_dir" in warning
    assert json_records(console, "train_inner") == []  # not one more update
    after = torch.load(rerun / "checkpoint_last.pt", weights_only=True)
    assert after["optimizer_history"][-1]["num_updates"] == before["optimizer_history"][-1]["num_updates"] == 6
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())


def test_a_typo_in_an_override_names_the_key_and_the_nearest_one(after_the_run):
    result = after_the_run["typo"]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]  # the answer alone, in one line
    lines = [line for line in result.stderr.splitlines() if line.startswith("unknown key")]
    assert len(lines) == 1 and lines[0] in ("unknown key task.dta; did you mean task.data?",
                                            "unknown key model.dept; did you mean model.depth?")


# the docs' command blocks these tests run as written (tests/test_docs.py leaves them to this module)
RUN_HERE = {"docs/running.md": ["**Without a recipe**"],
            "docs/probes.md": ["**Checkpoints to track.**", "**Is the difference real?**"]}


def test_the_readme_command_without_a_recipe_runs_on_the_demo_digits(runs, tmp_path):
    command = doc_block_after("docs/running.md", "**Without a recipe**")
    assert "fairseq-hydra-train" in command and "/data/imagenet" in command
    command = (command.replace("/data/imagenet", str(runs["data"])).replace("/ckpt/base_imagenet.pt", str(runs["init"]))
               + f" +model.num_classes=10 +task.image_size=16 optimization.max_update=8 dataset.batch_size=64"
                 f" checkpoint.save_dir={tmp_path / 'run'}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(["bash", "-c", command], cwd=elsewhere, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"})
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-3000:]
    valid = next(line for line in console.splitlines() if "valid on 'valid' subset" in line)
    assert "| n 360 |" in valid  # fairseq's valid subset read from val/
    assert (tmp_path / "run" / "checkpoint_best.pt").is_file()


def test_more_workers_than_cores_is_said_once(caplog, recwarn):
    from types import SimpleNamespace

    import torch

    from d2v_plugin.training import check_workers

    check_workers(SimpleNamespace(num_workers=2), 2)
    assert caplog.records == []
    check_workers(SimpleNamespace(num_workers=10), 2)
    assert [r.getMessage()[:60] for r in caplog.records] == [
        "dataset.num_workers=10 data-loading processes per loader, on"]
    for _ in range(2):  # torch's own warning, once per loader (train, valid), is not repeated
        torch.utils.data.DataLoader(list(range(4)), num_workers=10).check_worker_number_rationality()
    assert not [w for w in recwarn if "DataLoader will create" in str(w.message)]


def test_the_pace_is_said_once_from_the_measured_updates():
    from d2v_plugin.training import UpdatePace

    now = [0.0]
    pace = UpdatePace(log_interval=100, max_update=1000, updates_per_epoch=500, max_epoch=10, clock=lambda: now[0])
    for update in range(6):
        for _ in range(2):  # two micro-batches an update (update_freq 2)
            pace.seen(update)
        now[0] += 30.0 if update == 0 else 2.0  # the first update is slow (loaders, kernels): not counted
    assert pace.said == ("training at 2.0 s/update (measured over updates 2-3); the next progress line "
                         "(common.log_interval=100) in 3 min; an epoch (about 500 updates) takes 17 min; the "
                         "remaining 997 updates to update 1000, 33 min")


def test_a_run_from_the_repositorys_parent_folder_with_the_relative_user_dir_works(finished_run, after_the_run):
    """A clone named d2v_plugin seen from its parent: fairseq put the parent first on sys.path and imported the
    clone as an empty namespace package ('Could not infer task type'); make setup's path entry wins."""
    tmp, _ = finished_run
    result = after_the_run["parent"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp / "from_parent" / "checkpoint_last.pt").is_file()


def test_the_readmes_demo_figures_say_what_they_were_measured_on_and_how_bf16_fares_on_a_cpu():
    """The demo's pace (10 updates/s) was an idle machine's, unsaid: at a load of 3.5 a user saw 1 update/s; and
    the docs promised 2.5x from bf16 on a CPU, which a user did not see."""
    demo = open(os.path.join(REPO, "docs", "demo.md")).read()
    assert "idle machine" in demo and "OMP_NUM_THREADS" in demo and "dataset.num_workers=1" in demo
    evaluation = open(os.path.join(REPO, "docs", "evaluation.md")).read()
    assert "2.5x faster" not in evaluation and "Where loading dominates" in evaluation


@pytest.fixture(scope="module")
def tracked(runs, tmp_path_factory):
    """docs/probes.md's "Checkpoints to track" block, run on the session's digits (checkpoints every 4 updates, not
    50): demo_work/ with the run, its track and its data."""
    command = doc_block_after("docs/probes.md", "**Checkpoints to track.**")
    assert "checkpoint.keep_interval_updates=-1" in command
    demo = tmp_path_factory.mktemp("tracked") / "demo_work"
    demo.mkdir()
    os.symlink(runs["data"], demo / "data")
    os.symlink(runs["init"], demo / "init.pt")
    result = run_readme(command, demo, ("--config-name demo", "--config-name demo task.image_size=16 "
                                        "dataset.batch_size=64 dataset.num_workers=1 optimization.max_epoch=100 "
                                        "common.log_interval=50"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return demo


def run_readme(command: str, demo, *changes):
    """A docs block run from the repository root on ``demo`` (its demo_work/), checkpoints every 4 updates."""
    command = command.replace("demo_work/", f"{demo}/").replace("save_interval_updates=50", "save_interval_updates=4")
    command = command.replace("max_update=150", "max_update=12").replace("checkpoint_1_50", "checkpoint_1_4")
    for old, new in changes:
        command = command.replace(old, new)
    return subprocess.run(["bash", "-ec", command], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"})


def test_the_readmes_checkpoints_to_track_block_leaves_three_checkpoints_and_their_track(tracked):
    """checkpoint.save_interval_updates=50 alone kept one checkpoint (the demo recipe's keep_interval_updates: 1)."""
    run_dir = tracked / "tracked"
    assert len(list(run_dir.glob("checkpoint_*_*.pt"))) >= 3
    rows = [json.loads(line) for line in (run_dir / "track.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [4, 8, 12] and all(len(r["file"]["sha256"]) == 64 for r in rows)
    assert all(r["top1_interval"]["low"] <= r["top1"] <= r["top1_interval"]["high"] for r in rows)


def test_the_readmes_is_the_difference_real_block_gives_the_verdict_its_discordant_counts_imply(tracked):
    from d2v_plugin.evaluation.statistics import mcnemar

    result = run_readme(doc_block_after("docs/probes.md", "**Is the difference real?**"), tracked)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    pair = json.loads(result.stdout.strip().splitlines()[-1])
    assert pair["a"].startswith("evaluate-val-checkpoint_1_4-") and pair["b"].startswith("evaluate-val-checkpoint_best-")
    a, b = pair["only_a_right"], pair["only_b_right"]
    expected = ("A better" if a > b else "B better") if mcnemar(a, b) < 0.05 else "within noise at 95%"
    assert pair["verdict"] == expected and pair["holm_p"] == pair["mcnemar_p"] == mcnemar(a, b)
    d = pair["difference"]
    assert d["difference"] == pytest.approx(pair["top1_a"] - pair["top1_b"]) and d["low"] <= d["difference"] <= d["high"]
    assert d["resamples"] == 10_000 and pair["n"] == 360
    assert (tracked / "paired" / "paired.md").is_file()


def test_track_sweeps_every_block_of_every_checkpoint_and_rankme_tells_the_fine_tuned_from_the_init(tracked,
                                                                                                    capsys):
    """track probed one block per checkpoint: the best block's drift over a run was invisible."""
    from d2v_plugin.cli import probe as probe_cli
    from d2v_plugin.cli import track as track_cli

    run_dir = tracked / "tracked"
    assert track_cli.main([str(run_dir), "--data", str(tracked / "data"), "--probes", "knn,rankme", "--sweep-blocks",
                           "--workers", "1", "--settle", "0.2"]) == 0
    lines = [json.loads(x) for x in (run_dir / "track.jsonl").read_text().splitlines()]
    swept = [r for r in lines if r.get("block") is not None]
    assert sorted({(r["update"], r["block"], r["probe"]) for r in swept}) == sorted(
        (u, b, p) for u in (4, 8, 12) for b in range(1, 7) for p in ("knn", "rankme")) and len(swept) == 36
    assert all(r["features"] == f"mean@{r['block']}" for r in swept)
    from PIL import Image

    for name in ("blocks_vs_update.png", "top1_vs_update.png"):
        with Image.open(run_dir / name) as img:
            img.verify()
    capsys.readouterr()
    values = {}
    for name, ckpt in (("init", tracked / "init.pt"), ("fine-tuned", run_dir / "checkpoint_best.pt")):
        assert probe_cli.main([str(ckpt), "--data", str(tracked / "data"), "--probes", "rankme", "--cache", "none",
                               "--workers", "1"]) == 0
        values[name] = json.loads(capsys.readouterr().out)["value"]
    # measured (4.68 against 3.87): 12 updates of fine-tuning on 10 classes concentrate the last block's features
    # in fewer directions than the random init spreads them over (lower effective rank)
    assert values["fine-tuned"] < values["init"] * 0.95, values
