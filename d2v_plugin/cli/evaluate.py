"""Evaluate a fine-tuned classifier on a split; prints {"top1", "top5", "n", ...} as one JSON line (top-1 and
top-5 as fractions of the n images read).

    python -m d2v_plugin.cli.evaluate CHECKPOINT --data ROOT [--split val] [--device auto] [--precision bf16]
    torchrun --nproc_per_node=8 -m d2v_plugin.cli.evaluate CHECKPOINT --data /data/imagenet
    python -m d2v_plugin.cli.evaluate CHECKPOINT --data /data/imagenet-r --benchmark imagenet-r|auto
    python -m d2v_plugin.cli.evaluate CHECKPOINT --data /data/imagenet/val --benchmark imagenet-real --real-labels real.json
    python -m d2v_plugin.cli.evaluate CHECKPOINT --data ROOT --out RUN/eval_val.jsonl --per-class RUN/per_class

--benchmark scores another ImageNet set its own way (--data is then the set's folder, the one holding its
class folders): imagenet-v2 (folders 0 ... 999 are class indices), imagenet-real (a prediction is right
when it is in the image's ReaL label set; images without one are left out), imagenet-a / imagenet-r (the
logits of the set's 200 classes only, found from the model's class names), imagenet-sketch; auto finds
which from the layout and says so. The JSON line names the benchmark and, where restricted, the classes
used.

CHECKPOINT: written by fairseq-hydra-train with this plugin, an export folder, data2vec's own fine-tuned
checkpoint (mae_image_classification) or the thesis' fine-tuned Lightning classifier. On several ranks
(torchrun, or SLURM tasks under srun) each reads its own shard of the split and the counts are summed;
rank 0 prints. The result records the device, precision and ranks used and the time taken.
"""
from __future__ import annotations

import sys

from d2v_plugin.cli.common import (NothingCounted, add_data_arguments, add_out_argument, add_runtime_arguments, emit,
                                   fail_cleanly, load_heavy, make_parser, preflight, ratio, start_runtime,
                                   write_results)


def main(argv=None) -> int:
    parser = make_parser(__doc__, "evaluate")
    parser.add_argument("checkpoint", help="fine-tuned checkpoint (e.g. checkpoint_best.pt) or export folder")
    add_data_arguments(parser)
    parser.add_argument("--split", default="val", help="the split to evaluate (val also finds validation/)")
    add_runtime_arguments(parser)
    parser.add_argument("--crop-ratio", type=ratio, default=None,
                        help="resize the shorter side to size / ratio, centre-crop size (default: what the "
                             "checkpoint's training validated with)")
    parser.add_argument("--benchmark", default=None,
                        choices=("auto", "imagenet-v2", "imagenet-real", "imagenet-a", "imagenet-r", "imagenet-sketch"),
                        help="score another ImageNet set its own way (--data: the set's folder; auto: found from what it holds; "
                             "default: plain top-1/top-5 of --split)")
    parser.add_argument("--real-labels", default=None, help="imagenet-real: ReaL's real.json (default: in --data)")
    parser.add_argument("--per-class", default=None, metavar="DIR",
                        help="also write each class's top-1 (per_class.csv) and the confusion matrix (confusion.csv, "
                             "confusion.png) to this folder (default: not written)")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.real_labels and args.benchmark not in ("imagenet-real", "auto"):
        parser.error("--real-labels is for --benchmark imagenet-real")
    if args.per_class and args.benchmark not in (None, "imagenet-v2", "imagenet-sketch"):
        parser.error("--per-class counts a split's own classes: use it without --benchmark, or with imagenet-v2 or "
                     "imagenet-sketch")
    preflight(args, [args.checkpoint], args.data, [(args.out, "--out")], [(args.per_class, "--per-class")],
              files=[(args.real_labels, "--real-labels")])
    load_heavy()
    from d2v_plugin.data.containers import COMMAND_FLAGS, open_split
    from d2v_plugin.evaluation import benchmarks
    from d2v_plugin.evaluation.features import index_identity
    from d2v_plugin.evaluation.loop import evaluate
    from d2v_plugin.evaluation.outcomes import Collector
    from d2v_plugin.evaluation.provenance import provenance
    from d2v_plugin.inference import load_classifier

    with fail_cleanly():
        runtime = start_runtime(args)
        model = load_classifier(args.checkpoint, trust=args.trust_checkpoint, num_heads=args.num_heads,
                                norm_eps=args.norm_eps, crop_ratio=args.crop_ratio)
        scorer, details, name = None, {}, args.split
        if args.benchmark:
            benchmark, detected = args.benchmark, None
            if benchmark == "auto":
                benchmark, why = benchmarks.detect(args.data)
                detected = f"{benchmark} ({why})"
                if runtime.is_main:
                    print(f"evaluate: --benchmark auto: {args.data} is {detected}", file=sys.stderr)
            index, scorer, details = benchmarks.prepare(benchmark, args.data, model.classes, model.cfg.num_classes,
                                                        args.real_labels, args.cache_dir)
            details = {"benchmark": benchmark, **details, **({"detected": detected} if detected else {})}
            name = benchmark
        else:
            index = open_split(args.data, args.split, classes=model.classes or None, cache_dir=args.cache_dir,
                               data_format=args.data_format, names=COMMAND_FLAGS)
            if not model.classes and len(index.classes) != model.cfg.num_classes:
                raise ValueError(f"{args.data}/{args.split} has {len(index.classes)} classes but the model has "
                                 f"{model.cfg.num_classes}")
        confusion = None
        if args.per_class:
            from d2v_plugin.evaluation.per_class import Confusion

            confusion = Confusion(model.cfg.num_classes, runtime.device)
        collector = Collector() if args.out else None
        result = evaluate(model, index, runtime, args.batch_size, args.workers, scorer, desc=f"evaluate {name}",
                          confusion=confusion, outcomes=collector)
        if result["n"] == 0:
            raise NothingCounted(f"no image of {index.split_dir} could be read or scored: nothing was evaluated")
        result = {**result, **details, "split": None if args.benchmark else args.split, "checkpoint": args.checkpoint,
                  "accuracy_unit": "fraction", **provenance(runtime, args.checkpoint, index_identity(index))}
        if collector is not None:
            result["_outcomes"] = collector.gathered(runtime)
        if confusion is not None:
            from d2v_plugin.evaluation.per_class import write_per_class

            matrix = confusion.matrix(runtime)
            if runtime.is_main:
                names = model.classes or index.classes
                result.update(write_per_class(args.per_class, matrix, list(names)))
        emit(runtime, result)
        if runtime.is_main:
            write_results(args.out, "evaluate", [result], args, {result["split"]: index})
        runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
