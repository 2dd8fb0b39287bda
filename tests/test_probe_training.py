"""Probes as papers report them, trained by fairseq with a frozen encoder: the heads (MAE's BatchNorm +
Linear, an attentive one), a frozen encoder that runs frozen, LARS as MAE computes it, the recipes."""
import math

import pytest
import torch

from conftest import tiny_encoder
from d2v_plugin.models.classifier import AttentivePooling, Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier
from d2v_plugin.optim.lars import MAELars


def mae_lars_steps(params, grads_per_step, lr, weight_decay, momentum=0.9, trust=0.001):
    """MAE's util/lars.py written out on plain tensors: no decay or scaling for 1-D parameters."""
    params = [p.clone() for p in params]
    mu = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, (p, dp) in enumerate(zip(params, grads)):
            if p.ndim > 1:
                dp = dp + weight_decay * p
                pn, un = p.norm(), dp.norm()
                q = trust * pn / un if pn > 0 and un > 0 else 1.0
                dp = dp * q
            mu[i] = momentum * mu[i] + dp
            params[i] = p - lr * mu[i]
    return params


def test_lars_computes_maes_update_over_several_steps():
    g = torch.Generator().manual_seed(0)
    matrix, bias = torch.randn(5, 7, generator=g), torch.randn(5, generator=g)
    steps = [[torch.randn(5, 7, generator=g), torch.randn(5, generator=g)] for _ in range(6)]
    expected = mae_lars_steps([matrix, bias], steps, lr=0.5, weight_decay=0.05)
    params = [torch.nn.Parameter(matrix.clone()), torch.nn.Parameter(bias.clone())]
    opt = MAELars(params, lr=0.5, weight_decay=0.05)
    for grads in steps:
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
    assert all((a - b).abs().max() < 1e-6 for a, b in zip(params, expected))
    assert not torch.allclose(params[1], bias - 0.5 * steps[0][1])  # momentum carried over the steps
    # timm's Lars computes another update: at MAE's weight decay 0 it adapts nothing (plain momentum SGD)
    from timm.optim import Lars

    mae = mae_lars_steps([matrix, bias], steps, lr=0.5, weight_decay=0.0)
    timm_params = [torch.nn.Parameter(matrix.clone()), torch.nn.Parameter(bias.clone())]
    timm_opt = Lars(timm_params, lr=0.5, momentum=0.9, weight_decay=0.0, trust_coeff=0.001)
    for grads in steps:
        for p, grad in zip(timm_params, grads):
            p.grad = grad.clone()
        timm_opt.step()
    assert (timm_params[0] - mae[0]).abs().max() > 0.1


def test_lars_under_half_precision_with_flattened_gradients_is_refused_naming_the_setting():
    """With common.fp16_no_flatten_grads=false fairseq hands the optimizer one flat 1-D tensor, and LARS scales
    no 1-D update: one step at the linear probe's lr 6.4 moved the weights 100x too far."""
    from fairseq.optim.fp16_optimizer import FP16Optimizer

    from d2v_plugin.testing.recipes import resolve
    from d2v_plugin.training import ConfigError, check_flat_params

    for half in ("fp16", "bf16"):
        other = "bf16" if half == "fp16" else "fp16"
        flat = resolve("linear_probe_imagenet", f"common.{half}=true", f"common.{other}=false",
                       "common.fp16_no_flatten_grads=false")
        with pytest.raises(ConfigError, match=rf"optimizer lars with common.{half}=true needs "
                                              r"common.fp16_no_flatten_grads=true"):
            check_flat_params(flat)
    check_flat_params(resolve("linear_probe_imagenet"))  # the recipe's own setting
    check_flat_params(resolve("linear_probe_imagenet", "common.fp16=false"))  # fp32: no flat copy
    # and fairseq's own builder (FP16Optimizer: "does not support flat params, please set
    # --fp16-no-flatten-grads", on a GPU) refuses it too, had the task's check been skipped
    from d2v_plugin.optim.lars import Lars

    assert Lars(resolve("linear_probe_imagenet").optimizer, [torch.nn.Parameter(torch.randn(4, 3))]).supports_flat_params \
        is False


def test_the_attentive_heads_output_for_one_query_is_a_hand_written_cross_attention():
    torch.manual_seed(0)
    head = AttentivePooling(128)  # 2 heads of width 64
    tokens = torch.randn(3, 10, 128)
    with torch.no_grad():
        kv = tokens @ head.kv.weight.T + head.kv.bias
        k, v = kv[..., :128], kv[..., 128:]
        expected = []
        for h in range(2):
            cols = slice(64 * h, 64 * (h + 1))
            scores = (k[..., cols] @ head.query[cols]) / math.sqrt(64)  # [B, N]
            weights = scores.softmax(dim=-1)
            expected.append((weights.unsqueeze(-1) * v[..., cols]).sum(1))
        assert torch.allclose(head(tokens), torch.cat(expected, dim=-1), atol=1e-5)


def make(head="batchnorm_linear", freeze=True, **kw):
    return Data2Vec2ImageClassifier(Data2Vec2ClassifierConfig(num_classes=3, head=head, freeze_encoder=freeze, **kw),
                                    tiny_encoder(drop_path_rate=0.2))


def saved_bytes(model, images):
    """Bytes of the tensors autograd keeps from the forward for the backward pass (the activation memory a
    training step holds)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(images).logsumexp(-1).sum()
    loss.backward()
    return total


@pytest.mark.parametrize("head", ["batchnorm_linear", "attentive", "layernorm_linear"])
def test_a_frozen_encoder_keeps_no_activations_runs_in_eval_mode_and_stays_out_of_the_optimizer(head):
    images = torch.randn(8, 3, 24, 24)
    frozen, tuned = make(head, True), make(head, False)
    frozen.train(), tuned.train()
    assert not frozen.encoder.training and frozen.head.training  # no drop path in the frozen encoder
    kept, full = saved_bytes(frozen, images), saved_bytes(tuned, images)
    assert kept < 0.05 * full, (kept, full)  # the head's inputs only: under 5% of fine-tuning's activations
    assert all(p.grad is None for p in frozen.encoder.parameters())
    assert all(p.grad is not None for n, p in frozen.named_parameters() if not n.startswith("encoder."))
    rules = frozen.param_group_rules()
    assert rules and all(not name.startswith("encoder.") for name in rules)
    with torch.no_grad():  # and it is the same function in eval mode: drop path off, same weights
        frozen.eval(), tuned.eval()
        tuned.load_state_dict(frozen.state_dict())
        assert torch.allclose(frozen(images), tuned(images), atol=1e-6)


# --- the recipes, run ---------------------------------------------------------------------------------

import os  # noqa: E402

from conftest import REPO, VENV_BIN, free_port, max_diff, one_thread, run, together, weights  # noqa: E402


def probe_cmd(root, save_dir, recipe="linear_probe_imagenet", *overrides, init=None, data=None, image_size=24,
              classes=3, batch=4):
    """A probe recipe on tiny data on the CPU: its own optimizer, schedule, head and frozen encoder, 2
    data-loading workers, 12 updates over 2 epochs."""
    return [os.path.join(VENV_BIN, "fairseq-hydra-train"), "--config-dir", "config", "--config-name", recipe,
            "common.user_dir=d2v_plugin", f"task.data={data or root / 'images'}",
            f"model.pretrained_checkpoint={init or root / 'init.pt'}", f"checkpoint.save_dir={save_dir}",
            f"task.cache_dir={root / 'cache'}", f"task.image_size={image_size}", f"model.num_classes={classes}",
            f"dataset.batch_size={batch}", "task.global_batch_size=null", "common.fp16=false", "common.cpu=true",
            "optimization.max_epoch=2", "optimization.max_update=12", "dataset.num_workers=2", "common.log_interval=1",
            "common.log_format=json", *({"linear_probe_imagenet": ["lr_scheduler.warmup_updates=2"],
                                         "attentive_probe_imagenet": []}[recipe]), *overrides]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from d2v_plugin.demo_data import write_random_images
    from d2v_plugin.testing.checkpoints import save_data2vec_checkpoint

    root = tmp_path_factory.mktemp("probes")
    write_random_images(str(root / "images"), classes=3, per_class={"train": 8, "val": 4}, size=24)
    save_data2vec_checkpoint(tiny_encoder(), str(root / "init.pt"), prenet_depth=2)
    return root


RECIPES = ["linear_probe_imagenet", "attentive_probe_imagenet"]


@pytest.fixture(scope="module")
def probe_runs(tiny):
    """One short run of each probe recipe, side by side: recipe -> (its folder, the completed process)."""
    done = together(*(lambda r=r: run(probe_cmd(tiny, tiny / r, r, "optimization.lr=[0.5]" if r.startswith("linear")
                                                else "optimizer.groups.default.lr_float=0.01"), env=one_thread())
                      for r in RECIPES))
    return {r: (tiny / r, result) for r, result in zip(RECIPES, done)}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_a_probe_run_leaves_the_encoder_as_pretrained_and_optimizes_the_head_only(tiny, probe_runs, tmp_path, recipe):
    from d2v_plugin.models.checkpoints import read_checkpoint

    run_dir, result = probe_runs[recipe]
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "encoder frozen (model.freeze_encoder): its" in log and "stay out of the optimizer" in log
    saved = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)
    pretrained = read_checkpoint(str(tiny / "init.pt")).encoder
    encoder = {k[len("encoder."):]: v for k, v in saved["model"].items() if k.startswith("encoder.")}
    assert encoder.keys() == pretrained.keys() and all(torch.equal(encoder[k], pretrained[k]) for k in encoder)
    head = [k for k in saved["model"] if not k.startswith("encoder.") and saved["model"][k].is_floating_point()
            and "running" not in k]
    state = saved["last_optimizer_state"]
    if recipe.startswith("linear"):  # one LARS: a momentum buffer for each head parameter, none for the encoder
        assert len(state["state"]) == len(head) == 2 and all(set(s) == {"mu"} for s in state["state"].values())
        assert not torch.equal(saved["model"]["fc_norm.running_mean"], torch.zeros(32))  # BatchNorm's statistics moved
    else:  # the composite optimizer's two groups hold the attentive head's parameters only
        counted = sum(len(group["state"]) for group in state.values())
        assert counted == len(head) == 7  # the query, kv's weight and bias, fc_norm's and head's
    assert saved["cfg"]["model"]["head"] == recipe.split("_")[0].replace("linear", "batchnorm_linear")
    from d2v_plugin.cli import compare as compare_cli  # a probe run is its own kind of row

    assert compare_cli.main([str(run_dir), "--out", str(tmp_path / "report"), "--no-speed", "--labels",
                             "probe"]) == 0
    row = next(line for line in (tmp_path / "report" / "report.md").read_text().splitlines()
               if line.startswith("| probe |"))
    assert row.split("|")[2].strip() == recipe.replace("_imagenet", "").replace("_", " ")


@pytest.mark.slow
def test_a_killed_probe_run_resumes_to_the_same_weights_and_two_ranks_match_one_with_update_freq_2(tiny, tmp_path):
    import subprocess

    from test_cluster import CPU_DDP
    from test_reliability import kill_after_saving

    extra = ["optimization.lr=[0.5]", "checkpoint.save_interval_updates=2", "dataset.batch_size=2",
             "task.global_batch_size=4"]
    env = one_thread()  # every run on one thread: the uninterrupted one beside the one killed, then the rest
    cmd = probe_cmd(tiny, tmp_path / "killed", "linear_probe_imagenet", *extra)
    whole, _ = together(lambda: run(probe_cmd(tiny, tmp_path / "whole", "linear_probe_imagenet", *extra), env=env),
                        lambda: kill_after_saving(cmd, 8, env))  # in the middle of epoch 2
    assert whole.returncode == 0, whole.stderr[-3000:]

    def pair():
        port = free_port()
        procs = [subprocess.Popen(probe_cmd(tiny, tmp_path / "pair", "linear_probe_imagenet", *extra, *CPU_DDP,
                                            f"distributed_training.distributed_rank={rank}",
                                            f"distributed_training.distributed_init_method=tcp://127.0.0.1:{port}"),
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                 for rank in (0, 1)]
        return procs, [p.communicate(timeout=600)[0] for p in procs]

    resumed, (procs, outs) = together(lambda: run(cmd, env=env), pair)
    assert resumed.returncode == 0 and "Loaded checkpoint" in resumed.stdout + resumed.stderr
    assert max_diff(weights(tmp_path / "whole" / "checkpoint_last.pt"),
                    weights(tmp_path / "killed" / "checkpoint_last.pt")) == 0.0
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:]
    assert "global batch 4 = dataset.batch_size 2 x 2 ranks x optimization.update_freq 1" in outs[0]
    assert "global batch 4 = dataset.batch_size 2 x 1 ranks x optimization.update_freq 2" in whole.stdout + whole.stderr
    # the head's weights agree; BatchNorm's running statistics are each rank's own (as in MAE's DDP runs:
    # the checkpoint keeps rank 0's, from half the images), so they are left out of the comparison
    one, two = (weights(tmp_path / d / "checkpoint_last.pt") for d in ("whole", "pair"))
    trained = [k for k in one if "running" not in k and "num_batches" not in k]
    diff = max_diff({k: one[k] for k in trained}, {k: two[k] for k in trained})
    assert diff < 1e-5, diff


@pytest.mark.slow
@pytest.mark.parametrize("recipe,settings,expected", [
    ("linear_probe_imagenet", ["optimization.lr=[10.0]", "model.pooling=mean", "lr_scheduler.warmup_updates=20"], 0.55),
    ("attentive_probe_imagenet", ["optimizer.groups.default.lr_float=0.003"], 0.5)])
def test_the_probe_recipes_rank_the_fine_tuned_demo_encoder_above_a_random_one(runs, tmp_path, recipe, settings,
                                                                                 expected):
    import json

    top1, encoders = {}, (("fine-tuned", runs["depth4"] / "checkpoint_best.pt", []),
                          ("random", runs["init"], ["model.depth=4"]))
    cmds = [probe_cmd(runs["root"], tmp_path / name, recipe, *settings, *extra, "optimization.max_epoch=4",
                      "optimization.max_update=180", "common.log_interval=50", init=init, data=runs["data"],
                      image_size=16, classes=10, batch=32) for name, init, extra in encoders]
    done = together(*(lambda c=c: run([a for a in c if a != "lr_scheduler.warmup_updates=2"], env=one_thread())
                      for c in cmds))  # the two encoders side by side
    for (name, _, _), result in zip(encoders, done):
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [line for line in (result.stdout + result.stderr).splitlines() if "[val][INFO] - {" in line]
        top1[name] = max(float(json.loads(line.split(" - ", 1)[1])["val_accuracy"]) for line in lines) / 100
    # on the digits, 4 epochs: the fine-tuned encoder's features probe at 61-64%, the random one's at 19-27%
    assert top1["fine-tuned"] >= expected and top1["fine-tuned"] > top1["random"] + 0.2, top1
