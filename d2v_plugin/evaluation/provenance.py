"""Where a number came from: a checkpoint's SHA-256, computed once per file and kept in a cache keyed by the
file's path, size and modification time (a 330 MB file is hashed in about a second; a rerun reads the
cache). The cache is a file from outside like any other: read only if it is a regular file of bounded
size, each entry checked, rewritten atomically (never through a link); a broken cache is ignored."""
from __future__ import annotations

import hashlib
import json
import os
import stat

from d2v_plugin.atomic import atomic_path

CACHE_BYTES = 2**24  # the hash cache's bound (about 100,000 entries)
_memory: dict = {}


def cache_file() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "d2v_plugin",
                        "hashes.json")


def weights_file(path: str) -> str:
    """The file that holds a checkpoint's weights (an export folder's model.safetensors)."""
    return os.path.join(path, "model.safetensors") if os.path.isdir(path) else path


def _read_cache(path: str) -> dict:
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > CACHE_BYTES:
            return {}
        with open(path, "rb") as f:
            data = json.loads(f.read(CACHE_BYTES + 1))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _valid(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64
            and all(c in "0123456789abcdef" for c in entry["sha256"])
            and all(isinstance(entry.get(k), int) for k in ("size", "mtime_ns")))


def sha256(path: str) -> str:
    """The SHA-256 of a checkpoint's weights file, from the cache when the file is unchanged since it was
    hashed (same path, size and modification time)."""
    target = os.path.realpath(weights_file(os.fspath(path)))
    st = os.stat(target)
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    entry = _memory.get(target)
    if not (_valid(entry) and all(entry[k] == v for k, v in key.items())):
        cached = _read_cache(cache_file()).get(target)
        if _valid(cached) and all(cached[k] == v for k, v in key.items()):
            entry = cached
        else:
            digest = hashlib.sha256()
            with open(target, "rb") as f:
                for block in iter(lambda: f.read(2**22), b""):
                    digest.update(block)
            entry = {**key, "sha256": digest.hexdigest()}
            _remember(target, entry)
        _memory[target] = entry
    return entry["sha256"]


def _remember(target: str, entry: dict) -> None:
    path = cache_file()
    cache = {k: v for k, v in _read_cache(path).items() if _valid(v)}
    cache[target] = entry
    text = json.dumps(cache)
    if len(text) > CACHE_BYTES:  # full: keep this entry only
        text = json.dumps({target: entry})
    try:
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.write(text)
    except OSError:
        pass  # a read-only cache folder: the hash is still right, only not kept


def file_record(path: str) -> dict:
    """What a result names of the file it measured: its name as given, its size, modification time and hash."""
    target = weights_file(os.fspath(path))
    st = os.stat(target)
    return {"path": os.fspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256(path)}


_versions: dict = {}


def _git_commit(folder: str) -> str | None:
    """The commit of the checkout the plugin runs from (None when it is not one, or git is not there);
    '+changes' when the working tree differs from it."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def versions() -> dict:
    """The plugin's version (and its git commit when run from a checkout) and torch's, timm's and fairseq's."""
    if not _versions:
        from importlib.metadata import PackageNotFoundError, version

        def of(name):
            try:
                return version(name)
            except PackageNotFoundError:
                return None

        package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        _versions.update({"d2v_plugin": of("d2v_plugin"), "git_commit": _git_commit(package), "torch": of("torch"),
                          "timm": of("timm"), "fairseq": of("fairseq-fixed") or of("fairseq")})
    return dict(_versions)


def command_line() -> str:
    """The command as the user typed it (``python -m d2v_plugin.cli.evaluate ...``)."""
    import shlex
    import sys

    argv = list(sys.argv)
    if argv and argv[0].endswith(".py") and os.sep + "d2v_plugin" + os.sep + "cli" + os.sep in argv[0]:
        argv = ["python", "-m", "d2v_plugin.cli." + os.path.basename(argv[0])[:-3], *argv[1:]]
    return shlex.join(argv)


def provenance(runtime=None, checkpoint: str | None = None, index_digest: str | None = None) -> dict:
    """Where a result came from, recorded in every result: the code (versions, commit), where it ran (device,
    precision, ranks), what it measured (the checkpoint's SHA-256, the split's index digest), the command
    and the date."""
    import datetime

    out = {"versions": versions(), "command_line": command_line(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if runtime is not None:
        out.update(runtime.describe())
    if checkpoint is not None:
        out["checkpoint_sha256"] = sha256(checkpoint)
    if index_digest is not None:
        out["index_digest"] = index_digest
    return {"provenance": out}
