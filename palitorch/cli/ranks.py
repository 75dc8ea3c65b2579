"""Several processes on one `palitorch batch` job: `torchrun --nproc-per-node N -m palitorch batch ...`.

torchrun starts N copies of the command, with RANK, WORLD_SIZE and LOCAL_RANK in their environment. Each process
answers every N-th request still to do (process r: the r-th, the (r + N)-th, ...) on its own device (cuda:LOCAL_RANK
with `--device cuda`) and appends its results to its own part file beside the output, `<output>.rank<r>`
(`results.fold_parts`). When all have finished, the first process folds the parts into the output, in input order.
The processes meet only at barriers (gloo, so on CPU and GPU alike): before the output is read to resume, after the
first process has tidied it, and at the end. A run stopped early leaves its parts; the next run, with any number
of processes, folds them in first and goes on.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from palitorch.errors import InputError, ProcessError
from palitorch.train import ddp
from palitorch.train.ddp import Dist

WAIT = timedelta(days=7)  # how long a process that has finished its share waits for the others (gloo's: 30 min)


@dataclass(frozen=True)
class Ranks(Dist):
    """Which process this is (rank, world, local_rank, main: `train.ddp.Dist`), and its meetings with the others."""

    @classmethod
    def from_env(cls) -> Ranks:
        try:
            ranks = cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                        int(os.environ.get("LOCAL_RANK", "0")))
        except ValueError:
            raise InputError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (torchrun sets them)") from None
        if not 0 <= ranks.rank < ranks.world:
            raise InputError(f"RANK {ranks.rank} is not below WORLD_SIZE {ranks.world} (torchrun sets them)")
        return ranks

    def device(self, device: str) -> str:
        """This process's device: with several processes `--device cuda` means one GPU each, cuda:LOCAL_RANK."""
        if self.world == 1 or device != "cuda":
            return device
        if self.local_rank >= torch.cuda.device_count():
            raise ProcessError(f"process {self.rank}: --device cuda: it is process {self.local_rank + 1} on its "
                               f"machine, which has {torch.cuda.device_count()} GPU(s) visible: start at most that "
                               "many processes per machine (--nproc-per-node)")
        return f"cuda:{self.local_rank}"

    @contextmanager
    def joined(self):
        """The block runs in torchrun's process group (for `barrier` and `sum`); nothing for one process."""
        import torch.distributed as dist

        if self.world == 1 or dist.is_initialized():
            yield self
            return
        ddp.init_group("gloo", self.rank, self.world, timeout=WAIT)
        try:
            yield self
        finally:
            dist.destroy_process_group()

    def barrier(self) -> None:
        ddp.barrier(self)

    def sum(self, *counts: int) -> list[int]:
        """Each count summed over the processes."""
        return ddp.all_reduce_sum(torch.tensor(counts, dtype=torch.int64), self).tolist()
