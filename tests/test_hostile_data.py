"""Broken and hostile image data: one definition of an unreadable file on every path (RandAugment's
included), bounds on the work per image, a folder index that does not trust the file system, and
validation that counts only the images that exist."""
import io
import os
import re
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import json_records, run, train_cmd
from d2v_plugin.data import DataError, ImageFolderDataset, eval_transform, index_split, train_transform
from d2v_plugin.data.decode import UnreadableImage
from d2v_plugin.demo_data import write_random_images


def jpeg(size=(64, 48), quality=90) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def write_bad_files(folder, prefix="z") -> list:
    """A truncated 700-byte JPEG, an empty file, a text file named .png, a PNG named .jpg that is cut, and a
    333-byte 1x65535 PNG (16.7M pixels after the eval resize): the names, in the folder's order."""
    files = {f"{prefix}0_truncated.jpg": jpeg((320, 240))[:700], f"{prefix}1_empty.jpg": b"",
             f"{prefix}2_text.png": b"this is not an image\n", f"{prefix}3_cut_png.jpg": png(64, 64)[:60],
             f"{prefix}4_tall.png": png(1, 65535)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(files)


@pytest.mark.parametrize("transform", ["randaugment", "plugin", "eval"])
def test_every_path_reports_the_same_files_unreadable_and_none_ends_the_run(tmp_path, cache_dir, transform):
    folder = tmp_path / "d" / "train" / "a"
    folder.mkdir(parents=True)
    (folder / "good.jpg").write_bytes(jpeg())
    bad = write_bad_files(folder)
    index = index_split(str(tmp_path / "d"), "train", cache_dir=cache_dir)
    t = {"randaugment": train_transform(32, auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25),
         "plugin": train_transform(32), "eval": eval_transform(32)}[transform]
    ds = ImageFolderDataset(index, t, seed=1)
    items = [ds[i] for i in range(len(ds))]
    reasons = {os.path.basename(item["bad"][0]): item["bad"][1] for item in items if "bad" in item}
    assert sorted(reasons) == bad and len(items) - len(reasons) == 1
    assert reasons["z1_empty.jpg"] == "the file is empty"
    assert reasons["z4_tall.png"].startswith("aspect ratio 1:65535 (1x65535), over the bound of 1:100")
    assert "truncated" in reasons["z0_truncated.jpg"]
    strict = ImageFolderDataset(index, t, on_bad_image="error", seed=1)
    with pytest.raises(DataError, match=r"unreadable image .*z0_truncated.jpg"):
        strict[index.files.index("a/z0_truncated.jpg")]


def test_a_decoder_out_of_memory_is_an_unreadable_image_not_a_dead_run(tmp_path, cache_dir, monkeypatch):
    from PIL import ImageFile

    folder = tmp_path / "d" / "train" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(folder / "big.png")
    index = index_split(str(tmp_path / "d"), "train", cache_dir=cache_dir)

    def exhausted(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", exhausted)
    item = ImageFolderDataset(index, eval_transform(16), seed=1)[0]
    assert item["bad"][1] == "decoding it ran out of memory"


def test_the_bounds_are_checked_on_the_header_before_decoding(tmp_path, cache_dir, monkeypatch):
    from d2v_plugin.data import decode

    folder = tmp_path / "d" / "train" / "a"
    folder.mkdir(parents=True)
    (folder / "wide.png").write_bytes(png(20000, 1))  # 157 bytes; 6 GB once resized to a 256 short side
    Image.new("RGB", (300, 200)).save(folder / "large.png")
    index = index_split(str(tmp_path / "d"), "train", cache_dir=cache_dir)
    monkeypatch.setattr(decode, "LIMITS", decode.LIMITS.__class__(max_image_pixels=50_000))
    ds = ImageFolderDataset(index, eval_transform(16), seed=1)
    assert ds[1]["bad"][1].startswith("aspect ratio 20000:1 (20000x1), over the bound of 1:100 (D2V_MAX_ASPECT_RATIO)")
    assert ds[0]["bad"][1] == "the image is 300x200 = 60,000 pixels, over the bound of 50,000 (D2V_MAX_IMAGE_PIXELS)"
    with pytest.raises(UnreadableImage, match="aspect ratio"):
        decode.check_size(1, 65535)


def test_the_folder_index_trusts_no_entry_of_the_file_system(tmp_path, cache_dir, caplog):
    root = tmp_path / "d"
    write_random_images(str(root), classes=2, per_class={"train": 2}, size=8)
    a = root / "train" / "class_0"
    os.symlink("loop_b.jpg", a / "loop_a.jpg")
    os.symlink("loop_a.jpg", a / "loop_b.jpg")
    os.symlink(str(root / "train" / "class_loop"), root / "train" / "class_loop")  # a class folder that loops
    os.mkfifo(a / "fifo.jpg")
    os.symlink("/dev/zero", a / "zero.jpg")
    os.symlink(str(root / "train" / "class_1"), a / "linked_folder")
    name = os.path.join(os.fsencode(a), b"caf\xe9.png")  # not UTF-8
    with open(name, "wb") as f:
        f.write((a / "000.png").read_bytes())
    with caplog.at_level("WARNING"):
        index = index_split(str(root), "train", cache_dir=cache_dir)
    assert index.classes == ["class_0", "class_1"]
    assert sorted(index.left_out) == [
        ("./class_loop", "a symbolic link loop"), ("class_0/fifo.jpg", "a FIFO, not a regular file"),
        ("class_0/linked_folder", "a symbolic link to a folder, not entered (links below the class folders could "
                                  "loop)"),
        ("class_0/loop_a.jpg", "a symbolic link loop"), ("class_0/loop_b.jpg", "a symbolic link loop"),
        ("class_0/zero.jpg", "a device, not a regular file")]
    for path, reason in index.left_out:
        assert caplog.text.count(f"left out {path}: {reason}") == 1  # each named once
    assert len(index) == 5 and "class_0/caf\udce9.png" in list(index.files)
    ds = ImageFolderDataset(index, eval_transform(8), seed=1)
    assert all("image" in ds[i] and ds[i]["image"] is not None for i in range(len(ds)))  # the non-UTF-8 name reads
    assert "caf\\xe9.png" in index.describe(list(index.files).index("class_0/caf\udce9.png"))
    again = index_split(str(root), "train", cache_dir=cache_dir)  # from the cache: the same, names as bytes
    assert list(again.files) == list(index.files) and again.left_out == index.left_out
    # a file replaced by a FIFO after it was indexed is refused when read, not waited on
    target = a / "001.png"
    target.unlink()
    os.mkfifo(target)
    reader = threading.Thread(target=lambda: ds.__getitem__(list(index.files).index("class_0/001.png")), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert ds[list(index.files).index("class_0/001.png")]["bad"][1] == "not a regular file"


@pytest.mark.slow
def test_a_randaugment_run_over_bad_files_reports_each_once_and_validates_on_the_readable_images(tmp_path):
    root = tmp_path / "images"
    write_random_images(str(root), classes=3, per_class={"train": 8, "val": 4}, size=24)
    bad = {}
    for split in ("train", "val"):
        for k in (0, 2):
            folder = root / split / f"class_{k}"
            bad.update({str(folder / n): n for n in write_bad_files(folder, prefix=f"z{k}")})
    # val class_0 and class_2 each end with 5 bad files after their 4 good ones: with batch 4 of validation,
    # one batch of class_0's holds nothing readable
    result = run(train_cmd(tmp_path, root, tmp_path / "run", "task.auto_augment=rand-m9-mstd0.5-inc1",
                           "task.random_erasing=0.25", "dataset.num_workers=2", "common.log_format=json",
                           "dataset.batch_size_valid=4", max_update=18))  # 2 epochs of 9 batches of 4
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    for path in bad:
        assert len(re.findall(re.escape(f"skipping unreadable image {path}:"), log)) == 1, path
    val = json_records(log, "val")
    assert val and all(r["val_n"] == 12 for r in val)  # the readable val images, each once, not fairseq's dummy
    from d2v_plugin.data.containers import open_split
    from d2v_plugin.evaluation.loop import evaluate
    from d2v_plugin.evaluation.runtime import start
    from d2v_plugin.inference import load_classifier

    model = load_classifier(tmp_path / "run" / "checkpoint_best.pt")
    index = open_split(str(root), "val", classes=model.classes, cache_dir=str(tmp_path / "cache"))
    scores = evaluate(model, index, start("cpu"), batch_size=4, workers=2)
    assert scores["n"] == 12 and abs(100 * scores["top1"] - max(r["val_accuracy"] for r in val)) < 1e-3
    train = json_records(log, "train")
    assert [int(r["train_bad_images"]) for r in train] == [10, 10]  # the 10 bad train files, every epoch
