"""What the commands share: a parser whose usage is ``python -m d2v_plugin.cli.<name>``, one clear
error line and exit status 2 on bad input, fairseq imported quietly after parsing."""
import argparse
import contextlib
import logging
import sys


def make_parser(doc: str, name: str, trust_flag: bool = True) -> argparse.ArgumentParser:
    """A parser whose --help is the command's docstring; with the checkpoint flags by default."""
    parser = argparse.ArgumentParser(prog=f"python -m d2v_plugin.cli.{name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if trust_flag:
        parser.add_argument("--trust-checkpoint", action="store_true",
                            help="allow full unpickling of the checkpoint (runs code from the file: trusted files only)")
        parser.add_argument("--num-heads", type=int, default=None,
                            help="attention heads, for checkpoints that do not record them (Lightning state dicts)")
        parser.add_argument("--norm-eps", type=float, default=None,
                            help="LayerNorm eps, for checkpoints that do not record it")
    return parser


DATA_FORMATS = ("auto", "folder", "parquet", "wds")


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True,
                       help: str = "the dataset, as task.data: a folder tree, Parquet files or tar shards") -> None:
    """``--data`` and ``--data-format``, as the task's ``data`` and ``data_format`` settings."""
    parser.add_argument("--data", required=required, default=None, help=help)
    parser.add_argument("--data-format", default="auto", choices=DATA_FORMATS,
                        help="auto (found from what --data holds), folder, parquet or wds (tar shards)")


def load_heavy() -> None:
    """Import fairseq (and with it torch) without the DEBUG root logger its import leaves behind, and
    keep the command's stderr to warnings, errors and its own progress bar."""
    import d2v_plugin_quiet

    with d2v_plugin_quiet.fairseq_root_logging_undone():
        import fairseq  # noqa: F401
    logging.getLogger().setLevel(logging.WARNING)


@contextlib.contextmanager
def fail_cleanly():
    # the plugin's own errors (CheckpointError, DataError, ConfigError) are ValueErrors naming the problem
    try:
        yield
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
