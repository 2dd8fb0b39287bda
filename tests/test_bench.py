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
