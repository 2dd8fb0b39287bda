"""Checks of the paths a command is given, made before anything heavy is imported (no torch, no fairseq):
a wrong argument is answered in a fraction of a second, in one line naming the path and the problem, and
nothing is opened that is not a regular file (a FIFO would hang the read, a link to /dev/zero would never
end it). What a file holds is checked where it is read (models/safe_load.py, the data and result readers);
these are the checks every command shares on its way in."""
from __future__ import annotations

import os
import pickle
import stat
import sys


class InputError(ValueError):
    """A path given to a command that cannot be what the command needs; the message names it."""


LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[2:]  # torch.save before 1.6: its first pickle
ZIP_MAGIC = b"PK\x03\x04"


def _kind(st: os.stat_result) -> str:
    mode = st.st_mode
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path: str, what: str) -> os.stat_result:
    """The file's status (through a link) if it is a regular file, else an InputError naming it."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except OSError as err:
        raise InputError(f"{what} {path} cannot be read: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} {path} is {_kind(st)}, not a regular file")
    return st


def checkpoint_format(path: str) -> str:
    """``zip`` (torch.save), ``legacy`` (torch.save before 1.6), from the first bytes of a regular file."""
    with open(path, "rb") as f:
        head = f.read(32)
    if not head:
        raise InputError(f"{path} is not a PyTorch checkpoint: the file is empty")
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(b"\x80") and LEGACY_MAGIC in head[:16]:
        return "legacy"
    raise InputError(f"{path} is not a PyTorch checkpoint: neither a zip archive (what torch.save writes) nor an "
                     f"older torch.save pickle")


def checkpoint(path: str) -> str:
    """A checkpoint argument: an export folder (config.json + model.safetensors), or a regular file in
    torch.save's format. Returns ``export``, ``zip`` or ``legacy``."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise InputError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        for name in ("config.json", "model.safetensors"):
            if not os.path.lexists(os.path.join(path, name)):
                raise InputError(f"{path} is a folder but not an exported model: {name} is missing")
            regular_file(os.path.join(path, name), "exported model file")
        return "export"
    regular_file(path, "checkpoint")
    return checkpoint_format(path)


def data_root(path: str, what: str = "--data") -> None:
    """A dataset argument: a folder (a folder tree, Parquet files or tar shards in it), or a brace pattern
    of shards."""
    path = os.fspath(path)
    if "{" in path:
        return
    if not os.path.lexists(path):
        raise InputError(f"{what} {path} not found")
    if not os.path.isdir(path):
        try:
            kind = _kind(os.stat(path))
        except OSError:
            kind = "a broken link"
        raise InputError(f"{what} {path} is {kind}, not a folder (the dataset's root, holding its splits)")


def folder(path: str, what: str) -> None:
    """A folder a command writes into (created when missing): what exists there must be a folder."""
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        try:
            kind = _kind(os.stat(path))
        except OSError:
            kind = "a broken link"
        raise InputError(f"{what} {path} is {kind}, not a folder")


def output_file(path: str, what: str) -> None:
    """A file a command writes (atomically: a new file renamed over the old): what exists there must be a
    regular file, not a link, a folder or a FIFO, and its folder must be a folder."""
    path = os.fspath(path)
    if os.path.islink(path):
        raise InputError(f"{what} {path} is a link: give the file itself (a result is never written through a link)")
    if os.path.lexists(path):
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{what} {path} is {_kind(st)}, not a file it can write")
    parent = os.path.dirname(os.path.abspath(path))
    folder(parent, f"the folder of {what}")


def device(name: str) -> None:
    """``--device cuda...`` on a machine without an NVIDIA driver is refused without importing torch."""
    drivers = ("/dev/nvidiactl", "/dev/dxg")  # Linux's NVIDIA driver; WSL2's
    if name.startswith("cuda") and sys.platform.startswith("linux") and not any(map(os.path.exists, drivers)):
        raise InputError(f"--device {name}: no CUDA device is available here (no NVIDIA driver), or use --device cpu")
