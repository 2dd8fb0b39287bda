"""The encoder computes what data2vec 2.0's own code computes (fairseq examples/data2vec as reference)."""
import pytest
import torch

from d2v_plugin.models.checkpoints import read_encoder_checkpoint, strict_load
from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier
from d2v_plugin.models.encoder import Data2Vec2ImageEncoder, EncoderConfig, sincos_2d_positions
from d2v_plugin.testing.reference import build_data2vec_model, data2vec, save_like_fairseq


def reference_features(model, images):
    with torch.no_grad():
        return model.extract_features(images, mode="IMAGE", mask=False, remove_extra_tokens=False)["x"]


def truncate_reference(model, depth, prenet_depth):
    """The reference model cut to its first `depth` blocks, prenet blocks first."""
    enc = model.modality_encoders["IMAGE"].context_encoder
    keep_prenet = min(depth, prenet_depth)
    enc.blocks = torch.nn.ModuleList(list(enc.blocks)[:keep_prenet])
    model.blocks = torch.nn.ModuleList(list(model.blocks)[: depth - keep_prenet])
    return model


def load_ours(path, depth=None):
    cfg = Data2Vec2ClassifierConfig(pretrained_checkpoint=str(path), depth=depth, num_classes=7)
    return Data2Vec2ImageClassifier.build_model(cfg).eval()


SMALL = dict(embed_dim=64, num_heads=4, depth=4, prenet_depth=2, image_size=32, patch_size=8)
BASE = dict()  # 768 wide, 2 prenet + 10 main blocks, 224 px: data2vec 2.0 base


@pytest.mark.parametrize("depth", [None, 4])
@pytest.mark.parametrize("arch", [SMALL, BASE], ids=["small", "base"])
def test_features_match_data2vec(tmp_path, arch, depth):
    ref, cfg = build_data2vec_model(**arch)
    path = tmp_path / "d2v.pt"
    save_like_fairseq(ref, cfg, path)
    ours = load_ours(path, depth)
    if depth is not None:
        truncate_reference(ref, depth, prenet_depth=2)
    size = arch.get("image_size", 224)
    images = torch.randn(2, 3, size, size)
    expected = reference_features(ref, images)
    got = ours.extract_features(images)
    assert got.shape == expected.shape == (2, 1 + (size // arch.get("patch_size", 16)) ** 2, arch.get("embed_dim", 768))
    assert len(ours.encoder.blocks) == (depth or 2 + arch.get("depth", 10))
    assert (got - expected).abs().max().item() < 1e-5


def trainable_reference_encoder_params(model):
    # the reference counts: every trainable parameter of the image encoder and blocks, minus the decoder
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".decoder." not in n)


@pytest.mark.parametrize("depth,expected", [(12, 85_647_360), (4, 28_944_384)])
def test_parameter_counts_equal_reference_at_base_width(depth, expected):
    ref, _ = build_data2vec_model(depth=depth - 2, prenet_depth=2)
    assert trainable_reference_encoder_params(ref) == expected
    ours = Data2Vec2ImageEncoder(EncoderConfig(depth=depth))
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == expected


def test_positions_are_data2vecs_sincos():
    expected = torch.from_numpy(data2vec().mae.get_2d_sincos_pos_embed(64, 5, cls_token=False)).float()
    assert torch.equal(sincos_2d_positions(64, 5, 5)[0], expected)


def test_positions_are_fixed_not_trained():
    enc = Data2Vec2ImageEncoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, patch_size=8, image_size=32))
    assert "pos_embed" in enc.state_dict()
    assert all("pos_embed" not in n for n, _ in enc.named_parameters())


def test_other_image_size_resamples_checkpoint_positions_bicubically(tmp_path):
    ref, cfg = build_data2vec_model(embed_dim=64, num_heads=4, depth=2, prenet_depth=2, image_size=32, patch_size=8)
    path = tmp_path / "d2v.pt"
    save_like_fairseq(ref, cfg, path)
    model = Data2Vec2ImageClassifier.build_model(
        Data2Vec2ClassifierConfig(pretrained_checkpoint=str(path), num_classes=3, image_size=48)
    )
    saved = ref.state_dict()["modality_encoders.IMAGE.fixed_positional_encoder.positions"]  # 4x4 grid
    grid = saved.reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 36, 64)
    assert torch.allclose(model.encoder.pos_embed, expected, atol=1e-6)
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 3)


def test_same_image_size_keeps_checkpoint_positions_exactly(tmp_path):
    ref, cfg = build_data2vec_model(embed_dim=64, num_heads=4, depth=2, prenet_depth=2, image_size=32, patch_size=8)
    path = tmp_path / "d2v.pt"
    save_like_fairseq(ref, cfg, path)
    _, state = read_encoder_checkpoint(str(path))
    assert torch.equal(state["pos_embed"], ref.state_dict()["modality_encoders.IMAGE.fixed_positional_encoder.positions"])


def test_drop_path_rises_linearly_to_the_rate():
    enc = Data2Vec2ImageEncoder(EncoderConfig(embed_dim=32, depth=5, num_heads=2, patch_size=8, image_size=16,
                                              drop_path_rate=0.2))
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in enc.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_attention_equals_explicit_softmax_attention():
    enc = Data2Vec2ImageEncoder(EncoderConfig(embed_dim=32, depth=1, num_heads=4, patch_size=8, image_size=16))
    attn = enc.blocks[0].attn
    x = torch.randn(2, 5, 32)
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = ((q * 8 ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))
    assert torch.allclose(attn(x), expected, atol=1e-6)


def test_load_into_encoder_reports_every_bad_key(tmp_path):
    from d2v_plugin.models.checkpoints import CheckpointError

    enc = Data2Vec2ImageEncoder(EncoderConfig(embed_dim=32, depth=2, num_heads=2, patch_size=8, image_size=16))
    state = dict(enc.state_dict())
    del state["blocks.1.norm2.bias"]
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    state["extra.thing"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        strict_load(enc, state, "somefile.pt", what="the encoder")
    msg = str(err.value)
    assert "somefile.pt" in msg and "blocks.1.norm2.bias" in msg and "extra.thing" in msg
    assert "blocks.0.attn.qkv.weight" in msg


def test_logits_match_data2vecs_mae_image_classification(tmp_path):
    from d2v_plugin.testing.reference import reference_classifier

    ref_d2v, cfg = build_data2vec_model(embed_dim=64, num_heads=4, depth=3, prenet_depth=2, image_size=32, patch_size=8)
    path = tmp_path / "d2v.pt"
    save_like_fairseq(ref_d2v, cfg, path)
    ours = load_ours(path)
    reference = reference_classifier(ref_d2v, num_classes=7).eval()
    assert type(reference).__name__ == "MaeImageClassificationModel"
    ours.fc_norm.load_state_dict(reference.fc_norm.state_dict())
    ours.head.load_state_dict(reference.head.state_dict())
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (ours(images) - reference(images)).abs().max().item() < 1e-5
