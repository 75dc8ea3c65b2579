"""When to stop decoding a batch whose rows have all finished, without making a GPU wait for the host."""

from __future__ import annotations

import torch


class DoneWatch:
    """Says after each decode step whether every row has finished, at a cost that suits the device.

    CPU: reads `done` (free). CUDA: reads flags copied to the host asynchronously (`DoneFlag`), one that has
    arrived, or one made `lag` steps ago, waiting for it if need be: the host runs ahead of the GPU, so the GPU
    then still has steps queued and never idles (a blocking read of the current step would empty its queue), and a
    finished batch runs at most 2 * lag - 1 steps past its end (pad tokens). Other devices: a blocking read every
    8 steps. `make_flag` replaces `DoneFlag` (tests)."""

    def __init__(self, device: torch.device, lag: int = 4, make_flag=None):
        self.kind, self.lag = device.type, lag
        self.make_flag = make_flag or DoneFlag
        self.pending = None

    def finished(self, done: torch.Tensor, step: int) -> bool:
        if self.kind == "cpu":
            return bool(done.all())
        if self.kind != "cuda":
            return (step + 1) % 8 == 0 and bool(done.all())
        p = self.pending
        if p is not None and (p.ready() or step - p.step >= self.lag):
            if p.value():
                return True
            self.pending = None
        if self.pending is None:
            self.pending = self.make_flag(done.all(), step)
        return False


class DoneFlag:
    """A CUDA bool on its way to the host: copied asynchronously to pinned memory when made (at decode step
    `step`); `ready()` says, without waiting, whether it has arrived; `value()` waits for it if need be."""

    def __init__(self, flag: torch.Tensor, step: int):
        self.step = step
        self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
        self.host.copy_(flag, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(flag.device))  # the flag's device (not the current one: cuda:1)

    def ready(self) -> bool:
        return self.event.query()

    def value(self) -> bool:
        self.event.synchronize()
        return bool(self.host)
