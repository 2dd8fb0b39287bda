"""Weighted k-nearest-neighbour probe of frozen features: a cheap way to rank encoders before fine-tuning.

    python -m d2v_plugin.cli.knn CHECKPOINT [CHECKPOINT ...] --data ROOT [--k 10 20 100 200] [--temperature 0.07]
        [--block last] [--pool mean] [--cache DIR] [--device auto] [--precision bf16]
    torchrun --nproc_per_node=8 -m d2v_plugin.cli.knn CHECKPOINT --data /data/imagenet --k 10 20 100 200

Features are the mean of a block's patch tokens (the pooling the head uses; --pool cls or mean+cls,
--block N or last4 for others), L2-normalised; every val image votes with its k most cosine-similar
train images, each weighted exp(similarity / T), as DINO's and DINOv2's kNN evaluation does. Several k
are answered by one search: one JSON line each ({"probe": "knn", "k", "top1", "top5", "n", ...}).

Features are extracted once per split into a store on disk (--cache, default ~/.cache/d2v_plugin/features:
1.28M x 768 in fp16 is 2 GB), in chunks, so a killed run resumes where it stopped and a rerun with
the same settings reads them back. On several ranks each extracts its chunks, holds its share of the
train features and scores every val image against it; rank 0 prints. CHECKPOINT is any file the model
accepts (data2vec 2.0, Lightning student, converted file, fine-tuned checkpoint, export folder).
"""
import sys

from d2v_plugin.cli.common import (add_data_arguments, add_out_argument, add_runtime_arguments, emit, fail_cleanly,
                                   load_heavy, make_parser, positive_float, positive_int, preflight, ratio,
                                   resumable, start_runtime, write_results)


def add_weights_argument(parser) -> None:
    parser.add_argument("--weights", default="student", choices=("student", "ema"),
                        help="which encoder of the file: the student (the model trained) or ema (a data2vec 2.0 "
                             "pretraining checkpoint's EMA teacher)")


def add_encoder_arguments(parser) -> None:
    """Which encoder of the file, and at which image size and crop: what changes its features."""
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="pretrained encoder, student, fine-tuned checkpoint or export folder; several: each is "
                             "probed in turn on the same pixels (the first one's data config, or the flags')")
    parser.add_argument("--prefix", default=None, help="key prefix of the encoder in the checkpoint (default: found)")
    add_weights_argument(parser)
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="default: the (first) checkpoint's")
    parser.add_argument("--crop-ratio", type=ratio, default=None,
                        help="resize to size / ratio, centre-crop size (default: the (first) file's training's, "
                             "else 0.875)")
    parser.add_argument("--interpolation", default=None, choices=("bicubic", "bilinear", "nearest"),
                        help="resampling of the eval resize (default: the (first) file's training's, else bicubic)")
    parser.add_argument("--block", default="last", help="the block whose output is read: 1..depth, last, or last4 "
                                                        "(DINOv2's: CLS of the last 4 blocks + mean of the last)")
    parser.add_argument("--pool", default="mean", choices=("mean", "cls", "mean+cls"),
                        help="mean: the patch tokens' mean (the head's pooling); cls: the CLS token")
    parser.add_argument("--cache", default=None,
                        help="feature store folder (default: ~/.cache/d2v_plugin/features); 'none': a temporary one")
    parser.add_argument("--store-chunk", type=positive_int, default=256,
                        help="rows of the feature store written (and redone after a kill) at a time")
    parser.add_argument("--train-split", default="train", help="the split the neighbours come from")
    parser.add_argument("--val-split", default="val", help="the split that is classified")


def store_folder(cache):
    """--cache as a folder to check (``none``: a temporary one, nothing to check)."""
    return None if cache in (None, "none") else cache


def kept_features(cache) -> str:
    """What an interrupted extraction leaves for a rerun (its finished chunks, each checked when reused)."""
    if cache == "none":
        return "Nothing is kept (--cache none)"
    from d2v_plugin.evaluation.defaults import default_store_dir

    return f"The features' finished chunks are kept in {cache or default_store_dir()} and the same command reuses them"


def main(argv=None) -> int:
    parser = make_parser(__doc__, "knn")
    add_encoder_arguments(parser)
    add_data_arguments(parser, help="the dataset, as task.data: a folder tree, Parquet files or tar shards, with "
                                    "train and val splits")
    parser.add_argument("--k", type=positive_int, nargs="+", default=[20],
                        help="neighbours voting (several: one search, one line each; DINOv2: 10 20 100 200)")
    parser.add_argument("--temperature", type=positive_float, default=0.07, help="votes weigh exp(similarity / T)")
    add_runtime_arguments(parser)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    preflight(args, args.checkpoints, args.data, [(args.out, "--out")], [(store_folder(args.cache), "--cache")])
    load_heavy()
    from d2v_plugin.evaluation.probes import knn_from_args

    with fail_cleanly(), resumable("knn", argv, kept_features(args.cache)):
        runtime = start_runtime(args)
        records, indexes = knn_from_args(args, runtime)
        for record in records:
            emit(runtime, record)
        if runtime.is_main:
            write_results(args.out, "knn", records, args, indexes)
        runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
