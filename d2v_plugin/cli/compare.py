"""Compare models side by side, accuracy against cost; or ask whether one is better than another.

    python -m d2v_plugin.cli.compare MODEL [MODEL ...] --out REPORT_DIR [--labels A B ...] [--leaderboard OUT]
        [--batch-size 64] [--device auto] [--precision bf16] [--no-speed]
    python -m d2v_plugin.cli.compare --paired A.outcomes.parquet B.outcomes.parquet [...] [--out DIR]

MODEL is a fine-tuning run's folder (its checkpoint.save_dir: fairseq's log gives the best validation top-1,
when it was reached and how fast; checkpoint_best.pt its cost), a checkpoint file (an init, a released
data2vec file, a student: its cost), or a results folder (what evaluate, knn and probe wrote with --out: one
row per checkpoint measured). Results anywhere given are shown on every row whose checkpoint they measured.
The report (report.md) has one row per model: encoder parameters, GFLOPs per image (torch.utils.flop_counter,
2 per multiply-add), inference images/s measured as `make bench` measures (interleaved rounds; --no-speed
skips it), the run's best top-1 with its 95% interval; then each model's probes and other sets, columns in
the order of their k and shot counts, every cell with its interval and the checkpoint (file and hash) it
measured, rankings within noise marked ≈; plots of the runs (top-1 against training time, per epoch, loss, lr)
and of tracked pretraining runs. Files it cannot read are listed, not fatal. --leaderboard OUT also writes
OUT.md and OUT.csv: one row per model, probe and set with provenance, rows whose checkpoint or split changed
marked stale.

--paired: two or more outcome files of one split (evaluate/knn/probe --out write them beside their results):
for each pair the difference in top-1 with a paired-bootstrap 95% interval, the exact McNemar p-value on the
images only one gets right, Holm's correction over the pairs, and a verdict: "A better", "B better" or
"within noise at 95%". Files of different splits are refused, naming the difference.
"""
import os
import sys

from d2v_plugin.cli.common import (add_runtime_arguments, emit, fail_cleanly, load_heavy, make_parser, positive_int,
                                   preflight, start_runtime)


def main(argv=None) -> int:
    parser = make_parser(__doc__, "compare", trust_flag=False)
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="run folders, checkpoint files, results folders (with --paired: outcome files)")
    parser.add_argument("--out", default=None, help="report folder (required but with --paired; default: none)")
    parser.add_argument("--labels", nargs="+", default=None, help="one name per row (default: folder and file names)")
    parser.add_argument("--leaderboard", default=None, metavar="OUT",
                        help="also write OUT.md and OUT.csv, one row per model, probe and set (default: none)")
    parser.add_argument("--paired", action="store_true", help="compare outcome files pair by pair (McNemar, bootstrap)")
    parser.add_argument("--resamples", type=positive_int, default=10_000, help="--paired: bootstrap resamples")
    parser.add_argument("--no-speed", action="store_true", help="do not measure inference speed")
    parser.add_argument("--speed-rounds", type=positive_int, default=5,
                        help="rounds of the speed measurement (every model each round, the order rotated)")
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    if not args.paired and not args.out:
        parser.error("--out REPORT_DIR is needed (but with --paired)")
    if args.paired and len(args.models) < 2:
        parser.error("--paired compares two or more outcome files")
    from d2v_plugin import inputs

    with fail_cleanly():
        for model in args.models:
            if not os.path.lexists(model):
                raise inputs.InputError(f"{'outcome file' if args.paired else 'run folder'} not found: {model}")
            if args.paired:
                inputs.regular_file(model, "outcome file")
            elif os.path.isdir(model):
                inputs.folder(model, "run folder")
            else:
                inputs.checkpoint(model)
    preflight(args, folders=[(args.out, "--out")])
    load_heavy()
    with fail_cleanly():
        if args.paired:
            from d2v_plugin.evaluation import paired, report

            pairs = paired.compare(args.models, args.resamples)
            for record in pairs:
                emit(None, record)
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                report.write_paired(pairs, args.out)
            return 0
        from d2v_plugin.evaluation.report import write_compare

        runtime = None if args.no_speed else start_runtime(args)
        result = write_compare(args.models, args.out, args.labels, args.batch_size, not args.no_speed, runtime,
                               args.speed_rounds, args.leaderboard)
    print(f"wrote {result['report']} and {len(result['plots'])} plots"
          + (f"; {len(result['skipped'])} file(s) or line(s) not read, listed there" if result["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
