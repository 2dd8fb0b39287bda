"""What the commands share: one clear error line and exit status 2 on bad input."""
import contextlib
import sys

from d2v_plugin.data.index import DataError
from d2v_plugin.models.checkpoints import CheckpointError, atomic_torch_save  # noqa: F401 (re-exported)


@contextlib.contextmanager
def fail_cleanly():
    try:
        yield
    except (CheckpointError, DataError, FileNotFoundError, NotADirectoryError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
