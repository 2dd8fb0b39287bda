"""Data where users keep it: the same split as an image-folder tree, Parquet files and tar shards gives the
same samples, labels and pixels; bad records are skipped or named; cli.pack writes and restarts."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import json_records, one_thread, run, together, train_cmd
from d2v_plugin.data.packing import pack
from d2v_plugin.data import DataError, ImageFolderDataset, train_transform
from d2v_plugin.data.containers import ParquetSplit, ShardSplit, open_split
from d2v_plugin.data.index import FolderIndex


def packed_digits(tmp_path):
    """A subset of scikit-learn's digits in all three containers, packed from the folder tree."""
    from d2v_plugin.demo_data import write_digits

    write_digits(str(tmp_path / "folder"), image_size=24, per_class=8)
    cache = str(tmp_path / "cache")
    for fmt in ("parquet", "wds"):
        pack(str(tmp_path / "folder"), str(tmp_path / fmt), fmt, shard_size=12_000, cache_dir=cache)
    return {"folder": tmp_path / "folder", "parquet": tmp_path / "parquet", "wds": tmp_path / "wds", "cache": cache}


@pytest.fixture
def digits(tmp_path):
    return packed_digits(tmp_path)


@pytest.fixture(scope="module")
def container_runs(tmp_path_factory):
    """One short run per container and per worker count (0 and the recipes' > 0), started side by side, one
    thread each: (the data, {(format, workers): (run folder, completed process)})."""
    tmp = tmp_path_factory.mktemp("container_runs")
    data = packed_digits(tmp)
    train_cmd(tmp, data["folder"], tmp / "run")  # the init checkpoint, written once before the runs start
    keys = [(fmt, workers) for fmt in ("folder", "parquet", "wds") for workers in (0, 2)]
    done = together(*(lambda f=f, w=w: run(train_cmd(tmp, data[f], tmp / f"run_{f}_{w}", "model.num_classes=10",
                                                     f"dataset.num_workers={w}", "common.log_format=json",
                                                     batch_size=8, max_update=20), env=one_thread())
                      for f, w in keys))
    return data, {key: (tmp / f"run_{key[0]}_{key[1]}", result) for key, result in zip(keys, done)}


def test_each_container_gives_the_same_samples_labels_and_classes(digits):
    splits = {fmt: open_split(str(digits[fmt]), "train", cache_dir=digits["cache"]) for fmt in ("folder", "parquet", "wds")}
    assert isinstance(splits["folder"], FolderIndex) and isinstance(splits["parquet"], ParquetSplit)
    assert isinstance(splits["wds"], ShardSplit) and len(splits["wds"].files) > 2  # several shards
    ref = splits["folder"]
    for fmt, split in splits.items():
        assert split.classes == ref.classes == [str(d) for d in range(10)], fmt
        assert len(split) == len(ref) and np.array_equal(split.labels, ref.labels), fmt
        assert all(split.read(i) == ref.read(i) for i in range(len(ref))), fmt
    # the same image at the same position gets the same crop and flip, whatever holds it
    datasets = {fmt: ImageFolderDataset(s, train_transform(16), seed=3) for fmt, s in splits.items()}
    for i in (0, 7, len(ref) - 1):
        assert torch.equal(datasets["parquet"][(2, i)]["image"], datasets["folder"][(2, i)]["image"])
        assert torch.equal(datasets["wds"][(2, i)]["image"], datasets["folder"][(2, i)]["image"])
    shards = sorted(p for p in os.listdir(digits["wds"]) if p.startswith("train-"))
    pattern = f"{digits['wds']}/{{split}}-{{000000..{len(shards) - 1:06d}}}.tar"  # webdataset's brace pattern
    assert open_split(pattern, "train", cache_dir=digits["cache"]).files == [str(digits["wds"] / s) for s in shards]
    val = open_split(str(digits["parquet"]), "val", classes=ref.classes, cache_dir=digits["cache"])
    assert len(val) == len(open_split(str(digits["folder"]), "val", classes=ref.classes, cache_dir=digits["cache"]))


def test_the_index_is_cached_and_rebuilt_when_a_file_changes(digits, monkeypatch):
    built = []
    real = ShardSplit._build_index
    monkeypatch.setattr(ShardSplit, "_build_index", lambda self: built.append(1) or real(self))
    root = str(digits["wds"])
    open_split(root, "train", cache_dir=digits["cache"])  # built and cached
    open_split(root, "train", cache_dir=digits["cache"])  # read from the cache
    assert built == [1]
    shard = sorted(p for p in os.listdir(root) if p.startswith("train-"))[0]
    os.utime(os.path.join(root, shard), ns=(1, 1))  # another modification time: another key
    open_split(root, "train", cache_dir=digits["cache"])
    assert built == [1, 1]


def test_hugging_face_parquet_layout_with_class_names_and_validation_split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    import io

    def jpeg(colour):
        out = io.BytesIO()
        Image.new("RGB", (20, 20), colour).save(out, format="JPEG")
        return out.getvalue()

    (tmp_path / "hf" / "data").mkdir(parents=True)
    names = ["tench", "goldfish", "great white shark"]
    meta = {"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"},
                                                             "label": {"names": names, "_type": "ClassLabel"}}}})}
    for split, n in (("train", 6), ("validation", 3)):
        table = pa.table({"image": [{"bytes": jpeg((40 * k, 0, 0)), "path": f"{k}.JPEG"} for k in range(n)],
                          "label": pa.array([k % 3 for k in range(n)], pa.int64())}).replace_schema_metadata(meta)
        pq.write_table(table, tmp_path / "hf" / "data" / f"{split}-00000-of-00001.parquet", row_group_size=1000)
    train = open_split(str(tmp_path / "hf"), "train", cache_dir=str(tmp_path / "c"))
    val = open_split(str(tmp_path / "hf"), "val", classes=train.classes, cache_dir=str(tmp_path / "c"))  # val -> validation
    assert train.classes == names and len(train) == 6 and list(val.labels) == [0, 1, 2]
    assert val.read(2) == jpeg((80, 0, 0)) and "validation-00000-of-00001.parquet row 2" in val.describe(2)


def bad_shard(path, members):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_bad_records_are_skipped_and_counted_or_named(digits, tmp_path):
    good = open_split(str(digits["folder"]), "train", cache_dir=digits["cache"]).read(0)
    root = tmp_path / "bad_wds"
    root.mkdir()
    bad_shard(root / "train-000000.tar", [("a.jpg", good), ("a.cls", b"1"), ("empty.jpg", b""), ("empty.cls", b"2"),
                                           ("corrupt.jpg", good[:60]), ("corrupt.cls", b"3"), ("nolabel.jpg", good)])
    split = open_split(str(root), "train", cache_dir=str(tmp_path / "c"))
    assert split.classes == ["0", "1", "2", "3"]
    ds = ImageFolderDataset(split, train_transform(16), seed=1)
    batch = ds.collater([ds[i] for i in range(len(split))])
    assert batch["bad_images"] == 3 and batch["id"].tolist() == [0]
    reasons = dict(batch["bad_files"])
    assert reasons[f"{root / 'train-000000.tar'}:empty"] == "the file is empty"
    assert reasons[f"{root / 'train-000000.tar'}:nolabel"] == "the record has no label"
    assert f"{root / 'train-000000.tar'}:corrupt" in reasons
    strict = ImageFolderDataset(split, train_transform(16), on_bad_image="error", seed=1)
    with pytest.raises(DataError, match=r"unreadable image .*train-000000.tar:empty: the file is empty"):
        strict[1]

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "bad_pq").mkdir()
    table = pa.table({"image": [{"bytes": good, "path": "a"}, {"bytes": b"not an image", "path": "b"},
                                {"bytes": good, "path": "c"}], "label": pa.array([0, 1, None], pa.int64())})
    pq.write_table(table, tmp_path / "bad_pq" / "train-0.parquet")
    split = open_split(str(tmp_path / "bad_pq"), "train", cache_dir=str(tmp_path / "c"))
    ds = ImageFolderDataset(split, train_transform(16), seed=1)
    batch = ds.collater([ds[i] for i in range(3)])
    assert batch["bad_images"] == 2 and dict(batch["bad_files"])[f"{tmp_path / 'bad_pq' / 'train-0.parquet'} row 2"] \
        == "the record has no label"


def test_tar_keys_split_at_the_first_dot_of_the_file_name_as_webdataset_does(digits, tmp_path):
    good = open_split(str(digits["folder"]), "train", cache_dir=digits["cache"]).read(0)
    root = tmp_path / "dots"
    root.mkdir()
    # a dot in a folder name, and the ./ that `tar cf shard.tar ./...` writes before every member
    bad_shard(root / "train-000000.tar", [("./n01.v2/a.jpg", good), ("./n01.v2/a.cls", b"1"),
                                           ("./n01.v2/b.jpg", good), ("./n01.v2/b.cls", b"2"),
                                           ("./c.d/e.f.jpg", good), ("./c.d/e.f.cls", b"0")])
    split = open_split(str(root), "train", cache_dir=str(tmp_path / "c"))
    assert list(split.keys) == ["./n01.v2/a", "./n01.v2/b", "./c.d/e"]  # e.f.jpg: key ./c.d/e, field f.jpg
    assert split.labels.tolist() == [1, 2, 0]


def test_a_truncated_shard_or_an_unreadable_parquet_file_stops_at_start_naming_it(digits, tmp_path):
    shards = sorted(p for p in os.listdir(digits["wds"]) if p.startswith("train-"))
    cut = tmp_path / "cut"
    cut.mkdir()
    data = (digits["wds"] / shards[0]).read_bytes()
    (cut / "train-000000.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"train-000000.tar: member .* at byte [\d,]+ runs past the shard's end "
                                        r".*it was cut short"):
        open_split(str(cut), "train", cache_dir=str(tmp_path / "c"), on_bad_image="error")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "train-0.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"train-0.parquet: not a readable Parquet file"):
        open_split(str(tmp_path / "junk"), "train", cache_dir=str(tmp_path / "c"), on_bad_image="error")


def test_a_parquet_file_with_a_damaged_footer_is_named_or_skipped_and_counted(digits, tmp_path, caplog):
    """It ended in a raw pyarrow OSError traceback in evaluate and killed training."""
    import shutil

    root = tmp_path / "damaged"
    shutil.copytree(digits["parquet"], root)
    files = sorted(p for p in root.iterdir() if p.name.startswith("train-"))
    whole = open_split(str(digits["parquet"]), "train", cache_dir=str(tmp_path / "c0"))
    data = files[1].read_bytes()
    files[1].write_bytes(data[:-8] + b"XXXXXXXX")  # the footer's length and magic
    with pytest.raises(DataError, match=rf"{files[1].name}: not a readable Parquet file .*task.on_bad_image=skip"):
        open_split(str(root), "train", cache_dir=str(tmp_path / "c"), on_bad_image="error")
    with caplog.at_level("WARNING"):
        split = open_split(str(root), "train", cache_dir=str(tmp_path / "c"), on_bad_image="skip")
    assert f"{files[1].name}: not a readable Parquet file" in caplog.text and "its rows are left out" in caplog.text
    assert 0 < len(split) < len(whole)
    # damaged after it was indexed, while a run reads it: its rows are unreadable images, skipped and counted
    files[1].write_bytes(data)
    split = open_split(str(root), "train", cache_dir=str(tmp_path / "c2"), on_bad_image="skip")
    assert len(split) == len(whole)
    files[1].write_bytes(b"\0" * len(data))
    dataset = ImageFolderDataset(split, train_transform(24))
    rows = [i for i in range(len(split)) if split.describe(i).startswith(str(files[1]))]
    sample = dataset[rows[0]]
    assert sample["image"] is None and "its Parquet file cannot be read" in sample["bad"][1]


def test_pack_is_restartable_and_writes_only_what_is_missing(digits):
    root = digits["wds"]
    shards = sorted(p for p in os.listdir(root) if p.startswith("train-"))
    before = {p: (root / p).read_bytes() for p in shards}
    mtimes = {p: os.stat(root / p).st_mtime_ns for p in shards}
    os.remove(root / shards[1])  # as if the job died before that shard was complete
    written = pack(str(digits["folder"]), str(root), "wds", shard_size=12_000, cache_dir=digits["cache"])
    assert written["train"]["written_now"] == 1 and written["val"]["written_now"] == 0
    assert {p: (root / p).read_bytes() for p in shards} == before  # the same bytes again
    assert all(os.stat(root / p).st_mtime_ns == mtimes[p] for p in shards if p != shards[1])
    assert (root / "classes.txt").read_text() == "".join(f"{d}\n" for d in range(10))


@pytest.mark.slow
def test_training_from_each_container_ends_bit_identical(container_runs):
    weights = {}
    for key, (run_dir, result) in container_runs[1].items():
        assert result.returncode == 0, result.stderr[-3000:]
        log = result.stdout + result.stderr
        assert [r["epoch"] for r in json_records(log, "val")] == [1, 2]  # two whole epochs
        weights[key] = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)["model"]
    ref = weights["folder", 0]
    for key, w in weights.items():
        assert all(torch.equal(w[k], ref[k]) for k in ref), key


def test_the_commands_take_containers(container_runs, capsys):
    from d2v_plugin.cli import evaluate, predict

    digits, runs = container_runs
    run_dir = runs["folder", 2][0]
    scores = {}
    for fmt in ("folder", "parquet", "wds"):
        assert evaluate.main([str(run_dir / "checkpoint_best.pt"), "--data", str(digits[fmt]), "--cache-dir",
                              digits["cache"]]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        scores[fmt] = {k: result[k] for k in ("top1", "top5", "n")}
    assert scores["parquet"] == scores["folder"] == scores["wds"] and scores["folder"]["n"] == 16
    assert predict.main([str(run_dir / "checkpoint_best.pt"), "--data", str(digits["wds"]), "--split", "val",
                         "--limit", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 3 and ".tar:" in lines[0]["image"] and len(lines[0]["top"]) == 5
    sys.stdout.flush()


def forty_samples(path, good):
    bad_shard(path, [m for i in range(40) for m in ((f"s{i:02d}.jpg", good), (f"s{i:02d}.cls", str(i % 3).encode()))])
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name: m.offset for m in tar}


def test_a_corrupt_tar_header_or_a_cut_is_never_silent(digits, tmp_path, caplog):
    good = open_split(str(digits["folder"]), "train", cache_dir=digits["cache"]).read(0)
    root = tmp_path / "broken"
    root.mkdir()
    shard = root / "train-000000.tar"
    offsets = forty_samples(shard, good)
    clean = shard.read_bytes()
    data = bytearray(clean)
    header = offsets["s09.jpg"]
    data[header + 148] ^= 0x11  # member 19 of 80 (sample 9's image): its header checksum no longer adds up
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"train-000000.tar: reading stopped at byte {header:,} of [\d,]+: the tar "
                                        rf"header there is corrupt"):
        open_split(str(root), "train", cache_dir=str(tmp_path / "c"), on_bad_image="error")
    with caplog.at_level("WARNING"):
        split = open_split(str(root), "train", cache_dir=str(tmp_path / "c"), on_bad_image="skip")
    assert "the tar header there is corrupt" in caplog.text and "1 samples of the shard lost their image or label" \
        in caplog.text
    assert len(split) == 39 and "s09" not in list(split.keys)  # all the others, read past the damage
    # cut at 70% of its length, and cut exactly after a member: both reported
    for cut, expected in ((int(len(clean) * 0.7), "runs past the shard's end"),
                          (offsets["s20.jpg"], "without tar's end-of-archive marker: it was cut short")):
        shard.write_bytes(clean[:cut])
        caplog.clear()
        with caplog.at_level("WARNING"):
            split = open_split(str(root), "train", cache_dir=str(tmp_path / "c2"), on_bad_image="skip")
        assert expected in caplog.text and len(split) < 40


def test_random_header_damage_is_reported_or_harmless(digits, tmp_path, caplog):
    import random

    good = open_split(str(digits["folder"]), "train", cache_dir=digits["cache"]).read(0)
    root = tmp_path / "flips"
    root.mkdir()
    clean = root / "clean.tar"
    offsets = sorted(forty_samples(clean, good).values())
    rng = random.Random(0)
    for trial in range(20):
        data = bytearray(clean.read_bytes())
        header = rng.choice(offsets[1:])  # not the first header: a shard that does not open at all is an error
        data[header + rng.randrange(0, 500)] ^= 1 << rng.randrange(8)
        (root / "train-000000.tar").write_bytes(bytes(data))
        caplog.clear()
        with caplog.at_level("WARNING"):
            try:
                split = open_split(str(root), "train", cache_dir=str(tmp_path / f"c{trial}"), on_bad_image="skip")
            except DataError:
                continue  # named
        assert len(split) == 40 or "train-000000.tar" in caplog.text, trial  # never fewer samples silently


def test_duplicate_keys_and_labels_that_are_not_class_indices(digits, tmp_path, caplog):
    good = open_split(str(digits["folder"]), "train", cache_dir=digits["cache"]).read(0)
    root = tmp_path / "labels"
    root.mkdir()
    bad_shard(root / "train-000000.tar", [
        ("a.jpg", good), ("a.cls", b"1"), ("a.jpg", good), ("sup.jpg", good), ("sup.cls", "²".encode()),
        ("long.jpg", good), ("long.cls", b"1" * 25), ("huge.jpg", good), ("huge.cls", b"7" * 5000),
        ("neg.jpg", good), ("neg.cls", b"-1"), ("ok.jpg", good), ("ok.cls", b"2")])
    with caplog.at_level("WARNING"):
        split = open_split(str(root), "train", cache_dir=str(tmp_path / "c"))
    assert "duplicate key a: a second image a.jpg" in caplog.text
    assert list(split.keys) == ["a", "sup", "long", "huge", "neg", "ok"] and split.classes == ["0", "1", "2"]
    ds = ImageFolderDataset(split, train_transform(16), seed=1)
    batch = ds.collater([ds[i] for i in range(len(split))])
    assert batch["id"].tolist() == [0, 5] and batch["bad_images"] == 4
    assert all("its label is not a class index" in reason for _, reason in batch["bad_files"])
    with pytest.raises(DataError, match="duplicate key a"):
        open_split(str(root), "train", cache_dir=str(tmp_path / "c"), on_bad_image="error")


def test_parquet_columns_of_other_types_are_named_and_fractional_labels_are_bad_records(digits, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = open_split(str(digits["folder"]), "train", cache_dir=digits["cache"]).read(0)
    for name, image in (("string", pa.array(["not bytes"])), ("int", pa.array([3])),
                        ("bytes as string", pa.array([good.decode("latin1")]))):
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        pq.write_table(pa.table({"image": image, "label": pa.array([0])}), folder / "train-0.parquet")
        with pytest.raises(DataError, match=r"train-0.parquet: its 'image' column holds (string|int64), not encoded "
                                            r"image bytes"):
            open_split(str(folder), "train", cache_dir=str(tmp_path / "c"))
    folder = tmp_path / "floats"
    folder.mkdir()
    pq.write_table(pa.table({"image": pa.array([good] * 4, pa.binary()),
                             "label": pa.array([0.7, 1.0, float("nan"), -2.0])}), folder / "train-0.parquet")
    split = open_split(str(folder), "train", cache_dir=str(tmp_path / "c"))
    assert split.labels.tolist() == [-2, 1, -1, -2]  # 0.7 is not class 0; 1.0 is class 1
    ds = ImageFolderDataset(split, train_transform(16), seed=1)
    batch = ds.collater([ds[i] for i in range(4)])
    assert batch["id"].tolist() == [1] and batch["bad_images"] == 3
    (tmp_path / "text").mkdir()
    pq.write_table(pa.table({"image": pa.array([good], pa.binary()), "label": pa.array(["cat"])}),
                   tmp_path / "text" / "train-0.parquet")
    with pytest.raises(DataError, match=r"its 'label' column holds string, not class indices"):
        open_split(str(tmp_path / "text"), "train", cache_dir=str(tmp_path / "c"))
