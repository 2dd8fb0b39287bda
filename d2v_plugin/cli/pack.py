"""Pack a dataset into a few large files: Parquet (the Hugging Face layout) or WebDataset tar shards.

    python -m d2v_plugin.cli.pack SRC --out DST --format parquet|wds [--shard-size 1GB] [--splits train val]

SRC is anything task.data takes (a folder tree, Parquet files, tar shards); every split is written as
DST/<split>-000000.<parquet|tar> ..., in the source's order (image i of a split stays image i, so runs
from either give the same samples), with DST/classes.txt. The images' bytes are copied as they are.
Parquet: columns image = {bytes, path} and label, row groups of 8 rows (a random read costs one row
group), the class names in the Hugging Face metadata too. Tar: <key>.<ext> + <key>.cls per image.
Each shard is written to a temporary name and renamed when complete; a rerun writes only the shards
that are missing, so an interrupted pack is restarted by running it again.
"""
import sys

from d2v_plugin.cli.common import fail_cleanly, load_heavy, make_parser, preflight


def main(argv=None) -> int:
    parser = make_parser(__doc__, "pack", trust_flag=False)
    parser.add_argument("src", help="the dataset, as task.data takes it")
    parser.add_argument("--out", required=True, help="folder for the shards")
    parser.add_argument("--format", required=True, choices=("parquet", "wds"),
                        help="parquet (files of rows: image bytes, label) or wds (WebDataset tar shards)")
    parser.add_argument("--shard-size", default="1GB", help="image data per shard, in bytes or with a unit (KB, MB, GB)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="the first one gives the classes")
    parser.add_argument("--cache-dir", default=None, help="folder-index cache (default: ~/.cache/d2v_plugin/index)")
    args = parser.parse_args(argv)
    preflight(args, data=args.src, folders=[(args.out, "--out")])
    load_heavy()
    from d2v_plugin.data.packing import pack, parse_size

    with fail_cleanly():
        written = pack(args.src, args.out, args.format, parse_size(args.shard_size), args.splits, args.cache_dir)
    for split, w in written.items():
        print(f"{split}: {w['images']} images in {w['shards']} {args.format} shards in {args.out} "
              f"({w['written_now']} written now)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
