"""Write a pre-resized copy of an image-folder dataset, for nodes whose CPUs cannot keep up.

    python -m d2v_plugin.cli.preresize ROOT --out OUT [--short-side 320] [--quality 90] [--workers N]

Every image of every split is decoded, converted to RGB, resized (bicubic) so that its shorter side
is at most --short-side, and written as a JPEG under the same <split>/<class>/ path in OUT (``a.png``
becomes ``a.jpg``; files that share a stem keep their whole name, ``a.png.jpg`` beside ``a.jpg.jpg``, so
none is lost); smaller images are copied as JPEG unchanged in size. Decoding and resizing a 320-pixel image is several
times cheaper than an ImageNet original, at the price of the augmentation seeing less detail in
large crops: the crop boxes keep their distribution relative to the image, but a crop is drawn from
at most the stored resolution. Unreadable files are skipped and listed. Existing outputs are kept,
so an interrupted run can be restarted: a rerun counts them as already done. A folder without any
image is an error (exit status 2); a run that wrote or found nothing exits 1.
"""
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from d2v_plugin.atomic import atomic_path
from d2v_plugin.cli.common import fail_cleanly, load_heavy, make_parser, positive_int, preflight


def resize_one(job):
    """One image: ("written", None), ("done", None) when an earlier run wrote it, or ("failed", reason)."""
    from PIL import Image

    from d2v_plugin.data.decode import UnreadableImage, decode_pil, decoding, open_image
    from d2v_plugin.data.index import read_regular_file

    src, dst, short_side, quality = job
    if os.path.exists(dst):
        return "done", None
    try:
        data = read_regular_file(src)
        img = open_image(data)
        w, h = img.size
        scale = short_side / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if scale < 1:
            with decoding(data):
                img.draft("RGB", size)  # JPEG: DCT-scaled decode
        img = decode_pil(img)
        if scale < 1:
            img = img.resize(size, Image.BICUBIC)
        with atomic_path(dst) as tmp:
            img.save(tmp, format="JPEG", quality=quality)
    except UnreadableImage as err:
        return "failed", f"{src}: {err}"
    except MemoryError:
        return "failed", f"{src}: decoding it ran out of memory"
    return "written", None


def output_names(names: list[str]) -> dict:
    """Image file name -> the JPEG name it is written under in the same folder: ``<stem>.jpg``, or the
    whole name + ``.jpg`` for files that share a stem (``a.png`` and ``a.jpg`` -> ``a.png.jpg`` and
    ``a.jpg.jpg``), so that no file overwrites or hides another. A name that still collides is an error
    naming both files."""
    stems: dict = {}
    for name in names:
        stems.setdefault(os.path.splitext(name)[0], []).append(name)
    out, taken = {}, {}
    for name in names:
        stem = os.path.splitext(name)[0]
        new = f"{stem}.jpg" if len(stems[stem]) == 1 else f"{name}.jpg"
        if new in taken:
            raise ValueError(f"{name} and {taken[new]} would both be written as {new}: rename one of them")
        out[name], taken[new] = new, name
    return out


def jobs(root, out, short_side, quality):
    from d2v_plugin.data.index import IMAGE_EXTENSIONS

    for dirpath, _, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        images = sorted(name for name in files if name.lower().endswith(IMAGE_EXTENSIONS))
        try:
            names = output_names(images)
        except ValueError as err:
            raise ValueError(f"{dirpath}: {err}") from None
        for name in images:
            yield os.path.join(dirpath, name), os.path.join(out, rel, names[name]), short_side, quality


def preresize(root, out, short_side=320, quality=90, workers=None) -> dict:
    """{"images", "written", "done" (by an earlier run), "failed": [reasons]}."""
    from tqdm import tqdm

    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder not found: {root}")
    todo = list(jobs(root, out, short_side, quality))
    if not todo:
        from d2v_plugin.data.index import IMAGE_EXTENSIONS

        raise ValueError(f"{root}: no image files found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    for d in {os.path.dirname(j[1]) for j in todo}:
        os.makedirs(d, exist_ok=True)
    counts = {"images": len(todo), "written": 0, "done": 0, "failed": []}
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        for outcome, reason in tqdm(pool.map(resize_one, todo, chunksize=64), total=len(todo), file=sys.stderr,
                                    desc="preresize", unit="img"):
            if outcome == "failed":
                counts["failed"].append(reason)
            else:
                counts[outcome] += 1
    return counts


def jpeg_quality(text: str) -> int:
    """PIL's useful JPEG qualities: 1 to 95 (above 95 only grows the file)."""
    import argparse

    value = positive_int(text)
    if value > 95:
        raise argparse.ArgumentTypeError(f"{value} is above 95")
    return value


def main(argv=None) -> int:
    parser = make_parser(__doc__, "preresize", trust_flag=False)
    parser.add_argument("root", help="dataset root holding <split>/<class>/<image>")
    parser.add_argument("--out", required=True, help="where to write the resized copy")
    parser.add_argument("--short-side", type=positive_int, default=320, help="the shorter side at most this many pixels")
    parser.add_argument("--quality", type=jpeg_quality, default=90, help="JPEG quality of the written files, 1 to 95")
    parser.add_argument("--workers", type=positive_int, default=None, help="processes (default: the cores available)")
    args = parser.parse_args(argv)
    preflight(args, data=args.root, folders=[(args.out, "--out")])
    load_heavy()
    with fail_cleanly():
        counts = preresize(args.root, args.out, args.short_side, args.quality, args.workers)
    for line in counts["failed"]:
        print(f"skipped unreadable image {line}", file=sys.stderr)
    print(f"wrote {counts['written']} images to {args.out} (shorter side <= {args.short_side}); "
          f"{counts['done']} already done; {len(counts['failed'])} skipped as unreadable")
    return 0 if counts["written"] + counts["done"] else 1


if __name__ == "__main__":
    sys.exit(main())
