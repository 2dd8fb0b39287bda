"""Export a fine-tuned checkpoint for use outside fairseq: DIR/model.safetensors + DIR/config.json.

    python -m d2v_plugin.cli.export FINETUNED.pt --out DIR

config.json holds the architecture, pooling, class names in label order, image size and the
normalisation; ``d2v_plugin.load_classifier(DIR)`` loads it back (no pickle involved).
"""
import json
import os
import sys

from d2v_plugin.atomic import atomic_path
from d2v_plugin.cli.common import fail_cleanly, load_heavy, make_parser, preflight


def export(checkpoint: str, out: str, trust: bool = False, num_heads=None, norm_eps=None) -> dict:
    from safetensors.torch import save_file

    from d2v_plugin.inference import load_classifier
    from d2v_plugin.names import EXPORT_FORMAT, MODEL_NAME

    from d2v_plugin.models.checkpoints import CheckpointError, non_finite

    model = load_classifier(checkpoint, trust=trust, num_heads=num_heads, norm_eps=norm_eps)
    bad = non_finite(model.state_dict())
    if bad:
        names = ", ".join(k.removeprefix("encoder.") for k in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise CheckpointError(f"{checkpoint}: {len(bad)} tensors hold NaN or inf values: {names}; not exported")
    os.makedirs(out, exist_ok=True)
    meta = {
        "format": EXPORT_FORMAT, "version": 1, "model": MODEL_NAME,
        "architecture": model.encoder.cfg.to_dict(), "pooling": model.cfg.pooling, "head": model.head_kind,
        "num_classes": model.cfg.num_classes, "classes": model.classes, "image_size": model.data_cfg.image_size,
        "eval_crop_ratio": model.data_cfg.crop_ratio, "mean": list(model.data_cfg.mean),
        "std": list(model.data_cfg.std), "interpolation": model.data_cfg.interpolation,
        "source": os.path.abspath(checkpoint),
    }
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(os.path.join(out, "model.safetensors")) as tmp:
        save_file(weights, tmp)
    with atomic_path(os.path.join(out, "config.json")) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv=None) -> int:
    parser = make_parser(__doc__, "export")
    parser.add_argument("checkpoint", help="checkpoint written by fairseq-hydra-train")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    preflight(args, [args.checkpoint], folders=[(args.out, "--out")])
    load_heavy()
    with fail_cleanly():
        meta = export(args.checkpoint, args.out, args.trust_checkpoint, args.num_heads, args.norm_eps)
    print(f"exported {meta['num_classes']}-class model ({meta['architecture']['depth']} blocks) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
