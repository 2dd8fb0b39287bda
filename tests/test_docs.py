"""Every command shown in the README and in docs/ runs, so that no page can go stale (issue 34.4).

How each kind of command is run (docs/benchmarks.md, "Tests", says the same to readers):
- `python -m d2v_plugin.cli.*` (alone, under `srun` or `torchrun`): run as written, in-process and in one
  process, on a small ImageNet-like world built here from the session's digits (wnid class folders, JPEG
  files named as ImageNet's val files, ReaL labels, -A/-R-style subsets, a Hugging Face Parquet copy), with
  the session's fine-tuned runs as the runs and checkpoints (data2vec 2.0's layout, the thesis' Lightning
  students, a pretraining checkpoint holding an EMA teacher). Placeholders (/data/imagenet, /ckpt/...,
  CHECKPOINT, ROOT, RUN, N, R) name those; the linear probe's 12,500-step floor is lifted (`--min-steps 0`).
  Several ranks give one rank's answer: tests/test_evaluation.py and tests/test_inside.py run them so.
- `fairseq-hydra-train` with an ImageNet recipe: the recipe and every override resolved as fairseq-hydra-train
  resolves them, with the plugin's start-up decisions on the ranks the launcher line gives (torchrun's
  options checked by torchrun's own parser, SLURM's from the #SBATCH lines; 1 and 8 without a launcher).
  The recipes' real runs are the end-to-end tests'.
- the demo-scale blocks (demo_work/, the command without a recipe): run as written, for real, by
  tests/test_first_hour.py (its RUN_HERE) and `make demo` (scripts/demo.py runs docs/demo.md's command).
- `make` targets: `make -n`; the install-by-hand lines: each is a step of the Makefile's `setup`.
Any other command form fails here until this module is taught to run it.
"""
import glob
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest
import torch
from PIL import Image

from conftest import REPO, doc_block_after, doc_blocks
from test_cluster import CPU_DDP
from test_first_hour import RUN_HERE

PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
PROGRAMS = ("make", "python", "python3.11", "pip", "fairseq-hydra-train", "torchrun", "srun", "#SBATCH", "#!/bin/bash")
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041", "n01514668",
         "n01514859", "n01518878"]
WHERE = re.compile(r"\$\(python -m d2v_plugin\.cli\.where (\w+)\)")


def commands(block: str) -> list:
    """The block's commands: continuation lines joined, comment lines and trailing comments dropped."""
    out, current = [], ""
    for line in block.split("\n"):
        if not line.strip() or (line.startswith("#") and not line.startswith(("#SBATCH", "#!"))):
            continue
        if line.startswith(" ") and not current and out:  # a synopsis' continuation, indented without a backslash
            current = out.pop()
        current += " " + re.sub(r"\s+# .*$", "", line).strip()
        if current.endswith("\\"):
            current = current[:-1]
            continue
        out.append(current.strip())
        current = ""
    return out


def is_command_block(block: str) -> bool:
    first = next(line for line in block.split("\n") if line.strip() and not line.startswith("# "))
    return first.split()[0] in PROGRAMS


def test_every_block_is_a_command_or_an_example_of_output():
    """An output example never begins a line with a program (a command pasted into one would not be run)."""
    found = 0
    for page in PAGES:
        for line, block in doc_blocks(page):
            if is_command_block(block):
                found += 1
            else:
                starts = [li.split()[0] for li in block.split("\n") if li.strip()]
                assert not set(starts) & set(PROGRAMS), f"{page}:{line}"
    assert found >= 25


def test_every_relative_link_and_anchor_in_the_docs_resolves():
    def anchors(path):
        text = open(path).read()
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}

    for page in PAGES:
        text = open(os.path.join(REPO, page)).read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(REPO, os.path.dirname(page), path)) if path else os.path.join(REPO, page)
            assert os.path.exists(full), f"{page}: link to {target}"
            if anchor:
                assert anchor in anchors(full), f"{page}: anchor {target}"


# --- the world the commands run in ------------------------------------------------------------------

def jpeg_copy(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with Image.open(src) as img:
        img.convert("RGB").save(dst, "JPEG", quality=95)


@pytest.fixture(scope="module")
def world(runs, tmp_path_factory):
    """ImageNet as the docs' commands expect it, from 40 digits a class; runs and checkpoints as users have them."""
    from client_files import save_like_the_thesis

    from d2v_plugin.demo_data import write_digits

    root = tmp_path_factory.mktemp("docs_world")
    write_digits(str(root / "digits"), image_size=16, per_class=40)
    imagenet, real = root / "imagenet", []
    number = 0
    for split in ("train", "val"):
        for digit, wnid in enumerate(WNIDS):
            for i, src in enumerate(sorted((root / "digits" / split / str(digit)).iterdir())):
                if split == "val":
                    number += 1
                    name = f"ILSVRC2012_val_{number:08d}.JPEG"
                    real.append([digit] if i % 5 else [digit, (digit + 1) % 10])
                else:
                    name = f"{wnid}_{i}.JPEG"
                jpeg_copy(src, imagenet / split / wnid / name)
                if split == "val" and digit < 4:
                    jpeg_copy(src, root / "imagenet-r" / wnid / f"art_{i}.jpg")
                    jpeg_copy(src, root / "imagenet-a" / wnid / f"{i}.jpg")
    (root / "real.json").write_text(json.dumps(real))
    from d2v_plugin.cli import pack

    assert pack.main([str(imagenet), "--out", str(root / "imagenet_hf"), "--format", "parquet"]) == 0
    # the session's two fine-tuned runs, as trained on ImageNet's wnid folders
    for recipe, run in (("distilled_imagenet", runs["depth4"]), ("d2v2_base_imagenet", runs["depth2"])):
        shutil.copytree(run, root / "checkpoints" / recipe, ignore=shutil.ignore_patterns("tb"))
        for path in (root / "checkpoints" / recipe).glob("checkpoint*.pt"):
            state = torch.load(path, weights_only=True)
            state["task_state"]["classes"] = WNIDS
            torch.save(state, path)
    # the thesis' students: the teacher's first 4 and all 6 blocks (2 prenet + 2 or 4 main) under model.model.
    teacher = torch.load(runs["init"], weights_only=True)
    (root / "ckpt").mkdir()
    for depth in (4, 6):
        keep = {k: v for k, v in teacher["model"].items()
                if not (k.startswith("blocks.") and int(k.split(".")[1]) >= depth - 2)}
        save_like_the_thesis({f"model.model.{k}": v for k, v in keep.items()}, root / "ckpt" / f"student_{depth}.ckpt",
                             root / f"thesis_{depth}", depth=depth)
    os.symlink(root / "ckpt" / "student_4.ckpt", root / "ckpt" / "student.ckpt")
    os.symlink(runs["init"], root / "ckpt" / "base_imagenet.pt")
    # a data2vec pretraining run: two checkpoints holding the student and its EMA teacher
    (root / "pretrain").mkdir()
    for update in (50, 100):
        state = dict(teacher)
        state["model"] = dict(teacher["model"])
        state["model"]["_ema"] = {k: v * (1 - update / 1000) for k, v in teacher["model"].items()}
        state["optimizer_history"] = [{"num_updates": update}]
        torch.save(state, root / "pretrain" / ("checkpoint_last.pt" if update == 100 else "checkpoint_1_50.pt"))
    return root


def place(world, cwd):
    """Placeholder -> path, longest first."""
    run = world / "checkpoints" / "distilled_imagenet"
    return sorted({
        "/data/imagenet": world / "imagenet", "/data/imagenet-r": world / "imagenet-r",
        "/data/imagenet-a": world / "imagenet-a", "/data/real.json": world / "real.json",
        "/data/imagenet_hf": world / "imagenet_hf", "/data/imagenet_wds": cwd / "imagenet_wds",
        "/data/imagenet_pq": cwd / "imagenet_pq", "/ckpt": world / "ckpt", "base_imagenet.pt": world / "ckpt" /
        "base_imagenet.pt", "/runs/pretrain": cwd / "pretrain", "/runs/student": cwd / "student",
        "CHECKPOINT": run / "checkpoint_best.pt", "ROOT": world / "imagenet", "RUN": run,
    }.items(), key=lambda kv: -len(kv[0]))


def substitute(token: str, places) -> str:
    if "=" in token and not token.startswith("-"):
        key, value = token.split("=", 1)
        return f"{key}={path_of(value, places)}"
    token = token.strip("[]")  # a synopsis' optional parts
    if token in ("N", "R"):  # and its values
        return {"N": "1", "R": "0.875"}[token]
    return path_of(token, places)


def path_of(token: str, places) -> str:
    for name, path in places:
        if token == name or token.startswith(name + "/"):
            return str(path) + token[len(name):]
    return token


def where(token: str) -> str:
    from d2v_plugin.cli.where import locations

    return WHERE.sub(lambda m: locations()[m.group(1)], token)


def launcher(tokens: list, sbatch: dict):
    """(the command after its launcher, ranks): torchrun's options checked by torchrun's own parser."""
    if tokens[0] == "srun":
        return tokens[1:], sbatch.get("nodes", 1) * sbatch.get("ntasks-per-node", 1)
    if tokens[0] != "torchrun":
        return tokens, None
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(tokens[1:])
    program = [args.training_script, *args.training_script_args]
    if args.module:
        program = ["python", "-m", *program]
    nodes = int(str(args.nnodes).split(":")[-1])
    return program, nodes * int(args.nproc_per_node)


def run_cli(module: str, argv: list, capsys) -> str:
    capsys.readouterr()
    main = importlib.import_module(module).main
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    assert code in (0, None), f"{module} {' '.join(argv)}\n{err[-3000:]}"
    return out


def resolve(tokens: list, ranks, capsys):
    """fairseq-hydra-train's recipe and overrides, resolved with the start-up decisions on ``ranks``."""
    name = tokens[tokens.index("--config-name") + 1]
    config_dir = tokens[tokens.index("--config-dir") + 1] if "--config-dir" in tokens else "config"
    overrides = [t for i, t in enumerate(tokens[1:], 1) if not t.startswith("--") and tokens[i - 1] not in
                 ("--config-name", "--config-dir")]
    for world_size in ([ranks] if ranks else [1, 8]):
        out = run_cli("d2v_plugin.cli.recipe", [name, *overrides, "--config-dir", os.path.join(REPO, config_dir),
                                                "--world-size", str(world_size)], capsys)
        assert f"on {world_size} rank(s)" in out


def run_elsewhere(page: str, block: str):
    """A block tests/test_first_hour.py or `make demo` runs as written."""
    if page == "docs/demo.md":  # scripts/demo.py, which make demo runs, builds this command
        source = open(os.path.join(REPO, "scripts", "demo.py")).read()
        source = source.replace('f"', '"').replace("{WORK}", re.search(r'WORK = "(\w+)"', source).group(1))
        for token in shlex.split(block.replace("\\\n", " "))[1:]:
            assert f'"{token}"' in source, f"{page}: {token} is not in scripts/demo.py's command"
        return
    assert any(block == doc_block_after(page, marker) for marker in RUN_HERE.get(page, [])), (
        f"{page}: a demo-scale block that no test runs:\n{block}")


@pytest.mark.parametrize("page", PAGES)
def test_every_command_on_the_page_runs(page, world, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    os.symlink(world / "checkpoints", cwd / "checkpoints")
    os.symlink(world / "ckpt" / "base_imagenet.pt", cwd / "base_imagenet.pt")
    shutil.copytree(world / "pretrain", cwd / "pretrain")
    for i, src in enumerate(sorted((world / "imagenet" / "val" / WNIDS[3]).iterdir())[:2]):
        shutil.copy(src, cwd / f"photo{i + 1}.jpg")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("RANK", "0")
    places = place(world, cwd)
    ran = 0
    for line, block in doc_blocks(page):
        if not is_command_block(block):
            continue
        if "demo_work/" in block or ("fairseq-hydra-train" in block and "--config-name" not in block
                                     and "..." not in block):
            run_elsewhere(page, block)
            ran += 1
            continue
        sbatch = {}
        for command in commands(block):
            tokens = [where(t) for t in shlex.split(command)]
            if tokens[0] == "#SBATCH":
                for option in tokens[1:]:
                    key, _, value = option.lstrip("-").partition("=")
                    sbatch[key] = int(value) if value.isdigit() else value
                continue
            if tokens[0] in ("#!/bin/bash",):
                continue
            tokens, ranks = launcher(tokens, sbatch)
            tokens = [substitute(t, places) for t in tokens]
            if tokens[:2] == ["python", "-m"] and tokens[2].startswith("d2v_plugin.cli."):
                argv = []
                for t in tokens[3:]:  # the outputs of earlier commands in the block: shell globs
                    matches = sorted(glob.glob(t)) if "*" in t else [t]
                    assert matches, f"{page}:{line}: {t} matches nothing"
                    argv += matches
                if tokens[2].endswith((".probe", ".track")) and "linear" in " ".join(argv):
                    argv += ["--min-steps", "0"]
                run_cli(tokens[2], argv, capsys)
            elif tokens[0] == "fairseq-hydra-train":
                if "..." in tokens:  # the CPU two-process form: the tests' own launch (tests/test_cluster.py)
                    given = [t for t in tokens[1:] if t != "..."]
                    assert set(given) == set(CPU_DDP) | {"distributed_training.distributed_init_method=env://",
                                                         "distributed_training.distributed_rank=${oc.env:RANK}"}
                    tokens = ["fairseq-hydra-train", "--config-name", "demo", f"task.data={world / 'imagenet'}",
                              *given]
                resolve(tokens, ranks, capsys)
            elif tokens[0] == "make":
                assert subprocess.run(["make", "-n", *tokens[1:]], cwd=REPO, capture_output=True).returncode == 0
            elif tokens[0] in ("pip", "python3.11") or tokens[:3] == ["python", "-m", "d2v_plugin_quiet"]:
                makefile = open(os.path.join(REPO, "Makefile")).read()
                for part in shlex.split(command.split("&&")[0]):
                    if part.startswith("fairseq-fixed=="):
                        assert part in open(os.path.join(REPO, "requirements-fairseq.txt")).read()
                    elif part not in ("python3.11", "pip", "python"):
                        assert part in makefile, f"{page}:{line}: {part} is not in make setup's steps"
            else:
                pytest.fail(f"{page}:{line}: a command this test does not know how to run: {command}")
            ran += 1
    if page == "README.md":
        assert ran >= 6
