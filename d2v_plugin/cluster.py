"""Cluster life: a run told to stop by a signal saves and exits to be resumed; a resumed run may have
another number of ranks.

Stopping (``task.save_on_signal``, SIGUSR1 and SIGTERM by default):

1. the signal only sets a flag (``StopRequest``) in the rank that received it; the update in flight
   finishes;
2. the flag rides in that update's logging outputs, which fairseq sums over the ranks anyway, so every
   rank learns of it in the same update (``StopRequest.agree``, from the task's ``reduce_metrics``);
3. fairseq's ``validate_and_save`` (compat.install_save_on_signal) then does what the update has due
   (an epoch's end validates and saves as always), saves ``checkpoint_last.pt`` if it did not, waits
   for every rank, optionally requeues the SLURM job, and exits with ``EXIT_STOPPED`` (75) on every rank.

Data-loading workers leave these signals to the training process (``leave_signals_to_main_process``):
SLURM signals every process of a job step, and a worker killed by SIGTERM makes PyTorch raise in the
training process before it could save.

Resuming on another number of ranks: every rank's batches are one shared, seeded list of batches
dealt out in turn (fairseq's ShardedIterator), so ``k`` batches done on each of ``N`` ranks are the
first ``k * N`` batches of the epoch, which ``M`` ranks continue from (``ResumableEpochBatchIterator``)
when ``k * N`` divides by ``M``. Each micro-batch draws its drop path and mixup from (seed, update,
place in the global batch) (``micro_batch_seed``), so the same images get the same draws whether
they were trained on rank 1 or as rank 0's second accumulation step.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading

from fairseq.data.iterators import EpochBatchIterator

from d2v_plugin.host import available_cores

logger = logging.getLogger(__name__)

EXIT_STOPPED = 75  # os.EX_TEMPFAIL, "temporary failure, try again": stopped on a signal, to be resumed
STOP_KEY = "stop_signal"  # the logging-output entry that carries a rank's stop request to all ranks
UNCATCHABLE = ("KILL", "STOP")


def parse_signals(names: str, setting: str = "task.save_on_signal") -> tuple:
    """``"USR1,SIGTERM"`` (names separated by commas or spaces; ``""`` or ``none``: no signal) -> the
    signals; an unknown or uncatchable name is an error naming the setting."""
    out = []
    for name in re.split(r"[,\s]+", (names or "").strip()):
        if not name or name.lower() == "none":
            continue
        short = str(name).upper().removeprefix("SIG")
        if short in UNCATCHABLE or not hasattr(signal, f"SIG{short}") or short.startswith(("RTMIN", "RTMAX")):
            raise ValueError(f"{setting}: {name!r} is not a signal a process can catch (use e.g. USR1, USR2, TERM)")
        out.append(signal.Signals[f"SIG{short}"])
    return tuple(dict.fromkeys(out))


def slurm_job_id(environ=os.environ) -> str | None:
    """The id ``scontrol requeue`` takes for this job (``<array job>_<task>`` for an array task)."""
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return environ.get("SLURM_JOB_ID")


class StopRequest:
    """The training process's side: signal handlers that note the request, the rank agreement, the exit."""

    def __init__(self, signals: tuple, requeue: bool = False):
        self.signals = signals
        self.requeue = requeue
        self.received: str | None = None  # the first signal's name, in this rank
        self.agreed = False  # some rank received one: set in every rank in the same update
        self._pid = None

    def install(self) -> None:
        """Install the handlers in this (the training) process; idempotent."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        for sig in self.signals:
            signal.signal(sig, self._on_signal)
        if self.signals:
            logger.info(f"on {'/'.join(s.name for s in self.signals)} the run finishes the update in flight, saves "
                        f"checkpoint_last.pt and exits with status {EXIT_STOPPED} (task.save_on_signal)")

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked data-loading worker, before it set its own handling
            return
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            logger.warning(f"received {name}: finishing the update in flight, then saving checkpoint_last.pt and "
                           f"stopping (exit status {EXIT_STOPPED}: rerun the same command to resume)")
        else:
            logger.warning(f"received {name}: already stopping on {self.received}")

    def mark(self, logging_output: dict) -> None:
        """Add this rank's request to a training step's logging output."""
        logging_output[STOP_KEY] = int(self.received is not None)

    def agree(self, logging_outputs) -> bool:
        """Called with an update's logging outputs as fairseq reduced them over the ranks."""
        if sum(int(log.get(STOP_KEY, 0)) for log in logging_outputs) > 0:
            self.agreed = True
        return self.agreed

    def finish(self, trainer, cfg) -> None:
        """After the checkpoint is saved: wait for every rank, requeue (rank 0), exit ``EXIT_STOPPED``."""
        import torch
        from fairseq import distributed_utils
        from fairseq.file_io import PathManager

        if cfg.checkpoint.write_checkpoints_asynchronously:
            PathManager.async_close()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier(distributed_utils.get_global_group())  # rank 0 has written the file
        if distributed_utils.is_master(cfg.distributed_training):
            updates = trainer.get_num_updates()
            if cfg.checkpoint.no_save or cfg.checkpoint.no_last_checkpoints:
                setting = "no_save" if cfg.checkpoint.no_save else "no_last_checkpoints"
                logger.warning(f"stopped after update {updates} without saving checkpoint_last.pt "
                               f"(checkpoint.{setting}=true): a rerun starts where the last saved checkpoint was")
            else:
                last = os.path.join(cfg.checkpoint.save_dir, "checkpoint_last.pt")
                logger.warning(f"stopped after update {updates} ({self.received or 'a signal to another rank'}): "
                               f"{last} holds it; exit status {EXIT_STOPPED}: rerun the same command to resume")
            if self.requeue:
                requeue_slurm_job()
        raise SystemExit(EXIT_STOPPED)


def requeue_slurm_job(environ=os.environ, run=subprocess.run) -> bool:
    """``scontrol requeue <this job>``, as PyTorch Lightning does on SIGUSR1; True when SLURM accepted it."""
    job = slurm_job_id(environ)
    if job is None:
        logger.warning("task.requeue_on_signal=true but this is not a SLURM job (no SLURM_JOB_ID): not requeued")
        return False
    try:
        result = run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        logger.error(f"could not requeue SLURM job {job}: scontrol requeue {job}: {err}")
        return False
    if result.returncode != 0:
        logger.error(f"could not requeue SLURM job {job}: scontrol requeue {job} exited {result.returncode}: "
                     f"{(result.stderr or result.stdout).strip()}")
        return False
    logger.warning(f"requeued SLURM job {job} (scontrol requeue {job}): it restarts from checkpoint_last.pt")
    return True


# --- data-loading workers ------------------------------------------------------------------------

_worker_pid = None


def leave_signals_to_main_process(signals: tuple) -> None:
    """In a data-loading worker (called with every item; acts once per process, and only in a worker):
    the stop signals are for the training process, which finishes its update and then shuts the
    workers down itself. A thread takes them from the worker (``sigwaitinfo``) so that the one
    SIGTERM PyTorch itself sends a stuck worker, from the training process, still ends it."""
    global _worker_pid
    if not signals or _worker_pid == os.getpid():
        return
    import torch.utils.data

    _worker_pid = os.getpid()  # this process is looked at once (the training process too, with 0 workers)
    if torch.utils.data.get_worker_info() is None:
        return
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no sender to tell apart; SIGTERM stays PyTorch's
        for sig in signals:
            if sig != signal.SIGTERM:
                signal.signal(sig, signal.SIG_IGN)
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # threads started later (queue feeders) inherit it

    def take_signals():
        while True:
            info = signal.sigwaitinfo(signals)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)  # what PyTorch's worker handler does with its parent's SIGTERM

    threading.Thread(target=take_signals, name="d2v-stop-signals", daemon=True).start()


# --- resuming on another number of ranks ----------------------------------------------------------

def micro_batch_seed(seed: int, update: int, position: int) -> int:
    """The torch seed of one micro-batch: (seed, update, its place in the global batch), where place =
    accumulation step x data-parallel ranks + rank. fairseq seeds every rank and step of an update
    alike (seed + update), which draws the same drop-path masks on every rank and ties the draws to how
    the global batch is split."""
    return ((int(seed) * 1_000_003 + int(update)) * 65_537 + int(position)) & 0x7FFF_FFFF


class MicroBatchPlaces:
    """The place in the global batch of each micro-batch a rank trains: step x world + rank."""

    def __init__(self):
        self.update, self.steps = None, 0
        self.rank_and_size = None  # read at the first step: the process group exists by then

    def __call__(self, update: int) -> int:
        if update != self.update:
            self.update, self.steps = update, 0
        step = self.steps
        self.steps += 1  # (an fp16 overflow retries the update: its steps count on, alike for any split)
        if self.rank_and_size is None:
            self.rank_and_size = data_parallel_rank_and_size()
        rank, world = self.rank_and_size
        return step * world + rank


def data_parallel_rank_and_size() -> tuple:
    """This process's data-parallel rank and the number of ranks; (0, 1) outside distributed training."""
    import torch
    from fairseq import distributed_utils

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1
    return distributed_utils.get_data_parallel_rank(), distributed_utils.get_data_parallel_world_size()


def cores_per_local_rank(distributed_training, environ=os.environ) -> int:
    """The cores one rank of this node has: a process bound to some of the node's cores (srun's
    --cpu-bind) has those; otherwise the node's cores are shared by the ranks started on it
    (torchrun's LOCAL_WORLD_SIZE, srun's tasks per node, else the processes fairseq spawns)."""
    cores = available_cores()
    if cores < (os.cpu_count() or cores):
        return cores
    local = environ.get("LOCAL_WORLD_SIZE") or (environ.get("SLURM_NTASKS_PER_NODE") or "").split("(")[0]
    ranks = int(local) if local.isdigit() else 0
    if ranks < 1:
        ranks = distributed_training.distributed_num_procs if distributed_training.distributed_world_size > 1 else 1
    return max(1, cores // max(ranks, 1))


class ResumableEpochBatchIterator(EpochBatchIterator):
    """fairseq's iterator, whose saved position also records the number of ranks and the per-rank
    batch size it counts in, so that a run can continue its epoch on another number of ranks.

    fairseq saves ``iterations_in_epoch``: batches done *per rank*. Every rank's batches are the
    epoch's one seeded list dealt out in turn, so that is ``iterations_in_epoch x num_shards`` batches
    of the list; ``load_state_dict`` turns it into the count per rank here."""

    batch_size = None  # images per rank and batch (dataset.batch_size), set by the task
    batches_through = None  # set by the task: wraps each epoch's batches (data.device_batch.DevicePrefetcher)

    @classmethod
    def adopt(cls, epoch_iter: EpochBatchIterator, batch_size) -> EpochBatchIterator:
        """Make fairseq's iterator (fresh from ``get_batch_iterator``) one of these; same state, same batches."""
        if type(epoch_iter) is EpochBatchIterator:
            epoch_iter.__class__ = cls
        if isinstance(epoch_iter, cls):
            epoch_iter.batch_size = batch_size
        return epoch_iter

    def _get_iterator_for_epoch(self, *args, **kwargs):
        itr = super()._get_iterator_for_epoch(*args, **kwargs)
        if itr is not None and self.batches_through is not None:
            itr._itr = self.batches_through(itr._itr)  # inside fairseq's CountingIterator: counts unchanged
        return itr

    def state_dict(self):
        state = super().state_dict()
        state.update(num_shards=self.num_shards, batch_size=self.batch_size)
        return state

    def load_state_dict(self, state_dict):
        done = state_dict.get("iterations_in_epoch", 0)
        shards = state_dict.get("num_shards", self.num_shards)
        if done and shards != self.num_shards:
            saved_batch = state_dict.get("batch_size")
            if saved_batch is not None and self.batch_size is not None and saved_batch != self.batch_size:
                raise ValueError(
                    f"the checkpoint stopped in the middle of epoch {state_dict['epoch']} with dataset.batch_size="
                    f"{saved_batch} per rank; with dataset.batch_size={self.batch_size} the epoch's batches would be "
                    f"others (images repeated or skipped): resume with dataset.batch_size={saved_batch} "
                    f"(update_freq follows task.global_batch_size)")
            batches = done * shards
            if batches % self.num_shards:
                raise ValueError(
                    f"the checkpoint stopped after {batches} batches of epoch {state_dict['epoch']} on {shards} ranks, "
                    f"which {self.num_shards} ranks cannot continue from without repeating or skipping images: resume "
                    f"on a number of ranks that divides {batches} (with task.global_batch_size set, any number that "
                    f"reaches the global batch does)")
            logger.info(f"continuing epoch {state_dict['epoch']} after its first {batches} batches: saved on {shards} "
                        f"ranks ({done} batches each), {batches // self.num_shards} each on {self.num_shards} ranks")
            state_dict = {**state_dict, "iterations_in_epoch": batches // self.num_shards}
        super().load_state_dict(state_dict)
