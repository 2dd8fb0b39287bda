"""The fairseq task ``image_folder_classification``: ImageFolder-style splits, transforms, metrics."""

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from fairseq import metrics, utils
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING, OmegaConf, open_dict

from d2v_plugin import compat
from d2v_plugin.cluster import (MicroBatchPlaces, ResumableEpochBatchIterator, StopRequest, cores_per_local_rank,
                                data_parallel_rank_and_size, micro_batch_seed, parse_signals)
from d2v_plugin.data import DataError, ImageFolderDataset, resolve_data_config, train_transform
from d2v_plugin.data.containers import open_split
from d2v_plugin.data.dataset import BadImageReport, tag_batches_with_epoch
from d2v_plugin.data.device_batch import DevicePrefetcher, decode_on_device, to_model_input
from d2v_plugin.data.transforms import data_eval_transform, interpolation_modes
from d2v_plugin.models.checkpoints import load_file
from d2v_plugin.models.classifier import record_architecture
from d2v_plugin.names import TASK_NAME
from d2v_plugin.training import (UpdatePace, build_config_for_resume, checkpoint_fairseq_restores, check_flat_params, check_precision,
                                 check_workers, resolve_update_freq, run_config)

logger = logging.getLogger(__name__)


@dataclass
class ImageFolderClassificationConfig(FairseqDataclass):
    data: str = field(
        default=MISSING,
        metadata={"help": "the dataset: a root holding <split>/<class>/<image> folders, Parquet files "
                          "(<split>-*.parquet, the Hugging Face layout) or tar shards (<split>-*.tar), or a brace "
                          "pattern of shards ({split} for the split's name)"},
    )
    data_format: str = field(
        default="auto", metadata={"help": "auto (found from what task.data holds), folder, parquet or wds"}
    )
    image_size: int = field(default=224, metadata={"help": "side of the square crop fed to the model"})
    train_crop_scale: List[float] = field(
        default_factory=lambda: [0.08, 1.0], metadata={"help": "RandomResizedCrop area range for training"}
    )
    eval_crop_ratio: float = field(
        default=0.875, metadata={"help": "eval: resize the shorter side to image_size / ratio, centre-crop image_size"}
    )
    interpolation: str = field(
        default="bicubic",
        metadata={"help": "resampling of every resize: the training crop, the eval resize, timm's transform "
                          "(bicubic, as data2vec; bilinear; nearest); recorded for evaluate and export"},
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
    global_batch_size: Optional[int] = field(
        default=None,
        metadata={"help": "the recipe's global batch (dataset.batch_size x GPUs x optimization.update_freq): at "
                          "start-up update_freq is set to reach it on the GPUs at hand, or the run stops if "
                          "it cannot be reached; null = no check"},
    )
    rebuild_batches: bool = field(
        default=True,
        metadata={"help": "draw new batches every epoch (fairseq otherwise keeps the first epoch's batches and "
                          "only reorders them: the same mixup pairs every epoch, and a resumed run would "
                          "build other batches than an uninterrupted one)"},
    )
    save_on_signal: str = field(
        default="USR1,TERM",
        metadata={"help": "signals (comma-separated) on which training finishes the update in flight, saves "
                          "checkpoint_last.pt and exits with status 75 to be resumed (SLURM: #SBATCH "
                          "--signal=USR1@180); none = fairseq's default (the signal ends the run)"},
    )
    requeue_on_signal: bool = field(
        default=False,
        metadata={"help": "after stopping on a signal under SLURM, requeue the job (scontrol requeue), as PyTorch "
                          "Lightning does; the requeued job resumes from checkpoint_last.pt"},
    )
    seed: int = II("common.seed")


@register_task(TASK_NAME, dataclass=ImageFolderClassificationConfig)
class ImageFolderClassificationTask(FairseqTask):
    cfg: ImageFolderClassificationConfig

    def __init__(self, cfg: ImageFolderClassificationConfig, classes: list[str]):
        super().__init__(cfg)
        self.classes = classes
        self.data_cfg = resolve_data_config(task=cfg)  # what validation, evaluate, knn and export all read
        self.report_bad_images = BadImageReport()  # each unreadable file logged once per run
        self.bad_images_total = 0  # training images left out so far in the run (kept in checkpoints)
        self.stop_signals = parse_signals(cfg.save_on_signal)
        self.stop_request = None  # a StopRequest once a training run starts (get_batch_iterator)
        self.micro_batch_places = MicroBatchPlaces()
        self.pace = None  # the training's measured pace, said once (an UpdatePace once a training run starts)

    @classmethod
    def setup_task(cls, cfg: ImageFolderClassificationConfig, from_checkpoint: bool = False, **kwargs):
        missing = OmegaConf.is_missing(cfg, "data") if OmegaConf.is_config(cfg) else cfg.data == MISSING
        if missing or not cfg.data:
            raise DataError("task.data is not set: pass task.data=<root holding train/ and val/ folders>")
        if "{" not in cfg.data and not os.path.isdir(cfg.data):
            raise DataError(f"task.data={cfg.data} does not exist or is not a folder")
        if cfg.on_bad_image not in ("skip", "error"):
            raise DataError(f"task.on_bad_image={cfg.on_bad_image!r}: use skip or error")
        interpolation_modes(cfg.interpolation)
        if cfg.device_decode and (cfg.auto_augment or cfg.random_erasing):
            raise DataError("task.device_decode=true works with the plugin's augmentation only: unset "
                            "task.auto_augment and task.random_erasing (timm's transform decodes in the workers)")
        # the whole run's config, when fairseq-hydra-train set this task up for training (not when
        # fairseq rebuilds a saved model: then the config is the checkpoint's)
        run = None if from_checkpoint else run_config(cfg)
        if run is not None:
            check_precision(run.common)
            check_flat_params(run)
            resolve_update_freq(cfg.global_batch_size, run)
            compat.install_finished_run_check()  # a finished run is not stepped again (compat.py, 5)
            check_workers(run.dataset, cores_per_local_rank(run.distributed_training))
        train = open_split(cfg.data, cfg.train_split, cache_dir=cfg.cache_dir, data_format=cfg.data_format,
                           on_bad_image=cfg.on_bad_image)
        logger.info(f"{len(train.classes)} classes in {train.split_dir}")
        task = cls(cfg, train.classes)
        task._indexes = {cfg.train_split: train}
        task.run = run
        return task

    def load_dataset(self, split: str, combine: bool = False, epoch: int = 1, **kwargs):
        index = self._indexes.pop(split, None) or open_split(
            self.cfg.data, split, classes=self.classes, cache_dir=self.cfg.cache_dir, data_format=self.cfg.data_format,
            on_bad_image=self.cfg.on_bad_image)
        is_train = split == self.cfg.train_split
        if is_train:
            transform = train_transform(self.cfg.image_size, self.cfg.train_crop_scale, self.cfg.auto_augment,
                                        self.cfg.random_erasing, self.cfg.fast_decode, self.data_cfg.mean,
                                        self.data_cfg.std, self.data_cfg.interpolation)
        else:
            # no fast_decode here: validation computes exactly what cli.evaluate reports for the checkpoint,
            # so the best checkpoint is picked on the pixels it is evaluated on
            transform = data_eval_transform(self.data_cfg)
        self.datasets[split] = ImageFolderDataset(index, transform, self.cfg.on_bad_image, shuffle=is_train,
                                                  seed=self.cfg.seed, device_decode=is_train and self.cfg.device_decode)
        # On resume fairseq starts prefetching the fast-forwarded epoch before it calls set_epoch:
        # the dataset must know its epoch from the start for the augmentation to match.
        self.datasets[split].set_epoch(epoch)
        logger.info(f"{split}: {len(index)} images in {index.split_dir}")
        if self.datasets[split].device_decode:
            logger.info(f"{split}: JPEGs are decoded on the training device (task.device_decode)")

    def model_input(self, sample, model) -> bool:
        """The batch (on the model's device) made the model's input (data.device_batch.to_model_input);
        its unreadable files logged once. True when no image is left (the gradient is then ignored)."""
        empty = to_model_input(sample, self.data_cfg, next(model.parameters()).dtype, self.cfg.image_size,
                               self.cfg.on_bad_image)
        self.report_bad_images(sample)
        return empty

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        ignore_grad = self.model_input(sample, model) or ignore_grad
        # mixup and drop path draw from (seed, update, place in the global batch): a resume draws as the
        # run did, and the same images draw alike however the global batch is split over ranks and steps
        place = self.micro_batch_places(update_num)
        criterion.set_update(update_num, place)
        utils.set_torch_seed(micro_batch_seed(self.cfg.seed, update_num, place))
        if self.pace is not None:
            self.pace.seen(update_num)
        loss, sample_size, logging_output = super().train_step(sample, model, criterion, optimizer, update_num,
                                                               ignore_grad)
        if self.stop_request is not None:
            self.stop_request.mark(logging_output)
        return loss, sample_size, logging_output

    def valid_step(self, sample, model, criterion):
        self.model_input(sample, model)
        return super().valid_step(sample, model, criterion)

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if self.stop_request is not None:  # fairseq summed the update's outputs over the ranks: all agree
            self.stop_request.agree(logging_outputs)
        # only training outputs carry bad_images (fairseq has summed them over the ranks already)
        if not any("bad_images" in log for log in logging_outputs):
            return
        self.bad_images_total += sum(int(log["bad_images"]) for log in logging_outputs if "bad_images" in log)
        if self.bad_images_total:  # the run's running total, beside the epoch's own bad_images
            metrics.log_scalar("bad_images_total", self.bad_images_total, weight=0)

    def get_batch_iterator(self, dataset, *args, required_batch_size_multiple=1, num_workers=0, data_buffer_size=0,
                           **kwargs):
        is_train = dataset is self.datasets.get(self.cfg.train_split)
        # fairseq's batch_by_size drops the samples that do not fill a multiple of
        # required_batch_size_multiple: for mixup in training that is the point (even batches), but
        # validation must see every image
        if not is_train:
            required_batch_size_multiple = 1
        if is_train and self.stop_request is None and getattr(self, "run", None) is not None:
            self.start_stopping_on_signals()
        if is_train and self.pace is None and getattr(self, "run", None) is not None:
            self.pace = self.update_pace(len(dataset))
        if self.stop_request is not None:  # before fairseq starts (forks) the data-loading workers
            dataset.stop_signals = self.stop_request.signals
        # With no workers fairseq loads batches in a background thread (data_buffer_size); timm's
        # transform seeds and restores the process-wide RNGs per image, which would race with the
        # training loop's own draws (drop path on the CPU), so that path then loads in the main thread.
        if num_workers == 0 and getattr(dataset, "uses_global_rngs", False):
            data_buffer_size = 0
        epoch_iter = super().get_batch_iterator(dataset, *args, required_batch_size_multiple=required_batch_size_multiple,
                                                num_workers=num_workers, data_buffer_size=data_buffer_size, **kwargs)
        # fairseq keeps the workers (and their copies of the dataset) alive across epochs: the epoch
        # travels with every training batch instead (data.dataset.EpochBatch). The iterator is cached
        # per dataset, so it is tagged once; its batches are not built yet (fairseq builds them lazily).
        if is_train and not getattr(epoch_iter.batch_sampler, "tags_epochs", False):
            epoch_iter.batch_sampler = tag_batches_with_epoch(epoch_iter.batch_sampler)
            epoch_iter._frozen_batches = None  # rebuild_batches=false: fairseq froze untagged batches already
        if is_train:  # its saved position says on how many ranks it was counted (resume on another number)
            ResumableEpochBatchIterator.adopt(epoch_iter, kwargs.get("max_sentences"))
            if dataset.device_decode and isinstance(epoch_iter, ResumableEpochBatchIterator):
                # batch k + 1 is copied to the device and decoded there while batch k trains
                device = self.training_device()
                logger.info(f"train: batches are copied and their JPEGs decoded, prepared on {device} one batch "
                            f"ahead of the training step (task.device_decode)")
                epoch_iter.batches_through = lambda batches: DevicePrefetcher(batches, self.decode_on_device, device)
        return epoch_iter

    def update_pace(self, images: int) -> UpdatePace | None:
        """What measures and says the training's pace (rank 0 only)."""
        rank, world = data_parallel_rank_and_size()
        if rank != 0:
            return None
        opt, dataset = self.run.optimization, self.run.dataset
        per_rank_batches = -(-images // max(world, 1) // max(dataset.batch_size or 1, 1))
        updates_per_epoch = max(1, -(-per_rank_batches // max(opt.update_freq[0], 1)))
        return UpdatePace(self.run.common.log_interval, opt.max_update, updates_per_epoch, opt.max_epoch)

    def training_device(self) -> torch.device:
        """The device fairseq trains on in this process (it has set the current CUDA device by now)."""
        cpu = getattr(getattr(self, "run", None), "common", None) is not None and self.run.common.cpu
        if cpu or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    def decode_on_device(self, sample: dict) -> dict:
        """A training batch on its device with its encoded JPEGs decoded there (task.device_decode)."""
        decode_on_device(sample, self.cfg.image_size, self.cfg.on_bad_image, self.data_cfg.interpolation)
        return sample

    def start_stopping_on_signals(self) -> None:
        """A training run starts: from now on the configured signals stop it to be resumed (cluster.py)."""
        self.stop_request = StopRequest(self.stop_signals, self.cfg.requeue_on_signal)
        if not self.stop_signals or not compat.install_save_on_signal():
            self.stop_request = None
            return
        dist = self.run.distributed_training
        if dist.distributed_world_size > 1 and not dist.distributed_no_spawn:
            logger.warning(
                "fairseq starts the ranks from one parent process here (distributed_training.distributed_no_spawn="
                "false), which does not load this plugin: a signal to the whole job ends that parent, and the ranks "
                "with it, before they can save. To save on signals, start one process per GPU: srun "
                "--ntasks-per-node=<GPUs> with distributed_training.distributed_port=<port>, or torchrun "
                "--nproc_per_node=<GPUs> --no-python fairseq-hydra-train ... (which passes on SIGTERM, not SIGUSR1; "
                "docs/cluster.md)")
        self.stop_request.install()

    def build_model(self, cfg, from_checkpoint: bool = False):
        expected = getattr(cfg, "num_classes", None)
        if expected is not None and expected != len(self.classes):
            raise DataError(
                f"model.num_classes={expected} but {os.path.join(self.cfg.data, self.cfg.train_split)} has "
                f"{len(self.classes)} class folders: set model.num_classes={len(self.classes)}"
            )
        build_cfg = cfg
        if from_checkpoint:  # fairseq loads the saved weights next: the recorded architecture is enough
            build_cfg = build_config_for_resume(cfg, None)
        elif getattr(self, "run", None) is not None:
            resume = checkpoint_fairseq_restores(self.run.checkpoint)
            if resume is not None:
                # fairseq is about to load this checkpoint over the model: build the architecture it
                # recorded, without reading model.pretrained_checkpoint (which may be gone by now)
                saved = load_file(resume, mmap=True)
                build_cfg = build_config_for_resume(cfg, resume, saved)
                task_state = saved.get("task_state") or {}  # fairseq restores the task's state only for inference
                self.bad_images_total = int(task_state.get("bad_images_total", 0))
                logger.info(f"resuming from {resume}: the model is built from the architecture saved there "
                            "(model.pretrained_checkpoint is not read)")
        model = super().build_model(build_cfg, from_checkpoint)
        # fairseq built the model from a merged copy of cfg; the trainer saves this one
        record_architecture(cfg, model.encoder.cfg)
        return model

    def build_criterion(self, cfg, from_checkpoint: bool = False):
        # fairseq-validate's own config has no model group to take the criterion's num_classes from
        # (`--criterion mixup_cross_entropy`): the classes are the task's
        if getattr(cfg, "num_classes", 0) is None:
            with open_dict(cfg) if OmegaConf.is_config(cfg) else contextlib.nullcontext():
                cfg.num_classes = len(self.classes)
        return super().build_criterion(cfg, from_checkpoint)

    def state_dict(self):
        # saved in every checkpoint as task_state: export and predict name classes from it
        return {"classes": list(self.classes), "bad_images_total": self.bad_images_total}

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
