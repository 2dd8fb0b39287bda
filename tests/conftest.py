"""Shared fixtures: tiny encoders, tiny checkpoints and tiny image folders, built on the spot."""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import d2v_plugin
from d2v_plugin.demo_data import write_digits, write_random_images
from d2v_plugin.testing.checkpoints import save_data2vec_checkpoint
from d2v_plugin.models.encoder import Data2Vec2ImageEncoder, EncoderConfig

d2v_plugin.register()  # the task, model and criterion, as loading the plugin as fairseq's user dir does

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist's workers share the cores: each worker's torch, and every process it starts, gets its share of
    # threads (OpenMP threads that outnumber the cores spin against each other: the linear probe's test took
    # 4x as long under 2 workers of 2 threads each on 2 cores)
    from d2v_plugin.host import available_cores

    _share = max(1, available_cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The test files that cost most (CPU seconds per file, measured on 2 cores), heaviest first: xdist hands a
# worker the next file when it runs dry, so the costly ones start early and the workers finish together
# (`make test` passes --no-loadscope-reorder; xdist's own order, by number of tests, left a 100 s file last)
HEAVY_FIRST = ("test_reliability.py", "test_tools.py", "test_first_hour.py", "test_cluster.py",
               "test_probe_training.py", "test_probes.py", "test_bench.py", "test_end_to_end.py",
               "test_evaluation.py", "test_docs.py", "test_containers.py", "test_hostile_checkpoints.py",
               "test_inside.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order

# the commands' default caches (folder index, feature stores) go under the session's own folder, not ~/.cache;
# commands run as subprocesses inherit it
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="d2v_test_cache_")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)

TINY = dict(embed_dim=32, depth=5, num_heads=4, patch_size=8, image_size=24)


def tiny_encoder(seed: int = 0, **overrides) -> Data2Vec2ImageEncoder:
    torch.manual_seed(seed)
    enc = Data2Vec2ImageEncoder(EncoderConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # non-trivial norms, so a wrong norm placement shows
        for name, p in enc.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return enc.eval()


@pytest.fixture
def image_root(tmp_path):
    """3 classes, 8 train + 4 val images each, 24x24 PNGs."""
    root = tmp_path / "images"
    write_random_images(str(root), classes=3, per_class={"train": 8, "val": 4}, size=24)
    return root


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "index_cache")


def train_cmd(tmp_path, data, save_dir, *overrides, init=None, batch_size=4, max_update=12, launcher=(),
              user_dir="d2v_plugin"):
    """fairseq-hydra-train on the demo recipe scaled down to the tiny image folders (2 epochs of 24 px
    images, 3 classes); writes a tiny data2vec-format init checkpoint when none is given."""
    init = init or tmp_path / "init.pt"
    if not os.path.exists(init):
        save_data2vec_checkpoint(tiny_encoder(), str(init), prenet_depth=2)
    return [*launcher, os.path.join(VENV_BIN, "fairseq-hydra-train"), "--config-dir", "config",
            "--config-name", "demo", f"common.user_dir={user_dir}", f"task.data={data}",
            f"model.pretrained_checkpoint={init}", f"checkpoint.save_dir={save_dir}",
            f"task.cache_dir={tmp_path / 'cache'}", "task.image_size=24", "model.num_classes=3",
            f"dataset.batch_size={batch_size}", "optimization.max_epoch=2", f"optimization.max_update={max_update}",
            "optimizer.groups.default.lr_scheduler.warmup_updates=2",
            "optimizer.groups.no_decay.lr_scheduler.warmup_updates=2", "common.log_interval=1", *overrides]


def doc_blocks(page: str) -> list:
    """The indented code blocks of a Markdown page (a path under the repository): (line number, text dedented)."""
    lines = open(os.path.join(REPO, page)).read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("    ") and (i == 0 or lines[i - 1].strip() == ""):
            indent = len(lines[i]) - len(lines[i].lstrip())
            j, block = i, []
            while j < len(lines) and (lines[j].startswith(" " * indent) or (
                    lines[j] == "" and j + 1 < len(lines) and lines[j + 1].startswith(" " * indent))):
                block.append(lines[j][indent:])
                j += 1
            blocks.append((i + 1, "\n".join(block)))
            i = j
        else:
            i += 1
    return blocks


def doc_block_after(page: str, marker: str) -> str:
    """The first indented code block after ``marker`` in ``page``."""
    text = open(os.path.join(REPO, page)).read()
    at = text[:text.index(marker)].count("\n") + 1
    return next(text for line, text in doc_blocks(page) if line > at)


def one_thread(**extra) -> dict:
    """The environment for processes run side by side: one torch thread each, so that two on two cores do not
    contend for them (the runs a test compares bit for bit all get it)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def together(*calls):
    """Independent calls that each run a process, run at the same time, their results in order. A short run is
    mostly its start-up (single-threaded imports): two on two cores take little more than one."""
    from concurrent.futures import ThreadPoolExecutor

    from d2v_plugin.host import available_cores

    with ThreadPoolExecutor(max_workers=max(2, available_cores())) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


def free_port() -> int:
    """A TCP port on 127.0.0.1 free now, for a run's rendezvous (runs side by side each take their own)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, env=None, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env, **kw)


def weights(path):
    """A saved checkpoint's model weights."""
    return torch.load(path, weights_only=True)["model"]


def max_diff(a, b):
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


class Calls:
    """Unpickling this calls ``func(*args)``: a stand-in for a malicious checkpoint's payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def json_records(output, kind):
    """fairseq's JSON log lines of one kind ('train', 'val', ...); it writes numbers as strings."""
    out = []
    for line in output.splitlines():
        if f"[{kind}][INFO] - {{" in line:
            out.append({k: _number(v) for k, v in json.loads(line.split(" - ", 1)[1]).items()})
    return out


def exception_line(stderr, prefixes=("d2v_plugin.",)):
    """The exception line hydra prints last (before its HYDRA_FULL_ERROR hint): exactly one. A compact
    Hydra exception (the plugin's settings errors) is its message alone, with no traceback before it."""
    lines = [line for line in stderr.splitlines() if line.startswith(prefixes)]
    if not lines and "Traceback" not in stderr:
        before = stderr.split("\nSet the environment variable HYDRA_FULL_ERROR")[0].rstrip().splitlines()
        lines = before[-1:]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


# --- the session's fine-tuned runs (built once, shared by every test that needs a trained model) ----------

def fairseq_train(data, init, save_dir, cache, *overrides, env=None):
    cmd = [os.path.join(VENV_BIN, "fairseq-hydra-train"), "--config-dir", "config", "--config-name", "demo",
           "common.user_dir=d2v_plugin", f"task.data={data}", f"model.pretrained_checkpoint={init}",
           f"checkpoint.save_dir={save_dir}", f"task.cache_dir={cache}", "task.image_size=16",
           "optimization.max_epoch=6", "optimization.max_update=270",
           "optimizer.groups.default.lr_scheduler.warmup_updates=30",
           "optimizer.groups.no_decay.lr_scheduler.warmup_updates=30", *overrides]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return save_dir


def session_folder(tmp_path_factory):
    """The folder the whole test run shares: under pytest-xdist (``make test`` runs the suite on several
    workers) the parent of every worker's own folder, else the run's own folder."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Two real fairseq-hydra-train runs on scikit-learn's digits (16 px): a 2-block student cut from a 6-block
    checkpoint by model.depth, and a 4-block one from `convert --depth 4`. Built once per test run: the
    first worker that needs them builds them while the others wait on the lock; the tests only read them."""
    from filelock import FileLock

    root = session_folder(tmp_path_factory) / "tools"
    data, cache, init, student = root / "digits", root / "cache", root / "teacher.pt", root / "student4.pt"
    built = root / "built.json"
    with FileLock(str(root) + ".lock"):
        if not built.exists():
            built.write_text(json.dumps({"convert_stdout": _build_runs(root, data, cache, init, student)}))
    return {"data": data, "init": init, "student": student,
            "convert_stdout": json.loads(built.read_text())["convert_stdout"], "depth2": root / "depth2",
            "depth4": root / "depth4", "root": root, "cache": cache}


def _build_runs(root, data, cache, init, student) -> str:
    """The two runs (and their data, teacher and converted student) under ``root``; convert's stdout."""
    if root.exists():  # a build that died half-way (the lock is free again): start over
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    write_digits(str(data), image_size=16)
    torch.manual_seed(0)
    teacher = Data2Vec2ImageEncoder(EncoderConfig(embed_dim=64, depth=6, num_heads=4, patch_size=4, image_size=16))
    save_data2vec_checkpoint(teacher, str(init), prenet_depth=2)

    def converted_then_trained():
        out = subprocess.run([sys.executable, "-m", "d2v_plugin.cli.convert", str(init), "--out", str(student),
                              "--depth", "4"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        fairseq_train(data, student, root / "depth4", cache, env=one_thread())
        return out.stdout

    # the two runs side by side, one thread each (the folder index they share is written atomically)
    return together(lambda: fairseq_train(data, init, root / "depth2", cache, "model.depth=2", env=one_thread()),
                    converted_then_trained)[1]
