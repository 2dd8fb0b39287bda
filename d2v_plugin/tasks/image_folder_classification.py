"""The fairseq task ``image_folder_classification``: ImageFolder-style splits, transforms, metrics."""

import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING, OmegaConf

from d2v_plugin.data import DataError, ImageFolderDataset, eval_transform, index_split, train_transform
from d2v_plugin.data.transforms import IMAGENET_MEAN, IMAGENET_STD, decode_crops, normalize_batch
from d2v_plugin.models.classifier import record_architecture

logger = logging.getLogger(__name__)


@dataclass
class ImageFolderClassificationConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "root holding <split>/<class>/<image> folders"})
    image_size: int = field(default=224, metadata={"help": "side of the square crop fed to the model"})
    train_crop_scale: List[float] = field(
        default_factory=lambda: [0.08, 1.0], metadata={"help": "RandomResizedCrop area range for training"}
    )
    eval_crop_ratio: float = field(
        default=0.875, metadata={"help": "eval: resize the shorter side to image_size / ratio, centre-crop image_size"}
    )
    auto_augment: Optional[str] = field(
        default=None, metadata={"help": "timm RandAugment policy for training (data2vec's fine-tuning: "
                                        "rand-m9-mstd0.5-inc1); null = the pretraining augmentation only"}
    )
    random_erasing: float = field(default=0.0, metadata={"help": "timm random-erasing probability for training"})
    fast_decode: bool = field(
        default=False,
        metadata={"help": "decode JPEGs at 1/2, 1/4 or 1/8 scale when the crop still has the output size "
                          "(same crop boxes; pays off on photos well above 500x375, see BENCHMARKS.md)"},
    )
    device_decode: bool = field(
        default=False,
        metadata={"help": "decode training JPEGs and resize their crops on the training device: TorchCodec "
                          "decodes each batch there (nvJPEG on a GPU); the data-loading workers only read the "
                          "files and draw the crops (the same crops). For GPU nodes whose CPUs cannot keep up; "
                          "other formats are still decoded by the workers"},
    )
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "where the folder index is cached; null = ~/.cache/d2v_plugin/index"}
    )
    on_bad_image: str = field(
        default="skip", metadata={"help": "skip: drop unreadable images and log them; error: stop naming the file"}
    )
    train_split: str = field(default="train", metadata={"help": "folder whose classes define the label ids"})
    rebuild_batches: bool = field(
        default=True,
        metadata={"help": "draw new batches every epoch (fairseq otherwise keeps the first epoch's batches and "
                          "only reorders them: the same mixup pairs every epoch, and a resumed run would "
                          "build other batches than an uninterrupted one)"},
    )
    seed: int = II("common.seed")


@register_task("image_folder_classification", dataclass=ImageFolderClassificationConfig)
class ImageFolderClassificationTask(FairseqTask):
    cfg: ImageFolderClassificationConfig

    def __init__(self, cfg: ImageFolderClassificationConfig, classes: list[str]):
        super().__init__(cfg)
        self.classes = classes

    @classmethod
    def setup_task(cls, cfg: ImageFolderClassificationConfig, **kwargs):
        missing = OmegaConf.is_missing(cfg, "data") if OmegaConf.is_config(cfg) else cfg.data == MISSING
        if missing or not cfg.data:
            raise DataError("task.data is not set: pass task.data=<root holding train/ and val/ folders>")
        if not os.path.isdir(cfg.data):
            raise DataError(f"task.data={cfg.data} does not exist or is not a folder")
        if cfg.on_bad_image not in ("skip", "error"):
            raise DataError(f"task.on_bad_image={cfg.on_bad_image!r}: use skip or error")
        if cfg.device_decode and (cfg.auto_augment or cfg.random_erasing):
            raise DataError("task.device_decode=true works with the plugin's augmentation only: unset "
                            "task.auto_augment and task.random_erasing (timm's transform decodes in the workers)")
        train = index_split(cfg.data, cfg.train_split, cache_dir=cfg.cache_dir)
        logger.info(f"{len(train.classes)} classes in {train.split_dir}")
        task = cls(cfg, train.classes)
        task._indexes = {cfg.train_split: train}
        return task

    def load_dataset(self, split: str, combine: bool = False, epoch: int = 1, **kwargs):
        index = self._indexes.pop(split, None) or index_split(
            self.cfg.data, split, classes=self.classes, cache_dir=self.cfg.cache_dir
        )
        is_train = split == self.cfg.train_split
        if is_train:
            transform = train_transform(self.cfg.image_size, self.cfg.train_crop_scale, self.cfg.auto_augment,
                                        self.cfg.random_erasing, self.cfg.fast_decode)
        else:
            transform = eval_transform(self.cfg.image_size, self.cfg.eval_crop_ratio, self.cfg.fast_decode)
        # batches stay uint8 until train_step / valid_step: a quarter of the bytes to copy to the GPU,
        # and the normalisation runs there instead of in the data-loading workers
        self.datasets[split] = ImageFolderDataset(index, transform, self.cfg.on_bad_image, shuffle=is_train,
                                                  seed=self.cfg.seed, normalize=False,
                                                  device_decode=is_train and self.cfg.device_decode)
        # On resume fairseq starts prefetching the fast-forwarded epoch before it calls set_epoch:
        # the dataset must know its epoch from the start for the augmentation to match.
        self.datasets[split].set_epoch(epoch)
        logger.info(f"{split}: {len(index)} images in {index.split_dir}")
        if self.datasets[split].device_decode:
            logger.info(f"{split}: JPEGs are decoded on the training device (task.device_decode)")

    @staticmethod
    def normalize_images(sample, model) -> None:
        """uint8 images of a batch (already on the model's device) -> normalised, in the model's dtype."""
        images = (sample or {}).get("net_input", {}).get("images")
        if images is not None and images.dtype == torch.uint8:
            dtype = next(model.parameters()).dtype
            sample["net_input"]["images"] = normalize_batch(images, IMAGENET_MEAN, IMAGENET_STD).to(dtype)

    def decode_encoded(self, sample) -> bool:
        """``task.device_decode``: decode the batch's still-encoded JPEGs and resize their crops on the
        device the batch is on, appended after the images the workers decoded. A JPEG whose body does
        not decode is left out of the batch (its target and id too) and counted in ``bad_images``, or
        stops the run with ``on_bad_image=error``. True when no image at all is left: the batch then
        runs as zeros with its gradient ignored, as fairseq does with its dummy batches."""
        encoded = sample.pop("encoded", None) if sample else None
        if not encoded:
            return False
        images = sample["net_input"]["images"]
        device, first = sample["target"].device, images.shape[0]
        crops = decode_crops(encoded["jpegs"], encoded["boxes"], encoded["flips"], self.cfg.image_size, device)
        bad = [path for path, crop in zip(encoded["paths"], crops) if crop is None]
        for path in bad:
            if self.cfg.on_bad_image == "error":
                raise DataError(f"unreadable image {path}: the JPEG data does not decode "
                                "(task.on_bad_image=skip skips such files)")
            logger.warning(f"skipping unreadable image {path}: the JPEG data does not decode")
        good = [crop[None] for crop in crops if crop is not None]
        sample["net_input"]["images"] = torch.cat([images, *good])
        if not bad:
            return False
        sample["bad_images"] = sample.get("bad_images", 0) + len(bad)
        if first == 0 and not good:
            sample["net_input"]["images"] = torch.zeros((len(crops), *images.shape[1:]), dtype=images.dtype,
                                                        device=images.device)
            return True
        keep = list(range(first)) + [first + k for k, crop in enumerate(crops) if crop is not None]
        keep = torch.tensor(keep, device=device)
        sample["id"], sample["target"] = sample["id"].index_select(0, keep), sample["target"].index_select(0, keep)
        sample["nsentences"] = sample["ntokens"] = len(keep)
        return False

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        ignore_grad = self.decode_encoded(sample) or ignore_grad
        self.normalize_images(sample, model)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        self.normalize_images(sample, model)
        return super().valid_step(sample, model, criterion)

    def get_batch_iterator(self, dataset, *args, required_batch_size_multiple=1, **kwargs):
        # fairseq's batch_by_size drops the samples that do not fill a multiple of
        # required_batch_size_multiple: for mixup in training that is the point (even batches), but
        # validation must see every image
        if dataset is not self.datasets.get(self.cfg.train_split):
            required_batch_size_multiple = 1
        return super().get_batch_iterator(dataset, *args, required_batch_size_multiple=required_batch_size_multiple,
                                          **kwargs)

    def build_model(self, cfg, from_checkpoint: bool = False):
        expected = getattr(cfg, "num_classes", None)
        if expected is not None and expected != len(self.classes):
            raise DataError(
                f"model.num_classes={expected} but {os.path.join(self.cfg.data, self.cfg.train_split)} has "
                f"{len(self.classes)} class folders: set model.num_classes={len(self.classes)}"
            )
        model = super().build_model(cfg, from_checkpoint)
        # fairseq built the model from a merged copy of cfg; the trainer saves this one
        record_architecture(cfg, model.encoder.cfg)
        return model

    def state_dict(self):
        # saved in every checkpoint as task_state: export and predict name classes from it
        return {"classes": list(self.classes)}

    def load_state_dict(self, state_dict):
        saved = (state_dict or {}).get("classes")
        if saved is not None and list(saved) != list(self.classes):
            raise DataError(f"the checkpoint was trained on other classes than the folders in {self.cfg.data}")

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None

    def max_positions(self):
        return None
