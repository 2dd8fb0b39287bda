"""Checkpoints other code wrote (REFERENCE.md section 7), built with data2vec's own code and saved as
their clients save them, load without running their code and compute what data2vec computes."""
import logging

import pytest
import torch

from client_files import (earlier_kd_student, kd_student, save_data2vec_finetuned, save_like_the_thesis,
                          thesis_classifier)
from d2v_plugin.inference import load_classifier
from d2v_plugin.models.checkpoints import CheckpointError, load_file, read_encoder_checkpoint
from d2v_plugin.models.encoder import Data2Vec2ImageEncoder
from d2v_plugin.testing.reference import build_data2vec_model, reference_classifier

ARCH = dict(embed_dim=64, num_heads=4, image_size=32, patch_size=8)
IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def data2vec_features(d2v_model, images=IMAGES):
    with torch.no_grad():
        return d2v_model.extract_features(images, mode="IMAGE", mask=False, remove_extra_tokens=False)["x"]


def our_features(path, **given):
    enc_cfg, state = read_encoder_checkpoint(str(path), given=given or None)
    encoder = Data2Vec2ImageEncoder(enc_cfg).eval()
    encoder.load_state_dict(state, strict=True)
    with torch.no_grad():
        return encoder(IMAGES), enc_cfg


@pytest.fixture
def student():
    """A distilled student as the thesis builds it from a released checkpoint: no prenet blocks."""
    return build_data2vec_model(**ARCH, depth=3, prenet_depth=0, seed=1)[0]


def test_a_thesis_kd_student_loads_without_its_code_and_matches_data2vec(tmp_path, student, caplog):
    path = tmp_path / "student.ckpt"
    save_like_the_thesis(kd_student(student), path, tmp_path)
    with pytest.raises(Exception, match="Unsupported global|weights_only"):  # what torch alone says
        torch.load(path, weights_only=True)
    with pytest.raises(ModuleNotFoundError, match="models"):  # full unpickling needs the thesis' tree
        torch.load(path, weights_only=False)
    # the file says nothing of heads or eps: data2vec's (head width 64: 1 head at width 64, 12 at 768),
    # with a warning naming the override
    with caplog.at_level(logging.WARNING):
        _, guessed = our_features(path)
    assert guessed.num_heads == 1 and guessed.norm_eps == 1e-6
    assert "does not record the number of attention heads or the LayerNorm eps" in caplog.text
    assert "model.num_heads / model.norm_eps" in caplog.text and "--num-heads" in caplog.text
    ours, enc_cfg = our_features(path, num_heads=4)  # a given value wins: this student has 4
    assert enc_cfg.num_heads == 4 and enc_cfg.depth == 3 and enc_cfg.prenet_depth == 0
    assert (ours - data2vec_features(student)).abs().max().item() < 1e-5


def test_what_the_thesis_file_holds_besides_weights_stays_inert_data(tmp_path, student):
    path = tmp_path / "student.ckpt"
    save_like_the_thesis(kd_student(student), path, tmp_path)
    obj = load_file(path)
    cfg = obj["hyper_parameters"]["cfg"]
    assert type(cfg).__name__ == "DictConfig" and type(cfg).qualname == "omegaconf.dictconfig.DictConfig"
    assert obj["epoch"] == 9 and obj["callbacks"]  # plain values come through as they are
    assert "models" not in __import__("sys").modules


def test_the_earlier_kd_layout_gives_the_student_and_logs_the_teacher(tmp_path, student, caplog):
    teacher = build_data2vec_model(**ARCH, depth=5, prenet_depth=0, seed=2)[0]
    path = tmp_path / "kd.ckpt"
    save_like_the_thesis(earlier_kd_student(student, teacher), path, tmp_path)
    with caplog.at_level(logging.INFO):
        ours, enc_cfg = our_features(path, num_heads=4)
    assert enc_cfg.depth == 3  # the student's 3 blocks, not the teacher's 5
    assert (ours - data2vec_features(student)).abs().max().item() < 1e-5
    assert "ignored the teacher saved beside the student" in caplog.text


def test_the_thesis_fine_tuned_classifier_evaluates_as_its_head_computes(tmp_path, student):
    torch.manual_seed(3)
    head_norm, head = torch.nn.LayerNorm(64, eps=1e-6), torch.nn.Linear(64, 5)
    with torch.no_grad():
        head_norm.weight.normal_(1.0, 0.1), head_norm.bias.normal_(0.0, 0.1)
    path = tmp_path / "classifier.ckpt"
    save_like_the_thesis(thesis_classifier(student, head_norm, head), path, tmp_path)
    model = load_classifier(path, num_heads=4)
    with torch.no_grad():
        expected = head(head_norm(data2vec_features(student)[:, 1:].mean(dim=1)))
        logits = model(IMAGES)
    assert logits.shape == (3, 5) and (logits - expected).abs().max().item() < 1e-4
    assert model.data_cfg.crop_ratio == 1.0  # the thesis' code evaluates resize 224, centre-crop 224


def test_data2vecs_fine_tuned_classifier_loads_as_a_classifier(tmp_path):
    d2v, _ = build_data2vec_model(**ARCH, depth=3, prenet_depth=2, seed=4)
    mae = reference_classifier(d2v, num_classes=6).eval()
    assert type(mae).__name__ == "MaeImageClassificationModel"
    with torch.no_grad():
        mae.fc_norm.weight.normal_(1.0, 0.1), mae.head.bias.normal_(0.0, 0.1)
    path = tmp_path / "d2v_finetuned.pt"
    save_data2vec_finetuned(mae, path)
    model = load_classifier(path)  # heads and eps come from the file's pretrained_model_args
    assert model.encoder.cfg.num_heads == 4 and model.encoder.cfg.depth == 5 and model.data_cfg.crop_ratio == 0.875
    with torch.no_grad():
        assert (model(IMAGES) - mae(IMAGES)).abs().max().item() < 1e-4
        ours = model.encoder(IMAGES)
    assert (ours - data2vec_features(mae.model)).abs().max().item() < 1e-5


def test_a_pretrained_checkpoint_is_not_taken_for_a_classifier(tmp_path, student):
    path = tmp_path / "student.ckpt"
    save_like_the_thesis(kd_student(student), path, tmp_path)
    with pytest.raises(CheckpointError, match="holds an encoder but no classifier head"):
        load_classifier(path, num_heads=4)


@pytest.fixture(params=["data2vec", "thesis"])
def foreign_classifier(request, tmp_path):
    """A 3-class classifier another code fine-tuned, of either layout."""
    if request.param == "data2vec":
        mae = reference_classifier(build_data2vec_model(**ARCH, depth=3, prenet_depth=2, seed=5)[0], num_classes=3)
        path = tmp_path / "d2v_finetuned.pt"
        save_data2vec_finetuned(mae.eval(), path)
        return path, []
    student = build_data2vec_model(**ARCH, depth=3, prenet_depth=0, seed=6)[0]
    path = tmp_path / "thesis_classifier.ckpt"
    save_like_the_thesis(thesis_classifier(student, torch.nn.LayerNorm(64, eps=1e-6), torch.nn.Linear(64, 3)),
                         path, tmp_path)
    return path, ["--num-heads", "4"]


def test_every_command_takes_a_foreign_classifier(foreign_classifier, image_root, tmp_path, capsys):
    import json

    from d2v_plugin.cli import evaluate, export, knn, predict

    path, heads = foreign_classifier
    data = ["--data", str(image_root), "--split", "val"]
    assert evaluate.main([str(path), *data, *heads]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["n"] == 12 and 0 <= scores["top1"] <= 1
    assert export.main([str(path), "--out", str(tmp_path / "export"), *heads]) == 0
    exported = load_classifier(tmp_path / "export")
    assert torch.equal(exported(IMAGES), load_classifier(path, num_heads=4)(IMAGES))
    image = next((image_root / "val" / "class_0").iterdir())
    assert predict.main([str(path), str(image), *heads]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top"]) == 3
    assert knn.main([str(path), "--data", str(image_root), "--k", "3", *heads]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 12
