"""Write a pre-resized copy of an image-folder dataset, for nodes whose CPUs cannot keep up.

    python -m d2v_plugin.cli.preresize ROOT --out OUT [--short-side 320] [--quality 90] [--workers N]

Every image of every split is decoded, converted to RGB, resized (bicubic) so that its shorter side
is at most --short-side, and written as a JPEG under the same <split>/<class>/ path in OUT; smaller
images are copied as JPEG unchanged in size. Decoding and resizing a 320-pixel image is several
times cheaper than an ImageNet original, at the price of the augmentation seeing less detail in
large crops: the crop boxes keep their distribution relative to the image, but a crop is drawn from
at most the stored resolution. Unreadable files are skipped and listed. Existing outputs are kept,
so an interrupted run can be restarted.
"""
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from d2v_plugin.atomic import atomic_path
from d2v_plugin.cli.common import fail_cleanly, load_heavy, make_parser


def resize_one(job):
    from PIL import Image

    from d2v_plugin.data.dataset import DECODE_ERRORS

    src, dst, short_side, quality = job
    if os.path.exists(dst):
        return None
    try:
        with Image.open(src) as img:
            w, h = img.size
            scale = short_side / min(w, h)
            if scale < 1:
                img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))  # JPEG: DCT-scaled decode
            img = img.convert("RGB")
            if scale < 1:
                img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
            with atomic_path(dst) as tmp:
                img.save(tmp, format="JPEG", quality=quality)
    except DECODE_ERRORS as err:
        return f"{src}: {err}"
    return None


def jobs(root, out, short_side, quality):
    from d2v_plugin.data.index import IMAGE_EXTENSIONS

    for dirpath, _, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                dst = os.path.join(out, rel, os.path.splitext(name)[0] + ".jpg")
                yield os.path.join(dirpath, name), dst, short_side, quality


def preresize(root, out, short_side=320, quality=90, workers=None):
    from tqdm import tqdm

    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder not found: {root}")
    todo = list(jobs(root, out, short_side, quality))
    for d in {os.path.dirname(j[1]) for j in todo}:
        os.makedirs(d, exist_ok=True)
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        failed = [r for r in tqdm(pool.map(resize_one, todo, chunksize=64), total=len(todo), file=sys.stderr,
                                  desc="preresize", unit="img") if r]
    return len(todo), failed


def main(argv=None) -> int:
    parser = make_parser(__doc__, "preresize", trust_flag=False)
    parser.add_argument("root", help="dataset root holding <split>/<class>/<image>")
    parser.add_argument("--out", required=True, help="where to write the resized copy")
    parser.add_argument("--short-side", type=int, default=320)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    load_heavy()
    with fail_cleanly():
        n, failed = preresize(args.root, args.out, args.short_side, args.quality, args.workers)
    for line in failed:
        print(f"skipped unreadable image {line}", file=sys.stderr)
    print(f"wrote {n - len(failed)} images to {args.out} (shorter side <= {args.short_side}); {len(failed)} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
