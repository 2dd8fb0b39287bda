"""Classify images with a fine-tuned model; one JSON line per image.

    python -m d2v_plugin.cli.predict MODEL IMAGE... [--topk 5]
    python -m d2v_plugin.cli.predict MODEL --data ROOT [--split val] [--limit N]

MODEL is a trainer checkpoint, an export folder or another code's fine-tuned classifier. IMAGE files,
or the images of a dataset split (a folder tree, Parquet files or tar shards, as task.data takes it).
An unreadable image gives {"image": ..., "error": ...} and the others continue; the exit status is 1
if any failed.
"""
import json
import sys

from d2v_plugin.cli.common import add_data_arguments, fail_cleanly, load_heavy, make_parser


def file_images(paths):
    """(name, opener) of image files."""
    from d2v_plugin.data import load_rgb

    for path in paths:
        yield path, (lambda p=path: load_rgb(p))


def split_images(source, limit=None):
    """(name, opener) of a split's images, wherever they are stored."""
    import io

    from PIL import Image

    def opener(i):
        with Image.open(io.BytesIO(source.read(i))) as img:
            return img.convert("RGB")

    for i in range(len(source) if limit is None else min(limit, len(source))):
        yield source.describe(i), (lambda i=i: opener(i))


def predict(model, images, topk: int = 5):
    """Top-k classes of each (name, opener) image; file paths are accepted too."""
    import torch

    names = model.classes or [str(i) for i in range(model.cfg.num_classes)]
    k = min(topk, len(names))
    for item in images:
        name, opener = next(file_images([item])) if isinstance(item, str) else item
        try:
            image = model.preprocess(opener()).unsqueeze(0)
        except Exception as err:  # one bad file must not stop the others
            yield {"image": name, "error": f"cannot read image: {err}"}
            continue
        with torch.no_grad():
            probs = model(image).softmax(-1)[0]
        top = probs.topk(k)
        yield {"image": name, "top": [{"class": names[i], "index": int(i), "prob": float(p)}
                                      for p, i in zip(top.values, top.indices)]}


def main(argv=None) -> int:
    parser = make_parser(__doc__, "predict")
    parser.add_argument("model", help="fine-tuned checkpoint or export folder")
    parser.add_argument("images", nargs="*", help="image files")
    add_data_arguments(parser, required=False, help="a dataset to classify the images of, instead of files (a "
                                                    "folder tree, Parquet files or tar shards)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=None, help="only the split's first N images")
    parser.add_argument("--topk", type=int, default=5)
    args = parser.parse_args(argv)
    if bool(args.images) == bool(args.data):
        parser.error("give image files or --data, one of the two")
    load_heavy()
    from d2v_plugin.inference import load_classifier

    with fail_cleanly():
        model = load_classifier(args.model, trust=args.trust_checkpoint, num_heads=args.num_heads,
                                norm_eps=args.norm_eps)
        if args.data:
            from d2v_plugin.data.containers import open_split

            source = open_split(args.data, args.split, classes=model.classes or None, data_format=args.data_format)
            images = split_images(source, args.limit)
        else:
            images = file_images(args.images)
    failed = 0
    for record in predict(model, images, args.topk):
        failed += "error" in record
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
