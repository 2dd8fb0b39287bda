"""Make fairseq's checkpoint copies atomic.

fairseq writes each checkpoint once, atomically (``torch_persistent_save``: write ``.tmp``, rename),
then *copies* it to the other names it is saved under (``checkpoint_last.pt``, ``checkpoint_best.pt``)
with ``PathManager.copy`` -> ``shutil.copyfile``, which truncates the destination first. A job killed
during that copy (a 350 MB base checkpoint takes a while) leaves a half-written ``checkpoint_last.pt``
and the restart cannot resume. Installed when the plugin is imported, this wraps ``PathManager.copy``
for local destinations: copy to a temporary file beside the destination, then ``os.replace``.
"""
import os
import shutil

from fairseq.file_io import PathManager

from d2v_plugin.atomic import atomic_path

_original_copy = PathManager.copy


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    if "://" in str(dst_path) or "://" in str(src_path):  # remote storage: leave it to iopath
        return _original_copy(src_path, dst_path, overwrite=overwrite)
    if os.path.exists(dst_path) and not overwrite:
        return False
    with atomic_path(dst_path) as tmp:
        shutil.copyfile(src_path, tmp)
    return True


def install() -> None:
    if PathManager.copy is not atomic_copy:
        PathManager.copy = staticmethod(atomic_copy)
