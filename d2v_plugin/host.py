"""What this machine gives the process, below everything that asks: the cores it may run on (the training
task's worker check, cluster.py's cores per rank, the evaluation runtime's data-loading workers)."""
import os


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: srun --cpu-bind, taskset), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
