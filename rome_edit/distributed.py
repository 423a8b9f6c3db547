"""Data-parallel runs: which process am I, which share of the work is mine, sum across processes.

rome-edit runs data-parallel on accelerate's process launcher; nothing else changes::

    accelerate launch --multi_gpu --num_processes N -m rome_edit sweep ...
    accelerate launch --multi_gpu --num_processes N -m rome_edit stats ...

Each process loads its own copy of the model (on GPU ``cuda:<local rank>``), takes every N-th
batch of names (or of corpus documents), and the results are combined: sweep shards are merged
into one store, statistics sums are all-reduced.  On a machine without CUDA the same command
runs N CPU processes that talk over gloo.  (``accelerate launch --cpu --num_processes N`` starts
*one* process in accelerate 1.x unless it is given an MPI hostfile; ``--multi_gpu`` is
accelerate's name for its torchrun launcher, which is what spawns the N processes, and
``torchrun --nproc_per_node N -m rome_edit ...`` works the same way.)

A plain ``rome-edit ...`` is a single process and never touches ``torch.distributed``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Workers:
    """This process's place among ``world_size`` data-parallel processes."""

    rank: int = 0
    world_size: int = 1
    device: str | None = None  # the process's own accelerator, if it has one

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def owns(self, index: int) -> bool:
        """Round-robin: this process takes items ``rank, rank + N, …`` (keeps loads even)."""
        return index % self.world_size == self.rank

    def barrier(self) -> None:
        if self.parallel:
            torch.distributed.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place by summation (a no-op for one process)."""
        if self.parallel:
            # gloo reduces CPU tensors; nccl needs them on the process's GPU.
            staged = tensor.to(self.device) if self.device else tensor
            torch.distributed.all_reduce(staged)
            if staged is not tensor:
                tensor.copy_(staged)
        return tensor

    def broadcast(self, value: T) -> T:
        """The main process's ``value`` (picklable, built by this program), on every process."""
        if not self.parallel:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum_int(self, value: int) -> int:
        return int(self.sum_(torch.tensor([value], dtype=torch.float64)).item())


SINGLE = Workers()


def launched_in_parallel() -> bool:
    """Whether a launcher (accelerate, torchrun, mpirun) started this process as one of several."""
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    return False


@contextmanager
def data_parallel(timeout_minutes: float = 24 * 60.0) -> Iterator[Workers]:
    """Join the launcher's process group for the body (CPU → gloo, CUDA → nccl); always leave it.

    Yields :data:`SINGLE` when the process was not launched as one of several.  The timeout
    bounds how long a process waits at a barrier for the others: a resumed GPT-J sweep can
    leave one process hours more work than another, so it is a day, not torch's 30 minutes.
    """
    if not launched_in_parallel():
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
            log.warning("running as a single process: 'accelerate launch --cpu' starts one "
                        "process without an MPI hostfile; use 'accelerate launch --multi_gpu "
                        "--num_processes N' (gloo on CPU) for N processes.")
        yield SINGLE
        return
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") \
        or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=timedelta(minutes=timeout_minutes))
    device = None if cpu else str(state.device)
    workers = Workers(state.process_index, state.num_processes, device)
    log.info("data-parallel process %d of %d (%s, %s)", workers.rank, workers.world_size,
             state.backend, state.device)
    ok = False
    try:
        yield workers
        ok = True
    finally:
        if ok:
            workers.barrier()  # nobody tears the group down while another still reduces
        # Destroying the group explicitly avoids gloo aborting at interpreter exit; after a
        # failure the launcher stops the other processes.
        torch.distributed.destroy_process_group()
