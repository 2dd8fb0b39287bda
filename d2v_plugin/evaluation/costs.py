"""What a model costs: its encoder's parameters, FLOPs per image, and inference speed measured as ``make bench``
measures it (interleaved rounds, so drift hits every model alike)."""
from __future__ import annotations

import statistics
import time


def flops_per_image(model) -> int:
    """FLOPs of one forward pass of one image (2 per multiply-add), torch's own flop counter. Attention
    is counted through its math kernel: the counter has no formula for the CPU's fused kernel, and
    would leave attention out on the CPU only."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    size = model.data_cfg.image_size
    images = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops()


def inference_speeds(models: dict, runtime, batch_size: int = 64, rounds: int = 5, batches: int = 3) -> dict:
    """Images/s of each model's forward pass at ``batch_size`` on the runtime's device and precision,
    measured as ``make bench`` measures: one warm-up batch each, then ``rounds`` rounds in which every model
    runs ``batches`` batches, the order rotated each round (so drift hits all alike); label -> {median,
    min, max} over the rounds."""
    import torch

    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    inputs = {}
    for label, model in models.items():
        size = model.data_cfg.image_size
        inputs[label] = torch.randn(batch_size, 3, size, size, device=runtime.device)
        models[label] = model.to(runtime.device).eval()
    rates = {label: [] for label in models}
    labels = list(models)
    with torch.no_grad(), runtime.autocast():
        for label in labels:
            models[label](inputs[label])  # warm-up
        for r in range(rounds):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                sync()
                start = time.perf_counter()
                for _ in range(batches):
                    models[label](inputs[label])
                sync()
                rates[label].append(batch_size * batches / (time.perf_counter() - start))
    return {label: {"median": statistics.median(v), "min": min(v), "max": max(v)} for label, v in rates.items()}


def run_kind(ckpt) -> str:
    """What a checkpoint holds: a fine-tuned classifier, a probe of a frozen encoder (linear / attentive), or no
    classifier at all (a pretraining checkpoint, a student, an init)."""
    if ckpt.head is None:
        return "encoder"
    if not ckpt.model_cfg.get("freeze_encoder"):
        return "fine-tune"
    return "attentive probe" if ckpt.model_cfg.get("head") == "attentive" else "linear probe"


def model_costs(path: str | None) -> tuple[dict, object]:
    """(what the checkpoint at ``path`` holds, encoder parameters and GFLOPs per image of its model: the
    encoder alone without a head; the model), or Nones."""
    from d2v_plugin.inference import classifier_from_checkpoint, load_encoder
    from d2v_plugin.models.checkpoints import read_checkpoint

    if path is None:
        return {"kind": None, "encoder_params": None, "gflops": None}, None
    ckpt = read_checkpoint(path)
    kind = run_kind(ckpt)
    if ckpt.head is None:
        model, data_cfg, _ = load_encoder(path)
        model.data_cfg = data_cfg
        encoder = model
    else:
        model = classifier_from_checkpoint(ckpt)
        encoder = model.encoder
    return {"kind": kind, "encoder_params": sum(p.numel() for p in encoder.parameters()),
            "gflops": flops_per_image(model) / 1e9}, model
