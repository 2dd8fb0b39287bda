"""Folder index and its cache, decoding of odd formats, transforms, and the dataset's bad-image policy."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from d2v_plugin.data import DataError, ImageFolderDataset, eval_transform, index_split, load_rgb, train_transform
from d2v_plugin.data import DataConfig
from d2v_plugin.data.device_batch import Normalized
from d2v_plugin.data.transforms import RandomResizedCropFlip, sample_crop
from d2v_plugin.data import index as index_module
from d2v_plugin.demo_data import write_random_images


def test_classes_sorted_by_folder_name_give_label_ids(image_root, cache_dir):
    train = index_split(str(image_root), "train", cache_dir=cache_dir)
    assert train.classes == ["class_0", "class_1", "class_2"]
    assert len(train) == 24
    for rel, label in zip(train.files, train.labels):
        assert rel.split(os.sep)[0] == train.classes[label]


def test_other_splits_use_the_train_mapping(image_root, cache_dir):
    # val lacks class_0: its labels must still be train's ids, not re-numbered from 0
    import shutil
    shutil.rmtree(image_root / "val" / "class_0")
    train = index_split(str(image_root), "train", cache_dir=cache_dir)
    val = index_split(str(image_root), "val", classes=train.classes, cache_dir=cache_dir)
    assert set(val.labels) == {1, 2}


def test_val_class_absent_from_train_is_named(image_root, cache_dir):
    (image_root / "val" / "zebra").mkdir()
    Image.new("RGB", (8, 8)).save(image_root / "val" / "zebra" / "z.png")
    train = index_split(str(image_root), "train", cache_dir=cache_dir)
    with pytest.raises(DataError, match=r"class folders not in the train split: zebra"):
        index_split(str(image_root), "val", classes=train.classes, cache_dir=cache_dir)


def test_missing_and_empty_splits_are_errors(image_root, cache_dir):
    with pytest.raises(DataError, match=r"split folder not found: .*test"):
        index_split(str(image_root), "test", cache_dir=cache_dir)
    (image_root / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty: no image files found"):
        index_split(str(image_root), "empty", cache_dir=cache_dir)
    (image_root / "nofolders").mkdir()
    with pytest.raises(DataError, match=r"no class folders in .*nofolders"):
        index_split(str(image_root), "nofolders", cache_dir=cache_dir)


def test_index_is_cached_and_rescanned_when_files_change(image_root, cache_dir, monkeypatch):
    first = index_split(str(image_root), "train", cache_dir=cache_dir)
    assert len(os.listdir(cache_dir)) == 1
    real_scan = index_module._scan
    calls = []
    monkeypatch.setattr(index_module, "_scan", lambda *a: calls.append(1) or real_scan(*a))
    again = index_split(str(image_root), "train", cache_dir=cache_dir)
    assert calls == [] and again.files == first.files
    Image.new("RGB", (8, 8)).save(image_root / "train" / "class_1" / "new.png")
    changed = index_split(str(image_root), "train", cache_dir=cache_dir)
    assert calls == [1] and len(changed) == len(first) + 1


def test_a_change_in_a_nested_folder_is_seen_on_the_next_start(image_root, cache_dir, monkeypatch):
    nested = image_root / "train" / "class_1" / "sub" / "deeper"
    nested.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(nested / "a.png")
    first = index_split(str(image_root), "train", cache_dir=cache_dir)
    real_scan, calls = index_module._scan, []
    monkeypatch.setattr(index_module, "_scan", lambda *a: calls.append(1) or real_scan(*a))
    assert index_split(str(image_root), "train", cache_dir=cache_dir).files == first.files and calls == []
    added = os.path.join("class_1", "sub", "deeper", "b.png")
    Image.new("RGB", (8, 8)).save(image_root / "train" / added)  # only deeper/'s time changes
    grown = index_split(str(image_root), "train", cache_dir=cache_dir)
    assert calls == [1] and added in grown.files and len(grown) == len(first) + 1
    (nested / "a.png").unlink()
    shrunk = index_split(str(image_root), "train", cache_dir=cache_dir)
    assert calls == [1, 1] and os.path.join("class_1", "sub", "deeper", "a.png") not in shrunk.files
    assert len(shrunk) == len(first)
    assert index_split(str(image_root), "train", cache_dir=cache_dir).files == shrunk.files and calls == [1, 1]


def test_files_without_image_extension_are_left_out_and_reported(image_root, cache_dir):
    (image_root / "train" / "class_0" / "notes.txt").write_text("not an image")
    train = index_split(str(image_root), "train", cache_dir=cache_dir)
    assert os.path.join("class_0", "notes.txt") in train.ignored
    assert all(not f.endswith(".txt") for f in train.files)


@pytest.mark.parametrize("mode,fmt,name", [
    ("L", "PNG", "grey.png"), ("RGBA", "PNG", "rgba.png"), ("P", "PNG", "palette.png"),
    ("CMYK", "JPEG", "cmyk.jpg"), ("RGB", "PNG", "png_named.JPEG"),
])
def test_odd_formats_decode_to_rgb(tmp_path, mode, fmt, name):
    img = Image.new(mode, (10, 7), color=(100, 50, 20, 255)[: len(mode)] if mode not in ("L", "P") else 80)
    img.save(tmp_path / name, format=fmt)
    out = load_rgb(str(tmp_path / name))
    assert out.mode == "RGB" and out.size == (10, 7)


def test_eval_transform_resizes_shorter_side_then_centre_crops(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    out = Normalized(eval_transform(64, 0.875), DataConfig())(img)
    # independent: PIL bicubic resize of the shorter side to int(64 / 0.875) = 73, then the centre 64x64
    resized = img.resize((109, 73), Image.BICUBIC)
    left, top = round((109 - 64) / 2.0), round((73 - 64) / 2.0)
    crop = np.asarray(resized.crop((left, top, left + 64, top + 64)), dtype=np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = torch.from_numpy(((crop - mean) / std).transpose(2, 0, 1)).float()
    assert out.shape == (3, 64, 64)
    assert torch.allclose(out, expected, atol=1e-5)


def test_the_interpolation_setting_changes_the_pixels_of_every_resize(tmp_path, cache_dir):
    import torch.nn.functional as F

    from d2v_plugin.data import resolve_data_config
    from d2v_plugin.data.transforms import RandomResizedCropFlip, data_eval_transform, hwc_tensor
    from d2v_plugin.tasks.image_folder_classification import (ImageFolderClassificationConfig,
                                                               ImageFolderClassificationTask)

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    # eval: PIL's resize with the filter named
    out = {name: eval_transform(32, 0.875, interpolation=name)(img) for name in ("bicubic", "bilinear")}
    resized = img.resize((48, 36), Image.BILINEAR)
    left, top = round((48 - 32) / 2.0), round((36 - 32) / 2.0)
    assert torch.equal(out["bilinear"], hwc_tensor(resized.crop((left, top, left + 32, top + 32))))
    assert not torch.equal(out["bilinear"], out["bicubic"])
    # training crop: torch's antialiased kernel of that mode, on the same crop box
    crops = {name: RandomResizedCropFlip(24, interpolation=name, flip=0.0)(img, 7) for name in ("bicubic", "bilinear")}
    left, top, w, h = RandomResizedCropFlip(24).draw(img, 7)[0]
    crop = hwc_tensor(img)[None, :, top:top + h, left:left + w]
    assert torch.equal(crops["bilinear"], F.interpolate(crop, size=(24, 24), mode="bilinear", antialias=True)[0])
    assert not torch.equal(crops["bilinear"], crops["bicubic"])
    # the task's setting reaches the data config, its eval transform and its training transform
    write_random_images(str(tmp_path / "d"), classes=2, per_class={"train": 2, "val": 1}, size=24)
    cfg = ImageFolderClassificationConfig(data=str(tmp_path / "d"), image_size=16, interpolation="bilinear",
                                          cache_dir=cache_dir)
    task = ImageFolderClassificationTask.setup_task(cfg)
    assert task.data_cfg.interpolation == "bilinear" == resolve_data_config(task=cfg).interpolation
    task.load_dataset("train"), task.load_dataset("val")
    assert task.datasets["train"].transform.interpolation == "bilinear"
    assert task.datasets["val"].transform.filter == data_eval_transform(task.data_cfg).filter == Image.BILINEAR
    with pytest.raises(ValueError, match="task.interpolation='lanczos2': use one of bicubic, bilinear, nearest"):
        ImageFolderClassificationTask.setup_task(ImageFolderClassificationConfig(
            data=str(tmp_path / "d"), interpolation="lanczos2", cache_dir=cache_dir))


def test_train_transform_output_is_normalised_crop():
    img = Image.new("RGB", (120, 90), color=(124, 116, 104))  # ~ the ImageNet mean colour
    out = Normalized(train_transform(32), DataConfig())(img)
    assert out.shape == (3, 32, 32)
    assert out.abs().max() < 0.02


def test_crop_boxes_follow_random_resized_crops_distribution():
    from scipy.stats import ks_2samp
    from torchvision.transforms import RandomResizedCrop

    W, H, n = 500, 375, 4000
    g = torch.Generator().manual_seed(0)
    ours = np.array([sample_crop(W, H, (0.08, 1.0), generator=g) for _ in range(n)], dtype=np.float64)
    torch.manual_seed(0)
    img = Image.new("RGB", (W, H))
    ref = np.array([RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)],
                   dtype=np.float64)  # (top, left, h, w)
    ref = ref[:, [1, 0, 3, 2]]  # -> (left, top, w, h)
    stats = {
        "area": lambda b: b[:, 2] * b[:, 3] / (W * H),
        "log aspect": lambda b: np.log(b[:, 2] / b[:, 3]),
        "centre x": lambda b: (b[:, 0] + b[:, 2] / 2) / W,
        "centre y": lambda b: (b[:, 1] + b[:, 3] / 2) / H,
    }
    for name, f in stats.items():
        assert ks_2samp(f(ours), f(ref)).pvalue > 0.001, name  # same distribution within sampling error


def test_flips_happen_half_the_time_and_mirror_the_crop():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    t = RandomResizedCropFlip(16, scale=(1.0, 1.0), ratio=(1.5, 1.5))  # always the whole image
    outs = [t(img, torch.Generator().manual_seed(s)) for s in range(400)]
    plain = t(img, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, plain.flip(-1)) for o in outs]
    same = [torch.equal(o, plain) for o in outs]
    assert all(a or b for a, b in zip(flipped, same))
    assert 0.42 < sum(flipped) / len(outs) < 0.58


def test_fast_decode_keeps_crops_and_stays_close_to_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)  # smooth photo-like content, upscaled
    Image.fromarray(base).resize((1000, 750), Image.BICUBIC).save(tmp_path / "big.jpg", quality=90)
    plain, fast = (RandomResizedCropFlip(64, fast_decode=f) for f in (False, True))
    diffs, other, drafted = [], [], 0
    for s in range(20):
        with Image.open(tmp_path / "big.jpg") as a, Image.open(tmp_path / "big.jpg") as b:
            x = plain(a, torch.Generator().manual_seed(s)).float()
            y = fast(b, torch.Generator().manual_seed(s)).float()
            drafted += b.size != a.size
        with Image.open(tmp_path / "big.jpg") as c:
            z = fast(c, torch.Generator().manual_seed(s + 1000)).float()
        diffs.append((x - y).abs().mean().item())
        other.append((x - z).abs().mean().item())
    # mean abs difference in 0..255 levels: the same crops, resampled from a reduced decode (box edges
    # within half a reduced pixel), versus what another crop of the same image gives
    assert drafted >= 10  # most of these crops are >= 2x the output: the reduced decode really ran
    assert np.mean(diffs) < 12.0 and np.mean(other) > 5 * np.mean(diffs), (np.mean(diffs), np.mean(other))


def test_drafted_box_maps_the_crop_onto_the_reduced_grid(tmp_path):
    from d2v_plugin.data.transforms import drafted_box

    Image.new("RGB", (1000, 750), (90, 30, 60)).save(tmp_path / "big.jpg")
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        box = sample_crop(1000, 750, generator=g)
        with Image.open(tmp_path / "big.jpg") as img:
            reduced = drafted_box(img, box, 64, 64)
            if min(box[2], box[3]) < 128:
                assert reduced is None and img.size == (1000, 750)
                continue
            sx, sy = img.size[0] / 1000, img.size[1] / 750
            assert sx in (1 / 2, 1 / 4, 1 / 8) and min(reduced[2], reduced[3]) >= 64
            exact = (box[0] * sx, box[1] * sy, (box[0] + box[2]) * sx, (box[1] + box[3]) * sy)
            got = (reduced[0], reduced[1], reduced[0] + reduced[2], reduced[1] + reduced[3])
            assert max(abs(e - r) for e, r in zip(exact, got)) <= 0.5


def photos():
    from skimage import data

    return {name: Image.fromarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea")}


def test_crop_resize_matches_torchvisions_random_resized_crop_within_rounding():
    import torchvision.transforms.functional as TF
    from d2v_plugin.data.transforms import hwc_tensor, resize_crop

    g = torch.Generator().manual_seed(0)
    for name, img in photos().items():
        means, off = [], []
        for _ in range(40):  # shrinking, enlarging, and one side each
            left, top, w, h = sample_crop(*img.size, generator=g)
            ours = resize_crop(hwc_tensor(img), left, top, w, h, 224, 224).int()
            ref = TF.resized_crop(img, top, left, h, w, [224, 224], TF.InterpolationMode.BICUBIC)
            d = (ours - torch.from_numpy(np.array(ref)).permute(2, 0, 1).int()).abs()
            means.append(d.float().mean().item())
            off.append((d > 1).float().mean().item())
        # torch's uint8 kernel rounds its two passes differently from PIL's: a level here and there
        assert np.mean(means) < 0.1 and max(means) < 0.5 and max(off) < 0.005, (name, max(means), max(off))


@pytest.mark.parametrize("mode,options", [("RGB", {}), ("L", {}), ("RGB", {"progressive": True}),
                                          ("RGB", {"subsampling": 0}), ("CMYK", {})])
def test_jpeg_decoder_gives_pils_pixels(tmp_path, monkeypatch, mode, options):
    import torchcodec.decoders
    from d2v_plugin.data.decode import decode

    calls, real = [], torchcodec.decoders.decode_jpeg
    monkeypatch.setattr(torchcodec.decoders, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    img = photos()["coffee"].convert(mode)
    img.save(tmp_path / "a.jpg", quality=90, **options)
    data = (tmp_path / "a.jpg").read_bytes()
    with Image.open(tmp_path / "a.jpg") as a, Image.open(tmp_path / "a.jpg") as b:
        fast, pil = decode(a, data), decode(b)  # with the bytes: TorchCodec where it applies
    assert len(calls) == (0 if mode == "CMYK" else 1)  # CMYK keeps PIL's conversion
    assert fast.shape == (3, 400, 600) and torch.equal(fast, pil)


def test_jpeg_with_exif_rotation_is_decoded_unrotated_like_pil(tmp_path):
    from d2v_plugin.data.decode import decode

    img = photos()["coffee"]
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90": ImageFolder's PIL loader ignores it, TorchCodec would apply it
    img.save(tmp_path / "r.jpg", quality=90, exif=exif.tobytes())
    with Image.open(tmp_path / "r.jpg") as a:
        out = decode(a, (tmp_path / "r.jpg").read_bytes())
    assert out.shape == (3, 400, 600)


def test_a_truncated_jpeg_is_unreadable_from_either_decoder(tmp_path):
    from d2v_plugin.data.decode import UnreadableImage, decode

    photos()["coffee"].save(tmp_path / "a.jpg", quality=90)
    data = (tmp_path / "a.jpg").read_bytes()[:20000]
    (tmp_path / "t.jpg").write_bytes(data)
    for given in (data, None):
        with Image.open(tmp_path / "t.jpg") as img, pytest.raises(UnreadableImage, match="^[Ii]mage .*truncated"):
            decode(img, given)


def write_bad_files(folder):
    Image.new("RGB", (16, 16), (200, 10, 10)).save(folder / "good.png")
    (folder / "empty.jpg").write_bytes(b"")
    good = (folder / "good.png").read_bytes()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(folder / "full.jpg", quality=90)
    (folder / "corrupt.jpg").write_bytes((folder / "full.jpg").read_bytes()[:200])
    (folder / "png_as.JPEG").write_bytes(good)


def test_dataset_skips_unreadable_images_and_counts_them(tmp_path, cache_dir):
    folder = tmp_path / "d" / "train" / "a"
    folder.mkdir(parents=True)
    write_bad_files(folder)
    index = index_split(str(tmp_path / "d"), "train", cache_dir=cache_dir)
    ds = ImageFolderDataset(index, eval_transform(16, 1.0), on_bad_image="skip", shuffle=False)  # noqa
    batch = ds.collater([ds[i] for i in range(len(ds))])
    assert batch["bad_images"] == 2 and batch["net_input"]["images"].shape == (3, 3, 16, 16)


def test_dataset_stops_naming_the_file_when_asked(tmp_path, cache_dir):
    folder = tmp_path / "d" / "train" / "a"
    folder.mkdir(parents=True)
    write_bad_files(folder)
    index = index_split(str(tmp_path / "d"), "train", cache_dir=cache_dir)
    ds = ImageFolderDataset(index, eval_transform(16, 1.0), on_bad_image="error", shuffle=False)
    bad = index.files.index(os.path.join("a", "corrupt.jpg"))
    with pytest.raises(DataError, match=r"unreadable image .*corrupt.jpg"):
        ds[bad]


def test_a_batch_of_only_bad_images_is_a_placeholder_that_counts_nothing_and_carries_its_failures(tmp_path,
                                                                                                   cache_dir):
    from d2v_plugin.criterions.mixup_cross_entropy import MixupCrossEntropyConfig, MixupCrossEntropyCriterion
    from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier

    folder = tmp_path / "d" / "train" / "a"
    folder.mkdir(parents=True)
    write_bad_files(folder)
    index = index_split(str(tmp_path / "d"), "train", cache_dir=cache_dir)
    ds = ImageFolderDataset(index, eval_transform(16, 1.0), shuffle=False)
    bad = [index.files.index(os.path.join("a", n)) for n in ("corrupt.jpg", "empty.jpg")]
    batch = ds.collater([ds[i] for i in bad])
    assert batch["no_image_left"] and batch["bad_images"] == 2 and len(batch["bad_files"]) == 2
    assert batch["net_input"]["images"].shape == (1, 3, 16, 16) and batch["nsentences"] == 0
    # the criterion runs it (every rank runs every step) and counts no image, no loss, no correct answer
    from d2v_plugin.data.device_batch import to_model_input

    assert to_model_input(batch, DataConfig(image_size=16)) is True
    model = Data2Vec2ImageClassifier(Data2Vec2ClassifierConfig(num_classes=3),
                                     __import__("conftest").tiny_encoder(image_size=16)).eval()
    criterion = MixupCrossEntropyCriterion(MixupCrossEntropyConfig(num_classes=3, seed=1, batch_size=2), None)
    loss, n, log = criterion(model, batch)
    assert n == 0 and log["sample_size"] == 0 and int(log["correct"]) == 0 and float(loss.detach()) == 0.0


def test_preresize_writes_a_smaller_copy_with_the_same_tree(tmp_path, cache_dir):
    from d2v_plugin.cli.preresize import preresize

    src = tmp_path / "src"
    for split, cls in (("train", "a"), ("train", "b"), ("val", "a")):
        (src / split / cls).mkdir(parents=True)
        Image.new("RGB", (640, 480), (10, 200, 30)).save(src / split / cls / "big.jpg", quality=90)
        Image.new("L", (100, 80), 50).save(src / split / cls / "small.png")
    (src / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    counts = preresize(str(src), str(tmp_path / "out"), short_side=120, workers=1)
    assert (counts["images"], counts["written"], counts["done"]) == (7, 6, 0)
    assert len(counts["failed"]) == 1 and "broken.jpg" in counts["failed"][0]
    with Image.open(tmp_path / "out" / "train" / "b" / "big.jpg") as img:
        assert img.size == (160, 120) and img.mode == "RGB"
    with Image.open(tmp_path / "out" / "val" / "a" / "small.jpg") as img:
        assert img.size == (100, 80) and img.mode == "RGB"
    train = index_split(str(tmp_path / "out"), "train", cache_dir=cache_dir)
    assert train.classes == ["a", "b"] and len(train) == 4
    again = preresize(str(src), str(tmp_path / "out"), short_side=120, workers=1)  # a restart: nothing left to do
    assert (again["written"], again["done"], len(again["failed"])) == (0, 6, 1)


def test_preresize_keeps_both_files_that_share_a_stem_and_refuses_an_empty_tree(tmp_path):
    from d2v_plugin.cli import preresize as cli

    src = tmp_path / "src" / "train" / "a"
    src.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 0, 0)).save(src / "x.png")
    Image.new("RGB", (40, 30), (0, 0, 200)).save(src / "x.jpg", quality=95)
    Image.new("RGB", (40, 30), (0, 200, 0)).save(src / "y.png")
    counts = cli.preresize(str(tmp_path / "src"), str(tmp_path / "out"), workers=1)
    assert counts["written"] == 3
    out = tmp_path / "out" / "train" / "a"
    assert sorted(os.listdir(out)) == ["x.jpg.jpg", "x.png.jpg", "y.jpg"]
    assert np.asarray(Image.open(out / "x.png.jpg"))[15, 20, 0] > 150  # the red PNG
    assert np.asarray(Image.open(out / "x.jpg.jpg"))[15, 20, 2] > 150  # the blue JPEG
    (tmp_path / "none" / "train" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit) as err:  # not "wrote 0 images" and exit status 0
        cli.main([str(tmp_path / "none"), "--out", str(tmp_path / "o2")])
    assert err.value.code == 2


def test_randaugment_path_runs_through_the_dataset(image_root, cache_dir):
    index = index_split(str(image_root), "train", cache_dir=cache_dir)
    ds = ImageFolderDataset(index, train_transform(16, auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25))
    batch = ds.collater([ds[i] for i in range(len(ds))])
    assert batch["net_input"]["images"].shape == (24, 3, 16, 16) and batch["bad_images"] == 0


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_empty_class_folder_stops_naming_it(image_root, cache_dir, split):
    (image_root / split / "class_9").mkdir()
    (image_root / split / "class_9" / "notes.txt").write_text("no images here")
    if split == "val":  # a class the train split has, empty in val
        (image_root / "train" / "class_9").mkdir()
        Image.new("RGB", (8, 8)).save(image_root / "train" / "class_9" / "a.png")
    train_classes = None if split == "train" else index_split(str(image_root), "train", cache_dir=cache_dir).classes
    with pytest.raises(DataError, match=rf"{split}: empty class folder\(s\) without image files: class_9;") as err:
        index_split(str(image_root), split, classes=train_classes, cache_dir=cache_dir)
    assert len(str(err.value).splitlines()) == 1
