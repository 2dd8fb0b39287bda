"""Several processes and cluster life: ranks started one per process or by torchrun train as one process
does; a run stopped by a signal saves, exits 75 and resumes to the same weights; data-loading workers
leave the signals to the training process; a run stopped on 2 ranks continues its epoch on 1."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from fairseq.data import iterators

from conftest import REPO, VENV_BIN, free_port, json_records, max_diff, one_thread, run, together, train_cmd, weights
from d2v_plugin import cluster
from d2v_plugin.data import ImageFolderDataset, index_split, train_transform
from d2v_plugin.demo_data import write_random_images


# --- signals, SLURM ---------------------------------------------------------------------------------

def test_signal_names_are_checked():
    assert cluster.parse_signals("USR1,SIGTERM, usr1") == (signal.SIGUSR1, signal.SIGTERM)
    assert cluster.parse_signals("") == cluster.parse_signals("none") == ()
    for bad in ("KILL", "SIGSTOP", "NOPE"):
        with pytest.raises(ValueError, match=f"task.save_on_signal: '{bad}' is not a signal a process can catch"):
            cluster.parse_signals(f"USR1,{bad}")


def test_requeue_names_the_job_and_reports_what_went_wrong(caplog):
    calls = []

    def accepted(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    assert cluster.requeue_slurm_job({"SLURM_JOB_ID": "42"}, accepted)
    assert cluster.requeue_slurm_job({"SLURM_JOB_ID": "43", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3"},
                                     accepted)
    assert calls == [["scontrol", "requeue", "42"], ["scontrol", "requeue", "40_3"]]
    assert not cluster.requeue_slurm_job({}, accepted) and len(calls) == 2  # not a SLURM job: nothing run

    def refused(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "Requested operation is presently disabled\n")

    def missing(cmd, **kw):
        raise FileNotFoundError(2, "No such file or directory", "scontrol")

    with caplog.at_level("WARNING"):
        assert not cluster.requeue_slurm_job({"SLURM_JOB_ID": "44"}, refused)
        assert not cluster.requeue_slurm_job({"SLURM_JOB_ID": "45"}, missing)
        assert not cluster.requeue_slurm_job({}, accepted)
    assert "scontrol requeue 44 exited 1: Requested operation is presently disabled" in caplog.text
    assert "could not requeue SLURM job 45: scontrol requeue 45: [Errno 2] No such file or directory" in caplog.text
    assert "not a SLURM job (no SLURM_JOB_ID): not requeued" in caplog.text


def test_one_rank_s_stop_request_reaches_every_rank_in_the_same_update():
    ranks = [cluster.StopRequest((signal.SIGUSR1,)) for _ in range(3)]
    ranks[2].received = "SIGUSR1"  # only rank 2 got the signal
    outputs = [{"loss": 1.0} for _ in ranks]
    for request, output in zip(ranks, outputs):
        request.mark(output)
    assert [o[cluster.STOP_KEY] for o in outputs] == [0, 0, 1]
    summed = [{cluster.STOP_KEY: sum(o[cluster.STOP_KEY] for o in outputs)}]  # what fairseq hands every rank
    assert all(request.agree(summed) for request in ranks)
    assert not cluster.StopRequest((signal.SIGUSR1,)).agree([{cluster.STOP_KEY: 0}, {"loss": 2.0}])


@pytest.mark.parametrize("world", [1, 2])
def test_a_training_task_stops_on_its_signals_and_names_fairseqs_spawn_as_unable_to(image_root, caplog, world):
    from fairseq import tasks
    from d2v_plugin.testing.recipes import resolve

    cfg = resolve("demo", f"distributed_training.distributed_world_size={world}",
                  placeholders=["common.user_dir=d2v_plugin", f"task.data={image_root}", "model.pretrained_checkpoint=x"])
    task = tasks.setup_task(cfg.task)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        with caplog.at_level("INFO"):
            task.start_stopping_on_signals()  # what loading the training data does
            os.kill(os.getpid(), signal.SIGUSR1)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert task.stop_request.received == "SIGUSR1" and not task.stop_request.agreed
    assert "received SIGUSR1: finishing the update in flight" in caplog.text
    assert ("fairseq starts the ranks from one parent process here" in caplog.text) == (world == 2)


def test_data_loading_workers_leave_stop_signals_to_the_training_process(image_root, cache_dir):
    index = index_split(str(image_root), "train", cache_dir=cache_dir)
    ds = ImageFolderDataset(index, train_transform(16), seed=5)
    ds.stop_signals = (signal.SIGUSR1, signal.SIGTERM)  # what a training run's task sets
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=ds.collater,
                                         persistent_workers=True)
    it = iter(loader)
    batches = [next(it) for _ in range(4)]  # both workers have loaded images
    workers = list(it._workers)
    for w in workers:  # SLURM signals every process of the job: sent from another process than the parent
        subprocess.run(["kill", "-USR1", str(w.pid)], check=True)
        subprocess.run(["kill", "-TERM", str(w.pid)], check=True)
    time.sleep(1)
    batches += [next(it) for _ in range(8)]  # the rest of the 24 images: no worker died, nothing was lost
    assert all(w.is_alive() for w in workers)
    assert sorted(i for b in batches for i in b["id"].tolist()) == list(range(24))
    os.kill(workers[0].pid, signal.SIGTERM)  # PyTorch's own SIGTERM to a stuck worker still ends it
    workers[0].join(timeout=10)
    assert workers[0].exitcode == 0
    del it


# --- continuing an epoch on another number of ranks --------------------------------------------------

class Items(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def epoch_iterator(num_shards, shard_id, batch_size=2, images=24):
    batches = [list(range(i, min(i + batch_size, images))) for i in range(0, images, batch_size)]
    it = iterators.EpochBatchIterator(Items(images), list, batches, seed=3, num_shards=num_shards,
                                      shard_id=shard_id)
    return cluster.ResumableEpochBatchIterator.adopt(it, batch_size)


def test_an_epoch_stopped_on_two_ranks_continues_on_one_without_repeating_or_skipping():
    pair = [epoch_iterator(2, rank) for rank in (0, 1)]
    done = []
    for it in pair:
        itr = it.next_epoch_itr(shuffle=True)
        done += [next(itr) for _ in range(2)]  # 2 batches on each rank: 4 of the epoch's 12
    state = pair[0].state_dict()
    assert (state["num_shards"], state["iterations_in_epoch"], state["batch_size"]) == (2, 2, 2)
    one = epoch_iterator(1, 0)
    one.load_state_dict(state)
    rest = list(one.next_epoch_itr(shuffle=True))
    assert sorted(i for b in done + rest for i in b) == list(range(24))  # each image once
    whole = list(epoch_iterator(1, 0).next_epoch_itr(shuffle=True))
    assert rest == whole[4:]  # in the epoch's own order: one rank goes on where the two stopped
    with pytest.raises(ValueError, match="after 4 batches of epoch 1 on 2 ranks, which 3 ranks cannot continue"):
        epoch_iterator(3, 0).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset.batch_size=2 per rank; with dataset.batch_size=4 the epoch's "
                                         "batches would be others"):
        epoch_iterator(1, 0, batch_size=4).load_state_dict(state)
    legacy = {k: v for k, v in state.items() if k not in ("num_shards", "batch_size")}  # fairseq's own state
    same = epoch_iterator(2, 1)
    same.load_state_dict(legacy)  # read as fairseq reads it: per-rank batches on as many ranks
    assert same.iterations_in_epoch == 2


def test_micro_batches_draw_by_their_place_in_the_global_batch(monkeypatch):
    assert cluster.data_parallel_rank_and_size() == (0, 1)  # no process group: one rank

    def places(world, rank, steps):
        monkeypatch.setattr(cluster, "data_parallel_rank_and_size", lambda: (rank, world))
        place = cluster.MicroBatchPlaces()
        return [(update, place(update)) for update in (7, 8) for _ in range(steps)]

    # rank r's step s trains the epoch's batch (update x world + s) x world + r: place s x world + r
    splits = {"4 ranks": [p for r in range(4) for p in places(4, r, 1)],
              "2 ranks x 2 steps": [p for r in range(2) for p in places(2, r, 2)],
              "1 rank x 4 steps": places(1, 0, 4)}
    assert all(sorted(p) == [(u, k) for u in (7, 8) for k in range(4)] for p in splits.values())
    seeds = {cluster.micro_batch_seed(1, u, k) for u in (7, 8) for k in range(4)}
    assert len(seeds) == 8 and cluster.micro_batch_seed(1, 7, 0) != cluster.micro_batch_seed(2, 7, 0)


# --- real runs ------------------------------------------------------------------------------------

# the recipes' randomness all on: mixup on every batch, drop path, 2 data-loading workers; global batch
# 4 (24 images: 6 updates an epoch, 12 in all); a test-only criterion records each step's images
RUN = ["model.drop_path_rate=0.1", "criterion.mixup_prob=1.0", "dataset.num_workers=2", "task.global_batch_size=4",
       "common.log_format=json", "criterion._name=recording_cross_entropy"]
CPU_DDP = ["common.cpu=true", "distributed_training.distributed_world_size=2",
           "distributed_training.distributed_no_spawn=true", "distributed_training.device_id=0",
           "distributed_training.distributed_backend=gloo", "distributed_training.ddp_backend=legacy_ddp"]


def cmd(tmp, save_dir, *overrides, launcher=()):
    return train_cmd(tmp, tmp / "images", save_dir, *RUN, *overrides, batch_size=2, launcher=launcher,
                     user_dir="tests/record_batches")


def record_env(folder):
    os.makedirs(folder, exist_ok=True)
    return {"D2V_RECORD_DIR": str(folder), "PYTHONUNBUFFERED": "1"}


def start(command, env):
    """A run in a session of its own: a signal to its process group reaches its data-loading workers
    too, as SLURM signals every process of a job step."""
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **env})


def rank_cmds(tmp, save_dir, *overrides):
    port = free_port()
    return [cmd(tmp, save_dir, *CPU_DDP, *overrides, f"distributed_training.distributed_rank={rank}",
                f"distributed_training.distributed_init_method=tcp://127.0.0.1:{port}") for rank in (0, 1)]


def read_until(proc, predicate) -> str:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if predicate(line):
            return "".join(lines)
    raise AssertionError("the run ended first:\n" + "".join(lines[-40:]))


def after_update(n):
    return lambda line: "[train_inner]" in line and json.loads(line.split(" - ", 1)[1])["num_updates"] == str(n)


def rest_of(proc, seen="") -> str:
    return seen + proc.communicate(timeout=600)[0]


def steps(folder) -> dict:
    """update -> the images trained in it, from the recording criterion's files."""
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            for line in f:
                record = json.loads(line)
                out.setdefault(record["update"], []).extend(record["ids"])
    return {u: sorted(ids) for u, ids in out.items()}


def num_updates(path):
    return torch.load(path, weights_only=True)["optimizer_history"][-1]["num_updates"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny image folders, one init checkpoint, and the uninterrupted runs every test compares with:
    one process (update_freq 2) and two ranks (update_freq 1) with the same global batch."""
    tmp = tmp_path_factory.mktemp("cluster")
    write_random_images(str(tmp / "images"), classes=3, per_class={"train": 8, "val": 5}, size=24)
    train_cmd(tmp, tmp / "images", tmp / "single")  # the init checkpoint, written before the runs start

    def pair():  # the two ranks, beside the single process; every process on one thread
        procs = [start(c, {**record_env(tmp / "rec_pair"), "OMP_NUM_THREADS": "1"})
                 for c in rank_cmds(tmp, tmp / "pair")]
        return procs, [rest_of(p) for p in procs]

    single, (procs, outputs) = together(
        lambda: run(cmd(tmp, tmp / "single"), env=one_thread(**record_env(tmp / "rec_single"))), pair)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "global batch 4 = dataset.batch_size 2 x 1 ranks x optimization.update_freq 2" in single.stdout + single.stderr
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:]
    return tmp, outputs[0]


def check_same_as_single_process(tmp, save_dir, output):
    assert "global batch 4 = dataset.batch_size 2 x 2 ranks x optimization.update_freq 1" in output
    diff = max_diff(weights(tmp / "single" / "checkpoint_last.pt"), weights(save_dir / "checkpoint_last.pt"))
    assert diff < 1e-5, diff  # the same images, mixes and drop paths; only the gradient sums' order differs
    records = json_records(output, "val")
    assert records and all(float(r["val_n"]) == 15 for r in records)  # all 15 val images, once
    single = json_records((tmp / "single" / "hydra" / "hydra_train.log").read_text(), "val")
    assert [r["val_accuracy"] for r in records] == [r["val_accuracy"] for r in single]


@pytest.mark.slow
def test_two_processes_per_rank_match_one_process(runs):
    tmp, output = runs
    check_same_as_single_process(tmp, tmp / "pair", output)
    assert steps(tmp / "rec_pair") == steps(tmp / "rec_single")  # each update trained the same images


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(runs):
    tmp, _ = runs
    launcher = [os.path.join(VENV_BIN, "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}",
                "--no-python"]
    result = run(cmd(tmp, tmp / "torchrun", *CPU_DDP, "distributed_training.distributed_init_method=env://",
                     "distributed_training.distributed_rank=${oc.env:RANK}", launcher=launcher),
                 env=record_env(tmp / "rec_torchrun"))
    assert result.returncode == 0, result.stderr[-3000:]
    check_same_as_single_process(tmp, tmp / "torchrun", result.stdout + result.stderr)


@pytest.mark.slow
def test_a_signal_mid_epoch_saves_the_next_update_exits_75_and_the_rerun_matches(runs, tmp_path):
    tmp, _ = runs
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    (fake / "scontrol").chmod(0o755)
    env = {**record_env(tmp_path / "rec"), "SLURM_JOB_ID": "4242", "PATH": f"{fake}:{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}  # as the uninterrupted run it is compared with bit for bit
    command = cmd(tmp, tmp_path / "stopped", "task.requeue_on_signal=true")
    proc = start(command, env)
    seen = read_until(proc, after_update(2))  # in the middle of epoch 1 (6 updates)
    os.killpg(proc.pid, signal.SIGUSR1)  # the run and its workers, as SLURM's --signal does
    out = rest_of(proc, seen)
    assert proc.returncode == cluster.EXIT_STOPPED, out[-3000:]
    stopped_at = num_updates(tmp_path / "stopped" / "checkpoint_last.pt")
    assert stopped_at in (3, 4), stopped_at  # the update in flight (or the next, had the signal come between two)
    assert "received SIGUSR1: finishing the update in flight" in out
    assert f"stopped after update {stopped_at} (SIGUSR1)" in out and "exit status 75" in out
    assert max(r["num_updates"] for r in json_records(out, "train_inner")) == stopped_at
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"

    resumed = run(command, env=env)  # what the requeued job runs
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(epoch 1 @ {stopped_at} updates" in resumed.stdout + resumed.stderr
    a, b = (torch.load(d / "checkpoint_last.pt", weights_only=True) for d in (tmp / "single", tmp_path / "stopped"))
    assert b["optimizer_history"][-1]["num_updates"] == 12
    assert max_diff(a["model"], b["model"]) == 0.0  # bit-identical to the uninterrupted run
    assert a["extra_state"]["val_loss"] == b["extra_state"]["val_loss"]
    assert steps(tmp_path / "rec") == steps(tmp / "rec_single")  # no update trained twice or skipped
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # a run that finished requeues nothing


@pytest.mark.slow
def test_sigterm_then_sigkill_leaves_the_previous_or_the_new_checkpoint(runs, tmp_path):
    from fairseq import checkpoint_utils

    tmp, _ = runs
    proc = start(cmd(tmp, tmp_path / "killed", "checkpoint.save_interval_updates=2"), record_env(tmp_path / "rec"))
    read_until(proc, lambda line: "Saved checkpoint" in line and "@ 2 updates" in line)
    os.killpg(proc.pid, signal.SIGTERM)  # a time limit: SIGTERM to every process, SIGKILL soon after
    read_until(proc, lambda line: "received SIGTERM" in line)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode in (cluster.EXIT_STOPPED, -signal.SIGKILL)
    last = str(tmp_path / "killed" / "checkpoint_last.pt")
    state = checkpoint_utils.load_checkpoint_to_cpu(last)  # what the resume reads
    assert state["optimizer_history"][-1]["num_updates"] in (2, 3, 4)
    assert proc.returncode == -signal.SIGKILL or state["optimizer_history"][-1]["num_updates"] > 2


@pytest.mark.slow
def test_a_run_stopped_on_two_ranks_continues_its_epoch_on_one(runs, tmp_path):
    tmp, _ = runs
    procs = [start(c, record_env(tmp_path / "rec_pair")) for c in rank_cmds(tmp, tmp_path / "run")]
    seen = read_until(procs[0], after_update(2))
    os.killpg(procs[1].pid, signal.SIGUSR1)  # rank 1 only: rank 0 learns of it with the update's statistics
    outputs = [rest_of(procs[0], seen), rest_of(procs[1])]
    assert [p.returncode for p in procs] == [cluster.EXIT_STOPPED] * 2, outputs[0][-3000:]
    stopped_at = num_updates(tmp_path / "run" / "checkpoint_last.pt")
    assert stopped_at in (3, 4) and "received SIGUSR1" in outputs[1] and "received SIGUSR1" not in outputs[0]
    assert f"stopped after update {stopped_at} (a signal to another rank)" in outputs[0]

    # the same command on one rank: task.global_batch_size turns update_freq 1 into 2
    resumed = run(cmd(tmp, tmp_path / "run"), env=record_env(tmp_path / "rec_one"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "global batch 4 = dataset.batch_size 2 x 1 ranks x optimization.update_freq 2" in log
    assert (f"continuing epoch 1 after its first {2 * stopped_at} batches: saved on 2 ranks ({stopped_at} batches "
            f"each), {2 * stopped_at} each on 1 ranks") in log
    before, after = steps(tmp_path / "rec_pair"), steps(tmp_path / "rec_one")
    assert sorted(before) == list(range(stopped_at)) and sorted(after) == list(range(stopped_at, 12))
    epoch_1 = [i for u in range(6) for i in {**before, **after}[u]]
    assert sorted(epoch_1) == list(range(24))  # every image of the epoch exactly once
    assert {**before, **after} == steps(tmp / "rec_pair")  # each update with the uninterrupted run's images
    diff = max_diff(weights(tmp / "pair" / "checkpoint_last.pt"), weights(tmp_path / "run" / "checkpoint_last.pt"))
    assert diff < 1e-5, diff


@pytest.mark.slow
def test_a_stop_at_an_epoch_end_keeps_the_best_checkpoint_and_its_score(image_root, tmp_path):
    # validation top-1 75% after epoch 1, 50% after epoch 2 (worse), 100% after epoch 3; SIGUSR1 arrives
    # during update 12, the last of epoch 2: fairseq validates and saves there anyway, then the run stops
    save_dir = tmp_path / "run"
    command = train_cmd(tmp_path, image_root, save_dir, "criterion._name=scripted_cross_entropy",
                        "+criterion.valid_top1=[0.75,0.5,1.0]", "+criterion.signal_in_update=12",
                        "checkpoint.no_epoch_checkpoints=false", "optimization.max_epoch=3", "dataset.num_workers=2",
                        max_update=18, user_dir="tests/scripted_run")
    stopped = run(command)
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode == cluster.EXIT_STOPPED, log[-3000:]
    assert "stopped after update 12 (SIGUSR1)" in log
    epoch_1, best, last = (torch.load(save_dir / name, weights_only=True)
                           for name in ("checkpoint1.pt", "checkpoint_best.pt", "checkpoint_last.pt"))
    assert last["optimizer_history"][-1]["num_updates"] == 12 and last["extra_state"]["val_loss"] == 50.0
    assert max_diff(best["model"], epoch_1["model"]) == 0.0  # still epoch 1's weights
    assert best["extra_state"]["best"] == last["extra_state"]["best"] == 75.0

    resumed = run(command)  # the rerun: epoch 3 is the best yet
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    best, epoch_3 = (torch.load(save_dir / name, weights_only=True) for name in ("checkpoint_best.pt", "checkpoint3.pt"))
    assert max_diff(best["model"], epoch_3["model"]) == 0.0 and best["extra_state"]["best"] == 100.0
