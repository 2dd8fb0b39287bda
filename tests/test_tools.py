"""The commands around a run: convert, export + load_classifier, predict, the kNN probe, compare.

One session fixture trains two real runs on scikit-learn's digits with fairseq-hydra-train: a 2-block
student cut from a 6-block checkpoint by model.depth, and a 4-block one from `convert --depth 4`.
"""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from d2v_plugin.cli import compare as compare_cli
from d2v_plugin.cli import convert as convert_cli
from d2v_plugin.cli import evaluate as evaluate_cli
from d2v_plugin.cli import export as export_cli
from d2v_plugin.cli import knn as knn_cli
from d2v_plugin.cli import predict as predict_cli
from d2v_plugin.data import index_split
from d2v_plugin.inference import load_classifier

pytestmark = pytest.mark.slow


def test_convert_depth_4_keeps_the_sources_first_four_blocks(runs):
    src = torch.load(runs["init"], weights_only=True)["model"]
    out = torch.load(runs["student"], weights_only=True)
    assert set(out) == {"format", "arch", "encoder", "source"}  # weights + architecture, nothing else
    enc = out["encoder"]
    assert out["arch"]["depth"] == 4 and not any(k.startswith("blocks.4.") for k in enc)
    pre = "modality_encoders.IMAGE."
    assert torch.equal(enc["blocks.0.attn.qkv.weight"], src[pre + "context_encoder.blocks.0.attn.qkv.weight"])
    assert torch.equal(enc["blocks.1.norm2.bias"], src[pre + "context_encoder.blocks.1.norm2.bias"])
    assert torch.equal(enc["blocks.2.mlp.fc1.weight"], src["blocks.0.mlp.fc1.weight"])
    assert torch.equal(enc["blocks.3.mlp.fc2.bias"], src["blocks.1.mlp.fc2.bias"])
    assert torch.equal(enc["norm_pre.weight"], src[pre + "context_encoder.norm.weight"])
    assert torch.equal(enc["cls_token"], src[pre + "extra_tokens"])
    assert torch.equal(enc["patch_embed.proj.weight"], src[pre + "local_encoder.proj.weight"])
    n = sum(v.numel() for k, v in enc.items() if k != "pos_embed")
    assert f"{n:,} parameters" in runs["convert_stdout"] and "MiB" in runs["convert_stdout"]
    # and it fine-tuned through fairseq-hydra-train as it is (the depth4 run started from it)
    assert (runs["depth4"] / "checkpoint_best.pt").exists()


def trainer_model(checkpoint):
    from fairseq import checkpoint_utils

    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)])
    return models[0].eval()


def val_batch(runs, n=16):
    model = load_classifier(runs["depth4"] / "checkpoint_best.pt")
    index = index_split(str(runs["data"]), "val", classes=model.classes, cache_dir=str(runs["cache"]))
    paths = [os.path.join(index.split_dir, f) for f in index.files[:: len(index) // n][:n]]
    from d2v_plugin.data import load_rgb
    return paths, torch.stack([model.preprocess(load_rgb(p)) for p in paths])


def test_export_round_trip_gives_the_trainers_logits(runs, tmp_path):
    ckpt = runs["depth4"] / "checkpoint_best.pt"
    assert export_cli.main([str(ckpt), "--out", str(tmp_path / "export")]) == 0
    assert {"model.safetensors", "config.json"} <= set(os.listdir(tmp_path / "export"))
    meta = json.loads((tmp_path / "export" / "config.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)] and meta["image_size"] == 16
    assert meta["architecture"]["depth"] == 4 and meta["pooling"] == "mean" and meta["mean"] == [0.485, 0.456, 0.406]
    loaded = load_classifier(tmp_path / "export")
    assert not loaded.training
    _, images = val_batch(runs)
    with torch.no_grad():
        expected = trainer_model(ckpt)(images)
        got = loaded(images)
    assert (got - expected).abs().max().item() < 1e-6
    # the recorded interpolation is the one the loaded model preprocesses with
    assert meta["interpolation"] == "bicubic" == loaded.data_cfg.interpolation
    (tmp_path / "export" / "config.json").write_text(json.dumps({**meta, "interpolation": "bilinear"}))
    bilinear = load_classifier(tmp_path / "export")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    assert bilinear.data_cfg.interpolation == "bilinear"
    assert not torch.equal(bilinear.preprocess(photo), loaded.preprocess(photo))


def test_predict_agrees_with_the_logits(runs, tmp_path, capsys):
    ckpt = runs["depth4"] / "checkpoint_best.pt"
    paths, images = val_batch(runs, n=4)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    code = predict_cli.main([str(ckpt), paths[0], str(tmp_path / "broken.jpg"), *paths[1:], "--topk", "3"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert code == 1 and len(lines) == 5
    assert lines[1]["image"].endswith("broken.jpg") and "error" in lines[1]
    good = [lines[0]] + lines[2:]
    with torch.no_grad():
        probs = trainer_model(ckpt)(images).softmax(-1)
    for record, p in zip(good, probs):
        top = p.topk(3)
        assert [r["index"] for r in record["top"]] == top.indices.tolist()
        assert [r["class"] for r in record["top"]] == [str(i) for i in top.indices.tolist()]
        assert [r["prob"] for r in record["top"]] == pytest.approx(top.values.tolist(), abs=1e-6)


def brute_force_knn_top1(train_f, train_y, val_f, val_y, k, t, num_classes):
    correct = 0
    for q, y in zip(val_f.tolist(), val_y.tolist()):
        sims = [sum(a * b for a, b in zip(q, x)) for x in train_f.tolist()]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in nearest:
            votes[int(train_y[i])] += float(np.exp(sims[i] / t))
        correct += int(max(range(num_classes), key=lambda c: votes[c]) == y)
    return correct / len(val_y)


def test_knn_separates_trained_from_random_and_matches_brute_force(runs, capsys, tmp_path):
    from d2v_plugin.evaluation.knn import knn_probe
    from d2v_plugin.evaluation.probes import cached_features
    from d2v_plugin.evaluation.runtime import start

    results = {}
    for name, ckpt in (("random init", runs["init"]), ("fine-tuned", runs["depth4"] / "checkpoint_best.pt")):
        assert knn_cli.main([str(ckpt), "--data", str(runs["data"]), "--k", "10", "--cache",
                             str(tmp_path / "feats")]) == 0
        results[name] = json.loads(capsys.readouterr().out.strip())
    with capsys.disabled():
        print(f"\nkNN probe on digits (k=10): random init top-1 {results['random init']['top1']:.3f}, "
              f"fine-tuned top-1 {results['fine-tuned']['top1']:.3f}")
    assert results["fine-tuned"]["n"] == 360 and results["fine-tuned"]["n_train"] == 1437
    assert results["fine-tuned"]["top1"] > results["random init"]["top1"] + 0.1
    # the probe's top-1 equals a brute-force computation on the same features
    runtime = start("cpu")
    feats = cached_features(str(runs["depth4"] / "checkpoint_best.pt"), str(runs["data"]), ["train", "val"], runtime,
                            store=str(tmp_path / "feats"), index_cache=str(runs["cache"]))
    train, val = feats.splits["train"], feats.splits["val"]
    tf, vf = (torch.nn.functional.normalize(torch.from_numpy(np.array(s.view([0])[:])).float(), dim=-1)
              for s in (train, val))
    expected = brute_force_knn_top1(tf, train.labels, vf[:60], val.labels[:60], 10, 0.07, 10)
    got = knn_probe(train.view([0]), train.labels, torch.from_numpy(np.array(val.view([0])[:60])), val.labels[:60],
                    10, [10], 0.07, runtime)[0]["top1"]
    assert got == pytest.approx(expected)


def test_knn_features_are_reused_from_the_store(runs, tmp_path, capsys, monkeypatch):
    from d2v_plugin.evaluation import features

    args = [str(runs["init"]), "--data", str(runs["data"]), "--k", "5", "--cache", str(tmp_path / "feats")]
    assert knn_cli.main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert len(os.listdir(tmp_path / "feats")) == 2  # train and val features
    monkeypatch.setattr(features, "compute_entries", lambda *a, **k: pytest.fail("features recomputed"))
    assert knn_cli.main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["top1"] == first["top1"] and again["extract_s"] == 0.0


def log_lines(run_dir):
    """Independent read of fairseq's simple-format log: (epoch, accuracy) per validation, and updates."""
    text = (run_dir / "hydra" / "hydra_train.log").read_text()
    valid = [(int(e), float(a)) for e, a in
             re.findall(r"epoch (\d+) \| valid on 'val' subset \|.*? accuracy ([\d.]+)", text)]
    updates = [int(m) for m in re.findall(r"num_updates[ =](\d+)", text)]
    return valid, updates


def vit_flops(width, depth, tokens, patch, classes, in_chans=3):
    """FLOPs of one image through the model, from its shapes (2 per multiply-add): the patch embedding,
    per block qkv + projection + MLP (12 d^2 per token) and the two attention products (2 t^2 d), the head."""
    patches = tokens - 1
    block = 2 * (12 * tokens * width * width + 2 * tokens * tokens * width)
    return 2 * in_chans * patch * patch * width * patches + depth * block + 2 * width * classes


def test_compare_two_runs_writes_plots_and_a_report_matching_the_logs(runs, tmp_path):
    out = tmp_path / "report"
    assert compare_cli.main([str(runs["depth2"]), str(runs["depth4"]), "--out", str(out),
                             "--labels", "depth 2", "depth 4"]) == 0
    for name in ("top1_vs_time.png", "val_top1.png", "train_loss.png", "lr.png"):
        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            assert img.size[0] > 100 and len(img.convert("RGB").getcolors(1 << 20)) > 10  # not blank
    report = (out / "report.md").read_text()
    assert "against the largest model, **depth 4**" in report
    kinds = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in report.splitlines()
             if line.startswith("| depth") and line.count("|") > 10}
    assert kinds == {"depth 2": "fine-tune", "depth 4": "fine-tune"}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:-1]]
            for line in report.splitlines() if line.startswith("| depth") and line.count("|") > 10}
    for label, run, depth in (("depth 2", runs["depth2"], 2), ("depth 4", runs["depth4"], 4)):
        valid, updates = log_lines(run)
        best_epoch, best = max(valid, key=lambda v: v[1])
        row = rows[label]
        assert float(row[6]) == pytest.approx(best, abs=1e-3) and int(row[9]) == best_epoch
        assert int(row[12].replace(",", "")) == max(updates) == 270
        assert int(row[8].replace(",", "")) == 45 * best_epoch  # 45 updates per epoch: validated at its end
        # encoder parameters counted from the checkpoint's tensors (the fixed positions are not trained)
        saved = torch.load(run / "checkpoint_best.pt", weights_only=True)["model"]
        expected = sum(v.numel() for k, v in saved.items() if k.startswith("encoder.") and k != "encoder.pos_embed")
        assert int(row[0].replace(",", "")) == expected
        # GFLOPs per image against a count from the shapes: 16 px, patch 4 -> 16 patches + CLS, 64 wide, 10 classes
        assert float(row[2]) == pytest.approx(vit_flops(64, depth, 17, 4, 10) / 1e9, rel=1e-3)
        assert float(row[4].split()[0]) > 0 and "–" in row[4] and float(row[13]) > 0 and float(row[14]) > 0
    assert rows["depth 4"][1] == "1.00" and rows["depth 4"][7] == "+0.000"
    p2, p4 = (int(rows[k][0].replace(",", "")) for k in ("depth 2", "depth 4"))
    assert p4 - p2 == 2 * (12 * 64 * 64 + 13 * 64)  # two more 64-wide blocks, each 12d^2 + 13d
    assert float(rows["depth 2"][1]) == pytest.approx(p2 / p4, abs=0.005)


def error_line(capsys):
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("command,args,expected", [
    (convert_cli, ["{missing}", "--out", "{tmp}/x.pt"], "checkpoint not found"),
    (convert_cli, ["{text}", "--out", "{tmp}/x.pt"], "is not a PyTorch checkpoint"),
    (export_cli, ["{missing}", "--out", "{tmp}/e"], "checkpoint not found"),
    (export_cli, ["{init}", "--out", "{tmp}/e"], "no classifier head"),
    (predict_cli, ["{init}", "{image}"], "no classifier head"),
    (predict_cli, ["{text}", "{image}"], "is not a PyTorch checkpoint"),
    (evaluate_cli, ["{missing}", "--data", "{data}"], "checkpoint not found"),
    (evaluate_cli, ["{best}", "--data", "{tmp}/nodata"], "split folder not found"),
    (knn_cli, ["{missing}", "--data", "{data}"], "checkpoint not found"),
    (knn_cli, ["{text}", "--data", "{data}"], "is not a PyTorch checkpoint"),
    (compare_cli, ["{tmp}/empty_run", "--out", "{tmp}/r"], "no fairseq training log found"),
    (compare_cli, ["{tmp}/no_such_run", "--out", "{tmp}/r"], "run folder not found"),
])
def test_bad_inputs_end_with_one_clear_error_line(runs, tmp_path, capsys, command, args, expected):
    (tmp_path / "notes.txt").write_text("just text")
    (tmp_path / "empty_run").mkdir()
    values = {"missing": tmp_path / "missing.pt", "text": tmp_path / "notes.txt", "tmp": tmp_path,
              "init": runs["init"], "data": runs["data"], "best": runs["depth4"] / "checkpoint_best.pt",
              "image": next((runs["data"] / "val" / "3").iterdir())}
    with pytest.raises(SystemExit) as exit_info:
        command.main([a.format(**values) for a in args])
    assert exit_info.value.code not in (0, None)
    assert expected in error_line(capsys)


def test_bf16_on_the_cpu_agrees_with_fp32(runs, tmp_path):
    from d2v_plugin.data.containers import open_split
    from d2v_plugin.evaluation.knn import nearest
    from d2v_plugin.evaluation.loop import evaluate
    from d2v_plugin.evaluation.probes import cached_features
    from d2v_plugin.evaluation.runtime import start

    model = load_classifier(runs["depth4"] / "checkpoint_best.pt")
    index = open_split(str(runs["data"]), "val", classes=model.classes, cache_dir=str(runs["cache"]))
    top1 = {p: evaluate(model, index, start("cpu", p), workers=2)["top1"] for p in ("fp32", "bf16")}
    assert abs(top1["bf16"] - top1["fp32"]) <= 0.005, top1  # within half a point on the 360 digits
    neighbours = {}
    for precision in ("fp32", "bf16"):
        runtime = start("cpu", precision)
        feats = cached_features(str(runs["depth4"] / "checkpoint_best.pt"), str(runs["data"]), ["train", "val"],
                                runtime, store=str(tmp_path / "f"), index_cache=str(runs["cache"]))
        train, val = feats.splits["train"], feats.splits["val"]
        neighbours[precision] = nearest(train.view([0]), train.labels, torch.from_numpy(np.array(val.view([0])[:])),
                                        10, runtime).index
    same = (neighbours["fp32"][:, 0] == neighbours["bf16"][:, 0]).float().mean().item()
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(*neighbours.values())])
    assert same >= 0.8 and overlap >= 0.8, (same, overlap)  # mostly the same neighbours, mostly the nearest too


def test_the_linear_probe_ranks_the_fine_tuned_encoder_above_a_random_one_and_sweeps_every_block(runs, tmp_path,
                                                                                                  capsys):
    from d2v_plugin.cli import probe as probe_cli

    top1 = {}
    for name, ckpt in (("random", runs["init"]), ("fine-tuned", runs["depth4"] / "checkpoint_best.pt")):
        assert probe_cli.main([str(ckpt), "--data", str(runs["data"]), "--probes", "linear,fewshot", "--epochs", "10", "--probe-batch-size", "64",
                               "--shots", "5", "--seeds", "0", "1", "--cache", str(tmp_path / "f"), "--workers",
                               "2"]) == 0
        lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
        assert [r["probe"] for r in lines] == ["linear", "fewshot"] and lines[0]["selected_on"].startswith("held-out")
        assert all(r["probe_s"] > 0 and r["extract_s"] >= 0 for r in lines)
        top1[name] = lines[0]["top1"]
    with capsys.disabled():
        print(f"\nlinear probe on digits: random init top-1 {top1['random']:.3f}, fine-tuned {top1['fine-tuned']:.3f}")
    # (the session's short fine-tuning reaches 56% itself; its features probe at ~66%, a random encoder's at ~56%)
    assert top1["fine-tuned"] >= 0.6 and top1["fine-tuned"] > top1["random"] + 0.05
    assert probe_cli.main([str(runs["depth4"] / "checkpoint_best.pt"), "--data", str(runs["data"]), "--probes",
                           "knn,linear", "--k", "10", "--epochs", "2", "--sweep-blocks", "--cache",
                           str(tmp_path / "f"), "--workers", "2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [(r["block"], r["probe"]) for r in lines] == [(b, p) for b in (1, 2, 3, 4) for p in ("knn", "linear")]


def test_compare_shows_the_probes_and_evaluations_written_beside_a_run(runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "depth4"
    shutil.copytree(runs["depth4"], run)
    best = str(run / "checkpoint_best.pt")
    assert evaluate_cli.main([best, "--data", str(runs["data"]), "--out", str(run / "eval_val.jsonl")]) == 0
    assert knn_cli.main([best, "--data", str(runs["data"]), "--k", "10", "--cache", str(tmp_path / "f"), "--out",
                         str(run / "knn.jsonl")]) == 0
    capsys.readouterr()
    evaluated = json.loads((run / "eval_val.jsonl").read_text())
    assert evaluated["command"] == "evaluate" and evaluated["settings"]["checkpoint"] == best  # with its settings
    knn = json.loads((run / "knn.jsonl").read_text())
    assert compare_cli.main([str(run), "--out", str(tmp_path / "report"), "--no-speed"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in report.split("## Probes and other sets")[1].splitlines() if line.startswith("| depth4"))
    assert f"{evaluated['top1']:.4f}" in row and f"{knn['top1']:.4f}" in row
