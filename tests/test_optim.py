"""fused_adamw: fairseq's adam computed by torch's fused kernel, inside fairseq's optimizer machinery."""
import pytest
import torch

from conftest import tiny_encoder
from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier
from d2v_plugin.testing.recipes import resolve


WARMUP_2 = ["optimizer.groups.default.lr_scheduler.warmup_updates=2",
            "optimizer.groups.no_decay.lr_scheduler.warmup_updates=2"]  # the full lr from update 2 on


def model_and_optimizer(name: str, layer_decay: float = 0.5, *overrides, half=None):
    """A tiny classifier with the recipe's groups (no-decay group, layer-decay lr scales) and fairseq's
    composite optimizer over it, as the trainer builds it (through the FP16 optimizer for fp16/bf16)."""
    from fairseq.optim import build_optimizer
    from fairseq.optim.fp16_optimizer import FP16Optimizer
    from fairseq.optim.lr_scheduler import build_lr_scheduler

    cfg = resolve("demo", f"optimizer.groups.default.optimizer._name={name}", *WARMUP_2, *overrides)
    model = Data2Vec2ImageClassifier(Data2Vec2ClassifierConfig(num_classes=3, layer_decay=layer_decay), tiny_encoder())
    model.assign_param_groups()
    params = [p for p in model.parameters() if p.requires_grad]
    if half is not None:
        model = model.to(half)
        optimizer = FP16Optimizer.build_optimizer(cfg, params)
    else:
        optimizer = build_optimizer(cfg.optimizer, params)
    scheduler = build_lr_scheduler(cfg.lr_scheduler, optimizer)
    scheduler.step_update(0)
    return model, optimizer, scheduler


def train(name: str, updates: int = 6, clip: float = 0.05, half=None, state=None, gaps=None):
    """``gaps``: update -> names of parameters left without a gradient in it (an unused or frozen part)."""
    model, optimizer, scheduler = model_and_optimizer(name, half=half)
    if state is not None:
        optimizer.load_state_dict(state)
    g = torch.Generator().manual_seed(0)
    for update in range(updates):
        images = torch.randn(4, 3, 24, 24, generator=g)
        target = torch.randint(0, 3, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(images.to(next(model.parameters()).dtype)).float(), target,
                                                 reduction="sum")
        optimizer.backward(loss)
        for name_ in (gaps or {}).get(update, ()):
            model.get_parameter(name_).grad = None
        optimizer.clip_grad_norm(clip)  # small enough to clip every update
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step_update(update + 1)
    return model, optimizer


def test_fused_adamw_reaches_the_weights_fairseqs_adam_reaches():
    ours, opt = train("fused_adamw")
    theirs, _ = train("adam")
    assert {type(o.optimizer).__name__ for o in opt.optimizers.values()} == {"FairseqEpsAdamW"}
    assert all(o.optimizer.defaults["fused"] for o in opt.optimizers.values())  # torch's fused CPU kernel ran
    diff = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters()))
    assert diff < 1e-6, diff
    moved = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), model_and_optimizer("adam")[0].parameters()))
    assert moved > 1e-3  # and the weights really moved


def test_a_parameter_without_a_gradient_in_some_updates_steps_as_in_fairseqs_adam():
    # fairseq's adam counts steps per parameter: one that had no gradient in an update is a step behind
    gaps = {1: ["head.weight", "fc_norm.bias"], 2: ["head.weight"], 4: ["encoder.blocks.0.attn.qkv.weight"]}
    ours, _ = train("fused_adamw", gaps=gaps)
    theirs, _ = train("adam", gaps=gaps)
    diff = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters()))
    assert diff < 1e-6, diff


def test_without_fairseqs_eps_placement_the_weights_would_differ(monkeypatch):
    # the test above can fail: plain torch AdamW (eps added after the bias correction) ends elsewhere
    from d2v_plugin.optim import fused_adamw

    monkeypatch.setattr(fused_adamw.FairseqEpsAdamW, "step", torch.optim.AdamW.step)
    ours, _ = train("fused_adamw")
    theirs, _ = train("adam")
    assert max((a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters())) > 1e-6


def step_counts(optimizer) -> set:
    return {state["fairseq_step"] for o in optimizer.fp32_optimizer.optimizers.values()
            for state in o.optimizer.state.values()}


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_under_fairseqs_fp16_optimizer_it_trains_finitely_and_resumes_exactly(half):
    whole, _ = train("fused_adamw", updates=6, half=half)
    first, opt = train("fused_adamw", updates=3, half=half)
    state = opt.state_dict()  # as fairseq saves it: with the fp32 masters (d2v_plugin.compat)
    assert all(torch.isfinite(p).all() for p in whole.parameters())
    assert step_counts(opt) == {3}  # per parameter, on the host, saved with the optimizer's state

    resumed_model, resumed = model_and_optimizer("fused_adamw", half=half)[:2]
    resumed.load_state_dict(state)
    assert step_counts(resumed) == {3}
    for a, b in zip(resumed.fp32_params, opt.fp32_params):
        assert torch.equal(a, b)


def test_switching_optimizers_is_one_override():
    for name in ("fused_adamw", "adam"):
        cfg = resolve("distilled_imagenet", f"optimizer.groups.default.optimizer._name={name}")
        assert {g.optimizer._name for g in cfg.optimizer.groups.values()} == {name}
