"""Two data-parallel processes (torchrun, gloo on CPU) follow the single-process loss curve of the same global batch."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from palitorch.checkpoint import load_model
from palitorch.cli import main
from palitorch.train.data import global_batch, read_jsonl
from palitorch.train.loop import Trainer

from trainkit import config, losses, make_data

ROOT = Path(__file__).resolve().parents[2]


def test_two_processes_match_one(tmp_path):
    data = make_data(tmp_path / "data")
    over = {"train__steps": 6, "train__batch_size": 8, "warmstart__epochs": 1, "warmstart__batch_size": 8,
            "augment__contrast": 0.2, "data__per_image": 2, "checkpoint__every": 3, "eval__final_max_examples": 6,
            "eval__metrics": ["exact", "cider"]}
    # One process, the global batch of 8 accumulated over two micro-batches of 4 ...
    one = config(data, tmp_path / "one", train__micro_batch_size=4, **over)
    Trainer(one).fit()
    # ... and two processes taking 4 examples each, launched the way users launch them.
    two = config(data, tmp_path / "two", **over)
    (tmp_path / "two.toml").write_text(two.to_toml())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "palitorch", "train", str(tmp_path / "two.toml")]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-4, (s, a[s], b[s])  # tolerance: float summation order only
    rows = [json.loads(r) for r in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["world_size"] == 2 and len([r for r in rows if "loss" in r]) == 6  # one writer: rank 0
    ws = [r["warmstart"] for r in rows if "warmstart" in r]
    assert len(ws) == 1 and ws[0]["images"] == 24
    final_one = [json.loads(r) for r in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()][-1]["eval"]
    final_two = rows[-1]["eval"]
    assert final_two["n"] == final_one["n"] == 6  # every held-out example evaluated once, over both processes
    assert abs(final_two["eval_loss"] - final_one["eval_loss"]) <= 1e-4
    # CIDEr needs every answer on each process (they travel as summed byte tensors): the figure is that of one
    # process answering all six with the same model
    argv = ["eval", "--model", str(tmp_path / "two" / "model"), "--data", str(data / "test.jsonl"), "--max-examples",
            "6", "--metrics", "exact,cider", "--max-new-tokens", "12", "--json", "--quiet", "--group-by", ""]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(argv) == 0
    alone = json.loads(printed.getvalue())
    assert alone["n"] == 6 and final_two["cider"] == alone["cider"] and final_two["exact_match"] == alone["exact_match"]
    wa, wb = load_model(tmp_path / "one" / "model").state_dict(), load_model(tmp_path / "two" / "model").state_dict()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() <= 1e-4, k
    # Resuming the two-process run on one process continues it (the data order does not depend on the split).
    resumed = config(data, tmp_path / "two", **{**over, "train__steps": 7})
    Trainer(resumed, resume=True).fit()
    assert sorted(losses(tmp_path / "two")) == list(range(1, 8))


def test_an_image_only_one_process_reads_stops_every_process_at_startup(tmp_path):
    # With the cache each process decodes only the images of its own shares before step 1; an unreadable one in
    # process 1's share stops both there, and the first process says which (only it prints errors).
    data = make_data(tmp_path / "data")
    examples = read_jsonl(data / "train.jsonl")
    idx = global_batch(len(examples), 8, 0, 0)
    mine = [{examples[i].image for i in idx[part]} for part in (slice(0, 4), slice(4, 8))]
    bad = sorted(mine[1] - mine[0])[0]
    bad.write_bytes(bad.read_bytes()[:80])
    cfg = config(data, tmp_path / "run", train__steps=1, eval__final_max_examples=2)
    (tmp_path / "run.toml").write_text(cfg.to_toml())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "palitorch", "train", str(tmp_path / "run.toml")]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    where = ", ".join(e.where for e in examples if e.image == bad)
    assert f"palitorch train: error: {where}: cannot read image {str(bad)!r}: image file is truncated" in proc.stderr
    assert proc.stderr.count("cannot read image") == 1, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was taken
