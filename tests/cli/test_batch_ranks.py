"""`torchrun -m palitorch batch`: processes share the requests, write parts beside the output, and the parts are
folded into it (also when a run stopped early and is started again, with any number of processes)."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
from conftest import REPO, cli  # tests/cli/conftest.py
from test_batch import read_results, write_requests

from palitorch.cli.results import fold_parts, part_files


def line(record) -> str:
    return json.dumps(record) + "\n"


def test_fold_parts_keeps_one_line_per_request_an_answer_over_an_error(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(line({"index": 1, "text": "a"}) + line({"index": 2, "error": "no image"}) + "not a result\n")
    (tmp_path / "out.jsonl.rank0").write_text(line({"index": 3, "text": "c"}) + line({"index": 2, "text": "b"})
                                              + '{"index": 5, "te')  # a line cut short: dropped
    (tmp_path / "out.jsonl.rank1").write_text(line({"index": 4, "error": "x"}) + line({"index": 3, "text": "c"}))
    (tmp_path / "out.jsonl.rank1.bak").write_text("not a part\n")
    assert part_files(out) == [tmp_path / "out.jsonl.rank0", tmp_path / "out.jsonl.rank1"]
    assert fold_parts(out) == 2
    lines = out.read_text().splitlines()
    assert "not a result" in lines  # the output's own lines are left for read_done to judge
    records = [json.loads(x) for x in lines if x != "not a result"]
    assert [(r["index"], r.get("text", r.get("error"))) for r in records] == [(1, "a"), (2, "b"), (3, "c"), (4, "x")]
    assert part_files(out) == [] and (tmp_path / "out.jsonl.rank1.bak").exists()
    assert fold_parts(out) == 0


def test_one_process_goes_on_from_the_parts_of_a_stopped_multi_process_run(fake_pipe, images, capsys):
    pipe = fake_pipe(lambda im, p: f"answer to {p}")
    src = write_requests(images.parent / "in.jsonl", [{"image": "imgs/red.png", "prompt": f"q{i}"} for i in range(4)])
    dst = images.parent / "out.jsonl"
    dst.with_name("out.jsonl.rank1").write_text(line({"image": "imgs/red.png", "prompt": "q1", "index": 2,
                                                      "decoding": {}, "text": "kept"}))
    rc, _, err = cli(["batch", "--input", src, "--output", dst, "--quiet"], capsys)
    assert rc == 0, err
    assert [p for call in pipe.calls for p in call[2]] == ["q0", "q2", "q3"]  # q1 was answered by the stopped run
    got = read_results(dst)
    assert [got[i]["text"] for i in (1, 2, 3, 4)] == ["answer to q0", "kept", "answer to q2", "answer to q3"]
    assert list(got) == [1, 2, 3, 4] and part_files(dst) == []


def torchrun(nproc: int, argv: list, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "palitorch", *map(str, argv)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_two_processes_give_the_one_process_output(pg1, images, capsys):
    """Seven requests with two kinds of options and a bad line, over two processes (gloo on CPU): the output is
    the one-process output, in input order, and no part is left; run again, nothing is redone."""
    folder, _ = pg1
    requests = [{"image": f"imgs/{c}.png", "prompt": p, "id": n}
                for n, (c, p) in enumerate([("red", "caption en"), ("blue", "caption en"), ("red", "detect cat"),
                                             ("blue", "ocr"), ("red", "answer en what?"), ("blue", "detect dog")])]
    requests.insert(3, {"image": "imgs/missing.png", "prompt": "caption en"})
    requests[5]["max_new_tokens"] = 3
    src = write_requests(images.parent / "in.jsonl", requests)
    one, two = images.parent / "one.jsonl", images.parent / "two.jsonl"
    common = ["--model", folder, "--input", src, "--max-new-tokens", "6", "--batch-size", "2", "--quiet"]
    rc, _, err = cli(["batch", *common, "--output", one], capsys)
    assert rc == 1, err  # the missing image
    proc = torchrun(2, ["batch", *common, "--output", two], images.parent)
    assert proc.returncode != 0, proc.stderr[-3000:]  # the missing image: the first process exits 1
    assert "palitorch/" not in proc.stderr, proc.stderr[-3000:]  # (torchrun prints its own traceback for a 1)
    assert "exitcode  : 1" in proc.stderr and "rank      : 0" in proc.stderr
    a, b = read_results(one), read_results(two)
    assert list(b) == list(a) == list(range(1, 8))  # input order
    for i in a:
        assert {k: v for k, v in b[i].items() if k != "logprobs"} == {k: v for k, v in a[i].items() if k != "logprobs"}
        assert b[i].get("logprobs", []) == pytest.approx(a[i].get("logprobs", []), abs=1e-5)  # batch company
    assert "does not exist" in b[4]["error"] and part_files(two) == []
    answered = [x for x in two.read_bytes().splitlines() if b'"error"' not in x]
    proc = torchrun(2, ["batch", *common, "--output", two], images.parent)  # again: only the error line is redone
    assert proc.returncode != 0 and read_results(two).keys() == a.keys() and "does not exist" in b[4]["error"]
    assert [x for x in two.read_bytes().splitlines() if b'"error"' not in x] == answered


@pytest.fixture
def second_of_two(monkeypatch):
    """This process as torchrun's second of two, without a process group: its meetings with the others are no-ops."""
    from palitorch.cli.ranks import Ranks

    def as_rank(rank):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setattr(Ranks, "from_env", classmethod(lambda cls: cls(rank, 2, rank)))
        for name in ("barrier", "sum"):
            monkeypatch.setattr(Ranks, name, lambda self, *counts: list(counts))

        @contextmanager
        def joined(self):
            yield self

        monkeypatch.setattr(Ranks, "joined", joined)

    return as_rank


def test_an_error_only_one_process_meets_is_said_by_that_process(second_of_two, images, monkeypatch, capsys):
    from palitorch.cli.ranks import Ranks
    from palitorch.errors import ProcessError

    src = write_requests(images.parent / "in.jsonl", [{"image": "imgs/red.png", "prompt": "q"}])
    second_of_two(1)
    rc, _, err = cli(["batch", "--input", images.parent / "missing.jsonl", "--output", images.parent / "o.jsonl"],
                     capsys)
    assert rc == 2 and err == ""  # every process meets this one: only the first says it
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    with pytest.raises(ProcessError, match="process 1: --device cuda: it is process 2 on its machine"):
        Ranks.from_env().device("cuda")

    def no_gpu(self, device):  # (this machine has no CUDA for --device cuda to pass the device check)
        raise ProcessError("process 1: no GPU of its own")

    monkeypatch.setattr(Ranks, "device", no_gpu)
    rc, _, err = cli(["batch", "--input", src, "--output", images.parent / "o.jsonl"], capsys)
    assert rc == 2 and "process 1: no GPU of its own" in err  # said by process 1 itself


def test_processes_that_do_not_share_the_output_folder_are_stopped_before_the_model(second_of_two, fake_pipe, images,
                                                                                       capsys):
    pipe = fake_pipe(lambda im, p: "x")
    src = write_requests(images.parent / "in.jsonl", [{"image": "imgs/red.png", "prompt": "q"}] * 3)
    second_of_two(0)  # the first process; the second one's part never appears beside the output
    rc, _, err = cli(["batch", "--input", src, "--output", images.parent / "o.jsonl"], capsys)
    assert rc == 2 and "the parts of process 1 are not in" in err and "shared file system" in err
    assert not pipe.calls
