"""Probe a checkpoint's frozen features cheaply: kNN, a linear probe and few-shot logistic regression on
features cached once per split; one JSON line per probe (per k, per shot count, per block).

    python -m d2v_plugin.cli.probe CHECKPOINT [CHECKPOINT ...] --data ROOT [--probes knn,linear,fewshot]
        [--block N|last|last4] [--pool mean|cls|mean+cls] [--sweep-blocks] [--device auto] [--precision bf16]
    torchrun --nproc_per_node=8 -m d2v_plugin.cli.probe CHECKPOINT --data /data/imagenet --probes knn,linear

- knn: weighted kNN (DINOv2's), --k 10 20 100 200 in one search, temperature --temperature.
- linear: MAE's head (BatchNorm without affine + Linear) trained on the cached features for --epochs and
  at least --min-steps steps (DINOv2's 12,500), a grid of --lrs x --weight-decays trained at once
  (DINOv2's), SGD with momentum 0.9 or AdamW, cosine; the head chosen on a held-out 10% of train, ties
  by the held-out loss (--select-on val: on val, DINOv2's way, recorded).
- fewshot: 1, 2, 5, 10 images per class (--shots), 3 seeds (--seeds), L2-regularised multinomial
  logistic regression on centred, normalised features (MSN's); mean and spread over the seeds.

Which features: --block (1..depth, last, or last4: DINOv2's CLS of the last 4 blocks + mean of the last
block's patch tokens) and --pool. --sweep-blocks runs every probe asked for on every block, from one
forward pass, each line naming its block's features, and ends with one line per probe naming its best
block. CHECKPOINT: any file the model accepts (pretrained, student, classifier, export folder);
several are probed in turn on the same pixels (the first one's size, crop and interpolation, or the
flags'), and every line records the data config it saw.
Features go to the store of cli.knn (--cache); several ranks extract and search together, rank 0 fits
the linear and few-shot probes and prints.
"""
import sys

from d2v_plugin.cli.common import (add_data_arguments, add_out_argument, add_runtime_arguments, bounded_float, emit,
                                   fail_cleanly, load_heavy, make_parser, nonnegative_int, positive_float, positive_int,
                                   preflight, ratio, resumable, start_runtime, write_results)
from d2v_plugin.cli.knn import add_encoder_arguments, kept_features, store_folder


def fraction_open(text: str) -> float:
    value = ratio(text)
    if value >= 1:
        import argparse

        raise argparse.ArgumentTypeError(f"{text} is not below 1")
    return value


def main(argv=None) -> int:
    from d2v_plugin.evaluation.defaults import LAMBDA, LRS, MIN_STEPS, SEEDS, SHOTS, WEIGHT_DECAYS

    parser = make_parser(__doc__, "probe")
    add_encoder_arguments(parser)
    add_data_arguments(parser, help="the dataset, as task.data, with train and val splits")
    parser.add_argument("--probes", default="knn,linear,fewshot", help="which probes, comma-separated")
    parser.add_argument("--sweep-blocks", action="store_true",
                        help="every probe on every block (one forward pass), then each probe's best block")
    parser.add_argument("--k", type=positive_int, nargs="+", default=[10, 20, 100, 200], help="kNN: neighbours")
    parser.add_argument("--temperature", type=positive_float, default=0.07, help="kNN: votes weigh exp(sim / T)")
    parser.add_argument("--lrs", type=bounded_float(0, 100), nargs="+", default=list(LRS),
                        help="linear: learning rates of the grid (x batch / 256)")
    parser.add_argument("--weight-decays", type=bounded_float(0, 10, lo_included=True), nargs="+", default=list(WEIGHT_DECAYS),
                        help="linear: weight decays of the grid")
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"), help="linear: SGD (momentum 0.9) or AdamW")
    parser.add_argument("--epochs", type=positive_int, default=10, help="linear: epochs over the cached features")
    parser.add_argument("--min-steps", type=nonnegative_int, default=MIN_STEPS,
                        help="linear: at least this many steps (DINOv2's 12,500 iterations at batch 1,024, whatever "
                             "the set's size: a small set's 10 epochs are a few steps)")
    parser.add_argument("--probe-batch-size", type=positive_int, default=1024, help="linear: features per step")
    parser.add_argument("--select-on", default="held-out", choices=("held-out", "val"),
                        help="linear: choose the head on a held-out part of train, or on val (DINOv2, optimistic)")
    parser.add_argument("--held-out", type=fraction_open, default=0.1, help="linear: the part of train held out")
    parser.add_argument("--shots", type=positive_int, nargs="+", default=list(SHOTS), help="few-shot: images per class")
    parser.add_argument("--seeds", type=nonnegative_int, nargs="+", default=list(SEEDS), help="few-shot: draws")
    parser.add_argument("--lambda", dest="lam", type=bounded_float(0, 1e4), default=LAMBDA,
                        help="few-shot: L2 weight of the logistic regression (mean loss + lambda/2 ||W||^2)")
    add_runtime_arguments(parser)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    preflight(args, args.checkpoints, args.data, [(args.out, "--out")], [(store_folder(args.cache), "--cache")])
    load_heavy()
    from d2v_plugin.evaluation.linear import LinearSettings
    from d2v_plugin.evaluation.probes import best_blocks, described, each_model, parse_probes, run_probes

    with fail_cleanly(), resumable("probe", argv, kept_features(args.cache)):
        probes = parse_probes(args.probes)
        runtime = start_runtime(args)
        linear = LinearSettings(lrs=tuple(args.lrs), weight_decays=tuple(args.weight_decays), optimizer=args.optimizer,
                                epochs=args.epochs, min_steps=args.min_steps, batch_size=args.probe_batch_size,
                                held_out=args.held_out, select_on=args.select_on)
        records, indexes = [], {}
        for feats in each_model(args, runtime, sweep=args.sweep_blocks, probes=probes):
            results = run_probes(feats, probes, runtime, train_split=args.train_split, val_split=args.val_split,
                                 ks=args.k, temperature=args.temperature, linear=linear, shots=args.shots,
                                 seeds=args.seeds, lam=args.lam, sweep=args.sweep_blocks, outcomes=bool(args.out))
            indexes[args.val_split] = feats.splits[args.val_split].index
            mine = []
            for record in described(results, feats, runtime, args.train_split, args.val_split):
                emit(runtime, record)
                mine.append(record)
            if args.sweep_blocks:  # the sweep ends with each probe's best block
                for record in best_blocks(mine):
                    emit(runtime, record)
                    mine.append(record)
            records += mine
        if runtime.is_main:
            write_results(args.out, "probe", records, args, indexes)
        runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
