"""Classify images with a fine-tuned model; one JSON line per image.

    python -m d2v_plugin.cli.predict MODEL IMAGE... [--topk 5] [--device auto] [--precision bf16]
    python -m d2v_plugin.cli.predict MODEL --data ROOT [--split val] [--limit N]

MODEL is a trainer checkpoint, an export folder or another code's fine-tuned classifier. IMAGE files,
or the images of a dataset split (a folder tree, Parquet files or tar shards, as task.data takes it),
classified in batches on the device. An unreadable image gives {"image": ..., "error": ...} and the
others continue; the exit status is 1 if any failed.
"""
import sys

from d2v_plugin.cli.common import (add_data_arguments, add_runtime_arguments, fail_cleanly, load_heavy, make_parser,
                                   positive_int, preflight, start_runtime)


def file_images(paths):
    """(name, bytes reader) of image files."""
    from d2v_plugin.data.index import read_regular_file

    for path in paths:
        yield path, (lambda p=path: read_regular_file(p))


def split_images(source, limit=None):
    """(name, bytes reader) of a split's images, wherever they are stored."""
    for i in range(len(source) if limit is None else min(limit, len(source))):
        yield source.describe(i), (lambda i=i: source.read(i))


def predict(model, images, topk: int = 5, runtime=None, batch_size: int = 64):
    """Top-k classes of each (name, bytes reader) image (file paths are accepted too), in order: batches of
    decoded images through the model on the runtime's device."""
    import torch

    from d2v_plugin.data.decode import UnreadableImage, decode_pil, open_image

    device = runtime.device if runtime is not None else torch.device("cpu")
    model = model.to(device).eval()
    names = model.classes or [str(i) for i in range(model.cfg.num_classes)]
    k = min(topk, len(names))
    pending = []

    def flush():
        good = [(name, x) for name, x in pending if not isinstance(x, str)]
        out = {}
        if good:
            with torch.no_grad(), (runtime.autocast() if runtime else torch.autocast("cpu", enabled=False)):
                probs = model(torch.stack([x for _, x in good]).to(device)).float().softmax(-1)
            top = probs.topk(k)
            for (name, _), values, indices in zip(good, top.values.tolist(), top.indices.tolist()):
                out[name] = {"image": name, "top": [{"class": names[i], "index": int(i), "prob": float(p)}
                                                    for p, i in zip(values, indices)]}
        records = [out[name] if not isinstance(x, str) else {"image": name, "error": f"cannot read image: {x}"}
                   for name, x in pending]
        pending.clear()
        return records

    for item in images:
        name, reader = next(file_images([item])) if isinstance(item, str) else item
        try:
            pending.append((name, model.preprocess(decode_pil(open_image(reader())))))
        except (UnreadableImage, MemoryError) as err:  # one bad file must not stop the others
            pending.append((name, str(err) or "decoding it ran out of memory"))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()


def main(argv=None) -> int:
    parser = make_parser(__doc__, "predict")
    parser.add_argument("model", help="fine-tuned checkpoint or export folder")
    parser.add_argument("images", nargs="*", help="image files")
    add_data_arguments(parser, required=False, help="a dataset to classify the images of, instead of files (a "
                                                    "folder tree, Parquet files or tar shards)")
    parser.add_argument("--split", default="val", help="the split of --data to classify")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the split's first N images (default: all of them)")
    parser.add_argument("--topk", type=positive_int, default=5, help="classes listed per image")
    add_runtime_arguments(parser, batch_size=32)
    args = parser.parse_args(argv)
    if bool(args.images) == bool(args.data):
        parser.error("give image files or --data, one of the two")
    preflight(args, [args.model], args.data, files=[(image, "image") for image in args.images])
    load_heavy()
    from d2v_plugin.inference import load_classifier

    with fail_cleanly():
        runtime = start_runtime(args)
        if runtime.distributed:
            raise ValueError("predict runs in one process (it prints one line per image in order): start it "
                             "without torchrun")
        model = load_classifier(args.model, trust=args.trust_checkpoint, num_heads=args.num_heads,
                                norm_eps=args.norm_eps)
        if args.data:
            from d2v_plugin.data.containers import COMMAND_FLAGS, open_split

            source = open_split(args.data, args.split, classes=model.classes or None, cache_dir=args.cache_dir,
                                data_format=args.data_format, names=COMMAND_FLAGS)
            images = split_images(source, args.limit)
        else:
            images = file_images(args.images)
    failed = 0
    import json

    for record in predict(model, images, args.topk, runtime, args.batch_size):
        failed += "error" in record
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
