"""Turn a data2vec 2.0 checkpoint, a bare state dict or a distilled student's Lightning checkpoint into a
compact encoder-only file (weights + architecture; no optimizer, EMA or decoder) for model.pretrained_checkpoint.

    python -m d2v_plugin.cli.convert SRC --out DST [--depth N]
"""
import os
import sys

from d2v_plugin.cli.common import fail_cleanly, load_heavy, make_parser, positive_int, preflight
from d2v_plugin.cli.knn import add_weights_argument


def convert(src: str, out: str, depth=None, prefix=None, trust=False, num_heads=None, norm_eps=None,
            weights: str = "student") -> dict:
    from d2v_plugin.atomic import atomic_torch_save
    from d2v_plugin.models.checkpoints import read_encoder_checkpoint
    from d2v_plugin.names import COMPACT_FORMAT

    given = {k: v for k, v in (("num_heads", num_heads), ("norm_eps", norm_eps)) if v is not None}
    cfg, state = read_encoder_checkpoint(src, depth=depth, trust=trust, prefix=prefix, given=given,
                                        depth_setting="--depth", weights=weights)
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    atomic_torch_save({"format": COMPACT_FORMAT, "arch": cfg.to_dict(), "encoder": state,
                       "source": os.path.abspath(src), "weights": weights}, out)
    trainable = sum(v.numel() for k, v in state.items() if k != "pos_embed")
    return {"out": out, "depth": cfg.depth, "embed_dim": cfg.embed_dim, "parameters": trainable,
            "bytes": os.path.getsize(out)}


def main(argv=None) -> int:
    parser = make_parser(__doc__, "convert")
    parser.add_argument("src", help="data2vec 2.0 checkpoint, Lightning student checkpoint or bare state dict")
    parser.add_argument("--out", required=True, help="where to write the compact encoder file")
    parser.add_argument("--depth", type=positive_int, default=None,
                        help="keep the first N blocks, prenet blocks first (default: all)")
    parser.add_argument("--prefix", default=None, help="key prefix of the encoder in SRC (default: found)")
    add_weights_argument(parser)
    args = parser.parse_args(argv)
    preflight(args, [args.src], outputs=[(args.out, "--out")])
    load_heavy()
    with fail_cleanly():
        info = convert(args.src, args.out, args.depth, args.prefix, args.trust_checkpoint, args.num_heads, args.norm_eps,
                       args.weights)
    print(f"wrote {info['out']}: {info['depth']} blocks x {info['embed_dim']} wide, "
          f"{info['parameters']:,} parameters, {info['bytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
