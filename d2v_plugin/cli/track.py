"""Track a pretraining run's improvement over time: probe each checkpoint it writes, cheaply.

    python -m d2v_plugin.cli.track RUN_DIR --data ROOT [--probes knn,linear] [--watch] [--poll 300]
    torchrun --nproc_per_node=8 -m d2v_plugin.cli.track /runs/pretrain --data /data/imagenet --watch

RUN_DIR: a pretraining run's folder (data2vec's fairseq run: checkpoint_N.pt, checkpoint_E_U.pt,
checkpoint_last.pt; the thesis' Lightning run: *.ckpt; or encoder files). Each checkpoint's training
step is read from the file itself; the checkpoints not probed yet are probed (the probes of cli.probe,
on features cached for the checkpoint and removed after it), and the results are appended to
RUN_DIR/track.jsonl (one line per checkpoint and probe result: the update, the file, the settings)
and drawn in RUN_DIR/top1_vs_update.png. A rerun probes only new checkpoints; a file still being
written is left until it is complete and stable. --watch polls for new checkpoints while pretraining
runs elsewhere, until Ctrl-C or SIGTERM (which let the checkpoint in progress finish; track.jsonl is
rewritten atomically, so it never holds a broken line). `cli.compare RUN_A RUN_B` draws two runs'
tracks side by side.
"""
import os
import signal
import sys

from d2v_plugin.cli.knn import add_weights_argument
from d2v_plugin.cli.common import (add_data_arguments, add_runtime_arguments, fail_cleanly, load_heavy, make_parser,
                                   nonnegative_int, positive_float, positive_int, preflight, ratio)


def main(argv=None) -> int:
    from d2v_plugin.evaluation.defaults import MIN_STEPS

    parser = make_parser(__doc__, "track")
    parser.add_argument("run_dir", help="the pretraining run's folder")
    add_data_arguments(parser, help="the dataset the probes use, as task.data, with train and val splits")
    parser.add_argument("--probes", default="knn,linear",
                        help="which probes of cli.probe, comma-separated (rankme, alphareq: label-free, drawn under "
                             "top-1)")
    parser.add_argument("--sweep-blocks", action="store_true",
                        help="every checkpoint probed at every block (one forward pass): blocks_vs_update.png")
    parser.add_argument("--k", type=positive_int, nargs="+", default=[20], help="kNN: neighbours")
    parser.add_argument("--temperature", type=positive_float, default=0.07, help="kNN: votes weigh exp(sim / T)")
    parser.add_argument("--epochs", type=positive_int, default=10, help="linear: epochs over the cached features")
    parser.add_argument("--block", default="last", help="the block read: 1..depth, last or last4")
    parser.add_argument("--pool", default="mean", choices=("mean", "cls", "mean+cls"), help="the tokens pooled")
    parser.add_argument("--prefix", default=None, help="key prefix of the encoder in the checkpoints (default: found)")
    add_weights_argument(parser)
    parser.add_argument("--crop-ratio", type=ratio, default=None, help="eval crop (default: the first checkpoint's, "
                                                                       "else 0.875)")
    parser.add_argument("--image-size", type=positive_int, default=None, help="default: the first checkpoint's")
    parser.add_argument("--interpolation", default=None, choices=("bicubic", "bilinear", "nearest"),
                        help="resampling of the eval resize (default: the first checkpoint's, else bicubic)")
    parser.add_argument("--min-steps", type=nonnegative_int, default=MIN_STEPS,
                        help="linear: at least this many steps (DINOv2's 12,500)")
    parser.add_argument("--cache", default=None,
                        help="where each checkpoint's features are kept while it is probed (default: RUN_DIR/track)")
    parser.add_argument("--store-chunk", type=positive_int, default=256, help="rows of the feature store at a time")
    parser.add_argument("--train-split", default="train", help="the split the probes learn from")
    parser.add_argument("--val-split", default="val", help="the split they are scored on")
    parser.add_argument("--watch", action="store_true", help="keep polling for new checkpoints")
    parser.add_argument("--poll", type=positive_float, default=300.0, help="seconds between looks (--watch)")
    parser.add_argument("--settle", type=positive_float, default=2.0,
                        help="seconds a file must stay unchanged before it is read")
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    from d2v_plugin import inputs

    with fail_cleanly():
        inputs.folder(args.run_dir, "run folder")  # (under --watch it may not exist yet: it is waited for)
        if not args.watch and not os.path.isdir(args.run_dir):
            raise inputs.InputError(f"run folder not found: {args.run_dir} (--watch waits for it to appear)")
    preflight(args, data=args.data, folders=[(args.cache, "--cache")])
    if args.watch and not os.path.isdir(args.run_dir):
        print(f"track: waiting for {args.run_dir} to appear (pretraining has not started it yet)", file=sys.stderr,
              flush=True)
    load_heavy()
    from d2v_plugin.evaluation.linear import LinearSettings
    from d2v_plugin.evaluation.probes import described, features_from_args, needs_train, parse_probes, run_probes
    from d2v_plugin.evaluation.runtime import start
    from d2v_plugin.evaluation.tracking import Tracker

    with fail_cleanly():
        probes = parse_probes(args.probes)
        runtime = start(args.device, args.precision)
        linear = LinearSettings(epochs=args.epochs, min_steps=args.min_steps)
        settings = result_settings(args, runtime, probes)
        pixels = {}  # the first checkpoint's data config, fed to every other (one comparison)

        def probe(path, store):
            splits = [args.train_split, args.val_split] if needs_train(probes) else [args.val_split]
            feats = features_from_args(argparse_copy(args, cache=store), runtime, path, data_cfg=pixels.get("cfg"),
                                       sweep=args.sweep_blocks, splits=splits)
            pixels.setdefault("cfg", feats.data_cfg)
            try:
                results = run_probes(feats, probes, runtime, train_split=args.train_split, val_split=args.val_split,
                                     ks=args.k, temperature=args.temperature, linear=linear, sweep=args.sweep_blocks)
                return list(described(results, feats, runtime, args.train_split, args.val_split))
            finally:
                feats.close(runtime)

        tracker = Tracker(args.run_dir, settings, probe, runtime, args.cache, args.settle)

        main_pid = os.getpid()

        def stop(signum, frame):
            if os.getpid() != main_pid:  # a data-loading worker (forked with this handler): the main process speaks
                return
            if tracker.stopping:
                raise KeyboardInterrupt
            tracker.stopping = True
            print(f"track: {signal.Signals(signum).name}: stopping after the checkpoint in progress",
                  file=sys.stderr, flush=True)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)
        if args.watch:
            tracker.watch(args.poll)
        else:
            probed = tracker.once()
            if runtime.is_main:
                print(f"track: {probed} new checkpoints probed; {os.path.join(args.run_dir, 'track.jsonl')}",
                      file=sys.stderr)
        runtime.close()
    return 0


# flags that change where and how fast a result is computed, not the result
NOT_RESULT_SETTINGS = ("run_dir", "watch", "poll", "settle", "cache", "cache_dir", "device", "precision", "batch_size",
                       "workers", "store_chunk", "trust_checkpoint")


def result_settings(args, runtime, probes) -> dict:
    """Everything that changes a result, as every line of track.jsonl records it and as the "already probed"
    check compares it: every flag but those of NOT_RESULT_SETTINGS (a flag added later counts unless listed
    there), the data as a real path, and the precision the forward pass ran in."""
    import os

    settings = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_RESULT_SETTINGS}
    return {**settings, "probes": probes, "data": os.path.realpath(args.data), "precision": runtime.precision}


def argparse_copy(args, **changes):
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})


if __name__ == "__main__":
    sys.exit(main())
