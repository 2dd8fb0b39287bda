"""Evaluate a fine-tuned classifier on a split; prints {"top1", "top5", "n", ...} as one JSON line (top-1 and
top-5 as fractions of the n images read).

    python -m d2v_plugin.cli.evaluate CHECKPOINT --data ROOT [--split val] [--device auto] [--precision bf16]
    torchrun --nproc_per_node=8 -m d2v_plugin.cli.evaluate CHECKPOINT --data /data/imagenet

CHECKPOINT: written by fairseq-hydra-train with this plugin, an export folder, data2vec's own fine-tuned
checkpoint (mae_image_classification) or the thesis' fine-tuned Lightning classifier. On several ranks
(torchrun, or SLURM tasks under srun) each reads its own shard of the split and the counts are summed;
rank 0 prints. The result records the device, precision and ranks used and the time taken.
"""
from __future__ import annotations

import sys

from d2v_plugin.cli.common import (NothingCounted, add_data_arguments, add_out_argument, add_runtime_arguments, emit,
                                   fail_cleanly, load_heavy, make_parser, ratio, start_runtime, write_results)


def main(argv=None) -> int:
    parser = make_parser(__doc__, "evaluate")
    parser.add_argument("checkpoint", help="fine-tuned checkpoint (e.g. checkpoint_best.pt) or export folder")
    add_data_arguments(parser)
    parser.add_argument("--split", default="val", help="the split to evaluate (val also finds validation/)")
    add_runtime_arguments(parser)
    parser.add_argument("--crop-ratio", type=ratio, default=None,
                        help="resize the shorter side to size / ratio, centre-crop size (default: what the "
                             "checkpoint's training validated with)")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    load_heavy()
    from d2v_plugin.data.containers import COMMAND_FLAGS, open_split
    from d2v_plugin.evaluation.loop import evaluate
    from d2v_plugin.inference import load_classifier

    with fail_cleanly():
        runtime = start_runtime(args)
        model = load_classifier(args.checkpoint, trust=args.trust_checkpoint, num_heads=args.num_heads,
                                norm_eps=args.norm_eps, crop_ratio=args.crop_ratio)
        index = open_split(args.data, args.split, classes=model.classes or None, cache_dir=args.cache_dir,
                           data_format=args.data_format, names=COMMAND_FLAGS)
        if not model.classes and len(index.classes) != model.cfg.num_classes:
            raise ValueError(f"{args.data}/{args.split} has {len(index.classes)} classes but the model has "
                             f"{model.cfg.num_classes}")
        result = evaluate(model, index, runtime, args.batch_size, args.workers, desc=f"evaluate {args.split}")
        if result["n"] == 0:
            raise NothingCounted(f"no image of {index.split_dir} could be read: nothing was evaluated")
        result = {**result, "split": args.split, "checkpoint": args.checkpoint, "accuracy_unit": "fraction"}
        emit(runtime, result)
        if runtime.is_main:
            write_results(args.out, "evaluate", [result], args)
        runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
