"""Files an attacker would write: torch zip checkpoints around a hand-written pickle, and the pieces of
such pickles (a global, deep nesting, many class names)."""
import io
import zipfile
from typing import Tuple

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


class _Payload(torch.nn.Module):
    """What a TorchScript archive may carry: its __setstate__, code from the file, runs when torch.jit.load
    (or torch.load, which hands such an archive to it) reads the file. This one creates the file
    ``marker`` and fills ``allocate`` bytes of memory, so that a run of it cannot go unseen."""

    def __init__(self, marker: str, allocate: int):
        super().__init__()
        self.marker, self.allocate = marker, allocate

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, int, bool]:
        return (self.marker, self.allocate, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, int, bool]) -> None:
        self.marker, self.allocate, self.training = state[0], state[1], state[2]
        print("torchscript payload ran")
        touched = torch.ones(self.allocate, dtype=torch.uint8)
        written = torch.from_file(self.marker, True, 4, dtype=torch.uint8)
        written.fill_(1)
        self.allocate = self.allocate + int(touched.sum().item()) + int(written.sum().item())

    def forward(self, x):
        return x


def torchscript_archive(path, marker, allocate: int = 4 * 2**30) -> None:
    """A TorchScript archive at ``path`` (any name: checkpoint_last.pt) whose loading writes ``marker`` and
    fills ``allocate`` bytes (4 GiB by default)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        torch.jit.save(torch.jit.script(_Payload(str(marker), allocate)), str(path))
