"""`make bench` cannot rot unnoticed: each section measures on tiny inputs and renders its report."""
import os

import pytest

from conftest import REPO


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "scripts"))  # scripts/bench.py runs with scripts/ on its path
    import benchmarks.common
    import benchmarks.pipeline

    return benchmarks


def test_pipeline_section_measures_the_dataset_and_the_reference(benchmarks, tmp_path):
    paths, sources = benchmarks.pipeline.write_photos(str(tmp_path / "photos"), count=4, size=(120, 90))
    assert len(paths) == 4 and sources >= 3 and all(os.path.isfile(p) for p in paths)
    for kind in ("reference", "ours", "ours (fast_decode)"):
        assert benchmarks.pipeline.pipeline_rate(kind, str(tmp_path / "photos"), rounds=1) > 0


def test_every_section_renders_its_report(benchmarks, tmp_path):
    import runpy

    s = {"median": 2.0, "min": 1.0, "max": 3.0, "n": 5}
    results = {
        "date": "today", "machine": "this one", "train_step_batch": 8,
        "train_step": {12: {"ours": {"images_per_s": s, "peak_rss_mib": s},
                            "reference": {"images_per_s": s, "peak_rss_mib": s}, "paired_ratio": s}},
        "pipeline": {"500x375": {"photos": 48, "sources": 9, **{k: s for k in benchmarks.pipeline.KINDS}}},
        "startup": {"files": 100000, "imagefolder": s, "first scan": s, "cached": s},
        "end_to_end": {"updates": 120, "ours": s, "reference": s},
    }
    bench = runpy.run_path(os.path.join(REPO, "scripts", "bench.py"))
    bench["write_markdown"](results, str(tmp_path / "BENCHMARKS.md"))
    text = (tmp_path / "BENCHMARKS.md").read_text()
    for heading in ("## Train step", "## Input pipeline", "## Start-up", "## End to end", "## GPU"):
        assert heading in text
    assert "| 12 | 2.00 (1.00–3.00) |" in text and "| 500x375 | ours (preresize 256) | 2.0 (1.0–3.0) | 1.00x |" in text


def test_the_gpu_benchmark_runs_on_the_cpu_in_its_dry_run(tmp_path):
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_gpu.py"), "--dry-run", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert {(r["impl"], r["precision"]) for r in written["rows"]} == {("ours", "bf16"), ("data2vec", "bf16")}
    assert all(r["images_per_s"] > 0 and 0 < r["optimizer_share"] < 1 for r in written["rows"])
    assert set(written["optimizers"]) == {"adam", "fused_adamw"}
    decode = written["device_decode"]  # the step with task.device_decode on real JPEG batches, prefetched or not
    assert set(decode["step_s"]) == {"no decode", "prefetched decode", "inline decode"}
    assert all(t > 0 for t in decode["step_s"].values()) and decode["decode_images_per_s"] > 0
