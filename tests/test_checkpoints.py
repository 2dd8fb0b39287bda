"""Checkpoint reading: every accepted format, depth truncation, and one clear error per bad file."""
import os

import pytest
import torch

from conftest import Calls, tiny_encoder
from d2v_plugin.models.checkpoints import CheckpointError, read_encoder_checkpoint, to_data2vec_names
from d2v_plugin.models.safe_load import load_file
from d2v_plugin.names import COMPACT_FORMAT
from d2v_plugin.testing.checkpoints import save_data2vec_checkpoint
from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def encoder():
    return tiny_encoder()


@pytest.fixture
def d2v_file(tmp_path, encoder):
    path = tmp_path / "d2v.pt"
    save_data2vec_checkpoint(encoder, str(path), prenet_depth=2)
    return path


def test_fairseq_data2vec_checkpoint_reads_architecture_and_weights(d2v_file, encoder):
    cfg, state = read_encoder_checkpoint(str(d2v_file))
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.image_size) == (32, 5, 4, 8, 24)
    assert same_tensors(state, encoder.state_dict())


def test_pretraining_only_entries_are_dropped_by_rule(tmp_path, encoder):
    path = tmp_path / "with_extras.pt"
    save_data2vec_checkpoint(encoder, str(path))
    obj = torch.load(path, weights_only=True)
    extras = {
        "_ema": {"blocks.0.norm1.weight": torch.ones(32)},
        "modality_encoders.IMAGE.decoder.blocks.0.0.weight": torch.zeros(4),
        "modality_encoders.IMAGE.encoder_mask": torch.zeros(1),
        "modality_encoders.TEXT.local_encoder.weight": torch.zeros(2),
        "shared_decoder.proj.weight": torch.zeros(2),
    }
    obj["model"].update(extras)
    torch.save(obj, path)
    _, state = read_encoder_checkpoint(str(path))
    assert same_tensors(state, encoder.state_dict())


def test_bare_state_dicts_in_either_naming(tmp_path, encoder):
    ours, theirs = tmp_path / "ours.pt", tmp_path / "theirs.pt"
    torch.save(encoder.state_dict(), ours)
    torch.save(to_data2vec_names(encoder.state_dict(), prenet_depth=2), theirs)
    for path in (ours, theirs):
        cfg, state = read_encoder_checkpoint(str(path))
        assert cfg.depth == 5
        assert same_tensors(state, encoder.state_dict())


def test_lightning_checkpoint_with_prefixed_student(tmp_path, encoder):
    student = {f"model.model.{k}": v for k, v in to_data2vec_names(encoder.state_dict(), 2).items()}
    obj = {"epoch": 3, "global_step": 100, "state_dict": {**student, "loss_fn.scale": torch.ones(1)},
           "hyper_parameters": {"lr": 1e-3}}
    path = tmp_path / "student.ckpt"
    torch.save(obj, path)
    cfg, state = read_encoder_checkpoint(str(path))
    assert same_tensors(state, encoder.state_dict())


def test_two_encoders_need_an_explicit_prefix(tmp_path, encoder):
    other = tiny_encoder(seed=1)
    sd = {**{f"student.{k}": v for k, v in encoder.state_dict().items()},
          **{f"teacher.{k}": v for k, v in other.state_dict().items()}}
    path = tmp_path / "both.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match="checkpoint_prefix"):
        read_encoder_checkpoint(str(path))
    _, state = read_encoder_checkpoint(str(path), prefix="teacher.")
    assert same_tensors(state, other.state_dict())


def test_compact_format(tmp_path, encoder):
    path = tmp_path / "compact.pt"
    torch.save({"format": COMPACT_FORMAT, "arch": encoder.cfg.to_dict(), "encoder": encoder.state_dict()}, path)
    cfg, state = read_encoder_checkpoint(str(path))
    assert cfg.num_heads == 4 and same_tensors(state, encoder.state_dict())


def test_depth_keeps_the_first_blocks_prenet_first(d2v_file, encoder):
    cfg, state = read_encoder_checkpoint(str(d2v_file), depth=3)
    assert cfg.depth == 3
    full = encoder.state_dict()
    kept = {k: v for k, v in full.items() if not k.startswith(("blocks.3.", "blocks.4."))}
    assert same_tensors(state, kept)
    # blocks 0-1 came from the prenet (context_encoder.blocks), block 2 from the main blocks.0
    raw = torch.load(d2v_file, weights_only=True)["model"]
    assert torch.equal(state["blocks.2.mlp.fc1.weight"], raw["blocks.0.mlp.fc1.weight"])
    assert torch.equal(state["blocks.1.mlp.fc1.weight"],
                       raw["modality_encoders.IMAGE.context_encoder.blocks.1.mlp.fc1.weight"])


def test_depth_beyond_the_checkpoint_is_an_error(d2v_file):
    with pytest.raises(CheckpointError, match=r"model.depth=9 but the checkpoint has 5 blocks"):
        read_encoder_checkpoint(str(d2v_file), depth=9)


def build(path, **kw):
    return Data2Vec2ImageClassifier.build_model(Data2Vec2ClassifierConfig(pretrained_checkpoint=str(path), num_classes=3, **kw))


def test_wrong_width_tensor_is_named(tmp_path, encoder):
    sd = dict(encoder.state_dict())
    sd["blocks.3.mlp.fc1.weight"] = torch.zeros(128, 48)
    path = tmp_path / "wrong_width.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"wrong_width.pt.*shape mismatches: blocks.3.mlp.fc1.weight"):
        build(path)


def test_explicit_width_different_from_the_checkpoint_is_named(d2v_file):
    with pytest.raises(CheckpointError, match=r"model.embed_dim=64 but the checkpoint has 32"):
        build(d2v_file, embed_dim=64)


def test_missing_block_is_named(tmp_path, encoder):
    sd = {k: v for k, v in encoder.state_dict().items() if not k.startswith("blocks.2.")}
    path = tmp_path / "missing.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks.2.attn.proj.bias, blocks.2.attn.proj.weight"):
        build(path)


def test_unknown_extra_key_is_named(tmp_path, encoder):
    path = tmp_path / "extra.pt"
    save_data2vec_checkpoint(encoder, str(path))
    obj = torch.load(path, weights_only=True)
    obj["model"]["modality_encoders.IMAGE.mystery.weight"] = torch.zeros(2)
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys .*modality_encoders.IMAGE.mystery.weight"):
        build(path)


@pytest.mark.parametrize("content", [b"", b"hello, I am text\n", b"PK\x03\x04broken zip"])
def test_file_that_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="notes.pt is not a PyTorch checkpoint"):
        build(path)


def test_checkpoint_holding_no_tensors(tmp_path):
    path = tmp_path / "numbers.pt"
    torch.save({"a": 1, "b": [2, 3]}, path)
    with pytest.raises(CheckpointError, match="numbers.pt is not a checkpoint"):
        build(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        build(tmp_path / "nope.pt")


def write_malicious(tmp_path, encoder):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": encoder.state_dict(), "payload": Calls(os.system, f"touch {marker}")}, path)
    return path, marker


def test_pickle_that_would_run_code_is_refused_and_not_run(tmp_path, encoder):
    path, marker = write_malicious(tmp_path, encoder)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*posix.system.*model.trust_checkpoint=true"):
        build(path)
    assert not marker.exists()


def test_trust_checkpoint_allows_full_unpickling(tmp_path, encoder):
    path, marker = write_malicious(tmp_path, encoder)
    build(path, trust_checkpoint=True)
    assert marker.exists()  # the user said they trust it: it ran, which is why it is off by default


def test_classes_of_code_not_installed_are_stand_ins_and_installed_ones_outside_the_list_are_refused(tmp_path,
                                                                                                     encoder):
    import dataclasses
    import sys
    import timeit

    student = {f"model.{k}": v for k, v in to_data2vec_names(encoder.state_dict(), 2).items()}
    # the training code's config class, as a Lightning run pickles it; this machine has no such module
    module = type(sys)("thesis_code.config")
    module.RunConfig = dataclasses.make_dataclass("RunConfig", [("depth", int)])
    module.RunConfig.__module__ = "thesis_code.config"
    package = type(sys)("thesis_code")
    package.config = module
    sys.modules.update({"thesis_code": package, "thesis_code.config": module})
    try:
        torch.save({"state_dict": student, "hyper_parameters": {"cfg": module.RunConfig(depth=4)}},
                   tmp_path / "ok.ckpt")
    finally:
        del sys.modules["thesis_code"], sys.modules["thesis_code.config"]
    cfg, state = read_encoder_checkpoint(str(tmp_path / "ok.ckpt"), given={"num_heads": 4})
    assert same_tensors(state, encoder.state_dict())
    stood_in = load_file(tmp_path / "ok.ckpt")["hyper_parameters"]["cfg"]
    assert type(stood_in).qualname == "thesis_code.config.RunConfig" and stood_in.state == {"depth": 4}  # inert data
    # an installed module a checkpoint has no reason to name: refused, never imported, never called
    marker = tmp_path / "ran"
    torch.save({"state_dict": student, "hyper_parameters": {"x": Calls(timeit.timeit, f"open({str(marker)!r}, 'w')")}},
               tmp_path / "odd.ckpt")
    sys.modules.pop("timeit", None)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle objects the file asks for \(timeit.timeit\)"):
        read_encoder_checkpoint(str(tmp_path / "odd.ckpt"), given={"num_heads": 4})
    assert not marker.exists() and "timeit" not in sys.modules


def test_modules_that_run_code_are_refused_outright(tmp_path, encoder):
    import subprocess

    path = tmp_path / "spawn.ckpt"
    torch.save({"state_dict": encoder.state_dict(), "x": Calls(subprocess.Popen, ["touch", str(tmp_path / "ran")])},
               path)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle objects the file asks for \(subprocess.Popen\)"):
        read_encoder_checkpoint(str(path))
    assert not (tmp_path / "ran").exists()
