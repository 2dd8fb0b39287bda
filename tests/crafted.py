"""Files an attacker would write: torch zip checkpoints around a hand-written pickle, and the pieces of
such pickles (a global, deep nesting, many class names)."""
import io
import zipfile

import torch


def checkpoint_with_pickle(path, pickle_bytes: bytes) -> None:
    """A zip archive exactly as torch.save writes one, with ``pickle_bytes`` as its data.pkl."""
    buffer = io.BytesIO()
    torch.save({}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as z, zipfile.ZipFile(path, "w") as out:
        for name in z.namelist():
            out.writestr(name, pickle_bytes if name.endswith("/data.pkl") else z.read(name))


def a_global(module: str, name: str) -> bytes:
    """{"x": <module.name>} in protocol 2 (the global pushed, never called)."""
    return b"\x80\x02}X\x01\x00\x00\x00xc" + module.encode() + b"\n" + name.encode() + b"\ns."


def called(module: str, name: str, arg: int) -> bytes:
    """{"x": module.name(arg)}: the global called with one integer."""
    return (b"\x80\x02}X\x01\x00\x00\x00xc" + module.encode() + b"\n" + name.encode() + b"\nJ"
            + int(arg).to_bytes(4, "little", signed=True) + b"\x85Rs.")


def nested_lists(depth: int) -> bytes:
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def many_globals(count: int, module: str = "gone_module") -> bytes:
    """A list of ``count`` distinct classes of modules that are not installed."""
    items = b"".join(f"c{module}{i}\nC\n".encode() + b"a" for i in range(count))
    return b"\x80\x02]" + items + b"."
