"""The serving benchmark's guard: it prints figures only when the server (continuous, static and no batching) and
transformers gave the same answers. Run whole, briefly, on a PaliGemma 2 checkpoint folder with varied answers
(its prefix-LM mask and two EOS ids are what a sloppy baseline gets wrong), and with palitorch's answers perturbed."""

import json
import sys
from pathlib import Path

import pytest
import torch

import palitorch

from hf_factory import diverse

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_serve  # noqa: E402


def run(folder, tmp_path, monkeypatch, *extra):
    out = tmp_path / "serve.json"
    monkeypatch.setattr(sys, "argv", ["bench_serve.py", "--size", str(folder), "--requests", "4", "--clients", "2",
                                      "--max-batch", "2", "--new-tokens", "6", "--reps", "1", "--out", str(out),
                                      *extra])
    bench_serve.main()
    return json.loads(out.read_text())


@pytest.mark.parametrize("extra", [[], ["--stream"], ["--rate", "50", "--vary-length", "--force-length"],
                                   ["--mix-sampling"]])
def test_figures_come_after_the_same_answers(ckpt_factory, tmp_path, monkeypatch, capsys, extra):
    folder, _ = diverse(ckpt_factory, 2)
    record = run(folder, tmp_path, monkeypatch, *extra)
    printed = capsys.readouterr().out
    assert "answers: the same in all 4 modes" in printed
    distinct = int(printed.split("answers: the same in all 4 modes (")[1].split(" distinct")[0])
    assert distinct > 1, "the answers should depend on the input"
    rows = record["rows"]
    assert [r["mode"].split(",")[0] for r in rows] == ["palitorch serve"] * 3 + ["transformers generate"]
    assert all(r["requests_per_s"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert all(0 < r["latency_p50_ms"] <= r["latency_p90_ms"] for r in rows[:3])
    assert rows[-1]["x_transformers"] == pytest.approx(1.0)


def test_different_answers_give_no_figures(ckpt_factory, tmp_path, monkeypatch, capsys):
    folder, _ = diverse(ckpt_factory, 2)
    load = palitorch.load

    def perturbed(*args, **kwargs):  # palitorch's final norm scaled after transformers took its tensors
        pipe = load(*args, **kwargs)
        norm = pipe.model.language_model.norm
        scale = torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(0)) * 3
        norm.forward = lambda x, forward=norm.forward: forward(x) * scale
        return pipe

    monkeypatch.setattr(bench_serve.palitorch, "load", perturbed)
    with pytest.raises(SystemExit) as e:
        run(folder, tmp_path, monkeypatch)
    assert e.value.code == 1
    printed = capsys.readouterr().out
    assert "ANSWERS DIFFER" in printed and "no figures reported" in printed and "req/s" not in printed
    assert not (tmp_path / "serve.json").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--size", "pg3-9b"], "unknown size 'pg3-9b'"),
    (["--requests", "0"], "--requests must be >= 1"),
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--rate", "0"], "--rate must be > 0"),
])
def test_bad_arguments_get_a_one_line_error(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_serve.py", *argv])
    with pytest.raises(SystemExit) as e:
        bench_serve.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
