"""The training split as fairseq iterates it with the recipes' loader settings: data-loading workers kept
alive across epochs (fairseq's default reuse_dataloader / persistent_workers), several ranks, resumes.

Images are recorded by (epoch, id) straight from fairseq's EpochBatchIterator built by the task, as
the trainer builds it; a crop that does not change with the epoch, or that depends on the worker or
rank that drew it, shows as equal or unequal tensors."""
import numpy as np
import pytest
import torch
from PIL import Image

from d2v_plugin.tasks.image_folder_classification import (ImageFolderClassificationConfig,
                                                           ImageFolderClassificationTask)


def make_task(root, tmp_path, **overrides):
    cfg = ImageFolderClassificationConfig(data=str(root), image_size=16, seed=1, cache_dir=str(tmp_path / "cache"),
                                          **overrides)
    task = ImageFolderClassificationTask.setup_task(cfg)
    task.load_dataset("train", epoch=1)
    return task


def train_iterator(task, num_workers, num_shards=1, shard_id=0, epoch=1):
    """What ``Trainer.get_train_iterator`` asks of the task (fairseq's defaults for everything else)."""
    itr = task.get_batch_iterator(task.datasets["train"], max_sentences=4, required_batch_size_multiple=2, seed=1,
                                  num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, epoch=epoch,
                                  data_buffer_size=10)
    itr.first_batch  # the trainer's dummy batch, built before training starts
    return itr


def record(itr, seen, batches=None):
    """Run the iterator's next epoch (or its first ``batches`` batches); images by (epoch, id)."""
    for k, batch in enumerate(itr.next_epoch_itr(shuffle=True)):
        for i, image in zip(batch["id"].tolist(), batch["net_input"]["images"]):
            seen[(itr.epoch, i)] = image.clone()
        if batches is not None and k + 1 == batches:
            break
    return seen


def run_epochs(task, epochs, **kw):
    itr, seen = train_iterator(task, **kw), {}
    for _ in range(epochs):
        record(itr, seen)
    close(itr)
    return seen


def close(itr):
    """Stop the iterator's persistent workers now, as the trainer's exit does: left to the garbage
    collector until other loaders have forked workers of their own, each takes torch's 5 s timeout."""
    loader_iter = itr.dataloader._iterator if itr.dataloader is not None else None
    if loader_iter is not None and hasattr(loader_iter, "_shutdown_workers"):
        loader_iter._shutdown_workers()


def test_workers_draw_new_crops_every_epoch_and_the_same_crops_as_no_workers(image_root, tmp_path):
    with_workers = run_epochs(make_task(image_root, tmp_path), 3, num_workers=2)
    without = run_epochs(make_task(image_root, tmp_path), 3, num_workers=0)
    n = 24  # training images (the last batch of each epoch is even: no image left out)
    assert len(with_workers) == len(without) == 3 * n
    for key, image in without.items():
        assert torch.equal(with_workers[key], image), key  # image i of epoch e: one crop, whoever loads it
    for e in (1, 2):
        changed = sum(not torch.equal(without[(e, i)], without[(e + 1, i)]) for i in range(n))
        assert changed >= n - 1, (e, changed)  # a new crop and flip every epoch


def test_a_resumed_iterator_draws_the_crops_of_the_uninterrupted_one(image_root, tmp_path):
    whole = run_epochs(make_task(image_root, tmp_path), 2, num_workers=2)
    itr, seen = train_iterator(make_task(image_root, tmp_path), num_workers=2), {}
    record(itr, seen)
    record(itr, seen, batches=2)  # into epoch 2, then "killed"
    state = itr.state_dict()
    assert state["epoch"] == 2 and state["iterations_in_epoch"] == 2
    close(itr)
    resumed = train_iterator(make_task(image_root, tmp_path), num_workers=2, epoch=2)  # as fairseq rebuilds it
    resumed.load_state_dict(state)
    record(resumed, seen)
    close(resumed)
    assert seen.keys() == whole.keys() and all(torch.equal(seen[k], whole[k]) for k in whole)


@pytest.fixture
def identical_images(tmp_path):
    """16 copies of one photograph: two equal tensors can only come from two equal augmentation draws."""
    from skimage import data

    photo = Image.fromarray(data.coffee()).resize((48, 32), Image.BICUBIC)
    for split, n in (("train", 16), ("val", 2)):
        folder = tmp_path / "same" / split / "only"
        folder.mkdir(parents=True)
        for j in range(n):
            photo.save(folder / f"{j:02d}.png")
    return tmp_path / "same"


def test_randaugment_draws_per_image_not_per_worker_and_rank(identical_images, tmp_path):
    recipe = dict(auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25)
    one_rank = run_epochs(make_task(identical_images, tmp_path, **recipe), 2, num_workers=2)
    two_ranks = {}
    for rank in (0, 1):
        torch.manual_seed(1)  # fairseq seeds every rank alike: their workers start from equal RNG states
        two_ranks.update(run_epochs(make_task(identical_images, tmp_path, **recipe), 2, num_workers=2,
                                    num_shards=2, shard_id=rank))
    assert two_ranks.keys() == one_rank.keys() and len(one_rank) == 2 * 16
    for key, image in one_rank.items():
        assert torch.equal(two_ranks[key], image), key  # the same augmentation for the same (epoch, image)
    pixels = {image.numpy().tobytes() for image in two_ranks.values()}
    assert len(pixels) == len(two_ranks)  # a different augmentation for every (epoch, image)


def test_randaugment_leaves_the_global_random_state_as_it_found_it(identical_images, tmp_path):
    import random

    task = make_task(identical_images, tmp_path, auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25)
    ds = task.datasets["train"]
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    a, b = ds[(4, 0)]["image"], ds[(4, 0)]["image"]
    assert torch.equal(a, b) and not torch.equal(a, ds[(5, 0)]["image"])
    after = random.getstate(), np.random.get_state()[1], torch.get_rng_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])


def test_without_workers_the_randaugment_path_loads_in_the_training_thread(identical_images, tmp_path):
    # fairseq's background loading thread would reseed the global RNGs while the model draws drop path
    from fairseq.data.iterators import BufferedIterator

    task = make_task(identical_images, tmp_path, auto_augment="rand-m9-mstd0.5-inc1")
    itr = train_iterator(task, num_workers=0)
    assert itr.buffer_size == 0 and not isinstance(itr.next_epoch_itr()._itr, BufferedIterator)
    plain = train_iterator(make_task(identical_images, tmp_path), num_workers=0)
    assert plain.buffer_size == 10  # the plugin's own transform keeps fairseq's buffer
