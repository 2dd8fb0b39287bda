"""Reliability: deterministic augmentation, resume after SIGKILL, atomic checkpoints, NaN losses, clear
errors for wrong settings, untrusted files at every entry point. (Several processes, signals and
resuming on another number of ranks: tests/test_cluster.py.)"""
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, Calls, exception_line, max_diff, one_thread, run, tiny_encoder, together, train_cmd
from d2v_plugin.demo_data import write_random_images
from d2v_plugin.data import ImageFolderDataset, index_split, train_transform

pytestmark = pytest.mark.slow


# --- augmentation ------------------------------------------------------------------------------

def test_augmentation_depends_on_seed_epoch_and_index_only(image_root, cache_dir):
    index = index_split(str(image_root), "train", cache_dir=cache_dir)
    ds = ImageFolderDataset(index, train_transform(16), seed=5)
    state = torch.get_rng_state()
    first = [ds[i]["image"] for i in range(6)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never touched
    torch.manual_seed(123)  # ... and its state does not matter
    again = [ds[i]["image"] for i in reversed(range(6))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=ds.collater)
    batched = torch.cat([b["net_input"]["images"] for b in loader])[:6]
    assert torch.equal(batched, ds.collater([ds[i] for i in range(6)])["net_input"]["images"])
    ds.set_epoch(2)
    assert not torch.equal(ds[0]["image"], first[0])  # a new epoch, a new crop


# --- resume after a crash ----------------------------------------------------------------------

def kill_after_saving(cmd, update, env=None):
    """Start a run and SIGKILL it right after it saved the checkpoint of ``update``."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if "Saved checkpoint" in line and f"@ {update} updates" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("precision", [[], ["common.bf16=true"], ["common.fp16=true"]], ids=["fp32", "bf16", "fp16"])
def test_killed_run_resumes_to_the_same_weights_and_accuracy(tmp_path, image_root, precision):
    # the recipes' loader (2 workers kept across epochs), mixup and drop path on: every source of
    # randomness must survive the restart; half precision also needs fairseq's fp32 master weights and
    # (fp16) its loss scaler restored. On the CPU: common.cpu=true, as the demo recipe sets.
    extra = ["checkpoint.save_interval_updates=2", "model.drop_path_rate=0.1", "criterion.mixup_prob=1.0",
             "dataset.num_workers=2", *precision]
    cmd = train_cmd(tmp_path, image_root, tmp_path / "killed", *extra)
    env = one_thread()  # the uninterrupted run beside the one killed, each on one thread
    whole, _ = together(lambda: run(train_cmd(tmp_path, image_root, tmp_path / "whole", *extra), env=env),
                        lambda: kill_after_saving(cmd, 8, env))  # in the middle of epoch 2
    assert whole.returncode == 0, whole.stderr[-3000:]
    resumed = run(cmd, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "Loaded checkpoint" in log and "(epoch 2 @ " in log

    a, b = (torch.load(d / "checkpoint_last.pt", weights_only=True) for d in (tmp_path / "whole", tmp_path / "killed"))
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 12
    assert max_diff(a["model"], b["model"]) == 0.0  # bit-identical on CPU
    assert a["extra_state"]["val_loss"] == b["extra_state"]["val_loss"]
    if precision:  # the weights fairseq steps are the fp32 masters, saved beside the half-precision model
        masters = b["last_optimizer_state"]["d2v_fp32_masters"]
        half = torch.bfloat16 if "bf16" in precision[0] else torch.float16
        assert masters and all(m.dtype == torch.float32 for m in masters)
        assert any(not torch.equal(m, m.to(half).float()) for m in masters)  # finer than the model's weights


# --- checkpoints are never half-written --------------------------------------------------------

def test_interrupted_checkpoint_write_leaves_the_previous_file_loadable(tmp_path, monkeypatch):
    from fairseq import checkpoint_utils

    last = tmp_path / "checkpoint_last.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, last)
    real_save = torch.save

    def killed_halfway(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_utils.torch_persistent_save({"model": {"w": torch.ones(3)}}, str(last))
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(last, weights_only=True)["model"]["w"], torch.zeros(3))


# --- numerical faults ---------------------------------------------------------------------------

def test_nan_loss_stops_the_run_naming_the_update_and_keeps_weights_clean(tmp_path, image_root):
    result = run(train_cmd(tmp_path, image_root, tmp_path / "nan", "criterion._name=nan_at_update_cross_entropy",
                           "+criterion.nan_at_update=5", "checkpoint.save_interval_updates=2",
                           user_dir="tests/nan_inject"))
    log = result.stdout + result.stderr
    assert result.returncode != 0
    # fairseq (fp32) stops at the first non-finite gradient norm: FloatingPointError, NanDetector names
    # the first module with NaN, and the state *before* the bad update is saved as crash.pt
    assert "FloatingPointError: gradients are Nan/Inf" in log
    assert "NaN detected in output of head" in log
    crash = torch.load(tmp_path / "nan" / "crash.pt", weights_only=True)
    assert crash["optimizer_history"][-1]["num_updates"] == 4  # the update that failed is the 5th
    assert all(torch.isfinite(v).all() for v in crash["model"].values())  # weights not poisoned
    last = torch.load(tmp_path / "nan" / "checkpoint_last.pt", weights_only=True)
    assert last["optimizer_history"][-1]["num_updates"] == 4
    assert all(torch.isfinite(v).all() for v in last["model"].values())


# --- clear errors for wrong settings ------------------------------------------------------------

PLUGIN_ERRORS = ("d2v_plugin.", "ValueError: ", "FileNotFoundError: ")


WRONG_SETTINGS = [
    (["task.data=???"], "task.data is not set: pass task.data="),
    # (it trained a randomly initialised encoder, without a word: fairseq's merge put the default in its place)
    (["model.pretrained_checkpoint=???"], "model.pretrained_checkpoint is not set: pass model.pretrained_checkpoint="),
    # (a missing data folder and a class-count mismatch: tests/test_end_to_end.py)
    (["model.pretrained_checkpoint=/no/ckpt.pt"], "checkpoint not found: /no/ckpt.pt"),
    (["model.depth=9"], "model.depth=9 but the checkpoint has 5 blocks"),
    (["model.embed_dim=64"], "model.embed_dim=64 but the checkpoint has 32"),
    (["dataset.batch_size=5"], "dataset.batch_size=5 is odd, but mixup/cutmix pairs the samples"),
    (["model.pooling=max"], "model.pooling='max' is not a pooling mode; use one of mean, cls"),
    (["task.on_bad_image=ignore"], "task.on_bad_image='ignore': use skip or error"),
    (["task.device_decode=true", "task.auto_augment=rand-m9-mstd0.5-inc1"],
     "task.device_decode=true works with the plugin's augmentation only"),
    (["task.global_batch_size=10"], "task.global_batch_size=10 is not reachable: dataset.batch_size=4 x 1 ranks x "
                                    "optimization.update_freq=1 = 4, and 4 does not divide 10: set dataset.batch_size=2"),
    (["common.cpu=false", "common.fp16=true"], "common.fp16=true but no CUDA device is available"),
    (["common.cpu=false", "common.fp16=false", "common.bf16=true"], "to train on the CPU set common.cpu=true"),
]


@pytest.fixture(scope="module")
def wrong_setting_runs(tmp_path_factory):
    """Each wrong setting's run, started side by side (each stops at start-up)."""
    tmp = tmp_path_factory.mktemp("wrong_settings")
    write_random_images(str(tmp / "images"), classes=3, per_class={"train": 8, "val": 4}, size=24)
    train_cmd(tmp, tmp / "images", tmp / "run")  # the init checkpoint, written once
    results = together(*(lambda i=i, o=o: run(train_cmd(tmp, tmp / "images", tmp / f"run{i}", *o), env=one_thread())
                         for i, (o, _) in enumerate(WRONG_SETTINGS)))
    return {i: r for i, r in enumerate(results)}


@pytest.mark.parametrize("case", range(len(WRONG_SETTINGS)), ids=[e[:60] for _, e in WRONG_SETTINGS])
def test_wrong_settings_stop_with_one_line_naming_the_setting(wrong_setting_runs, case):
    result, expected = wrong_setting_runs[case], WRONG_SETTINGS[case][1]
    assert result.returncode != 0
    assert expected in exception_line(result.stderr, PLUGIN_ERRORS)


# --- untrusted files ---------------------------------------------------------------------------

@pytest.fixture
def evil(tmp_path):
    """A checkpoint that looks like a fine-tuned one but runs a command when unpickled."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"cfg": {"model": {"_name": "data2vec2_image_classifier"}}, "model": tiny_encoder().state_dict(),
                "extra": Calls(os.system, f"touch {marker}")}, path)
    return path, marker


EVIL_COMMANDS = [
    ["-m", "d2v_plugin.cli.convert", "{evil}", "--out", "{tmp}/out.pt"],
    ["-m", "d2v_plugin.cli.evaluate", "{evil}", "--data", "{data}"],
    ["-m", "d2v_plugin.cli.predict", "{evil}", "{image}"],
    ["-m", "d2v_plugin.cli.knn", "{evil}", "--data", "{data}"],
    ["-m", "d2v_plugin.cli.export", "{evil}", "--out", "{tmp}/export"],
]


@pytest.fixture(scope="module")
def hostile_runs(tmp_path_factory):
    """Every command on its own malicious checkpoint (its own marker), fine-tuning from one, and a recipe value
    that is Python code: all started side by side. (command -> (result, marker))"""
    tmp = tmp_path_factory.mktemp("hostile")
    images = tmp / "images"
    write_random_images(str(images), classes=3, per_class={"train": 8, "val": 4}, size=24)
    image = next((images / "val" / "class_0").iterdir())
    calls, markers = [], []
    for i, command in enumerate([*EVIL_COMMANDS, "fine-tune", "config"]):
        work = tmp / f"case{i}"
        work.mkdir()
        marker = work / "pwned"
        markers.append(marker)
        if command == "config":
            payload = f"__import__('os').system('touch {marker}')"
            cmd = train_cmd(work, images, work / "run", f"model.pooling=\"{payload}\"")
        else:
            path = work / "evil.pt"
            torch.save({"cfg": {"model": {"_name": "data2vec2_image_classifier"}}, "model": tiny_encoder().state_dict(),
                        "extra": Calls(os.system, f"touch {marker}")}, path)
            cmd = (train_cmd(work, images, work / "run", init=path) if command == "fine-tune" else
                   [sys.executable, *(a.format(evil=path, tmp=work, data=images, image=image) for a in command)])
        calls.append(lambda cmd=cmd: run(cmd, env=one_thread()))
    return dict(zip(range(len(calls)), zip(together(*calls), markers)))


@pytest.mark.parametrize("case", range(len(EVIL_COMMANDS)), ids=[c[1].split(".")[-1] for c in EVIL_COMMANDS])
def test_malicious_pickle_is_refused_by_every_command(hostile_runs, case):
    result, marker = hostile_runs[case]
    assert result.returncode != 0 and not marker.exists()
    assert "refusing to unpickle" in result.stderr and "posix.system" in result.stderr


def test_malicious_pickle_is_refused_as_pretrained_checkpoint(hostile_runs):
    result, marker = hostile_runs[len(EVIL_COMMANDS)]
    assert result.returncode != 0 and not marker.exists()
    assert "model.trust_checkpoint=true" in exception_line(result.stderr, PLUGIN_ERRORS)


def test_malicious_pickle_is_refused_by_load_classifier(evil):
    from d2v_plugin import load_classifier
    from d2v_plugin.models.checkpoints import CheckpointError

    path, marker = evil
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_classifier(path)
    assert not marker.exists()


def test_config_values_are_never_evaluated(hostile_runs):
    result, marker = hostile_runs[len(EVIL_COMMANDS) + 1]
    assert result.returncode != 0 and not marker.exists()

