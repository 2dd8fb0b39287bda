"""Read a checkpoint without running code from it: torch's weights_only unpickler, with inert stand-ins
for the classes a file names that are not installed (or not safe), and refusal for files that ask for
modules which run code."""
from __future__ import annotations

import argparse
import logging
import os
import pickle

import torch

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def _enum_value(value):
    # Older fairseq configs pickle data2vec's Modality enum; its value is all we need, and this
    # stand-in keeps the load from importing (and running) anything.
    return value


def _plain_dict(*_args):
    # collections.defaultdict(factory): its items follow; the factory (maybe a stand-in) is never needed
    return {}


_HARMLESS_GLOBALS = [
    (_enum_value, "examples.data2vec.data.modality.Modality"),
    (_plain_dict, "collections.defaultdict"),
    argparse.Namespace,
]

# Plain data types that configs pickle as type references (omegaconf records a node's element and
# reference types): given as themselves, since naming or building one runs nothing.
_DATA_TYPES = [(t, f"builtins.{t.__name__}") for t in (dict, list, tuple, set, frozenset, int, float, str, bytes,
                                                      bool, complex, object)]

# Modules whose names a checkpoint written by training code has no reason to pickle: a file that
# asks for one is refused outright (nothing of it would run either way: see ``Stored``).
REFUSED_MODULES = {"builtins", "os", "posix", "nt", "sys", "subprocess", "shutil", "importlib", "runpy", "pickle",
                   "_pickle", "marshal", "socket", "ctypes", "code", "codeop", "pty", "types", "webbrowser",
                   "multiprocessing", "asyncio", "functools", "operator"}


class Stored:
    """Stands in for a class a checkpoint names that is not imported here (a Lightning run's config
    dataclass, omegaconf's containers, ...): it keeps what the file stored for the object (``args``,
    ``state``) and runs none of the class's code. torch's ``weights_only`` unpickler still does all
    the reading; these stand-ins are the only names it is given beyond its own allow-list."""

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
        return f"<{self.qualname}: stored, not imported>"


def _python3_name(qualname: str) -> str:
    """The name a pickled global refers to in Python 3: pickle protocol 2 writes some under their
    Python 2 names (``commands.Popen`` is ``subprocess.Popen``), and loading maps them back."""
    import _compat_pickle

    module, _, name = qualname.rpartition(".")
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _stand_in(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (Stored,), {"qualname": qualname, "__module__": __name__})


def _refusal(path: str, needed: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: refusing to unpickle objects the file asks for ({needed}); loading them can run "
        f"code from the file. If you trust it, set model.trust_checkpoint=true (--trust-checkpoint "
        f"on the command line tools).")


def load_file(path: str, trust: bool = False, mmap: bool = False) -> object:
    """Read a checkpoint without running code from it.

    torch.load(weights_only=True) first; a file that names classes outside torch's allow-list (a
    Lightning checkpoint's hyper-parameters, typed by the training code's own dataclasses) is read
    again by the same unpickler with those names bound to inert ``Stored`` stand-ins, so its tensors
    come out and nothing of the file's is imported or called. A file naming modules that run code
    (os, subprocess, builtins, ...) is refused. ``trust=True`` unpickles fully (runs the file's code).
    ``mmap``: tensors stay in the file until used (reading a checkpoint's config costs no memory)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_HARMLESS_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        return _load_with_stand_ins(path, err, mmap)
    except Exception as err:  # truncated, text, broken zip: the unpickler fails in many ways
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: {_first_line(err)}") from None


def _load_with_stand_ins(path: str, err: Exception, mmap: bool) -> object:
    try:
        unknown = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint: report what the unpickler said
        raise _refusal(path, _first_line(err)) from None
    data_types = {name: t for t, name in _DATA_TYPES}
    refused = [_python3_name(n) for n in unknown
               if n not in data_types and ("." not in n or _python3_name(n).split(".")[0] in REFUSED_MODULES)]
    if refused or not unknown:
        raise _refusal(path, ", ".join(refused) or _first_line(err))
    given = [(data_types[n], n) if n in data_types else (_stand_in(n), n) for n in unknown]
    try:
        with torch.serialization.safe_globals(_HARMLESS_GLOBALS + given):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err2:
        raise _refusal(path, f"{', '.join(unknown)}: {_first_line(err2)}") from None
    stood_in = [n for n in unknown if n not in data_types]
    shown = ", ".join(stood_in[:4]) + (", ..." if len(stood_in) > 4 else "")
    logger.info(f"{path}: read without importing the {len(stood_in)} classes it names ({shown}); "
                f"their objects are kept as stored data")
    return obj


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
