"""One tensor of a safetensors file, read with plain file reads when it must be converted.

safetensors hands out every tensor of a file as a view of one memory map of the whole file, and a page of it, once
touched, stays resident (counted in the process's memory) as long as any tensor of that file is in use. A weight
that is cast (float32 stored, bfloat16 asked) or sent to another device, or compared and then dropped, is
therefore read here a piece at a time, never through the mapping (`io.load_model`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from palitorch.errors import CheckpointError


class Stored:
    """One tensor of a safetensors file: its memory-mapped view (nothing read yet), and where its bytes begin."""

    CHUNK = 1 << 26  # bytes read at a time

    def __init__(self, file: Path, key: str, offset: int, mapped: torch.Tensor):
        self.file, self.key, self.offset, self.mapped = file, key, offset, mapped

    def load(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The tensor on `device` in `dtype`: the mapped view itself where it is both already; else a new tensor,
        filled from plain file reads (a cast through the mapping would leave the file's pages resident)."""
        t = self.mapped
        if t.dtype == dtype and device.type == "cpu":
            return t
        out = torch.empty(t.shape, dtype=dtype, device=device)
        flat, i = out.view(-1), 0
        for piece in self.pieces():
            flat[i:i + piece.numel()].copy_(piece)
            i += piece.numel()
        return out

    def pieces(self, dtype: torch.dtype | None = None):
        """The flattened tensor in pieces of CHUNK // 4 elements (the last one shorter), read from the file (each
        piece is valid until the next is asked for), cast to `dtype` if given."""
        size = self.mapped.element_size()
        total, step = self.mapped.numel() * size, self.CHUNK // 4 * size
        if total == 0:
            return
        buf = bytearray(min(step, total))
        try:
            with open(self.file, "rb") as fh:
                fh.seek(self.offset)
                for done in range(0, total, step):
                    view = memoryview(buf)[:min(step, total - done)]
                    if fh.readinto(view) != len(view):
                        raise OSError("the file ends early")
                    piece = torch.frombuffer(view, dtype=self.mapped.dtype)
                    yield piece if dtype is None else piece.to(dtype)
        except OSError as e:
            raise CheckpointError(f"{self.file.name}: cannot read {self.key!r} ({e.strerror or e}); the file may be "
                                  "truncated") from None

    def equal(self, other: Stored, dtype: torch.dtype) -> bool:
        """Whether both tensors hold the same values once cast to `dtype` (torch.equal's sense), read from the
        files: neither is paged in through its mapping."""
        if self.mapped.shape != other.mapped.shape:
            return False
        return all(torch.equal(a, b) for a, b in zip(self.pieces(dtype), other.pieces(dtype), strict=True))
