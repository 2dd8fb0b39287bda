"""task.device_decode: workers hand over JPEG bytes + the crop they drew, the task decodes the batch on
its device. On this CPU machine the same code runs with device=cpu (a GPU uses nvJPEG for the decode
and the float resampling tested below)."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import json_records, run, train_cmd
from d2v_plugin.data import DataError, ImageFolderDataset, train_transform
from d2v_plugin.data.decode import hwc_tensor
from d2v_plugin.data.device_batch import decode_on_device
from d2v_plugin.data.transforms import resize_crop, resize_in_float, sample_crop
from d2v_plugin.tasks.image_folder_classification import (ImageFolderClassificationConfig,
                                                           ImageFolderClassificationTask)


def write_jpeg_folders(root, per_class=6, extra_png=False):
    """Real photographs (scikit-image), cropped and shrunk to varied small sizes, as JPEGs in 3 classes."""
    from skimage import data

    photos = [Image.fromarray(getattr(data, n)()) for n in ("astronaut", "coffee", "chelsea")]
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for k, photo in enumerate(photos):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True)
            for j in range(n):
                w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
                photo.resize((w, h), Image.BICUBIC).save(folder / f"{j:02d}.jpg", quality=90)
            if extra_png and split == "train":
                photo.resize((50, 40)).save(folder / "png.png")
    return root


def task_for(root, tmp_path, **overrides):
    cfg = ImageFolderClassificationConfig(data=str(root), image_size=32, device_decode=True, seed=1,
                                          cache_dir=str(tmp_path / "cache"), **overrides)
    task = ImageFolderClassificationTask.setup_task(cfg)
    task.load_dataset("train")
    return task


def by_id(batch, key):
    values = batch["net_input"]["images"] if key == "images" else batch[key]
    return dict(zip(batch["id"].tolist(), values))


def test_device_decoded_batch_equals_the_workers_batch(tmp_path):
    root = write_jpeg_folders(tmp_path / "d", extra_png=True)
    task = task_for(root, tmp_path)
    ds = task.datasets["train"]
    ds.set_epoch(3)
    batch = ds.collater([ds[i] for i in range(len(ds))])
    assert len(batch["encoded"]["jpegs"]) == 18 and batch["net_input"]["images"].shape[0] == 3  # the PNGs
    decode_on_device(batch, 32)
    assert "encoded" not in batch and "no_image_left" not in batch
    plain = ImageFolderDataset(ds.index, train_transform(32), shuffle=False, seed=1)
    plain.set_epoch(3)
    ref = plain.collater([plain[i] for i in range(len(plain))])
    assert batch["net_input"]["images"].shape == ref["net_input"]["images"].shape == (21, 3, 32, 32)
    # the same batch: same order (mixup pairs sample i with B-1-i), crops, flips and pixels
    assert torch.equal(batch["id"], ref["id"]) and torch.equal(batch["target"], ref["target"])
    assert torch.equal(batch["net_input"]["images"], ref["net_input"]["images"])


def test_a_jpeg_that_does_not_decode_is_dropped_with_its_target_and_counted(tmp_path):
    root = write_jpeg_folders(tmp_path / "d")
    bad = root / "train" / "class_1" / "03.jpg"
    bad.write_bytes(bad.read_bytes()[:700])  # the header parses, the data is cut
    task = task_for(root, tmp_path)
    ds = task.datasets["train"]
    batch = ds.collater([ds[i] for i in range(len(ds))])
    assert len(batch["encoded"]["jpegs"]) == 18  # the workers never decode it: it is handed over
    decode_on_device(batch, 32)
    bad_id = ds.index.files.index("class_1/03.jpg")
    assert batch["bad_images"] == 1 and batch["nsentences"] == 17
    assert bad_id not in batch["id"].tolist() and batch["net_input"]["images"].shape[0] == 17
    labels = {i: ds.index.labels[i] for i in range(len(ds))}
    assert all(labels[i] == t for i, t in by_id(batch, "target").items())

    strict = task_for(root, tmp_path, on_bad_image="error").datasets["train"]
    with pytest.raises(DataError, match=r"unreadable image .*class_1/03.jpg"):
        decode_on_device(strict.collater([strict[i] for i in range(len(strict))]), 32, on_bad_image="error")


def test_a_batch_with_nothing_decodable_runs_as_zeros_with_its_gradient_ignored(tmp_path):
    root = write_jpeg_folders(tmp_path / "d", per_class=2)
    for path in (root / "train").rglob("*.jpg"):
        path.write_bytes(path.read_bytes()[:700])
    task = task_for(root, tmp_path)
    ds = task.datasets["train"]
    batch = ds.collater([ds[i] for i in range(len(ds))])
    decode_on_device(batch, 32)
    assert batch["no_image_left"]
    assert batch["bad_images"] == 6 and batch["net_input"]["images"].shape == (6, 3, 32, 32)
    assert not batch["net_input"]["images"].any()


def test_gpu_float_resampling_matches_the_uint8_kernel_within_rounding():
    from skimage import data

    image = hwc_tensor(Image.fromarray(data.coffee()))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        left, top, w, h = sample_crop(600, 400, generator=g)
        crop = image[None, :, top:top + h, left:left + w]
        d = (resize_in_float(crop, 224, 224)[0].int() - resize_crop(image, left, top, w, h, 224, 224).int()).abs()
        assert d.float().mean() < 0.2 and (d > 1).float().mean() < 0.002


def test_training_with_device_decode_ends_bit_identical_on_a_folder_of_jpegs_and_pngs(tmp_path):
    root = write_jpeg_folders(tmp_path / "d", extra_png=True)  # PNGs are decoded by the workers
    runs, weights = {}, {}
    for flag in ("false", "true"):
        result = run(train_cmd(tmp_path, root, tmp_path / f"run_{flag}", f"task.device_decode={flag}",
                               "task.image_size=32", "common.log_format=json", batch_size=6, max_update=4))
        assert result.returncode == 0, result.stderr[-3000:]
        log = result.stdout + result.stderr
        assert ("JPEGs are decoded on the training device" in log) == (flag == "true")
        assert ("prepared on cpu one batch ahead" in log) == (flag == "true")  # the prefetching path
        records = json_records(log, "train_inner")
        runs[flag] = {r["num_updates"]: (r["loss"], r["gnorm"]) for r in records}
        weights[flag] = torch.load(tmp_path / f"run_{flag}" / "checkpoint_last.pt", weights_only=True)["model"]
    # the same batches in the same order, so the same mixup pairs, losses and weights
    assert sorted(runs["true"]) == [1, 2, 3, 4] and runs["true"] == runs["false"]
    assert all(torch.equal(weights["true"][k], weights["false"][k]) for k in weights["false"])


def test_the_prefetcher_hands_over_the_batches_decoded_in_order_and_raises_the_threads_errors(tmp_path):
    from d2v_plugin.data.device_batch import DevicePrefetcher

    root = write_jpeg_folders(tmp_path / "d", extra_png=True)
    task = task_for(root, tmp_path)
    ds = task.datasets["train"]
    batches = [ds.collater([ds[i] for i in range(k, min(k + 5, len(ds)))]) for k in range(0, len(ds), 5)]
    inline = []
    for b in batches:
        b = {**b, "net_input": dict(b["net_input"])}
        decode_on_device(b, 32)
        inline.append(b)
    fetched = list(DevicePrefetcher(iter(batches), task.decode_on_device, "cpu"))
    assert len(fetched) == len(inline) == 5
    for a, b in zip(fetched, inline):
        assert "encoded" not in a and torch.equal(a["id"], b["id"])
        assert torch.equal(a["net_input"]["images"], b["net_input"]["images"])

    def fails(sample):
        raise DataError("unreadable image x.jpg")

    it = DevicePrefetcher(iter(batches), fails, "cpu")
    with pytest.raises(DataError, match="unreadable image x.jpg"):
        next(it)
