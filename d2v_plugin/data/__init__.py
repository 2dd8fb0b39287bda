"""Image-folder data: the index, robust decoding, transforms and the fairseq dataset."""
from d2v_plugin.data.index import DataError, FolderIndex, index_split  # noqa: F401
from d2v_plugin.data.transforms import eval_transform, normalize_batch, train_transform  # noqa: F401
from d2v_plugin.data.dataset import ImageFolderDataset, load_rgb  # noqa: F401
