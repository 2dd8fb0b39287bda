"""Evaluate a fine-tuned checkpoint on an image-folder split; prints {"top1", "top5", "n"} as one JSON line.

    python -m d2v_plugin.cli.evaluate CHECKPOINT --data ROOT [--split val] [--batch-size N]

CHECKPOINT: written by fairseq-hydra-train with this plugin, an export folder, data2vec's own fine-tuned
checkpoint (mae_image_classification) or the thesis' fine-tuned Lightning classifier.
"""
from __future__ import annotations

import json
import sys

from d2v_plugin.cli.common import add_data_arguments, fail_cleanly, load_heavy, make_parser


def evaluate(model, data: str, split: str = "val", batch_size: int = 64, workers: int = 0, cache_dir=None,
             data_format: str = "auto") -> dict:
    """Top-1 / top-5 of a loaded classifier on a split, as exact fractions of the images it read."""
    import torch

    from d2v_plugin.data.containers import open_split
    from d2v_plugin.evaluation import eval_batches, topk_correct

    classes = model.classes or None
    index = open_split(data, split, classes=classes, cache_dir=cache_dir, data_format=data_format)
    if classes is None and len(index.classes) != model.cfg.num_classes:
        raise ValueError(f"{data}/{split} has {len(index.classes)} classes but the model has {model.cfg.num_classes}")
    top1 = top5 = n = 0
    with torch.no_grad():
        for images, target in eval_batches(index, model.data_cfg, batch_size, workers, desc=f"evaluate {split}"):
            c1, c5 = topk_correct(model(images), target)
            top1, top5, n = top1 + int(c1), top5 + int(c5), n + len(target)
    return {"top1": top1 / max(n, 1), "top5": top5 / max(n, 1), "n": n}


def main(argv=None) -> int:
    parser = make_parser(__doc__, "evaluate")
    parser.add_argument("checkpoint", help="fine-tuned checkpoint (e.g. checkpoint_best.pt) or export folder")
    add_data_arguments(parser)
    parser.add_argument("--split", default="val")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes")
    parser.add_argument("--cache-dir", default=None, help="folder-index cache (default ~/.cache/d2v_plugin/index)")
    parser.add_argument("--crop-ratio", type=float, default=None,
                        help="resize the shorter side to size / ratio, centre-crop size (default: what the "
                             "checkpoint's training validated with)")
    args = parser.parse_args(argv)
    load_heavy()
    from d2v_plugin.inference import load_classifier

    with fail_cleanly():
        model = load_classifier(args.checkpoint, trust=args.trust_checkpoint, num_heads=args.num_heads,
                                norm_eps=args.norm_eps, crop_ratio=args.crop_ratio)
        result = evaluate(model, args.data, args.split, args.batch_size, args.workers, args.cache_dir,
                          args.data_format)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
