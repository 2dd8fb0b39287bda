"""What the commands share: a parser whose usage is ``python -m d2v_plugin.cli.<name>`` and whose --help
shows every option's default, arguments checked before anything is loaded, the flags every command
that runs the model takes (device, precision, batch, workers), one clear error line and exit status 2
on bad input, fairseq imported quietly after parsing."""
import argparse
import contextlib
import logging
import math
import sys


class _Help(argparse.RawDescriptionHelpFormatter):
    """The command's docstring as written, and each option's default after its help, unless the help
    already says it in words, the option is required or a switch (off unless given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.required or action.nargs == 0 or action.default is argparse.SUPPRESS
                or not action.option_strings):
            return text
        return f"{text} (default: {_shown_default(action.default)})"


def _shown_default(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def make_parser(doc: str, name: str, trust_flag: bool = True) -> argparse.ArgumentParser:
    """A parser whose --help is the command's docstring; with the checkpoint flags by default."""
    parser = argparse.ArgumentParser(prog=f"python -m d2v_plugin.cli.{name}", description=doc, formatter_class=_Help)
    if trust_flag:
        parser.add_argument("--trust-checkpoint", action="store_true",
                            help="allow full unpickling of the checkpoint (runs code from the file: trusted files only)")
        parser.add_argument("--num-heads", type=positive_int, default=None,
                            help="attention heads, for checkpoints that do not record them (Lightning state dicts) "
                                 "(default: the file's, else data2vec's head width of 64)")
        parser.add_argument("--norm-eps", type=positive_float, default=None,
                            help="LayerNorm eps, for checkpoints that do not record it (default: the file's, else 1e-6)")
    return parser


# argument types: a bad value stops the command at once, naming the flag (argparse: "argument --x: ...")

def _parsed(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None


def _checked(value, ok: bool, why: str):
    if not ok:
        raise argparse.ArgumentTypeError(why)
    return value


def positive_int(text: str) -> int:
    value = _parsed(text, int)
    return _checked(value, value >= 1, f"{value} is not at least 1")


def nonnegative_int(text: str) -> int:
    value = _parsed(text, int)
    return _checked(value, value >= 0, f"{value} is negative")


def positive_float(text: str) -> float:
    value = _parsed(text, float)
    return _checked(value, math.isfinite(value) and value > 0, f"{text} is not a positive number")


def nonnegative_float(text: str) -> float:
    value = _parsed(text, float)
    return _checked(value, math.isfinite(value) and value >= 0, f"{text} is not a number >= 0")


def bounded_float(lo: float, hi: float, lo_included: bool = False):
    """An argument type: a number in (lo, hi] ([lo, hi] with ``lo_included``): the flag's sensible range, past
    which a run computes nothing meaningful, or overflows."""
    def parse(text: str) -> float:
        value = _parsed(text, float)
        above = value >= lo if lo_included else value > lo
        return _checked(value, math.isfinite(value) and above and value <= hi,
                        f"{text} is not in {'[' if lo_included else '('}{lo:g}, {hi:g}]")

    return parse


def ratio(text: str) -> float:
    """A fraction in (0, 1] (a crop ratio)."""
    value = _parsed(text, float)
    return _checked(value, 0 < value <= 1, f"{text} is not in (0, 1]")  # (nan fails too)


DATA_FORMATS = ("auto", "folder", "parquet", "wds")


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True,
                       help: str = "the dataset, as task.data: a folder tree, Parquet files or tar shards") -> None:
    """``--data`` and ``--data-format``, as the task's ``data`` and ``data_format`` settings."""
    parser.add_argument("--data", required=required, default=None,
                        help=help if required else f"{help} (default: none)")
    parser.add_argument("--data-format", default="auto", choices=DATA_FORMATS,
                        help="auto (found from what --data holds), folder, parquet or wds (tar shards)")
    parser.add_argument("--cache-dir", default=None,
                        help="folder-index cache (default: ~/.cache/d2v_plugin/index)")


def add_runtime_arguments(parser: argparse.ArgumentParser, batch_size: int = 64) -> None:
    """What every command that runs the model takes: where, in which precision, how many at once."""
    parser.add_argument("--device", default="auto",
                        help="auto (this rank's GPU when there is one, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                        help="autocast of the forward pass (default: bf16 on a GPU that has it, else fp32)")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size, help="images per forward pass and rank")
    parser.add_argument("--workers", type=nonnegative_int, default=None,
                        help="data-loading processes per rank (default: the cores available, at most 8)")


def preflight(args, checkpoints=(), data=None, outputs=(), folders=(), files=()) -> None:
    """The paths and the device a command is given, checked before anything heavy is imported (d2v_plugin/
    inputs.py: no torch, no fairseq): a path that does not exist, a text file, a FIFO or a link to a device
    is answered in one line and exit status 2 within a second. ``outputs`` / ``folders``: (path, what) pairs
    of files and folders the command writes, ``files`` of files it reads (None: not given)."""
    from d2v_plugin import inputs

    with fail_cleanly():
        for path in checkpoints:
            inputs.checkpoint(path)
        if data is not None:
            inputs.data_root(data)
        for path, what in outputs:
            if path and what == "--out" and not str(path).endswith(".jsonl"):
                inputs.folder(path, what)  # a results folder
            elif path:
                inputs.output_file(path, what)
        for path, what in folders:
            if path:
                inputs.folder(path, what)
        for path, what in files:
            if path:
                inputs.regular_file(path, what)
        if getattr(args, "device", None):
            inputs.device(args.device)


def load_heavy() -> None:
    """Import fairseq (and with it torch) without the DEBUG root logger its import leaves behind, and
    keep the command's stderr to warnings, errors and its own progress bar."""
    import d2v_plugin_quiet

    with d2v_plugin_quiet.fairseq_root_logging_undone():
        import fairseq  # noqa: F401
    logging.getLogger().setLevel(logging.WARNING)


def start_runtime(args):
    """The evaluation runtime of the device and precision flags (joins the ranks under torchrun or srun)."""
    from d2v_plugin.evaluation.runtime import start

    return start(args.device, args.precision)


def emit(runtime, record: dict) -> None:
    """One JSON line on stdout, from rank 0 only."""
    import json

    if runtime is None or runtime.is_main:  # (keys starting with _ are for the results file: per-image rows)
        print(json.dumps({k: v for k, v in record.items() if not k.startswith("_")}), flush=True)


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, metavar="DIR|FILE.jsonl",
                        help="also write the results, with the command's settings and provenance, and each image's "
                             "outcome (Parquet, for cli.compare --paired), to this results folder (or JSON Lines "
                             "file); cli.compare reads both, and a run's folder (default: printed only)")


def write_results(path: str | None, command: str, records: list, args, indexes: dict | None = None) -> None:
    """The results (and their per-image outcomes, beside them) where --out says: evaluation/results.py."""
    from d2v_plugin.evaluation.results import save

    save(path, command, records, args, indexes)


@contextlib.contextmanager
def resumable(name: str, argv, kept: str):
    """Ctrl-C (or SIGTERM turned into it) during the block: one line saying what is kept and the command that
    resumes, exit status 130; no traceback."""
    import shlex

    try:
        yield
    except KeyboardInterrupt:
        command = shlex.join(["python", "-m", f"d2v_plugin.cli.{name}", *(sys.argv[1:] if argv is None else argv)])
        print(f"\n{name}: interrupted. {kept}; to resume: {command}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


class NothingCounted(ValueError):
    """A command ran but had nothing to count: an error, not a result."""


@contextlib.contextmanager
def fail_cleanly():
    # the plugin's own errors (CheckpointError, DataError, ConfigError) are ValueErrors naming the problem
    try:
        yield
    except NothingCounted as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
