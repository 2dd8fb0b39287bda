"""Image data: the folder index, decoding, transforms, the data config, the fairseq dataset and the
device side of a batch (see docs/ARCHITECTURE.md)."""
from d2v_plugin.data.config import DataConfig, resolve_data_config  # noqa: F401
from d2v_plugin.data.dataset import ImageFolderDataset  # noqa: F401
from d2v_plugin.data.decode import load_rgb  # noqa: F401
from d2v_plugin.data.index import DataError, FolderIndex, index_split  # noqa: F401
from d2v_plugin.data.transforms import eval_transform, train_transform  # noqa: F401
