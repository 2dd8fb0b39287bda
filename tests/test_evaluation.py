"""Evaluation at the scale users have: devices and precision, several ranks under torchrun, a feature store
that survives a kill and is keyed on everything that changes the features, kNN with several k in one pass
and bounded memory."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, VENV_BIN, free_port, one_thread, run, tiny_encoder, together, train_cmd
from d2v_plugin.demo_data import write_random_images
from d2v_plugin.evaluation import features as features_module
from d2v_plugin.evaluation.knn import knn_probe, nearest
from d2v_plugin.evaluation.probes import cached_features
from d2v_plugin.evaluation.runtime import Runtime, start
from d2v_plugin.testing.checkpoints import save_data2vec_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Random-colour images (27 train, 15 val: not a multiple of 2 ranks), a tiny data2vec checkpoint and a
    short fine-tuned run of it."""
    root = tmp_path_factory.mktemp("evaluation")
    write_random_images(str(root / "images"), classes=3, per_class={"train": 9, "val": 5}, size=24)
    save_data2vec_checkpoint(tiny_encoder(), str(root / "init.pt"), prenet_depth=2)
    result = run(train_cmd(root, root / "images", root / "run", "dataset.num_workers=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def torchrun(*args, port):
    return subprocess.run([os.path.join(VENV_BIN, "torchrun"), "--nproc_per_node=2", f"--master_port={port}", "-m",
                           *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600)


STRIP = ("seconds", "images_per_s", "ranks", "search_s", "extract_s", "features_in", "per_class_dir", "provenance")


def results(stdout):
    return [{k: v for k, v in json.loads(line).items() if k not in STRIP} for line in stdout.strip().splitlines()]


@pytest.mark.slow
def test_two_ranks_under_torchrun_give_one_ranks_results(tiny, capsys):
    from d2v_plugin.cli import evaluate as evaluate_cli
    from d2v_plugin.cli import knn as knn_cli

    data = ["--data", tiny / "images", "--workers", "1"]
    best = tiny / "run" / "checkpoint_best.pt"
    knn = ["--k", "3", "5", "--cache"]
    # the two commands on two ranks each, side by side; then each in this process, on one rank
    two, two_knn = together(lambda: torchrun("d2v_plugin.cli.evaluate", best, *data, "--per-class", tiny / "pc2",
                                             "--out", tiny / "out2", port=free_port()),
                            lambda: torchrun("d2v_plugin.cli.knn", tiny / "init.pt", *data, *knn, tiny / "f2", "--out",
                                             tiny / "out2", port=free_port()))
    assert two.returncode == 0 and two_knn.returncode == 0, (two.stderr + two_knn.stderr)[-3000:]
    capsys.readouterr()
    assert evaluate_cli.main([str(a) for a in (best, *data, "--per-class", tiny / "pc1", "--out", tiny / "out1")]) == 0
    one = capsys.readouterr().out
    assert results(one) == results(two.stdout) and results(one)[0]["n"] == 15  # 8 + 7 images
    assert json.loads(two.stdout)["ranks"] == 2 and len(two.stdout.strip().splitlines()) == 1  # rank 0 prints
    # per class: the confusion matrix of both ranks' images, the same as one rank's
    for name in ("per_class.csv", "confusion.csv"):
        assert (tiny / "pc1" / name).read_text() == (tiny / "pc2" / name).read_text()
    matrix = np.loadtxt(tiny / "pc2" / "confusion.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3), dtype=int)
    assert matrix.sum(axis=1).tolist() == [5, 5, 5]  # each val class folder's images
    assert np.trace(matrix) == round(results(one)[0]["top1"] * 15)
    rows = (tiny / "pc2" / "per_class.csv").read_text().splitlines()
    assert rows[0].startswith("class_index,class,images,correct,top1") and len(rows) == 4
    from PIL import Image

    with Image.open(tiny / "pc2" / "confusion.png") as img:
        img.verify()
    assert knn_cli.main([str(a) for a in (tiny / "init.pt", *data, *knn, tiny / "f1", "--out", tiny / "out1")]) == 0
    one = capsys.readouterr().out
    assert results(one) == results(two_knn.stdout) and [r["k"] for r in results(one)] == [3, 5]
    # the per-image outcomes, gathered over the ranks in index order: one rank's file, row for row
    import pyarrow.parquet as pq

    files = sorted(p.name for p in (tiny / "out1").glob("*.outcomes.parquet"))
    assert len(files) == 3 and files == sorted(p.name for p in (tiny / "out2").glob("*.outcomes.parquet"))
    for name in files:
        a, b = pq.read_table(tiny / "out1" / name), pq.read_table(tiny / "out2" / name)
        assert a.num_rows == 15 and a.equals(b), name
        assert a.column("position").to_pylist() == list(range(15))


def knn_inputs(tiny, store):
    """The CPU runtime, the train and val splits' features, and the val features as queries."""
    runtime = start("cpu")
    feats = cached_features(str(tiny / "init.pt"), str(tiny / "images"), ["train", "val"], runtime,
                            store=str(tiny / store))
    train, val = feats.splits["train"], feats.splits["val"]
    return runtime, train, val, torch.from_numpy(np.array(val.view([0])[:]))


def test_knn_across_ranks_and_chunks_is_exactly_one_pass(tiny):
    runtime, train, _, queries = knn_inputs(tiny, "f_chunks")
    whole = nearest(train.view([0]), train.labels, queries, 5, runtime)
    small = nearest(train.view([0]), train.labels, queries, 5, runtime, train_chunk=4, query_chunk=3)
    assert torch.equal(whole.index, small.index) and torch.allclose(whole.sims, small.sims, atol=1e-6)
    # against brute force: cosine similarities of every pair (memory N_val x N_train, fine at this size)
    tf = torch.nn.functional.normalize(torch.from_numpy(np.array(train.view([0])[:])).float(), dim=-1)
    qf = torch.nn.functional.normalize(queries.float(), dim=-1)
    top = (qf @ tf.T).topk(5, dim=1)
    assert torch.equal(whole.index, top.indices) and torch.allclose(whole.sims, top.values, atol=1e-6)


def test_a_block_of_similarities_never_exceeds_its_memory_bound(tiny, monkeypatch):
    """The default query chunk follows from the bound: at ImageNet size 10,000 queries x 65,536 rows in one
    block were 2.5 GB (and the next block was computed before the last was freed)."""
    from d2v_plugin.evaluation import knn

    runtime, train, _, queries = knn_inputs(tiny, "f_bound")
    whole = nearest(train.view([0]), train.labels, queries, 5, runtime)
    blocks = []
    merge = knn._merge
    monkeypatch.setattr(knn, "_merge", lambda s, i, k: (blocks.append(len(s)), merge(s, i, k))[1])
    monkeypatch.setattr(knn, "SIMILARITY_BYTES", 4 * 8 * 4)  # 4 queries x 8 training rows of fp32
    bounded = nearest(train.view([0]), train.labels, queries, 5, runtime, train_chunk=8)
    assert blocks and max(blocks) == 4 and len(blocks) == 4 * 4  # 15 queries in 4 chunks x 27 rows in 4 chunks
    assert torch.equal(whole.index, bounded.index) and torch.allclose(whole.sims, bounded.sims, atol=1e-6)


def test_several_k_in_one_pass_give_what_separate_runs_give(tiny):
    runtime, train, val, queries = knn_inputs(tiny, "f_k")
    together = knn_probe(train.view([0]), train.labels, queries, val.labels, 3, [1, 3, 10], 0.07, runtime)
    alone = [knn_probe(train.view([0]), train.labels, queries, val.labels, 3, [k], 0.07, runtime)[0] for k in (1, 3, 10)]
    drop = ("search_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in together] == \
        [{k: v for k, v in r.items() if k not in drop} for r in alone]


def store_of(tiny, tmp_path, **settings):
    runtime = start("cpu", settings.pop("precision", None))
    feats = cached_features(str(settings.pop("checkpoint", tiny / "init.pt")), str(tiny / "images"), ["val"], runtime,
                            store=str(tmp_path / "stores"), **settings)
    return feats.splits["val"].store


def test_every_setting_that_changes_the_features_makes_another_store_and_the_same_ones_reuse_it(tiny, tmp_path,
                                                                                                 monkeypatch):
    base = store_of(tiny, tmp_path)
    bare = tmp_path / "bare.pt"  # a state dict records no heads or eps: --num-heads / --norm-eps choose them
    torch.save(tiny_encoder().state_dict(), bare)
    others = {"prefix": store_of(tiny, tmp_path, prefix=""), "bare": store_of(tiny, tmp_path, checkpoint=bare),
              "num_heads": store_of(tiny, tmp_path, checkpoint=bare, num_heads=2),
              "norm_eps": store_of(tiny, tmp_path, checkpoint=bare, norm_eps=1e-3),
              "block": store_of(tiny, tmp_path, block="3"), "pool": store_of(tiny, tmp_path, pool="cls"),
              "crop ratio": store_of(tiny, tmp_path, crop_ratio=0.5), "precision": store_of(tiny, tmp_path,
                                                                                            precision="bf16"),
              "checkpoint": store_of(tiny, tmp_path, checkpoint=tiny / "run" / "checkpoint_best.pt")}
    folders = [base.folder] + [s.folder for s in others.values()]
    assert len(set(folders)) == len(folders), others
    # the prefix names the same encoder here; num_heads and eps compute other features from the same weights
    assert np.array_equal(np.array(others["prefix"].features()), np.array(base.features()))
    for name in ("num_heads", "norm_eps"):
        assert not np.array_equal(np.array(others[name].features()), np.array(others["bare"].features()))
    monkeypatch.setattr(features_module, "compute_entries", lambda *a, **k: pytest.fail("features recomputed"))
    assert store_of(tiny, tmp_path).folder == base.folder  # the same settings: read back, not computed


def test_a_corrupt_or_foreign_store_is_rebuilt_saying_why(tiny, tmp_path, caplog):
    store = store_of(tiny, tmp_path)
    expected = np.array(store.features())
    meta = json.loads(open(os.path.join(store.folder, "meta.json")).read())
    with open(os.path.join(store.folder, "meta.json"), "w") as f:
        json.dump({**meta, "version": 0}, f)
    with caplog.at_level("WARNING"):
        again = store_of(tiny, tmp_path)
    assert "rebuilding the feature store" in caplog.text and "written by another version" in caplog.text
    assert np.array_equal(np.array(again.features()), expected)
    with open(os.path.join(store.folder, "features.bin"), "r+b") as f:
        f.truncate(10)  # cut short
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = store_of(tiny, tmp_path)
    assert "features.bin does not have the" in caplog.text and np.array_equal(np.array(again.features()), expected)


def test_a_store_whose_files_were_tampered_with_is_checked_and_mended_without_writing_elsewhere(tiny, tmp_path,
                                                                                                 caplog):
    """Each case used to end in a MemoryError, a hang, another file overwritten, a zeroed chunk reused or a
    traceback: now the store is rebuilt, or the chunks that fail their checksum are computed again."""
    store = store_of(tiny, tmp_path, chunk=4)  # 15 val images: 4 chunks
    expected, labels = np.array(store.features()), store.labels()
    folder = store.folder

    def again(why):
        caplog.clear()
        with caplog.at_level("WARNING"):
            mended = store_of(tiny, tmp_path, chunk=4)
        assert why in caplog.text, caplog.text
        assert np.array_equal(np.array(mended.features()), expected) and np.array_equal(mended.labels(), labels)

    meta = os.path.join(folder, "meta.json")
    os.remove(meta)
    os.symlink("/dev/zero", meta)  # (6.8 GB and a MemoryError)
    again("meta.json is not a regular file")
    os.remove(meta)
    os.mkfifo(meta)  # (a hang)
    again("meta.json is not a regular file")
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious" * (len(expected.tobytes()) // 8 + 1))
    before = victim.read_bytes()
    os.remove(os.path.join(folder, "features.bin"))
    os.symlink(victim, os.path.join(folder, "features.bin"))  # (the linked file was overwritten)
    again("features.bin is not a regular file")
    assert victim.read_bytes() == before
    with open(os.path.join(folder, "features.bin"), "r+b") as f:  # a chunk zeroed, its marker left
        f.seek(0)
        f.write(b"\0" * 64)
    again("1 chunk(s) computed again: 0 (its bytes do not match its checksum)")
    with open(os.path.join(folder, "features.bin"), "r+b") as f:  # flipped bytes in the last chunk
        f.seek(len(expected.tobytes()) - 3)
        f.write(b"\xff\xff\xff")
    again("computed again: 3 (its bytes do not match its checksum)")
    os.remove(os.path.join(folder, "done", "2"))
    for name in ("²", "02x", "99"):  # not markers of this store: ignored, the missing chunk computed
        open(os.path.join(folder, "done", name), "w").close()
    again("(3 of 4 chunks there already)")
    raw = np.memmap(os.path.join(folder, "labels.bin"), dtype=np.int64, mode="r+", shape=(15,))
    raw[5] = 10**6  # a label out of range (a RuntimeError traceback)
    raw.flush()
    del raw
    again("computed again: 1 (its bytes do not match its checksum)")


def test_the_stores_chunk_bookkeeping_lists_its_markers_once_per_fill(tiny, tmp_path, monkeypatch):
    """At ImageNet size a chunk of 256 rows is 5,005 chunks: listing done/ once per chunk, and counting each
    chunk's batches over the whole plan, was quadratic."""
    listed = []
    real = os.listdir
    monkeypatch.setattr(features_module.os, "listdir",
                        lambda path=".": (listed.append(str(path)) if str(path).endswith("done") else None, real(path))[1])
    counts = {}
    for chunk in (1, 2, 8):  # 15 val images: 15, 8 and 2 chunks
        listed.clear()
        store = store_of(tiny, tmp_path / str(chunk), chunk=chunk)
        assert store.chunks == -(-15 // chunk)
        counts[chunk] = len(listed)
    assert counts[1] == counts[2] == counts[8] <= 5, counts  # (today's main: one more per chunk)


@pytest.mark.slow
def test_a_killed_extraction_resumes_to_the_features_of_an_uninterrupted_one(tmp_path):
    write_random_images(str(tmp_path / "images"), classes=2, per_class={"train": 300, "val": 2}, size=24)
    save_data2vec_checkpoint(tiny_encoder(), str(tmp_path / "init.pt"), prenet_depth=2)
    cmd = [sys.executable, "-m", "d2v_plugin.cli.knn", str(tmp_path / "init.pt"), "--data", str(tmp_path / "images"),
           "--workers", "2", "--batch-size", "8", "--store-chunk", "16"]
    env = one_thread()  # the uninterrupted extraction beside the one killed, one thread each

    def killed():
        proc = subprocess.Popen(cmd + ["--cache", str(tmp_path / "killed")], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, env=env)
        deadline = time.time() + 300
        done = []
        while time.time() < deadline and len(done) < 3:
            time.sleep(0.02)
            done = [d for d in (tmp_path / "killed").glob("*/done/*")]
        os.killpg(proc.pid, signal.SIGKILL)  # the extraction and its workers, mid-way
        proc.communicate()

    whole, _ = together(lambda: subprocess.run(cmd + ["--cache", str(tmp_path / "whole")], cwd=REPO, env=env,
                                               capture_output=True, text=True, timeout=600), killed)
    assert whole.returncode == 0, whole.stderr[-2000:]
    stores = sorted((tmp_path / "killed").iterdir(), key=lambda p: -len(os.listdir(p / "done")))
    train_store = stores[0]
    assert 3 <= len(os.listdir(train_store / "done")) < 38, "killed too late to show a resume"  # 600 rows / 16
    resumed = subprocess.run(cmd + ["--cache", str(tmp_path / "killed")], cwd=REPO, capture_output=True, text=True,
                             timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "chunks there already" in resumed.stderr
    for name in ("features.bin", "labels.bin"):
        assert (train_store / name).read_bytes() == (tmp_path / "whole" / train_store.name / name).read_bytes()
    assert json.loads(resumed.stdout)["top1"] == json.loads(whole.stdout)["top1"]


def test_ctrl_c_in_probe_says_in_one_line_what_is_kept_and_how_to_resume(tmp_path):
    """It printed a 30-55-line KeyboardInterrupt traceback and no word on resuming."""
    write_random_images(str(tmp_path / "images"), classes=2, per_class={"train": 300, "val": 2}, size=24)
    save_data2vec_checkpoint(tiny_encoder(), str(tmp_path / "init.pt"), prenet_depth=2)
    cmd = [sys.executable, "-m", "d2v_plugin.cli.probe", str(tmp_path / "init.pt"), "--data", str(tmp_path / "images"),
           "--probes", "knn", "--workers", "1", "--batch-size", "8", "--store-chunk", "16", "--cache",
           str(tmp_path / "store")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "store").glob("*/done/*")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, to the whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    told = [line for line in err.splitlines() if line.startswith("probe: interrupted.")]
    assert len(told) == 1 and str(tmp_path / "store") in told[0], err[-3000:]
    assert told[0].endswith("to resume: " + " ".join(["python", "-m", "d2v_plugin.cli.probe", *cmd[3:]]))


def test_data_loading_workers_default_to_the_cores_at_most_8(monkeypatch):
    from d2v_plugin.evaluation import runtime as runtime_module

    monkeypatch.setattr(runtime_module, "available_cores", lambda: 64)
    assert Runtime(torch.device("cpu"), "fp32").default_workers() == 8
    assert Runtime(torch.device("cpu"), "fp32", world=8, local_world=8).default_workers() == 8
    monkeypatch.setattr(runtime_module, "available_cores", lambda: 2)
    assert Runtime(torch.device("cpu"), "fp32").default_workers() == 2
    assert start("auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert start("cpu").precision == "fp32" and start("cpu", "bf16").precision == "bf16"
    if not torch.cuda.is_available():  # this machine: asking for a GPU is an error naming the flag
        with pytest.raises(ValueError, match="--device cuda:0: no CUDA device is available"):
            start("cuda:0")


def test_knn_similarities_are_fp32_on_every_device_and_near_ties_break_as_in_float64(monkeypatch):
    """DINO computes kNN similarities in fp32. In fp16 (what this plugin did on GPUs) cosine similarities near 1
    snap to steps of 4.9e-4, and the near-ties that makes break by row order, toward low class ids."""
    from d2v_plugin.evaluation import knn

    assert knn.similarity_dtype(torch.device("cpu")) is torch.float32
    assert knn.similarity_dtype(torch.device("cuda")) is torch.float32
    # features like a ViT's: a large mean shared by every image, small class signal; the store keeps fp16
    rng = np.random.default_rng(0)
    classes, dim = 10, 768
    centres = rng.standard_normal((classes, dim)) * 0.01
    shared = rng.standard_normal(dim)

    def draw(n):
        labels = np.arange(n) % classes
        return (shared + centres[labels] + rng.standard_normal((n, dim)) * 0.03).astype(np.float16), labels

    train, train_labels = draw(2000)
    queries, query_labels = draw(300)
    runtime = Runtime(torch.device("cpu"), "fp32")
    gpu_choice = knn.similarity_dtype(torch.device("cuda"))
    monkeypatch.setattr(knn, "similarity_dtype", lambda device: gpu_choice)  # the GPU's path, on the CPU
    found = nearest(torch.from_numpy(train), train_labels, torch.from_numpy(queries), 10, runtime)
    # an independent float64 kNN (numpy), the same fp16 inputs
    t64, q64 = train.astype(np.float64), queries.astype(np.float64)
    t64 /= np.linalg.norm(t64, axis=1, keepdims=True)
    q64 /= np.linalg.norm(q64, axis=1, keepdims=True)
    sims = q64 @ t64.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    assert (np.sort(found.index.numpy(), axis=1) == np.sort(top, axis=1)).mean() > 0.95  # (the 10th: ties in fp32)
    votes = np.zeros((len(queries), classes))
    for i in range(len(queries)):
        np.add.at(votes[i], train_labels[top[i]], np.exp(sims[i, top[i]] / 0.07))
    ours = knn.vote(found.sims, found.labels, 10, classes, 0.07).argmax(dim=1).numpy()
    assert (ours == votes.argmax(axis=1)).all()
    # what fp16 similarities did to the same search: the test would have seen it
    monkeypatch.setattr(knn, "similarity_dtype", lambda device: torch.float16)
    half = nearest(torch.from_numpy(train), train_labels, torch.from_numpy(queries), 10, runtime)
    half_votes = knn.vote(half.sims, half.labels, 10, classes, 0.07).argmax(dim=1).numpy()
    assert (half_votes != votes.argmax(axis=1)).mean() > 0.5  # (measured: 80% of the answers changed)
