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


@pytest.fixture(scope="module", autouse=True)
def gpu_dry_run(tmp_path_factory):
    """scripts/bench_gpu.py --dry-run, started when this module starts and running while its other tests do (one
    process, one thread): (the process, its output folder)."""
    import subprocess
    import sys

    from conftest import one_thread

    out = tmp_path_factory.mktemp("bench_gpu")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "scripts", "bench_gpu.py"), "--dry-run", "--out",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=one_thread())
    yield proc, out
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_the_evaluation_section_measures_ours_the_plain_loop_the_search_and_the_probes(benchmarks, tmp_path):
    import benchmarks.evaluation as ev

    root = str(tmp_path / "photos")
    checkpoint = ev._setup(root, count=4, depth=1, width=64, heads=4)
    rates = ev.evaluate_rates(root, checkpoint, "cpu", "fp32", batch=2, workers=1, rounds=1)
    assert set(rates["results"]) == {"ours (cli.evaluate)", "plain ImageFolder loop", "feature extraction"}
    assert all(r["median"] > 0 for r in rates["results"].values()) and rates["images"] == 4
    features, labels = ev.synthetic_store(str(tmp_path), 3000, 32)
    search = ev.knn_vs_sklearn(features, labels, queries=50)
    assert search["ours"]["median"] > 0 and search["sklearn"]["median"] > 0
    scale = ev.knn_scale(str(tmp_path / "scale"), n=5000, dim=32, queries=100, sklearn_subset=2000, sklearn_queries=50)
    assert scale["ours"]["k"] == 20 and scale["ours"]["peak_rss_mib"] > 0
    assert scale["ours"]["peak_allocated_mib"] > 0 and scale["ours"]["peak_file_pages_mib"] > 0  # Linux's /proc
    probes = ev.probe_costs(n_train=300, n_val=50, dim=16, classes=5, linear_steps_timed=20)
    assert len(probes["seconds"]) == 3  # the linear probe's row says what was timed and the schedule it projects to
    assert "linear (26 heads, 12,500 steps at batch 1,024: 20 timed, x 625)" in probes["seconds"]
    lines = ev.report({"evaluation": {"evaluate": rates, "knn_vs_sklearn": search, "knn_scale": scale,
                                      "probes": probes}})
    assert lines[0] == "## Evaluation (CPU, fp32)" and any("queries/s" in line for line in lines)


def test_the_scale_section_measures_the_linear_probe_from_a_store_in_a_process_of_its_own(benchmarks, tmp_path):
    import benchmarks.scale as scale

    result = {"scale": scale.run(str(tmp_path), n=3000, dim=16, steps=2, hash_mb=2, inside_images=300)}
    assert result["scale"]["hash"]["first_s"] > 0 and result["scale"]["hash"]["rerun_s"] > 0
    linear = result["scale"]["linear"]
    assert linear["step_s"] > 0 and linear["schedule_steps"] == 12_500 and linear["held_out_rows"] > 0
    assert linear["peak_rss_mib"] > 0 and linear["val_s"] > 0
    lines = scale.report(result)
    assert lines[0].startswith("## The linear probe at ImageNet's size") and any("12,500 steps" in x for x in lines)
    assert any(x.startswith("### The checkpoint's hash") for x in lines)
    assert result["scale"]["inside"]["cka_s"] > 0 and any(x.startswith("### Looking inside") for x in lines)


# last, so that the dry run started with the module runs beside the tests above
def test_the_gpu_benchmark_runs_on_the_cpu_in_its_dry_run(gpu_dry_run):
    import json

    proc, tmp_path = gpu_dry_run
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    written = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert {(r["impl"], r["precision"]) for r in written["rows"]} == {("ours", "bf16"), ("data2vec", "bf16")}
    assert all(r["images_per_s"] > 0 and 0 < r["optimizer_share"] < 1 for r in written["rows"])
    assert set(written["optimizers"]) == {"adam", "fused_adamw"}
    decode = written["device_decode"]  # the step with task.device_decode on real JPEG batches, prefetched or not
    assert set(decode["step_s"]) == {"no decode", "prefetched decode", "inline decode"}
    assert all(t > 0 for t in decode["step_s"].values()) and decode["decode_images_per_s"] > 0
    assert set(written["probe_step"]["results"]) == {"distilled_imagenet", "linear_probe_imagenet",
                                                     "attentive_probe_imagenet"}
    assert all(r["median"] > 0 for r in written["evaluate"]["results"].values())
    assert written["knn_scale"]["ours"]["queries_per_s"] > 0
    knn = written["knn_precision"]  # on a GPU: the GPU's kNN top-1 against the CPU's on one store
    assert knn["equal"] and set(knn["device"]) == {"10", "20"} and knn["val"] > 300
