"""End to end: fairseq-hydra-train updates/s on the demo data, ours vs data2vec's own fine-tuning path."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

from benchmarks.common import REPO, RUNS, fmt, reference_module, rotated, summary


def run(updates: int):
    """fairseq-hydra-train updates/s, ours (config/demo.yaml) vs data2vec's own path
    (scripts/reference_train.py + scripts/reference_demo.yaml), same data and the same 2 + 3-block,
    128-wide checkpoint (data2vec's model cannot be built with 2 + 2), interleaved."""
    work = tempfile.mkdtemp(prefix="bench_e2e_")
    from d2v_plugin.demo_data import write_digits

    write_digits(os.path.join(work, "data"))
    ref = reference_module()
    d2v, cfg = ref.build_data2vec_model(embed_dim=128, num_heads=4, depth=3, prenet_depth=2, image_size=32,
                                        patch_size=4)
    ref.save_like_fairseq(d2v, cfg, os.path.join(work, "init.pt"))
    bin_dir = os.path.dirname(sys.executable)
    common = [f"optimization.max_update={updates}", "optimization.max_epoch=0", "dataset.disable_validation=true",
              "checkpoint.no_save=true", "common.log_format=json", f"common.log_interval={updates // 2}",
              f"task.data={work}/data", "dataset.num_workers=2"]  # the demo recipe's loader, for both
    commands = {
        "ours": [os.path.join(bin_dir, "fairseq-hydra-train"), "--config-dir", "config", "--config-name", "demo",
                 "common.user_dir=d2v_plugin", f"model.pretrained_checkpoint={work}/init.pt", *common],
        "reference": [sys.executable, "scripts/reference_train.py", "--config-dir", "scripts", "--config-name",
                      "reference_demo", f"model.model_path={work}/init.pt", *common],
    }
    per = {"ours": [], "reference": []}
    for r in range(RUNS):
        for name, cmd in rotated(list(commands.items()), r):
            extra = [f"checkpoint.save_dir={work}/{name}{r}"]
            out = subprocess.run(cmd + extra, capture_output=True, text=True, cwd=REPO)
            if out.returncode:
                raise RuntimeError(out.stderr[-3000:])
            ups = [float(json.loads(line.split(" - ", 1)[1])["ups"]) for line in (out.stdout + out.stderr).splitlines()
                   if "[train_inner][INFO] - {" in line]
            per[name].append(ups[-1])  # the second half: start-up excluded
            print(f"  end to end {name} run {r}: {ups[-1]:.2f} updates/s", flush=True)
    shutil.rmtree(work)
    return {"updates": updates, **{k: summary(v) for k, v in per.items()}}


def report(results: dict) -> list:
    e = results["end_to_end"]
    lines = ["## End to end: fairseq-hydra-train on the demo data", "",
             f"Updates/s over the second half of {e['updates']} updates, batch 32, 32 px digits, the same "
             "data2vec 2.0-format checkpoint (2 prenet + 3 main blocks, 128 wide: data2vec's model cannot be "
             "built with 2 + 2), no validation, no checkpoint writes, 2 data-loading workers (the demo recipe's). Ours: "
             "`config/demo.yaml` (pretraining augmentation). Reference: data2vec's own task, model and "
             "criterion (`mae_image_classification`, `model`) with its own transform (timm RandAugment + "
             "random erasing), run by `scripts/reference_train.py` (the test-only shims, and the plugin's "
             "timm posterize fix without which that transform crashes on Pillow >= 10).", "",
             "| path | updates/s | vs reference |", "|---|---|---|"]
    if "reference" in e:
        for k in ("reference", "ours"):
            lines.append(f"| {k} | {fmt(e[k], digits=2)} | {e[k]['median'] / e['reference']['median']:.2f}x |")
    lines.append("")
    return lines
