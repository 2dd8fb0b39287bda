"""Where an evaluation runs: the device, the precision of the forward pass, and the ranks.

Several processes (``torchrun --nproc_per_node=N -m d2v_plugin.cli.<command>``, or SLURM tasks under
``srun``) join one torch.distributed group (NCCL on GPUs, gloo on CPUs), as fairseq's training does;
each rank reads its own contiguous shard of a split and counts are summed, so each image is counted
exactly once. One process is a group of one: the same code runs without torch.distributed.
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from d2v_plugin.host import available_cores

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_WORKERS = 8


def _environment_ranks(environ=os.environ) -> tuple[int, int, int, int] | None:
    """(rank, world size, local rank, local world size) from torchrun's or SLURM's environment; None for
    a single process."""
    if int(environ.get("WORLD_SIZE", "1")) > 1:
        return (int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)),
                int(environ.get("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"])))
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ:
        world = int(environ["SLURM_NTASKS"])
        local = int(environ.get("SLURM_NTASKS_PER_NODE", str(world)).split("(")[0])
        return int(environ["SLURM_PROCID"]), world, int(environ.get("SLURM_LOCALID", 0)), local
    return None


def _slurm_master(environ=os.environ) -> str:
    """The first host of the SLURM job step (``scontrol show hostnames``), where rank 0 runs."""
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return nodes.split(",")[0]


@dataclass
class Runtime:
    """The device, the autocast precision and this process's place among the ranks."""

    device: torch.device
    precision: str
    rank: int = 0
    world: int = 1
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def autocast(self):
        """The forward pass in the chosen precision (autocast; fp32: as it is)."""
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def default_workers(self) -> int:
        """Data-loading processes per rank: the cores this rank has, at most 8."""
        return max(1, min(MAX_WORKERS, available_cores() // max(self.local_world, 1)))

    def shard(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items (the first ranks take one more when uneven)."""
        per, extra = divmod(n, self.world)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (self.rank < extra))

    def sum(self, values: list[int]) -> list[int]:
        """Integer counts summed over the ranks (each image counted once)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=self._collective_device())
        torch.distributed.all_reduce(t)
        return t.tolist()

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor (the same shape on every rank) summed over the ranks, on the CPU."""
        if not self.distributed:
            return tensor
        out = tensor.to(self._collective_device()).clone()
        torch.distributed.all_reduce(out)
        return out.cpu()

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape on every rank), on this rank's device."""
        if not self.distributed:
            return [tensor]
        tensor = tensor.to(self._collective_device()).contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        torch.distributed.all_gather(out, tensor)
        return out

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (any picklable value, its own size per rank), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (a decision all ranks must share)."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def _collective_device(self) -> torch.device:
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")

    def describe(self) -> dict:
        """What a result records of where it ran."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"device": str(self.device), "device_name": name, "precision": self.precision, "ranks": self.world}

    def close(self) -> None:
        """Leave the ranks' group together (a rank that leaves while another is still in a collective
        aborts the other's gloo threads at exit)."""
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def default_precision(device: torch.device) -> str:
    """bf16 on a GPU that has it (Ampere and later), fp32 otherwise (on the CPU too: bf16 there is a choice
    to make with --precision bf16, which the test of its accuracy supports on CPUs with avx512_bf16)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` (the GPU of this rank when there is one, else the CPU), ``cpu``, ``cuda`` (this rank's
    GPU) or ``cuda:N``; a CUDA device that is not there is an error naming the option."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise ValueError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available (check CUDA_VISIBLE_DEVICES), or use "
                         f"--device cpu")
    device = torch.device(name if ":" in name else f"cuda:{local_rank % torch.cuda.device_count()}")
    if device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def start(device: str = "auto", precision: str | None = None) -> Runtime:
    """This process's runtime: joins the ranks' group when started by torchrun or srun."""
    ranks = _environment_ranks()
    rank, world, local_rank, local_world = ranks or (0, 1, 0, 1)
    dev = resolve_device(device, local_rank)
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # srun: rank 0 runs on the step's first node
            os.environ["MASTER_ADDR"] = _slurm_master()
        os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                             rank=rank, world_size=world)
    runtime = Runtime(dev, precision or default_precision(dev), rank, world, local_world)
    if not runtime.is_main:
        logging.getLogger("d2v_plugin").setLevel(logging.ERROR)  # one rank speaks
    return runtime


def progress(runtime: Runtime, total: int, desc: str, unit: str = "img"):
    """A progress bar on stderr (rank 0 only) counting images: rate and time left."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=False, file=sys.stderr, disable=not runtime.is_main,
                dynamic_ncols=True, smoothing=0.1)
