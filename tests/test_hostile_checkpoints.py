"""Checkpoints written by an attacker: the plugin's own allow-list (not torch's), bounds checked before
anything is allocated, names from files printed escaped, weights that cannot be right."""
import json
import logging
import os
import subprocess
import sys
import traceback

import pytest
import torch

from conftest import REPO, Calls, tiny_encoder
from crafted import a_global, called, checkpoint_with_pickle, many_globals, nested_lists
from d2v_plugin.models.checkpoints import CheckpointError, read_checkpoint, read_encoder_checkpoint
from d2v_plugin.models.safe_load import classify, load_file


def torchs_allow_list() -> set:
    """Every name torch's weights_only unpickler lets a file use here: its built-in list, what torch and
    its libraries registered with add_safe_globals, and the distributed classes it special-cases."""
    from torch import _weights_only_unpickler as w

    names = set(w._get_allowed_globals())
    for entry in torch.serialization.get_safe_globals():
        obj = entry[0] if isinstance(entry, tuple) else entry
        names.add(entry[1] if isinstance(entry, tuple) else f"{obj.__module__}.{obj.__qualname__}")
    names |= {"torch.distributed.device_mesh.DeviceMesh", "torch.distributed.tensor._dtensor_spec.DTensorSpec",
              "torch.distributed.tensor.placement_types.Shard", "torch.distributed.tensor.placement_types.Replicate"}
    return names


def test_every_name_torch_allows_and_the_plugin_does_not_is_refused(tmp_path):
    outside = sorted(n for n in torchs_allow_list() if classify(n) != "allowed")
    assert {"builtins.bytearray", "builtins.set", "builtins.complex", "traceback.FrameSummary",
            "builtins.EOFError", "collections.Counter", "torch.distributed.device_mesh.DeviceMesh"} <= set(outside)
    assert all(classify(n) == "refused" for n in outside), [n for n in outside if classify(n) != "refused"]
    for name in outside:  # and a file that names it is refused, naming it
        module, _, attr = name.rpartition(".")
        path = tmp_path / "x.pt"
        checkpoint_with_pickle(path, a_global(module, attr))
        with pytest.raises(CheckpointError, match=rf"refusing to unpickle objects the file asks for \({name}\)"):
            load_file(path)
    # what real checkpoints hold stays readable
    assert all(classify(n) == "allowed" for n in ("torch._utils._rebuild_tensor_v2", "collections.OrderedDict",
                                                   "torch.FloatStorage", "torch.bfloat16", "argparse.Namespace"))


def test_a_frame_summary_pointing_at_a_real_file_is_refused_without_opening_it(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the content of a local file\n")
    path = tmp_path / "frame.pt"
    torch.save({"model": tiny_encoder().state_dict(), "x": Calls(traceback.FrameSummary, str(secret), 1, "f")}, path)
    opened = []
    sys.addaudithook(lambda event, args: opened.append(args[0]) if event == "open" and args
                     and str(args[0]) == str(secret) else None)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle objects the file asks for "
                                              r"\(traceback.FrameSummary\)"):
        read_checkpoint(path)
    assert opened == []


def run_python(code: str, env=None) -> subprocess.CompletedProcess:
    """A fresh process, so that its peak memory is the load's alone."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


PEAK = ("import resource\nfrom d2v_plugin.models.safe_load import load_file, CheckpointError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    load_file({path!r})\n    print('loaded')\nexcept CheckpointError as err:\n    print('refused:', err)\n"
        "print('grew MiB', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")


ALLOCATIONS = [("builtins", "bytearray"), ("__builtin__", "bytes"), ("builtins", "set")]


@pytest.fixture(scope="module")
def allocation_loads(tmp_path_factory):
    """Each crafted file loaded in a fresh process of its own (its peak memory the load's alone), side by side."""
    from conftest import one_thread, together

    tmp = tmp_path_factory.mktemp("alloc")
    codes = []
    for module, name in ALLOCATIONS:
        path = tmp / f"{module}_{name}.pt"
        checkpoint_with_pickle(path, called(module, name, 2_000_000_000))
        codes.append(PEAK.format(path=str(path)))
    return dict(zip(ALLOCATIONS, together(*(lambda c=c: run_python(c, env=one_thread()) for c in codes))))


@pytest.mark.parametrize("module,name", ALLOCATIONS)
def test_a_hundred_bytes_cannot_allocate_gigabytes(allocation_loads, module, name):
    out = allocation_loads[module, name]
    assert out.returncode == 0, out.stderr[-2000:]
    grew = int(out.stdout.split("grew MiB")[1])
    assert grew < 1024, out.stdout  # refused, or a stand-in that keeps the number: never 2 GB of bytes
    if name in ("bytearray", "set"):
        assert "refused:" in out.stdout and f"builtins.{name}" in out.stdout


def test_nesting_and_the_number_of_names_are_bounded_before_unpickling(tmp_path):
    checkpoint_with_pickle(tmp_path / "deep.pt", nested_lists(1_000_000))
    with pytest.raises(CheckpointError, match="nests containers more than 1000 deep .*D2V_MAX_PICKLE_DEPTH"):
        load_file(tmp_path / "deep.pt")
    checkpoint_with_pickle(tmp_path / "many.pt", many_globals(20_000))
    with pytest.raises(CheckpointError, match="names more than 1000 classes outside the allow-list"):
        load_file(tmp_path / "many.pt")
    checkpoint_with_pickle(tmp_path / "few.pt", many_globals(10))
    assert [x.qualname for x in load_file(tmp_path / "few.pt")][:2] == ["gone_module0.C", "gone_module1.C"]


def test_names_from_files_are_printed_escaped(tmp_path, caplog):
    forged = "system\x1b[2K\x1b[1AOK: checkpoint verified"
    checkpoint_with_pickle(tmp_path / "ansi.pt", a_global("os", forged))
    with pytest.raises(CheckpointError) as err:
        load_file(tmp_path / "ansi.pt")
    assert "\x1b" not in str(err.value) and "os.system\\x1b[2K\\x1b[1AOK: checkpoint verified" in str(err.value)
    checkpoint_with_pickle(tmp_path / "stand_in.pt", a_global("gone\x1b[31m", "Cls"))
    with caplog.at_level(logging.INFO):
        load_file(tmp_path / "stand_in.pt")
    assert "gone\\x1b[31m.Cls" in caplog.text and "\x1b" not in caplog.text


def state_of(encoder=None) -> dict:
    return dict((encoder or tiny_encoder()).state_dict())


def test_an_architecture_the_file_cannot_back_is_refused_before_it_is_built(tmp_path):
    sd = state_of()
    sd["blocks.99999.norm1.weight"] = torch.ones(32)  # 100,000 blocks claimed in a small file
    torch.save(sd, tmp_path / "deep.pt")
    with pytest.raises(CheckpointError, match=r"depth=100000 outside 1..256 \(raise D2V_MAX_DEPTH"):
        read_encoder_checkpoint(str(tmp_path / "deep.pt"))
    # within the bound, but without the weights: checked on the meta device, never allocated (250 blocks of
    # base width would be 7 GB)
    from d2v_plugin.models.encoder import Data2Vec2ImageEncoder

    base = {"patch_embed.proj.weight": torch.zeros(768, 3, 16, 16), "patch_embed.proj.bias": torch.zeros(768),
            "blocks.249.norm1.weight": torch.ones(768)}
    torch.save(base, tmp_path / "hollow.pt")
    with pytest.raises(CheckpointError, match=r"cannot load the encoder: missing keys: blocks.0.attn.proj.bias"):
        Data2Vec2ImageEncoder.from_pretrained(str(tmp_path / "hollow.pt"), given={"num_heads": 12})
    # shapes that a few bytes claim through zero strides
    sd = state_of()
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(1).expand(65536 * 32, 32)
    torch.save(sd, tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match=r"tensor blocks.0.mlp.fc1.weight claims 67,108,864 elements"):
        load_file(tmp_path / "wide.pt")
    # a recorded image size, and a class count beyond the bounds
    from d2v_plugin.names import COMPACT_FORMAT

    enc = tiny_encoder()
    torch.save({"format": COMPACT_FORMAT, "arch": {**enc.cfg.to_dict(), "image_size": 65536},
                "encoder": enc.state_dict()}, tmp_path / "huge_image.pt")
    with pytest.raises(CheckpointError, match=r"image_size=65536 outside 1..4096"):
        read_encoder_checkpoint(str(tmp_path / "huge_image.pt"))
    from d2v_plugin.inference import load_classifier

    head = {"fc_norm.weight": torch.ones(32), "fc_norm.bias": torch.zeros(32),
            "head.weight": torch.zeros(1).expand(10**8, 32), "head.bias": torch.zeros(1).expand(10**8)}
    torch.save({"cfg": {"model": {"_name": "data2vec2_image_classifier", "num_classes": 10**8}},
                "model": {**{f"encoder.{k}": v for k, v in state_of().items()}, **head}}, tmp_path / "classes.pt")
    with pytest.raises(CheckpointError, match=r"tensor model.head.(weight|bias) claims (3,2|1)00,000,000 elements"):
        load_classifier(tmp_path / "classes.pt")


def test_an_export_config_is_checked_key_by_key(tmp_path, image_root):
    from d2v_plugin.inference import load_classifier

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    enc = tiny_encoder()
    meta = {"format": "d2v_plugin_classifier", "architecture": enc.cfg.to_dict(), "num_classes": 3, "pooling": "mean"}
    for bad, expected in (({"architecture": {**enc.cfg.to_dict(), "activation": "relu"}},
                           "unknown architecture key 'activation'"),
                          ({"architecture": {**enc.cfg.to_dict(), "depth": "5; rm -rf /"}},
                           "architecture key 'depth' = '5; rm -rf /' is not an int"),
                          ({"architecture": {**enc.cfg.to_dict(), "depth": 100000}}, "depth=100000 outside 1..256"),
                          ({"num_classes": 10**9}, r"num_classes=1000000000 outside 1..1000000")):
        (folder / "config.json").write_text(json.dumps({**meta, **bad}))
        with pytest.raises(CheckpointError, match=expected):
            load_classifier(folder)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="config.json is not a readable JSON file: RecursionError"):
        load_classifier(folder)
    (folder / "config.json").write_text(" " * (2**20 + 1))
    with pytest.raises(CheckpointError, match="config.json is larger than the 1,048,576 bytes"):
        load_classifier(folder)


def test_weights_that_cannot_be_right_are_named_and_an_export_of_them_is_refused(tmp_path, caplog):
    from d2v_plugin.cli.export import export

    sd = state_of()
    sd["blocks.2.attn.qkv.weight"][0, 0] = float("nan")
    sd["head.weight"], sd["head.bias"] = torch.full((3, 32), float("inf")), torch.zeros(3)
    sd["fc_norm.weight"], sd["fc_norm.bias"] = torch.ones(32), torch.zeros(32)
    torch.save(sd, tmp_path / "nan.pt")
    with caplog.at_level(logging.WARNING):
        read_checkpoint(tmp_path / "nan.pt", given={"num_heads": 4})
    assert "2 tensors hold NaN or inf values: blocks.2.attn.qkv.weight, head.weight" in caplog.text
    with pytest.raises(CheckpointError, match=r"NaN or inf values: blocks.2.attn.qkv.weight, head.weight.*"
                                              r"not exported"):
        export(str(tmp_path / "nan.pt"), str(tmp_path / "out"), num_heads=4)
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


# every way a file from outside reaches a torch loader, each called in one process whose peak memory is measured
ENTRY_POINTS = r'''
import contextlib, io, json, os, resource, sys
path, marker, data, image, tmp = sys.argv[1:]
import d2v_plugin
d2v_plugin.register()  # as fairseq's user dir: the compat patches, fairseq's own loading among them
from d2v_plugin.cli import compare, convert, evaluate, export, knn, predict, probe, track
from d2v_plugin.models.safe_load import load_file
import fairseq.checkpoint_utils, matplotlib.pyplot
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # torch's CUDA build alone is ~700 MiB

def command(module, *args):
    return lambda: module.main([str(a) for a in args])

calls = {
    "evaluate": command(evaluate, path, "--data", data, "--workers", 0),
    "convert": command(convert, path, "--out", os.path.join(tmp, "out.pt")),
    "predict": command(predict, path, image),
    "knn": command(knn, path, "--data", data, "--workers", 0, "--cache", "none"),
    "probe": command(probe, path, "--data", data, "--workers", 0, "--cache", "none"),
    "export": command(export, path, "--out", os.path.join(tmp, "export")),
    "compare": command(compare, os.path.join(tmp, "run"), "--out", os.path.join(tmp, "report"), "--no-speed"),
    "track": command(track, os.path.join(tmp, "pretraining"), "--data", data, "--workers", 0),
    "load_classifier": lambda: d2v_plugin.load_classifier(path),
    "load_file(mmap=True)": lambda: load_file(path, mmap=True),
    "load_file(trust=True)": lambda: load_file(path, trust=True),
    "fairseq load_checkpoint_to_cpu": lambda: fairseq.checkpoint_utils.load_checkpoint_to_cpu(path),
}
said = {}
for name, call in calls.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            call()
            outcome = "returned"
        except SystemExit as stop:
            outcome = f"exit {stop.code}"
        except Exception as error:
            outcome = f"{type(error).__name__}: {error}"
    said[name] = [outcome, err.getvalue()]
print(json.dumps({"said": said, "imported_mib": imported,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
'''


def test_a_torchscript_archive_is_refused_by_every_entry_point_before_its_code_runs(tmp_path, image_root):
    from crafted import torchscript_archive

    marker = tmp_path / "marker"
    evil = tmp_path / "run" / "checkpoint_best.pt"  # named as compare and resumes look for it
    evil.parent.mkdir()
    torchscript_archive(evil, marker)
    (evil.parent / "train.log").write_text('[2026-12-01 10:00:00,000][valid][INFO] - {"epoch": 1, '
                                           '"valid_accuracy": "50.0", "valid_num_updates": "10"}\n')
    (tmp_path / "pretraining").mkdir()
    os.link(evil, tmp_path / "pretraining" / "checkpoint_1_10.pt")
    image = next((image_root / "val" / "class_0").iterdir())
    out = subprocess.run([sys.executable, "-c", ENTRY_POINTS, str(evil), str(marker), str(image_root), str(image),
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert not marker.exists() and "payload ran" not in out.stdout + out.stderr
    # the payload fills 4 GiB; the calls, beyond the imports they share, stay under 1 GiB
    assert report["peak_mib"] - report["imported_mib"] < 1024, report
    for name, (outcome, stderr) in report["said"].items():
        told = outcome + stderr
        named = tmp_path / "pretraining" / "checkpoint_1_10.pt" if name == "track" else evil
        assert f"{named} is a TorchScript archive" in told, (name, told)
        if name == "track":  # a decoy among a run's checkpoints is skipped, named; the pass goes on
            assert outcome == "returned" and "not tracked" in stderr, (name, told)
        elif name.startswith(("load_", "fairseq")):
            assert outcome.startswith("CheckpointError"), (name, told)
        else:
            assert outcome == "exit 2" and "Traceback" not in stderr and stderr.count("\n") == 1, (name, told)


def test_a_torchscript_archive_left_as_checkpoint_last_stops_the_resume_before_its_code_runs(tmp_path, image_root):
    from conftest import exception_line, run, train_cmd
    from crafted import torchscript_archive

    marker = tmp_path / "marker"
    (tmp_path / "run").mkdir()
    torchscript_archive(tmp_path / "run" / "checkpoint_last.pt", marker)
    result = run(train_cmd(tmp_path, image_root, tmp_path / "run"))
    assert result.returncode != 0 and not marker.exists() and "payload ran" not in result.stdout
    assert "checkpoint_last.pt is a TorchScript archive" in exception_line(result.stderr, ("d2v_plugin.",))


def test_a_legacy_checkpoint_nested_deeply_is_refused_before_it_is_unpickled(tmp_path):
    import pickle
    import time

    from crafted import nested_lists
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    path = tmp_path / "deep_legacy.pt"  # torch.save's format before 1.6: four pickles, then the storages
    with open(path, "wb") as f:
        for value in (MAGIC_NUMBER, PROTOCOL_VERSION, {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                                                       "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(value, f, protocol=2)
        f.write(nested_lists(10_000_000))
        pickle.dump([], f, protocol=2)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="nests containers more than 1000 deep"):
        load_file(path)
    assert time.perf_counter() - start < 10  # (today's main: over 150 s)
    # a real legacy checkpoint still loads, and one that names what no checkpoint holds is refused unread
    torch.save({"model": state_of()}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert read_encoder_checkpoint(str(tmp_path / "legacy.pt"), given={"num_heads": 4})[0].depth == 5
    torch.save({"model": state_of(), "x": Calls(os.system, "true")}, tmp_path / "evil_legacy.pt",
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle objects the file asks for \(posix.system\)"):
        load_file(tmp_path / "evil_legacy.pt")


def test_a_tensor_that_claims_more_than_its_storage_is_named_by_its_place_in_the_file(tmp_path):
    value = torch.zeros(1).expand(10**6)  # the bad tensor, 200 lists down
    for _ in range(200):
        value = [value]
    torch.save({"model": {"blocks": value}}, tmp_path / "deep.pt")
    with pytest.raises(CheckpointError, match=r"tensor model.blocks(\[0\]){200} claims 1,000,000 elements"):
        load_file(tmp_path / "deep.pt")


def test_class_names_that_outnumber_the_heads_outputs_are_refused_when_loading(tmp_path):
    """predict ended in 'selected index k out of range' on a checkpoint recording 5 names for a 2-way head."""
    from d2v_plugin.inference import load_classifier

    head = {"fc_norm.weight": torch.ones(32), "fc_norm.bias": torch.zeros(32), "head.weight": torch.zeros(2, 32),
            "head.bias": torch.zeros(2)}
    torch.save({"cfg": {"model": {"_name": "data2vec2_image_classifier", "num_classes": 2, "num_heads": 4}},
                "model": {**{f"encoder.{k}": v for k, v in state_of().items()}, **head},
                "task_state": {"classes": ["a", "b", "c", "d", "e"]}}, tmp_path / "names.pt")
    with pytest.raises(CheckpointError, match=r"names.pt records 5 class names but its head has 2 outputs"):
        load_classifier(tmp_path / "names.pt")
