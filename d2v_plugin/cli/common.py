"""What the commands share: one clear error line and exit status 2 on bad input."""
import argparse
import contextlib
import sys

from d2v_plugin.data.index import DataError
from d2v_plugin.models.checkpoints import CheckpointError


def make_parser(doc: str, trust_flag: bool = True) -> argparse.ArgumentParser:
    """A parser whose --help is the command's docstring; with the --trust-checkpoint flag by default."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if trust_flag:
        parser.add_argument("--trust-checkpoint", action="store_true",
                            help="allow full unpickling of the checkpoint (runs code from the file: trusted files only)")
        parser.add_argument("--num-heads", type=int, default=None,
                            help="attention heads, for checkpoints that do not record them (Lightning state dicts)")
        parser.add_argument("--norm-eps", type=float, default=None,
                            help="LayerNorm eps, for checkpoints that do not record it")
    return parser


@contextlib.contextmanager
def fail_cleanly():
    try:
        yield
    except (CheckpointError, DataError, FileNotFoundError, NotADirectoryError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
