"""What every command shares: a bad input ends with one clear line on stderr and exit status 2."""
from __future__ import annotations

import contextlib
import sys

from d2v_plugin.data.index import DataError
from d2v_plugin.models.checkpoints import CheckpointError


@contextlib.contextmanager
def fail_cleanly():
    try:
        yield
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
