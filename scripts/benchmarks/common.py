"""What the benchmarks share: repeated, interleaved runs, their summaries, the machine, worker processes."""
import json
import os
import platform
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = 5
BENCH = os.path.join(REPO, "scripts", "bench.py")


def reference_module():
    """data2vec's own code with its two shims (d2v_plugin/testing/reference.py)."""
    from d2v_plugin.testing import reference

    return reference


def rotated(items, r):
    """Run r's order: each candidate takes each position in turn (no one always runs first)."""
    items = list(items)
    return items[r % len(items):] + items[:r % len(items)]


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s, unit="", digits=1):
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def run_worker(*args) -> dict:
    """bench.py's --worker mode in a fresh process (its peak memory its own): its last stdout line, as JSON."""
    out = subprocess.run([sys.executable, BENCH, "--worker", *map(str, args)], capture_output=True, text=True,
                         cwd=REPO)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine():
    import torch
    import torchvision
    import timm
    import fairseq

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}, timm {timm.__version__}, fairseq {fairseq.__version__}, "
            f"{torch.get_num_threads()} torch threads")
