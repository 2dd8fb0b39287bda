"""The pooled head and the parameter groups, against independent computations."""

import pytest
import torch

from conftest import TINY
from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier


def make(**kw) -> Data2Vec2ImageClassifier:
    torch.manual_seed(0)
    arch = {k: v for k, v in TINY.items() if k != "depth"}
    return Data2Vec2ImageClassifier.build_model(
        Data2Vec2ClassifierConfig(num_classes=kw.pop("num_classes", 6), depth=kw.pop("depth", 4), **arch, **kw))


def test_build_model_works_without_a_task():
    model = make()
    assert model(torch.randn(2, 3, 24, 24)).shape == (2, 6)
    assert model.extract_features(torch.randn(2, 3, 24, 24)).shape == (2, 1 + 9, 32)


def test_mean_pooling_ignores_cls_token():
    model = make().eval()
    tokens = torch.randn(2, 10, 32)
    assert torch.allclose(model.pool(tokens), tokens[:, 1:].sum(1) / 9)
    changed = tokens.clone()
    changed[:, 0] += 100.0
    assert torch.equal(model.pool(changed), model.pool(tokens))


def test_cls_pooling_takes_the_first_token():
    model = make(pooling="cls")
    tokens = torch.randn(2, 10, 32)
    assert torch.equal(model.pool(tokens), tokens[:, 0])


def test_unknown_pooling_is_one_clear_error():
    with pytest.raises(ValueError, match=r"model.pooling='max' is not a pooling mode; use one of mean, cls"):
        make(pooling="max")


def test_head_init_matches_table_1():
    model = make(num_classes=1000)
    assert torch.equal(model.fc_norm.weight, torch.ones(32)) and torch.equal(model.fc_norm.bias, torch.zeros(32))
    assert model.fc_norm.eps == 1e-6
    assert torch.equal(model.head.bias, torch.zeros(1000))
    w = model.head.weight.detach()
    # trunc_normal_(std=0.02) as data2vec calls it: torch's bounds are absolute (+-2), far outside
    # 0.02, so the draw is N(0, 0.02^2); 32,000 draws pin the std to within ~0.5%
    assert w.abs().max() <= 2.0
    assert abs(w.std().item() - 0.02) < 0.0005 and abs(w.mean().item()) < 0.0005


def test_logits_are_raw_norm_then_linear_of_the_mean():
    model = make().eval()
    images = torch.randn(3, 3, 24, 24)
    tokens = model.extract_features(images)
    pooled = tokens[:, 1:].mean(1)
    normed = (pooled - pooled.mean(-1, keepdim=True)) / torch.sqrt(pooled.var(-1, unbiased=False, keepdim=True) + 1e-6)
    expected = normed @ model.head.weight.T + model.head.bias
    logits = model(images)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not torch.allclose(logits.softmax(-1).sum(-1), logits.sum(-1))  # not probabilities


def test_freeze_encoder_trains_the_head_only():
    model = make(freeze_encoder=True)
    model(torch.randn(2, 3, 24, 24)).sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.head.weight.grad is not None and model.fc_norm.weight.grad is not None
    assert all(n.startswith(("head.", "fc_norm.")) for n in model.param_group_rules())


def test_no_weight_decay_group_holds_norms_biases_and_cls():
    model = make()
    rules = model.param_group_rules()
    no_decay = {n for n, (g, _) in rules.items() if g == "no_decay"}
    expected = {n for n, p in model.named_parameters() if n.endswith(".bias") or ".norm" in n or "fc_norm" in n}
    expected.add("encoder.cls_token")
    assert no_decay == expected
    decayed = {n for n, (g, _) in rules.items() if g == "default"}
    assert decayed == {n for n, p in model.named_parameters() if p.ndim > 1 and n != "encoder.cls_token"}
    assert all(getattr(p, "param_group") in ("default", "no_decay") for p in model.parameters())


def test_layer_decay_scales_block_i_by_decay_to_the_n_minus_i():
    model = make(layer_decay=0.5, depth=4)
    for name, p in model.named_parameters():
        scale = getattr(p, "optim_overrides", {}).get("optimizer", {}).get("lr_scale", 1.0)
        if name.startswith("encoder.blocks."):
            i = int(name.split(".")[2])
            assert scale == pytest.approx(0.5 ** (4 - i)), name
        else:  # head, fc_norm, patch embedding, CLS, embedding norm: as data2vec, not decayed
            assert scale == 1.0, name


def test_layer_decay_off_sets_no_overrides():
    model = make(layer_decay=1.0)
    assert not any(hasattr(p, "optim_overrides") for p in model.parameters())


def test_layer_decay_reaches_fairseqs_composite_optimizer():
    from omegaconf import OmegaConf
    from fairseq.optim.composite import FairseqCompositeOptimizer

    model = make(layer_decay=0.5, depth=2)
    adam = {"_name": "adam", "adam_betas": [0.9, 0.95], "adam_eps": 1e-6}
    sched = {"_name": "cosine", "warmup_updates": 0, "max_update": 10}
    root = OmegaConf.create({"common": {"tpu": False}, "optimization": {"lr": [1e-3], "max_update": 10}, "optimizer": {
        "groups": {
            "default": {"lr_float": 1e-3, "optimizer": {**adam, "weight_decay": 0.05}, "lr_scheduler": sched},
            "no_decay": {"lr_float": 1e-3, "optimizer": {**adam, "weight_decay": 0.0}, "lr_scheduler": sched},
        },
        "dynamic_groups": True,
    }})
    FairseqCompositeOptimizer.optimizers = {}  # fairseq keeps this dict on the class
    opt = FairseqCompositeOptimizer(root.optimizer, list(model.parameters()))
    opt.lr_scheduler.step_update(0)
    found = {}
    for group in opt.param_groups:
        for p in group["params"]:
            found[id(p)] = (group["lr"], group["weight_decay"])
    for name, p in model.named_parameters():
        group, scale = model.param_group_rules()[name]
        lr, wd = found[id(p)]
        assert lr == pytest.approx(1e-3 * scale), name
        assert wd == (0.0 if group == "no_decay" else 0.05), name


def test_compiled_encoder_computes_the_same_logits_with_the_same_keys():
    from torch._dynamo.utils import counters

    counters.clear()
    eager = make(depth=1)
    compiled = make(depth=1, compile_encoder=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    images = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.allclose(compiled.eval()(images), eager.eval()(images), atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1  # it really went through torch.compile


def test_decayed_embeddings_sit_one_layer_below_the_first_block():
    # MAE's rule, which the thesis' code follows: patch embedding, CLS and embedding norm at decay^(N+1)
    model = make(layer_decay=0.5, depth=4, layer_decay_embeddings="decayed")
    rules = model.param_group_rules()
    for name in ("encoder.patch_embed.proj.weight", "encoder.cls_token", "encoder.norm_pre.weight"):
        assert rules[name][1] == 0.5 ** 5, name
    assert rules["encoder.blocks.0.attn.qkv.weight"][1] == 0.5 ** 4
    assert rules["head.weight"][1] == rules["fc_norm.weight"][1] == 1.0
