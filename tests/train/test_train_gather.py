"""The eval answers of several processes joined for CIDEr (evaluate.all_texts) over a real gloo group of two."""

import json

import torch.distributed as dist
import torch.multiprocessing as mp

from palitorch.train import ddp
from palitorch.train.evaluate import all_texts

TEXTS = ["a red circle", "", "zwei grüne Kreise — ✓", "x" * 300, "a", "últimos"]


def _worker(rank, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mine = {j: TEXTS[j] for j in range(rank, len(TEXTS), 2)}  # as exact_match shares them out
        (out / f"{rank}.json").write_text(json.dumps(all_texts(mine, len(TEXTS), ddp.Dist(rank, 2))))
    finally:
        dist.destroy_process_group()


def test_every_process_gets_every_answer_in_order(tmp_path):
    mp.spawn(_worker, args=(tmp_path / "store", tmp_path), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == TEXTS
