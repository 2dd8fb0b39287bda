"""Write-then-rename, so that a killed process never leaves a half-written file under its final name."""
import contextlib
import os


def _default_file_mode() -> int:
    """The permissions open() gives a new file here: 0o666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, with the
    permissions any file the user writes gets (writers such as safetensors create private temporary
    files); on any failure (or interruption) it is removed and ``path`` keeps its previous content."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj, path: str) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
