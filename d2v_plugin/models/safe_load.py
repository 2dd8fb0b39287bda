"""Read a checkpoint without running code from it, with an allow-list of the plugin's own.

torch's ``weights_only`` unpickler allows more than a checkpoint ever needs (``bytearray``, ``set``,
``traceback.FrameSummary``, which reads a local file, ``DeviceMesh``, which starts a process group,
every builtin exception), so checkpoints are read by torch's loader (its zip and legacy formats, its
storages) with an unpickler of the plugin's own (``_Unpickler``) that gives the file's pickle:

- real objects only for what real checkpoints hold (``ALLOWED``): tensors, parameters and their rebuild
  functions, storages (torch maps those itself), dtypes, ``torch.Size``, ``OrderedDict``, argparse's
  ``Namespace`` (fairseq's ``args``), numpy scalars of numeric types (fairseq's scores), ``_codecs.encode``
  of latin-1 text (how protocol 2 pickles bytes), ``defaultdict`` read as a plain dict;
- inert stand-ins (``Stored``: they keep what the file stored and run nothing) for the names configs
  pickle as data: omegaconf's classes and ``typing``'s (a Lightning run's hyper-parameters), the plain
  builtin types omegaconf records as type references, and classes of code that is not installed here
  (the thesis' config dataclass: it can only be data, since there is nothing to run);
- and a refusal, naming them, for everything else (``os.system``, ``builtins.eval``, ``bytearray``, ...).

Before anything is unpickled, the pickle's size, nesting and the number of classes it names are
bounded (d2v_plugin/limits.py); after, every tensor must be backed by its storage (no stride-0 views
claiming more elements than the file holds). ``trust=True`` unpickles fully, for a file you trust.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import logging
import os
import pickle
import pickletools
import stat
import threading
import types
import zipfile

import torch

from d2v_plugin.limits import LIMITS, env_name

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def shown(text) -> str:
    """A name or text taken from a file, safe to print: non-printable characters (terminal escapes)
    escaped, as repr writes them."""
    text = str(text)
    return text if text.isprintable() else repr(text)[1:-1]


class Stored:
    """Stands in for a class a checkpoint names that is read as data (omegaconf's containers, a Lightning
    run's config dataclass, ...): it keeps what the file stored for the object (``args``, ``state``) and
    runs none of the class's code."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<{shown(self.qualname)}: stored, not imported>"


def _plain_dict(*_args):
    # collections.defaultdict(factory): its items follow; the factory (maybe a stand-in) is never needed
    return {}


def _enum_value(value):
    # older fairseq configs pickle data2vec's Modality enum; its value is all that is needed
    return value


def _latin1(text, encoding="latin1"):
    # protocol 2 pickles bytes as _codecs.encode(text, "latin1"): only that, never another codec
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {shown(encoding)!r}) is not bytes")
    return text.encode("latin1")


def _numeric_dtype(spec, *args):
    import numpy as np

    dtype = np.dtype(spec) if isinstance(spec, str) else None
    if dtype is None or dtype.kind not in "biufc" or dtype.itemsize > 16:
        raise pickle.UnpicklingError(f"numpy dtype {shown(spec)!r} is not a numeric scalar type")
    return dtype


def _numpy_scalar(dtype, data=None):
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, bytes) \
            or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("a numpy scalar that is not a number of its dtype's size")
    return np.frombuffer(data, dtype=dtype)[0]


def _allowed() -> dict:
    """name -> the object a checkpoint's pickle may use (the only real objects it gets)."""
    from torch import _utils
    from torch._tensor import _rebuild_from_type_v2

    out = {f"torch._utils.{f}": getattr(_utils, f) for f in ("_rebuild_tensor", "_rebuild_tensor_v2",
                                                             "_rebuild_tensor_v3", "_rebuild_parameter",
                                                             "_rebuild_parameter_with_state")}
    out.update({
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.Tensor": torch.Tensor, "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.Size": torch.Size, "torch.device": torch.device,
        "collections.OrderedDict": __import__("collections").OrderedDict,
        "collections.defaultdict": _plain_dict,
        "argparse.Namespace": argparse.Namespace,
        "_codecs.encode": _latin1,
        "numpy.dtype": _numeric_dtype,
        "numpy.core.multiarray.scalar": _numpy_scalar, "numpy._core.multiarray.scalar": _numpy_scalar,
        "examples.data2vec.data.modality.Modality": _enum_value,
    })
    out.update({f"torch.{name}": value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
    return out


ALLOWED: dict = {}
# names read as inert stand-ins: configs pickle these as data
STAND_IN_MODULES = ("omegaconf", "typing")
TYPE_REFERENCES = {f"builtins.{t}" for t in ("dict", "list", "tuple", "int", "float", "str", "bytes", "bool",
                                              "object")}


def _python3_name(module: str, name: str) -> str:
    """The name a pickled global refers to in Python 3: protocol 2 writes some under their Python 2 names
    (``__builtin__.unicode`` is ``builtins.str``), as pickle's own find_class maps them."""
    import _compat_pickle

    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _storage_type(qualname: str) -> bool:
    """A storage class name (``torch.FloatStorage``): torch's loader maps those to the storage's dtype
    itself, before any unpickler is asked, so the class is never used."""
    module, _, name = qualname.rpartition(".")
    if module != "torch" or "Storage" not in name:
        return False
    try:
        torch.serialization.StorageType(name)
    except (KeyError, AttributeError):
        return False
    return True


_installed: dict = {}


def _is_installed(top: str) -> bool:
    """Whether a top-level module could be imported here (looked up, never imported)."""
    if top not in _installed:
        try:
            _installed[top] = bool(top.isidentifier()) and importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            _installed[top] = False
    return _installed[top]


def classify(qualname: str, installed: bool = True) -> str:
    """``allowed``, ``stand-in`` or ``refused``: what the plugin's unpickler does with a name
    (``installed=False``: only whether it is allowed, without looking its module up)."""
    if not ALLOWED:
        ALLOWED.update(_allowed())
    if qualname in ALLOWED or _storage_type(qualname):
        return "allowed"
    if not installed:
        return "unknown"
    module = qualname.rpartition(".")[0]
    top = module.split(".")[0]
    if qualname in TYPE_REFERENCES or top in STAND_IN_MODULES or not _is_installed(top):
        return "stand-in"
    return "refused"


class _Reading:
    """One file's read: its path and the stand-ins made for it (one class per name, bounded)."""

    def __init__(self, path: str):
        self.path, self.stand_ins = path, {}

    def stand_in(self, qualname: str) -> type:
        if qualname not in self.stand_ins:
            if len(self.stand_ins) >= LIMITS.max_stand_ins:
                raise _too_many_names(self.path)
            self.stand_ins[qualname] = type(qualname.rsplit(".", 1)[-1], (Stored,),
                                            {"qualname": qualname, "__module__": __name__})
        return self.stand_ins[qualname]


_reading = threading.local()


class _Unpickler(pickle.Unpickler):
    """pickle's unpickler whose globals are the allow-list's, stand-ins, or a refusal."""

    def find_class(self, module, name):
        qualname = _python3_name(module, name)
        kind = classify(qualname)
        if kind == "allowed":
            return ALLOWED[qualname]
        reading = getattr(_reading, "current", None)
        if kind == "stand-in" and reading is not None:
            return reading.stand_in(qualname)
        raise _refusal(reading.path if reading else "checkpoint", [qualname])


# what torch.load calls a pickle module: Unpickler and load
_SAFE_PICKLE = types.ModuleType("d2v_plugin_safe_pickle")
_SAFE_PICKLE.Unpickler = _Unpickler
_SAFE_PICKLE.load = lambda f, **kwargs: _Unpickler(f, **kwargs).load()
_SAFE_PICKLE.UnpicklingError = pickle.UnpicklingError


def _refusal(path: str, names) -> CheckpointError:
    listed = ", ".join(shown(n) for n in names)
    return CheckpointError(
        f"{path}: refusing to unpickle objects the file asks for ({listed}); a checkpoint has no reason to hold "
        f"them, and loading them can run code from the file. If you trust it, set model.trust_checkpoint=true "
        f"(--trust-checkpoint on the command line tools).")


def _too_many_names(path: str) -> CheckpointError:
    return CheckpointError(f"{path}: names more than {LIMITS.max_stand_ins} classes outside the allow-list "
                           f"(raise {env_name('max_stand_ins')} if that is real)")


def _not_a_checkpoint(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a PyTorch checkpoint: {why}")


def _format(path: str) -> str:
    """``zip`` (torch.save) or ``legacy`` (torch.save before 1.6), from the first bytes; else an error."""
    from d2v_plugin.inputs import InputError, checkpoint_format

    try:
        return checkpoint_format(path)
    except InputError as err:
        raise CheckpointError(str(err)) from None


# records of a zip archive that make it TorchScript, not a checkpoint: torch.load hands such an archive to
# torch.jit.load, which compiles the code in it and runs its __setstate__ methods (code from the file)
TORCHSCRIPT_RECORDS = ("constants.pkl", "code/", ".data/version")


def _is_torchscript_record(record: str) -> bool:
    return record in (TORCHSCRIPT_RECORDS[0], TORCHSCRIPT_RECORDS[2]) or record.startswith(TORCHSCRIPT_RECORDS[1])


def torchscript_records(path: str) -> list[str]:
    """The members of a zip archive that make it TorchScript (empty for a checkpoint), as Python's zipfile
    and torch's own reader (what torch.load will see) list the archive's directory; nothing in the file
    is run or decompressed. An archive that either cannot list is refused."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise _not_a_checkpoint(path, f"a broken zip archive ({err})") from None
    try:
        names += list(torch._C.PyTorchFileReader(path).get_all_records())
    except (RuntimeError, OSError, ValueError) as err:
        raise _not_a_checkpoint(path, f"a zip archive torch cannot read ({_first_line(err)})") from None
    # a record's name below the archive's top folder (torch's view), and the name as it is
    records = {r for n in names for r in (n, n.split("/", 1)[1] if "/" in n else n)}
    return sorted(r for r in records if _is_torchscript_record(r))


def check_file(path: str) -> str:
    """What every path that opens a checkpoint from outside checks before any torch loader sees the file:
    it exists, is a regular file, is torch.save's zip or legacy format, and is not a TorchScript archive
    (whose loading runs the code it carries). Returns the format, ``zip`` or ``legacy``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise CheckpointError(f"{path} is not a regular file (a checkpoint is a file torch.save wrote)")
    kind = _format(path)
    found = torchscript_records(path) if kind == "zip" else []
    if found:
        listed = ", ".join(shown(r) for r in found[:3]) + (", ..." if len(found) > 3 else "")
        raise CheckpointError(f"{path} is a TorchScript archive ({listed}), not a checkpoint: loading it would run "
                              f"the code it carries, so it is refused, with --trust-checkpoint too (a checkpoint "
                              f"is what torch.save or a trainer writes)")
    return kind


def _too_large(path: str, size: str) -> CheckpointError:
    return CheckpointError(f"{path}: its pickle is {size} bytes, over the {LIMITS.max_pickle_bytes:,} a checkpoint's "
                           f"needs (raise {env_name('max_pickle_bytes')} if that is real)")


class _Bounded(io.RawIOBase):
    """A file read no further than ``limit`` bytes; a read past that is refused. The legacy format's pickles
    come first in its file, before the tensors' data, and are bounded as a zip's data.pkl is."""

    def __init__(self, f, limit: int, path: str):
        self.f, self.left, self.path, self.read_so_far = f, limit, path, 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:  # where pickletools says a broken opcode is
        return self.read_so_far

    def readinto(self, buffer) -> int:
        if self.left <= 0:
            raise _too_large(self.path, f"more than {LIMITS.max_pickle_bytes:,}")
        data = self.f.read(min(len(buffer), self.left))
        buffer[:len(data)] = data
        self.left -= len(data)
        self.read_so_far += len(data)
        return len(data)


# torch.save before 1.6 wrote four pickles in a row (a magic number, the protocol version, the system's
# sizes, the object), then its storages' keys and data
LEGACY_PICKLES = 4


def _pickle_of(path: str) -> bytes:
    """The pickle of a torch zip archive (``<archive>/data.pkl``), read only if within the size bound."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                raise _not_a_checkpoint(path, "a zip archive without the data.pkl torch.save writes")
            info = z.getinfo(names[0])
            if info.file_size > LIMITS.max_pickle_bytes:
                raise _too_large(path, f"{info.file_size:,}")
            with z.open(info) as f:
                data = f.read(LIMITS.max_pickle_bytes + 1)
    except zipfile.BadZipFile as err:
        raise _not_a_checkpoint(path, f"a broken zip archive ({err})") from None
    if len(data) > LIMITS.max_pickle_bytes:
        raise CheckpointError(f"{path}: its pickle is larger than it says")
    return data


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _scan(path: str, stream, count: int = 1) -> list[str]:
    """The names ``count`` pickles in a row ask for, after checking their nesting against the bound (read
    opcode by opcode from ``stream``: nothing is built). Strings pushed before a STACK_GLOBAL are followed
    through the memo."""
    names = []
    for _ in range(count):
        names += _scan_one(path, stream)
    return list(dict.fromkeys(names))


def _scan_one(path: str, stream) -> list[str]:
    depth, marks, memo, recent, names = 0, [], {}, [], []
    try:
        for op, arg, _ in pickletools.genops(stream):
            if op.name == "MARK":
                marks.append(depth)
            else:
                before = op.stack_before
                if pickletools.markobject in before:
                    depth = marks.pop() - before.index(pickletools.markobject)
                else:
                    depth -= len(before)
                depth += len(op.stack_after)
            if depth + len(marks) > LIMITS.max_pickle_depth:
                raise CheckpointError(f"{path}: its pickle nests containers more than {LIMITS.max_pickle_depth} "
                                      f"deep (raise {env_name('max_pickle_depth')} if that is real)")
            if op.name in _STRING_OPS:
                recent = (recent + [arg])[-2:]
            elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                recent = (recent + [memo.get(arg)])[-2:]
            elif op.name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT") and recent:
                memo[len(memo) if op.name == "MEMOIZE" else arg] = recent[-1]
            if op.name in ("GLOBAL", "INST"):
                module, _, name = arg.partition(" ")
                names.append(_python3_name(module, name))
            elif op.name == "STACK_GLOBAL" and len(recent) == 2 and all(isinstance(s, str) for s in recent):
                names.append(_python3_name(*recent))
    except CheckpointError:
        raise
    except Exception as err:  # a broken pickle: genops says where
        raise _not_a_checkpoint(path, f"its pickle does not parse ({_first_line(err)})") from None
    return names


def _check_storage(obj, path: str) -> None:
    """Every tensor in the loaded object is backed by its storage: a view that claims more elements than
    the file stored (zero strides) would make a few bytes look like gigabytes to whatever reads it. Each
    object is visited once; where it sits in the file is spelled out only for the message (building that
    text for every item costs time in the square of the nesting)."""
    todo, seen = [(None, None, obj)], set()
    while todo:
        item = todo.pop()
        value = item[2]
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            stored = value.untyped_storage().nbytes()
            if value.numel() * value.element_size() > stored:
                raise CheckpointError(f"{path}: tensor {shown(_where(item)) or '(top level)'} claims "
                                      f"{value.numel():,} elements of shape {tuple(value.shape)} but the file "
                                      f"stores {stored:,} bytes")
        elif isinstance(value, dict):
            todo.extend((item, k, v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            todo.extend((item, i, v) for i, v in enumerate(value))


def _where(item) -> str:
    """``model.blocks[0]``: the keys and indices from the top of the file down to an item of _check_storage."""
    parts = []
    while item[0] is not None:
        parts.append(f"[{item[1]}]" if isinstance(item[1], int) else f".{item[1]}")
        item = item[0]
    return "".join(reversed(parts)).lstrip(".")

def load_file(path: str, trust: bool = False, mmap: bool = False) -> object:
    """Read a checkpoint (torch.save's zip or legacy format) without running code from it.

    Names outside the allow-list are refused (named) before anything is unpickled; classes configs
    store as data become ``Stored`` stand-ins. ``trust=True`` unpickles fully (runs the file's code).
    ``mmap``: tensors stay in the file until used (reading a checkpoint's config costs no memory)."""
    path = os.fspath(path)
    kind = check_file(path)
    mmap = mmap and kind == "zip"
    if trust:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        except Exception as err:  # noqa: B902 (whatever the file's own code raises)
            raise CheckpointError(f"{path} could not be unpickled even fully: {type(err).__name__}: "
                                  f"{_first_line(err)}") from None
    if kind == "zip":
        names = _scan(path, io.BytesIO(_pickle_of(path)))
    else:
        with open(path, "rb") as f:
            names = _scan(path, io.BufferedReader(_Bounded(f, LIMITS.max_pickle_bytes, path)), LEGACY_PICKLES)
    names = [n for n in names if classify(n, installed=False) != "allowed"]
    if len(names) > LIMITS.max_stand_ins:  # before each is looked up: that costs time per name
        raise _too_many_names(path)
    refused = [n for n in names if classify(n) == "refused"]
    if refused:
        raise _refusal(path, refused)
    reading = _reading.current = _Reading(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_SAFE_PICKLE, mmap=mmap)
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, RecursionError, MemoryError, RuntimeError, EOFError, ValueError, TypeError,
            KeyError, IndexError, AttributeError, OSError, UnicodeError) as err:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {type(err).__name__}: "
                              f"{shown(_first_line(err))}") from None
    finally:
        _reading.current = None
    _check_storage(obj, path)
    if reading.stand_ins:
        names = list(reading.stand_ins)
        listed = ", ".join(shown(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")
        logger.info(f"{path}: read without importing the {len(names)} classes it names ({listed}); their "
                    f"objects are kept as stored data")
    return obj


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_json(path: str) -> object:
    """A JSON file from outside (an export's config.json), within the size bound; errors name the file."""
    import json

    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found")
    if os.path.getsize(path) > LIMITS.max_json_bytes:
        raise CheckpointError(f"{path} is larger than the {LIMITS.max_json_bytes:,} bytes a config needs "
                              f"(raise {env_name('max_json_bytes')} if that is real)")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (ValueError, RecursionError, UnicodeError) as err:
        raise CheckpointError(f"{path} is not a readable JSON file: {type(err).__name__}: "
                              f"{shown(_first_line(err))}") from None

