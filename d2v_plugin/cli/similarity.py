"""How close are two encoders, block by block? Linear CKA between every block of A and every block of B on the
same images: a student against its teacher (where it still matches, where it departs), two checkpoints of a
run, a file's student against its EMA teacher.

    python -m d2v_plugin.cli.similarity A B --data ROOT [--split val] [--images N] [--pool mean|cls] --out DIR
    python -m d2v_plugin.cli.similarity /ckpt/student_4.ckpt /ckpt/base_imagenet.pt --data /data/imagenet --out sim/
    torchrun --nproc_per_node=8 -m d2v_plugin.cli.similarity A B --data /data/imagenet --out sim/

A and B: any checkpoints the plugin reads (--weights-a / --weights-b ema: a data2vec pretraining file's EMA
teacher). Both see the same pixels (A's data config). The features of every block come from the feature
store (--cache; a killed run resumes), the CKA from the minibatch unbiased HSIC estimator (Nguyen, Raghu and
Kornblith 2021: memory does not grow with the images; evaluation/similarity.py), on several ranks each its
share of the minibatches. Writes DIR/similarity.json (the matrix, its diagonal, both models with their hashes,
the images used and the split's digest) and DIR/similarity.png (the heatmap, A's blocks down, B's across),
and prints the JSON's summary line. For a student that keeps its teacher's first N blocks the diagonal of
those blocks starts at 1.0.
"""
import os
import sys

from d2v_plugin.cli.common import (add_data_arguments, add_runtime_arguments, emit, fail_cleanly, load_heavy,
                                   make_parser, positive_int, preflight, resumable, start_runtime)
from d2v_plugin.cli.knn import kept_features, store_folder


def main(argv=None) -> int:
    parser = make_parser(__doc__, "similarity")
    parser.add_argument("a", help="the first encoder (rows of the matrix)")
    parser.add_argument("b", help="the second encoder (its columns)")
    add_data_arguments(parser, help="the images, as task.data (any split, labels not read)")
    parser.add_argument("--split", default="val", help="the split whose images are compared")
    parser.add_argument("--images", type=positive_int, default=None,
                        help="a fixed draw of this many images of the split (default: all of them)")
    parser.add_argument("--pool", default="mean", choices=("mean", "cls"), help="each block's tokens pooled")
    parser.add_argument("--weights-a", default="student", choices=("student", "ema"), help="A's student or EMA teacher")
    parser.add_argument("--weights-b", default="student", choices=("student", "ema"), help="B's student or EMA teacher")
    parser.add_argument("--minibatch", type=positive_int, default=256, help="images per CKA minibatch (at least 4)")
    parser.add_argument("--cache", default=None, help="feature store folder (default: ~/.cache/d2v_plugin/features); "
                                                      "'none': a temporary one")
    parser.add_argument("--store-chunk", type=positive_int, default=256, help="rows of the feature store at a time")
    parser.add_argument("--out", required=True, help="folder for similarity.json and similarity.png")
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    if args.minibatch < 4:
        parser.error("argument --minibatch: the unbiased estimator needs at least 4 images a minibatch")
    preflight(args, [args.a, args.b], args.data, folders=[(args.out, "--out"), (store_folder(args.cache), "--cache")])
    load_heavy()
    import json

    from d2v_plugin.atomic import atomic_path
    from d2v_plugin.evaluation.similarity import compare_encoders, plot_heatmap

    with fail_cleanly(), resumable("similarity", argv, kept_features(args.cache)):
        runtime = start_runtime(args)
        result = compare_encoders(args, runtime)
        if runtime.is_main:
            os.makedirs(args.out, exist_ok=True)
            with atomic_path(os.path.join(args.out, "similarity.json")) as tmp, open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            import numpy as np

            plot_heatmap(os.path.join(args.out, "similarity.png"), np.array(result["matrix"]),
                         os.path.basename(args.a) + (" (EMA)" if args.weights_a == "ema" else ""),
                         os.path.basename(args.b) + (" (EMA)" if args.weights_b == "ema" else ""))
        emit(runtime, {k: v for k, v in result.items() if k != "matrix"})
        runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
