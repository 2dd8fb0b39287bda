"""The commands around a run: convert, export + load_classifier, predict, the kNN probe, compare.

One session fixture trains two real runs on scikit-learn's digits with fairseq-hydra-train: a 2-block
student cut from a 6-block checkpoint by model.depth, and a 4-block one from `convert --depth 4`.
"""
import hashlib
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
from d2v_plugin.cli import preresize as preresize_cli
from d2v_plugin.data import index_split
from d2v_plugin.inference import load_classifier

from conftest import REPO

pytestmark = pytest.mark.slow


def test_convert_depth_4_keeps_the_sources_first_four_blocks(runs):
    src = torch.load(runs["init"], weights_only=True)["model"]
    out = torch.load(runs["student"], weights_only=True)
    assert set(out) == {"format", "arch", "encoder", "source", "weights"}  # weights + architecture, nothing else
    assert out["weights"] == "student"  # (the student of the file: --weights ema takes a pretraining file's teacher)
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
    rows = {r["model"]: r for r in markdown_table(report, "| model | kind |")}
    assert {label: r["kind"] for label, r in rows.items()} == {"depth 2": "fine-tune", "depth 4": "fine-tune"}
    for label, run, depth in (("depth 2", runs["depth2"], 2), ("depth 4", runs["depth4"], 4)):
        valid, updates = log_lines(run)
        best_epoch, best = max(valid, key=lambda v: v[1])
        row = rows[label]
        assert float(row["best top-1 (%)"]) == pytest.approx(best, abs=1e-3) and int(row["epoch"]) == best_epoch
        lo, hi = (float(x) for x in row["95% interval"].split(" (")[0].split("–"))
        assert lo < best < hi and "(n 360)" in row["95% interval"]  # the run's validation n, from its log
        assert int(row["updates"].replace(",", "")) == max(updates) == 270
        assert int(row["at update"].replace(",", "")) == 45 * best_epoch  # 45 updates per epoch: validated at its end
        sha = hashlib.sha256((run / "checkpoint_best.pt").read_bytes()).hexdigest()
        assert row["checkpoint measured"] == f"checkpoint_best.pt {sha[:8]}"  # the number names what it measured
        # encoder parameters counted from the checkpoint's tensors (the fixed positions are not trained)
        saved = torch.load(run / "checkpoint_best.pt", weights_only=True)["model"]
        expected = sum(v.numel() for k, v in saved.items() if k.startswith("encoder.") and k != "encoder.pos_embed")
        assert int(row["encoder params"].replace(",", "")) == expected
        # GFLOPs per image against a count from the shapes: 16 px, patch 4 -> 16 patches + CLS, 64 wide, 10 classes
        assert float(row["GFLOPs/image"]) == pytest.approx(vit_flops(64, depth, 17, 4, 10) / 1e9, rel=1e-3)
        assert float(row["inference images/s"].split()[0]) > 0 and "–" in row["inference images/s"]
        assert float(row["training time (h)"]) > 0 and float(row["training images/s"]) > 0
    assert rows["depth 4"]["x params"] == "1.00" and rows["depth 4"]["top-1 vs reference"] == "+0.000"
    p2, p4 = (int(rows[k]["encoder params"].replace(",", "")) for k in ("depth 2", "depth 4"))
    assert p4 - p2 == 2 * (12 * 64 * 64 + 13 * 64)  # two more 64-wide blocks, each 12d^2 + 13d
    assert float(rows["depth 2"]["x params"]) == pytest.approx(p2 / p4, abs=0.005)


def markdown_table(report: str, header_start: str) -> list[dict]:
    """The rows of the Markdown table whose header starts with ``header_start``, as dicts by column."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    names = [c.strip() for c in lines[start].split("|")[1:-1]]
    out = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        out.append(dict(zip(names, (c.strip() for c in line.split("|")[1:-1]))))
    return out


def error_line(capsys):
    # progress bars (tqdm redraws with carriage returns) are not messages; everything else on stderr is
    lines = [line.rsplit("\r", 1)[-1] for line in capsys.readouterr().err.strip().splitlines()]
    err = [line for line in lines if line.strip() and not re.search(r"\|\s*\d+/\d+ \[", line)]
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
    (evaluate_cli, ["{best}", "--data", "{tmp}/nodata"], "nodata not found"),
    (knn_cli, ["{missing}", "--data", "{data}"], "checkpoint not found"),
    (knn_cli, ["{text}", "--data", "{data}"], "is not a PyTorch checkpoint"),
    (compare_cli, ["{tmp}/empty_run", "--out", "{tmp}/r"], "no fairseq training log found"),
    (compare_cli, ["{tmp}/no_such_run", "--out", "{tmp}/r"], "run folder not found"),
    # a file that is not a checkpoint is said to be so, with or without the flag to trust it (no hint to trust it)
    (evaluate_cli, ["{readme}", "--data", "{data}"], "is not a PyTorch checkpoint"),
    (evaluate_cli, ["{random}", "--data", "{data}"], "is not a PyTorch checkpoint"),
    (evaluate_cli, ["{readme}", "--data", "{data}", "--trust-checkpoint"], "is not a PyTorch checkpoint"),
    (knn_cli, ["{random}", "--data", "{data}", "--trust-checkpoint"], "is not a PyTorch checkpoint"),
    # the messages name the command's flags, not the settings of a training run
    (convert_cli, ["{init}", "--out", "{tmp}/x.pt", "--depth", "99"], "--depth=99 but the checkpoint has 6 blocks"),
    (evaluate_cli, ["{best}", "--data", "{data}", "--data-format", "parquet"], "(--data-format=parquet)"),
    (compare_cli, ["{tmp}/unrelated", "--out", "{tmp}/r"], "unrelated: no fairseq training log found"),
    # a split whose every image is unreadable: not {"top1": 0.0, "n": 0} and exit status 0
    (evaluate_cli, ["{best}", "--data", "{tmp}/allbad"], "could be read or scored: nothing was evaluated"),
])
def test_bad_inputs_end_with_one_clear_error_line(runs, tmp_path, capsys, command, args, expected):
    (tmp_path / "notes.txt").write_text("just text")
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "unrelated" / "sub").mkdir(parents=True)
    (tmp_path / "unrelated" / "notes.md").write_text("a folder holding no run")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(100))
    (tmp_path / "allbad" / "val" / "3").mkdir(parents=True)
    (tmp_path / "allbad" / "val" / "3" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    values = {"missing": tmp_path / "missing.pt", "text": tmp_path / "notes.txt", "tmp": tmp_path,
              "init": runs["init"], "data": runs["data"], "best": runs["depth4"] / "checkpoint_best.pt",
              "image": next((runs["data"] / "val" / "3").iterdir()), "readme": os.path.join(REPO, "README.md"),
              "random": tmp_path / "random.pt"}
    with pytest.raises(SystemExit) as exit_info:
        command.main([a.format(**values) for a in args])
    assert exit_info.value.code not in (0, None)
    line = error_line(capsys)
    assert expected in line
    assert "trust" not in line.replace("--trust-checkpoint", "")  # no steer toward unpickling a file that is not one
    assert "model.depth" not in line and "task.data_format" not in line


@pytest.mark.parametrize("command,args,flag", [
    (evaluate_cli, ["--batch-size", "0"], "--batch-size"),
    (evaluate_cli, ["--crop-ratio", "0"], "--crop-ratio"),
    (evaluate_cli, ["--crop-ratio", "1.5"], "--crop-ratio"),
    (evaluate_cli, ["--crop-ratio", "nan"], "--crop-ratio"),
    (evaluate_cli, ["--workers", "-1"], "--workers"),
    (predict_cli, ["--topk", "0"], "--topk"),
    (predict_cli, ["--limit", "0"], "--limit"),
    (knn_cli, ["--k", "0"], "--k"),
    (knn_cli, ["--temperature", "0"], "--temperature"),
    (convert_cli, ["--out", "x.pt", "--depth", "0"], "--depth"),
    (preresize_cli, ["--out", "x", "--quality", "96"], "--quality"),
    (preresize_cli, ["--out", "x", "--short-side", "0"], "--short-side"),
])
def test_arguments_are_checked_before_anything_is_loaded(tmp_path, capsys, monkeypatch, command, args, flag):
    """A checkpoint that does not exist: the answer is about the flag, so it came before any loading."""
    import d2v_plugin.cli.common as common

    monkeypatch.setattr(common, "load_heavy", lambda: pytest.fail("loaded before the arguments were checked"))
    monkeypatch.setattr(command, "load_heavy", lambda: pytest.fail("loaded before the arguments were checked"),
                        raising=False)
    data = [] if command in (convert_cli, preresize_cli) else ["--data", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        command.main([str(tmp_path / "missing.pt"), *data, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}" in err, err


@pytest.mark.parametrize("name", ["evaluate", "export", "predict", "knn", "convert", "compare", "preresize", "where",
                                  "pack", "probe", "track", "recipe", "similarity"])
def test_every_option_has_help_and_a_shown_default(name, monkeypatch):
    import argparse
    import importlib

    parsers = []

    def caught(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", caught)
    with pytest.raises(SystemExit):
        importlib.import_module(f"d2v_plugin.cli.{name}").main([])
    parser = parsers[-1]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        shown = formatter._get_help_string(action)
        assert action.help and len(action.help.split()) >= 2, f"{name} {action.dest}: no help"
        assert "(default: None)" not in shown and "(default: False)" not in shown, f"{name} {action.dest}: {shown}"
        if action.option_strings and not action.required and action.nargs != 0:
            assert "default" in shown, f"{name} {action.dest}: no default shown: {shown}"


def test_knn_takes_an_export_folder_as_evaluate_does(runs, tmp_path, capsys):
    best = runs["depth4"] / "checkpoint_best.pt"
    assert export_cli.main([str(best), "--out", str(tmp_path / "exported")]) == 0
    capsys.readouterr()
    answers = {}
    for name, source in (("checkpoint", best), ("export", tmp_path / "exported")):
        assert knn_cli.main([str(source), "--data", str(runs["data"]), "--k", "10", "--cache", "none"]) == 0
        answers[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answers["export"]["top1"] == answers["checkpoint"]["top1"] and answers["export"]["n"] == 360
    assert answers["export"]["features_in"] is None  # the temporary store is gone: not pointed at


def test_a_k_above_the_train_set_is_said_and_the_k_used_recorded(caplog):
    from d2v_plugin.evaluation.knn import knn_probe
    from d2v_plugin.evaluation.runtime import start

    g = torch.Generator().manual_seed(0)
    train, queries = torch.randn(30, 8, generator=g), torch.randn(6, 8, generator=g)
    labels, query_labels = np.arange(30) % 3, np.arange(6) % 3
    results = knn_probe(train, labels, queries, query_labels, 3, [10, 5000], 0.07, start("cpu"))
    assert [(r["k"], r["k_asked"]) for r in results] == [(10, 10), (30, 5000)]


def test_predict_with_no_classes_to_list_is_refused(runs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main([str(runs["depth4"] / "checkpoint_best.pt"), "x.png", "--topk", "0"])
    assert exit_info.value.code == 2 and "argument --topk: 0 is not at least 1" in capsys.readouterr().err


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


def sklearn_logistic_top1(train_x, train_y, val_x, val_y, held_out: float = 0.1) -> float:
    """scikit-learn's logistic regression on standardised features (the probe's BatchNorm standardises too), its
    C chosen on the same held-out part of train as the probe chooses its head on: the convex problem solved."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from d2v_plugin.evaluation.linear import held_out_split

    fit, held = held_out_split(train_y, held_out, 0)
    scaler = StandardScaler().fit(train_x[fit])
    # the C path solved in order, each fit starting from the last one's solution (warm_start: the same optimum,
    # the problem is strictly convex, in fewer iterations)
    model, scores = LogisticRegression(max_iter=5000, warm_start=True), {}
    for c in (0.01, 0.1, 1.0, 10.0, 100.0):
        model.set_params(C=c).fit(scaler.transform(train_x[fit]), train_y[fit])
        scores[c] = (model.predict(scaler.transform(train_x[held])) == train_y[held]).mean()
    best = max(scores, key=scores.get)
    scaler = StandardScaler().fit(train_x)
    model.set_params(C=best).fit(scaler.transform(train_x), train_y)  # all of train, from the path's last solution
    return float((model.predict(scaler.transform(val_x)) == val_y).mean())


def test_the_linear_probe_with_its_defaults_converges_on_the_digits_and_sweeps_every_block(runs, tmp_path, capsys):
    """Its schedule used to be 10 epochs: 20 steps on the demo's digits (the demo's random encoder probed at 0.29,
    below its own few-shot and kNN). With DINOv2's 12,500 steps it reaches what a convex solver reaches on the
    same features: the demo's random init (its 32 px digits, its 128-wide encoder) and a fine-tuned encoder."""
    from d2v_plugin.cli import probe as probe_cli
    from d2v_plugin.demo_data import write_digits
    from d2v_plugin.evaluation.probes import cached_features
    from d2v_plugin.evaluation.runtime import start
    from d2v_plugin.models.encoder import Data2Vec2ImageEncoder, EncoderConfig
    from d2v_plugin.testing.checkpoints import save_data2vec_checkpoint

    demo = tmp_path / "demo"
    write_digits(str(demo / "data"))
    torch.manual_seed(0)  # scripts/demo.py's init
    save_data2vec_checkpoint(Data2Vec2ImageEncoder(EncoderConfig(embed_dim=128, depth=4, num_heads=4, patch_size=4,
                                                                 image_size=32)), str(demo / "init.pt"), prenet_depth=2)
    top1 = {}
    for name, ckpt, data in (("random init", demo / "init.pt", demo / "data"),
                             ("fine-tuned", runs["depth4"] / "checkpoint_best.pt", runs["data"])):
        assert probe_cli.main([str(ckpt), "--data", str(data), "--probes", "linear", "--cache", str(tmp_path / "f"),
                               "--workers", "2"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["selected_on"].startswith("held-out") and result["steps"] == 12_500
        feats = cached_features(str(ckpt), str(data), ["train", "val"], start("cpu"), store=str(tmp_path / "f"))
        train, val = feats.splits["train"], feats.splits["val"]
        theirs = sklearn_logistic_top1(np.asarray(train.view([0])[:], np.float64), train.labels,
                                       np.asarray(val.view([0])[:], np.float64), val.labels)
        top1[name] = (result["top1"], round(theirs, 4))
        assert abs(result["top1"] - theirs) <= 0.03, (name, result["top1"], theirs)
    with capsys.disabled():
        print(f"\nlinear probe with its defaults (ours, scikit-learn's): {top1}")
    # the sweep: every probe on every block (few-shot was dropped without a word), each line naming its own
    # block's features (every line said mean@1+mean@2+mean@3+mean@4), then each probe's best block
    assert probe_cli.main([str(runs["depth4"] / "checkpoint_best.pt"), "--data", str(runs["data"]), "--probes",
                           "knn,linear,fewshot", "--k", "10", "--epochs", "2", "--min-steps", "0", "--shots", "2",
                           "--seeds", "0", "--sweep-blocks", "--cache", str(tmp_path / "f"), "--workers", "2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    sweep, summary = lines[:12], lines[12:]
    assert [(r["block"], r["probe"]) for r in sweep] == [(b, p) for b in (1, 2, 3, 4)
                                                         for p in ("knn", "linear", "fewshot")]
    assert all(r["features"] == f"mean@{r['block']}" for r in sweep)
    assert [(r["summary"], r["probe"]) for r in summary] == [("best block", p) for p in ("knn", "linear", "fewshot")]
    for r in summary:
        of_probe = [x for x in sweep if x["probe"] == r["probe"]]
        assert r["top1"] == max(x["top1"] for x in of_probe)
        assert r["block"] == next(x["block"] for x in of_probe if x["top1"] == r["top1"])


def test_compare_rows_are_models_each_number_names_its_checkpoint_and_columns_sort_by_number(runs, tmp_path, capsys):
    """A run, the file it was initialised from and a results folder: an init could not be a row; the probe row
    showed checkpoint_last.pt's results beside checkpoint_best.pt's top-1 unnamed; columns sorted as text
    (1-shot, 10-shot, 2-shot; k=10, k=100, k=20); both runs 'the largest' at one size."""
    best, init, other = runs["depth4"] / "checkpoint_best.pt", runs["student"], runs["depth2"] / "checkpoint_best.pt"
    results = tmp_path / "results"
    data = ["--data", str(runs["data"]), "--cache", str(tmp_path / "f"), "--out", str(results)]
    assert evaluate_cli.main([str(best), "--data", str(runs["data"]), "--out", str(results)]) == 0
    assert knn_cli.main([str(best), str(init), str(other), *data, "--k", "10", "100", "20"]) == 0
    from d2v_plugin.cli import probe as probe_cli

    assert probe_cli.main([str(init), *data, "--probes", "fewshot", "--shots", "1", "10", "2", "5", "--seeds", "0"]) == 0
    capsys.readouterr()
    assert compare_cli.main([str(runs["depth4"]), str(init), str(results), "--out", str(tmp_path / "report"),
                             "--no-speed"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    models = markdown_table(report, "| model | kind |")
    assert [m["model"] for m in models] == ["depth4", "student4.pt", "results"]  # the folder: the one other checkpoint
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest()[:8] for p in (best, init, other)}
    assert [m["checkpoint measured"] for m in models] == [f"checkpoint_best.pt {sha[best]}", f"student4.pt {sha[init]}",
                                                          f"checkpoint_best.pt {sha[other]}"]
    table = report.split("## Probes and other sets")[1]
    header = next(line for line in table.splitlines() if line.startswith("| model |"))
    assert [c.strip() for c in header.split("|")[2:-1]] == [
        "val top-1", "kNN k=10 top-1", "kNN k=20 top-1", "kNN k=100 top-1", "1-shot top-1", "2-shot top-1",
        "5-shot top-1", "10-shot top-1"]
    notes = dict(re.findall(r"\[(\d+)\] (\S+ [0-9a-f]{8})", table.split("Checkpoints measured:")[1]))
    cells = markdown_table(table, "| model |")
    for cell, expected in ((cells[0]["val top-1"], best), (cells[0]["kNN k=100 top-1"], best),
                           (cells[1]["kNN k=10 top-1"], init), (cells[1]["10-shot top-1"], init),
                           (cells[2]["kNN k=20 top-1"], other)):
        note = re.search(r"\[(\d+)\]$", cell).group(1)  # every number names the checkpoint it measured
        assert notes[note].endswith(sha[expected]) and re.search(r"\(0\.\d{4}–[01]\.\d{4}\)", cell), cell
    assert cells[2]["val top-1"] == "n/a" and cells[1]["val top-1"] == "n/a"
    assert "tie as the largest" in report.splitlines()[2] or "**depth4**" in report.splitlines()[2]
    # the leaderboard: a row per model, probe and set with its provenance; one whose checkpoint no longer hashes
    # as it did when measured (its recorded hash changed here, as a rewritten file's would) is stale
    knn_file = next(results.glob("knn-*.jsonl"))
    lines = [json.loads(x) for x in knn_file.read_text().splitlines()]
    lines[0]["provenance"]["checkpoint_sha256"] = "0" * 64
    knn_file.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert compare_cli.main([str(results), "--out", str(tmp_path / "report2"), "--no-speed", "--leaderboard",
                             str(tmp_path / "board")]) == 0
    board = markdown_table((tmp_path / "board.md").read_text(), "| model | measure |")
    # best: val + 2 k (its k=10 line now names another hash: a row of its own); init: 3 k + 4 shots; other: 3 k
    assert len(board) == 3 + 1 + 7 + 3 and {b["measure"] for b in board} >= {"kNN k=100 top-1", "10-shot top-1"}
    stale = [b for b in board if b["stale"]]
    assert len(stale) == 1 and "the checkpoint changed" in stale[0]["stale"]
    import csv

    with open(tmp_path / "board.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(board) and all(r["index_digest"] and r["command"] for r in rows)


def test_compare_measures_speed_interleaved_so_drift_hits_every_model_alike(monkeypatch):
    """On a machine that slows down as it runs (heat, other jobs), two identical models measured one after
    the other read as different speeds; rotated rounds give them the same median."""
    from types import SimpleNamespace

    from d2v_plugin.evaluation.runtime import start

    clock = SimpleNamespace(now=0.0, calls=[])

    class Identical(torch.nn.Module):
        data_cfg = SimpleNamespace(image_size=4)

        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            clock.calls.append(self.name)
            clock.now += 1.0 + 0.05 * len(clock.calls)  # every call slower than the last: 2x by the last one
            return x

    from d2v_plugin.evaluation import costs

    monkeypatch.setattr(costs.time, "perf_counter", lambda: clock.now)
    speeds = costs.inference_speeds({"a": Identical("a"), "b": Identical("b"), "c": Identical("c")},
                                          start("cpu"), batch_size=2, rounds=6, batches=1)
    # one warm-up each, then every model once a round, the order rotated
    assert clock.calls[:3] == ["a", "b", "c"]
    assert clock.calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"] * 2
    medians = [speeds[m]["median"] for m in "abc"]
    assert max(medians) / min(medians) < 1.05, speeds  # one after the other: 1.4x apart
    assert all(speeds[m]["min"] < speeds[m]["median"] < speeds[m]["max"] for m in "abc")  # the spread is kept


def test_compare_reads_only_what_it_can_and_names_every_file_and_line_it_skips(tmp_path, capsys):
    """A FIFO named *.log hung it, a link to /dev/zero took 6.9 GB, crafted values (accuracy 'abc', updates
    Infinity, a 40 MB top1, a kNN record without k) ended in tracebacks, and one bad file stopped the report."""
    run = tmp_path / "run"
    (run / "hydra").mkdir(parents=True)
    good = ['[2026-12-01 10:00:00,000][valid][INFO] - {"epoch": 1, "valid_accuracy": "50.0", "valid_n": "360", '
            '"valid_num_updates": "10"}',
            '[2026-12-01 10:00:01,000][valid][INFO] - {"epoch": 2, "valid_accuracy": "abc", "valid_num_updates": "20"}',
            '[2026-12-01 10:00:02,000][valid][INFO] - {"epoch": 3, "valid_accuracy": null, "valid_num_updates": "30"}',
            '[2026-12-01 10:00:03,000][train][INFO] - {"epoch": 3, "train_num_updates": Infinity, "train_wall": "5"}']
    (run / "hydra" / "train.log").write_text("\n".join(good) + "\n")
    os.mkfifo(run / "stuck.log")
    os.symlink("/dev/zero", run / "zero.log")
    os.mkfifo(run / "stuck.jsonl")
    os.symlink("/dev/zero", run / "zero.jsonl")
    lines = ['{"command": "knn", "probe": "knn", "top1": 0.5, "n": 10}', '{"command": "evaluate", "top1": "abc"}',
             '{"command": "evaluate", "top1": null}', '{"command": "evaluate", "top1": "' + "9" * 2_000_000 + '"}',
             '{"command": "evaluate", "split": "val", "top1": 0.25, "n": 360, "checkpoint": "x.pt"}']
    (run / "results.jsonl").write_text("\n".join(lines) + "\n")
    assert compare_cli.main([str(run), "--out", str(tmp_path / "report"), "--no-speed"]) == 0
    assert "not read, listed there" in capsys.readouterr().out
    report = (tmp_path / "report" / "report.md").read_text()
    row = markdown_table(report, "| model | kind |")[0]
    assert row["best top-1 (%)"] == "50.000" and row["updates"] == "10"  # the one whole validation record
    assert "| 0.2500 (" in report  # the one readable result
    skipped = report.split("## Not read")[1]
    for name, why in (("stuck.log", "not a regular file"), ("zero.log", "not a regular file"),
                      ("stuck.jsonl", "not a regular file"), ("zero.jsonl", "not a regular file"),
                      ("results.jsonl line 1", "a kNN result without its k"),
                      ("results.jsonl line 2", "its top1 'abc' is not an accuracy"),
                      ("results.jsonl line 3", "its top1 'None' is not an accuracy"),
                      ("results.jsonl line 4", "longer than 1,048,576 bytes")):
        assert any(name in line and why in line for line in skipped.splitlines()), (name, skipped)
