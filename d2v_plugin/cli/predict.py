"""Classify image files with a fine-tuned model; one JSON line per image.

    python -m d2v_plugin.cli.predict MODEL IMAGE... [--topk 5]

MODEL is a trainer checkpoint or an export folder. An unreadable image gives
{"image": ..., "error": ...} and the others continue; the exit status is 1 if any failed.
"""
import json
import sys

from d2v_plugin.cli.common import fail_cleanly, load_heavy, make_parser


def predict(model, paths, topk: int = 5):
    import torch

    from d2v_plugin.data import load_rgb

    names = model.classes or [str(i) for i in range(model.cfg.num_classes)]
    k = min(topk, len(names))
    for path in paths:
        try:
            image = model.preprocess(load_rgb(path)).unsqueeze(0)
        except Exception as err:  # one bad file must not stop the others
            yield {"image": path, "error": f"cannot read image: {err}"}
            continue
        with torch.no_grad():
            probs = model(image).softmax(-1)[0]
        top = probs.topk(k)
        yield {"image": path, "top": [{"class": names[i], "index": int(i), "prob": float(p)}
                                      for p, i in zip(top.values, top.indices)]}


def main(argv=None) -> int:
    parser = make_parser(__doc__, "predict")
    parser.add_argument("model", help="fine-tuned checkpoint or export folder")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--topk", type=int, default=5)
    args = parser.parse_args(argv)
    load_heavy()
    from d2v_plugin.inference import load_classifier

    with fail_cleanly():
        model = load_classifier(args.model, trust=args.trust_checkpoint, num_heads=args.num_heads,
                                norm_eps=args.norm_eps)
    failed = 0
    for record in predict(model, args.images, args.topk):
        failed += "error" in record
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
