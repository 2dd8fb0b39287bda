"""Every command, given a path that does not exist, a text file, a FIFO or a link to /dev/zero as its checkpoint,
its data, its store or its result file, answers in one line within seconds, before anything heavy is imported,
and writes nothing: good results beside the bad path are unchanged."""
import json
import os
import subprocess
import sys

from conftest import REPO

# (command, arguments with {bad} where the bad path goes, the path's role); {ckpt}: a real checkpoint,
# {data}: a real dataset, {tmp}: a folder to write in. A result file or a folder the command writes may not
# exist yet, and an existing result file is replaced (atomically, never written through): for them the other
# kinds are the bad ones.
CASES = [
    ("evaluate", ["{bad}", "--data", "{data}"], "checkpoint"),
    ("evaluate", ["{ckpt}", "--data", "{bad}"], "data"),
    ("evaluate", ["{ckpt}", "--data", "{data}", "--out", "{bad}"], "result"),
    ("evaluate", ["{ckpt}", "--data", "{data}", "--per-class", "{bad}"], "folder"),
    ("evaluate", ["{ckpt}", "--data", "{data}", "--benchmark", "imagenet-real", "--real-labels", "{bad}"], "labels"),
    ("knn", ["{bad}", "--data", "{data}"], "checkpoint"),
    ("knn", ["{ckpt}", "--data", "{bad}"], "data"),
    ("knn", ["{ckpt}", "--data", "{data}", "--cache", "{bad}"], "folder"),
    ("probe", ["{ckpt}", "{bad}", "--data", "{data}"], "checkpoint"),
    ("probe", ["{ckpt}", "--data", "{bad}"], "data"),
    ("probe", ["{ckpt}", "--data", "{data}", "--cache", "{bad}"], "folder"),
    ("probe", ["{ckpt}", "--data", "{data}", "--out", "{bad}"], "result"),
    ("predict", ["{bad}", "{image}"], "checkpoint"),
    ("predict", ["{ckpt}", "{bad}"], "image"),
    ("predict", ["{ckpt}", "--data", "{bad}"], "data"),
    ("convert", ["{bad}", "--out", "{tmp}/c.pt"], "checkpoint"),
    ("convert", ["{ckpt}", "--out", "{bad}"], "result"),
    ("export", ["{bad}", "--out", "{tmp}/e"], "checkpoint"),
    ("export", ["{ckpt}", "--out", "{bad}"], "folder"),
    ("compare", ["{bad}", "--out", "{tmp}/r", "--no-speed"], "run"),
    ("compare", ["{run}", "--out", "{bad}", "--no-speed"], "folder"),
    ("track", ["{bad}", "--data", "{data}"], "run"),
    ("track", ["{run}", "--data", "{bad}"], "data"),
    ("track", ["{run}", "--data", "{data}", "--cache", "{bad}"], "folder"),
    ("pack", ["{bad}", "--out", "{tmp}/p", "--format", "parquet"], "data"),
    ("pack", ["{data}", "--out", "{bad}", "--format", "parquet"], "folder"),
    ("preresize", ["{bad}", "--out", "{tmp}/s"], "data"),
    ("preresize", ["{data}", "--out", "{bad}"], "folder"),
]
NOT_BAD = {"result": ("missing", "text"), "folder": ("missing",), "labels": ("text",), "image": ("text",)}
# (real.json, an image: what they hold is read after the model, each crafted content named: test_benchmarks.py,
# test_tools.py; a result file is replaced)

# the driver's own peak: /proc's VmHWM (ru_maxrss keeps, across exec, the peak of the process that forked it)
DRIVER = r'''
import contextlib, io, json, os, sys, time, importlib
cases = json.loads(sys.argv[1])

def peak_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

out = []
for name, argv in cases:
    command = importlib.import_module(f"d2v_plugin.cli.{name}")
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            command.main(argv)
            code = 0
        except SystemExit as stop:
            code = stop.code
        except BaseException as error:
            code = f"{type(error).__name__}: {error}"
    out.append({"command": name, "argv": argv, "code": code, "stderr": err.getvalue(),
                "seconds": time.perf_counter() - start, "torch_after": "torch" in sys.modules,
                "peak_after": peak_mib()})
print(json.dumps({"calls": out, "torch_imported": "torch" in sys.modules,
                  "peak_mib": peak_mib()}))
'''


def test_every_command_answers_a_bad_path_in_one_line_before_loading_anything(tmp_path):
    import torch

    from conftest import tiny_encoder
    from d2v_plugin.demo_data import write_random_images
    from d2v_plugin.testing.checkpoints import save_data2vec_checkpoint

    data = tmp_path / "images"
    write_random_images(str(data), classes=2, per_class={"train": 2, "val": 1}, size=24)
    ckpt = tmp_path / "init.pt"
    save_data2vec_checkpoint(tiny_encoder(), str(ckpt))
    run = tmp_path / "run"
    run.mkdir()
    good_track = '{"update": 2, "probe": "knn", "top1": 0.5}\n'
    (run / "track.jsonl").write_text(good_track)
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "good").write_text("a good store's file")
    text = tmp_path / "notes.txt"
    text.write_text("just text\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    zero = tmp_path / "zero"
    os.symlink("/dev/zero", zero)
    kinds = {"missing": tmp_path / "missing", "text": text, "fifo": fifo, "link to /dev/zero": zero}
    image = next((data / "val").rglob("*.png"))
    calls = []
    for command, args, role in CASES:
        for kind, bad in kinds.items():
            if kind in NOT_BAD.get(role, ()):
                continue
            values = {"bad": bad, "ckpt": ckpt, "data": data, "tmp": tmp_path, "image": image, "run": run}
            calls.append((command, [a.format(**values) for a in args], kind, role))
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([(c, a) for c, a, _, _ in calls])], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    heavy = next((c for c in report["calls"] if c["torch_after"] or c["peak_after"] > 500), None)
    assert not report["torch_imported"] and report["peak_mib"] < 1024, (report["peak_mib"], heavy and heavy["argv"])
    for (command, argv, kind, role), call in zip(calls, report["calls"]):
        where = (command, role, kind, call["stderr"])
        lines = call["stderr"].strip().splitlines()
        assert call["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), where
        assert "Traceback" not in call["stderr"] and str(kinds[kind]) in lines[0], where
        assert call["seconds"] < (10 if kind == "fifo" else 3), where
    assert (run / "track.jsonl").read_text() == good_track
    assert sorted(os.listdir(run)) == ["track.jsonl"] and os.listdir(tmp_path / "store") == ["good"]
    assert os.path.islink(zero) and fifo.exists() and text.read_text() == "just text\n"
