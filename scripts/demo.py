"""`make demo`: fine-tune a small Data2Vec2 encoder on scikit-learn's real handwritten digits, on CPU.

1. builds demo_work/data/{train,val}/<digit>/*.png from sklearn's digits (1,437 train, 360 val);
2. writes demo_work/init.pt, a randomly initialised encoder in the fairseq data2vec 2.0 layout,
   so the real checkpoint-loading path runs;
3. runs fairseq-hydra-train --config-dir config --config-name demo common.user_dir=d2v_plugin ...;
4. evaluates checkpoint_best.pt with `python -m d2v_plugin.cli.evaluate` and prints its top-1;
5. packs the digits as Parquet files and as tar shards (`python -m d2v_plugin.cli.pack`) and evaluates
   from each: the same images, so the same top-1.
Exits non-zero if top-1 is below 0.90 or differs between the containers.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import torch

from d2v_plugin.demo_data import write_digits
from d2v_plugin.testing.checkpoints import save_data2vec_checkpoint
from d2v_plugin.models.encoder import Data2Vec2ImageEncoder, EncoderConfig

WORK = "demo_work"
TARGET = 0.90
CREATED = ("data", "data_parquet", "data_wds", "init.pt", "run")  # what the demo writes under WORK, all it deletes


def clean_previous(work: str = WORK) -> None:
    """Remove what an earlier demo wrote (a fresh run, not a resume of it); anything else a user put
    in the folder (an export, a report) stays."""
    for name in CREATED:
        path = os.path.join(work, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def main() -> int:
    start = time.time()
    clean_previous()
    counts = write_digits(os.path.join(WORK, "data"))
    print(f"demo data: {counts} images in {WORK}/data", flush=True)
    torch.manual_seed(0)
    encoder = Data2Vec2ImageEncoder(EncoderConfig(embed_dim=128, depth=4, num_heads=4, patch_size=4, image_size=32))
    save_data2vec_checkpoint(encoder, os.path.join(WORK, "init.pt"), prenet_depth=2)
    bin_dir = os.path.dirname(sys.executable)
    train = [
        os.path.join(bin_dir, "fairseq-hydra-train"), "--config-dir", "config", "--config-name", "demo",
        "common.user_dir=d2v_plugin", f"task.data={WORK}/data", f"model.pretrained_checkpoint={WORK}/init.pt",
        f"checkpoint.save_dir={WORK}/run", "common.tensorboard_logdir=",
    ]
    print("+ " + " ".join(train), flush=True)
    subprocess.run(train, check=True)
    # the same digits as Parquet files and as tar shards: the same images, so the same accuracy
    top1 = {}
    for fmt, data in (("folder", f"{WORK}/data"), ("parquet", f"{WORK}/data_parquet"), ("wds", f"{WORK}/data_wds")):
        if fmt != "folder":
            command(sys.executable, "-m", "d2v_plugin.cli.pack", f"{WORK}/data", "--out", data, "--format", fmt,
                    "--shard-size", "100KB")
        out = command(sys.executable, "-m", "d2v_plugin.cli.evaluate", f"{WORK}/run/checkpoint_best.pt",
                      "--data", data, "--split", "val")
        top1[fmt] = json.loads(out.splitlines()[-1])["top1"]
    print(f"demo: top-1 on {counts['val']} held-out digits = {top1['folder']:.4f} (target >= {TARGET}); the same "
          f"from Parquet files {top1['parquet']:.4f} and tar shards {top1['wds']:.4f}; "
          f"{time.time() - start:.0f} s", flush=True)
    return 0 if top1["folder"] >= TARGET and top1["parquet"] == top1["wds"] == top1["folder"] else 1


def command(*args) -> str:
    """Run a command as the README shows it, printing it and its output."""
    print("+ " + " ".join(args), flush=True)
    out = subprocess.run(args, check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    print(out, flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
