"""Weighted k-nearest-neighbour probe of frozen features: a cheap way to rank encoders before fine-tuning.

    python -m d2v_plugin.cli.knn CHECKPOINT --data ROOT [--k 20] [--temperature 0.07] [--cache DIR]

Features are the mean of all tokens but CLS (the pooling the head uses), L2-normalised; every val
image votes with its k most cosine-similar train images, each weighted exp(similarity / T), as DINO's
kNN evaluation does. CHECKPOINT is any encoder the model accepts (data2vec 2.0, Lightning student,
converted file) or a fine-tuned checkpoint. Prints one JSON line {"top1", "top5", "k", "n", ...}.
"""
import hashlib
import json
import os
import sys

from d2v_plugin.cli.common import add_data_arguments, fail_cleanly, load_heavy, make_parser


def load_encoder(path: str, image_size=None, trust=False, prefix=None, num_heads=None, norm_eps=None):
    """The frozen encoder of any checkpoint the model accepts, read as fine-tuning reads it."""
    from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig, build_encoder

    cfg = Data2Vec2ClassifierConfig(pretrained_checkpoint=path, trust_checkpoint=trust, checkpoint_prefix=prefix,
                                    num_heads=num_heads, norm_eps=norm_eps)
    return build_encoder(cfg, image_size=image_size).eval()


def features(encoder, index, batch_size=64, workers=0, crop_ratio=0.875, desc="features"):
    """[N, D] L2-normalised features (the head's pooling: the mean of all tokens but CLS) and [N]
    labels, in index order."""
    import torch
    import torch.nn.functional as F

    from d2v_plugin.data import resolve_data_config
    from d2v_plugin.evaluation import eval_batches
    from d2v_plugin.models.encoder import pool

    data_cfg = resolve_data_config(image_size=encoder.cfg.image_size, crop_ratio=crop_ratio)
    feats, labels = [], []
    with torch.no_grad():
        for images, target in eval_batches(index, data_cfg, batch_size, workers, desc=desc):
            feats.append(F.normalize(pool(encoder.extract_features(images), "mean"), dim=-1))
            labels.append(target)
    return torch.cat(feats), torch.cat(labels)


def cached_features(encoder, index, checkpoint, cache_dir=None, **kw):
    import torch

    from d2v_plugin.atomic import atomic_torch_save

    if not cache_dir:
        return features(encoder, index, **kw)
    st = os.stat(checkpoint)
    key = hashlib.sha1(json.dumps([os.path.realpath(checkpoint), st.st_mtime_ns, st.st_size, index.split_dir,
                                   len(index), encoder.cfg.image_size, kw.get("crop_ratio")]).encode()).hexdigest()
    path = os.path.join(cache_dir, f"{key}.pt")
    if os.path.isfile(path):
        print(f"knn: reusing the {kw.get('desc', 'features')} features cached in {path}", file=sys.stderr)
        cached = torch.load(path, weights_only=True)
        return cached["features"], cached["labels"]
    feats, labels = features(encoder, index, **kw)
    atomic_torch_save({"features": feats, "labels": labels}, path)
    return feats, labels


def knn_classify(train_feats, train_labels, query_feats, num_classes, k=20, temperature=0.07, chunk=1024):
    """Class scores [Q, C]: sum over the k nearest train features of exp(cos / T) for their class."""
    import torch

    k = min(k, len(train_feats))
    scores = []
    for start in range(0, len(query_feats), chunk):
        sims, idx = (query_feats[start:start + chunk] @ train_feats.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(sims), num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_probe(checkpoint, data, k=20, temperature=0.07, train_split="train", val_split="val", batch_size=64,
              workers=0, image_size=None, crop_ratio=0.875, cache_dir=None, trust=False, prefix=None,
              index_cache=None, num_heads=None, norm_eps=None, data_format="auto") -> dict:
    from d2v_plugin.data.containers import open_split
    from d2v_plugin.evaluation import topk_correct

    encoder = load_encoder(checkpoint, image_size, trust, prefix, num_heads, norm_eps)
    train_index = open_split(data, train_split, cache_dir=index_cache, data_format=data_format)
    val_index = open_split(data, val_split, classes=train_index.classes, cache_dir=index_cache, data_format=data_format)
    kw = dict(batch_size=batch_size, workers=workers, crop_ratio=crop_ratio)
    train_feats, train_labels = cached_features(encoder, train_index, checkpoint, cache_dir, desc="train", **kw)
    val_feats, val_labels = cached_features(encoder, val_index, checkpoint, cache_dir, desc="val", **kw)
    scores = knn_classify(train_feats, train_labels, val_feats, len(train_index.classes), k, temperature)
    top1, top5 = topk_correct(scores, val_labels)
    n = len(val_labels)  # exact fractions of counts, not float32 means
    return {"top1": int(top1) / n, "top5": int(top5) / n, "k": k,
            "temperature": temperature, "n": n, "n_train": len(train_labels)}


def main(argv=None) -> int:
    parser = make_parser(__doc__, "knn")
    parser.add_argument("checkpoint", help="pretrained encoder or fine-tuned checkpoint")
    add_data_arguments(parser, help="the dataset, as task.data: a folder tree, Parquet files or tar shards, with "
                                    "train and val splits")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="val")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--crop-ratio", type=float, default=0.875, help="resize to size/ratio, centre-crop size")
    parser.add_argument("--cache", default=None, help="folder to keep computed features in, for reuse")
    parser.add_argument("--prefix", default=None, help="key prefix of the encoder in the checkpoint")
    args = parser.parse_args(argv)
    load_heavy()
    with fail_cleanly():
        if args.k < 1:
            raise ValueError(f"--k must be at least 1, got {args.k}")
        result = knn_probe(args.checkpoint, args.data, args.k, args.temperature, args.train_split, args.val_split,
                           args.batch_size, args.workers, args.image_size, args.crop_ratio, args.cache,
                           args.trust_checkpoint, args.prefix, num_heads=args.num_heads, norm_eps=args.norm_eps,
                           data_format=args.data_format)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
