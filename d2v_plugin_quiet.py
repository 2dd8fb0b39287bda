"""Known, harmless console noise of fairseq, hydra and torch, silenced by name.

A run is started by ``fairseq-hydra-train``, which imports torch, fairseq and hydra (and so raises
most of these warnings) before it loads the plugin. This module therefore also runs at interpreter
start-up, from a one-line ``d2v_plugin_quiet.pth`` in the environment's site-packages (``make setup``
writes it; ``python -m d2v_plugin_quiet --install`` does it by hand). It imports nothing but the
standard library, and only ever ignores the exact messages listed here; any other warning shows.
The plugin installs the same filters when imported, for environments without the .pth.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import sysconfig
import warnings

# (category, start of the message as a regular expression, module the warning is raised from or None)
HARMLESS_WARNINGS = [
    # fairseq decorates modules with torch.jit.script at import; the plugin never scripts anything
    (FutureWarning, r"`torch\.jit\.script` is deprecated", r"torch\.jit\._script"),
    # fairseq's hydra.main has no version_base; its configs are hydra 1.1 style on purpose
    (UserWarning, r"\s*The version_base parameter is not specified", r"fairseq_cli\.hydra_train"),
    # fairseq's recipes (and the plugin's, as fairseq's loader expects) use '# @package _group_'
    (UserWarning, r"In '[^']+': Usage of deprecated keyword in package header '# @package _group_'",
     r"hydra\.core\.default_element"),
    # fairseq registers each recipe's schema in hydra's ConfigStore under the recipe's own name
    (UserWarning, r"\s*'[^']+' is validated against ConfigStore schema with the same name", None),
    # fairseq's loader asks for pinned memory; without an accelerator torch just says it will not pin
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found", r"torch\.utils\.data"),
    # fairseq's train_step uses torch.cuda.amp.autocast (a deprecated spelling of torch.amp.autocast)
    (FutureWarning, r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated", r"fairseq\.tasks\.fairseq_task"),
]

# hydra logs its job-runtime bookkeeping at DEBUG before it configures logging, while the root logger
# is still at the DEBUG level fairseq's import left it at (see fairseq_root_logging_undone)
QUIET_LOGGERS = {"hydra.core.utils": logging.INFO}

PTH_NAME = "d2v_plugin_quiet.pth"


def silence_known_warnings() -> None:
    for category, message, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module or "")
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def fairseq_root_logging_undone():
    """Import fairseq inside this block: ``import fairseq`` runs ``logging.basicConfig(level=DEBUG)``
    (in fairseq.models.wav2vec.wav2vec2_classification), after which every library's debug messages
    (PIL prints one per chunk of every image it opens) reach stderr. If the root logger had no handler
    before the block, the handler and level fairseq set are taken back afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    if not handlers and root.level == logging.DEBUG:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(level)


def install_pth() -> str:
    """Write the start-up hook into this environment's site-packages; returns its path."""
    path = os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)
    with open(path, "w") as f:
        f.write("import d2v_plugin_quiet\n")
    return path


silence_known_warnings()

if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        print(f"usage: python -m d2v_plugin_quiet --install   (writes {PTH_NAME} into site-packages)", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {install_pth()}")
