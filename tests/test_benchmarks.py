"""The speed benchmark's guard: it reports speed only when palitorch and transformers chose the same tokens.

`compare_tokens` on hand-made cases (identical, a near-tie within the tolerance, a real difference), then the
whole `bench_generate.py` on the bundled model: as it is (figures reported), and with palitorch's weights
perturbed after loading (tokens differ: no figures, and the record says so).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

import palitorch
from palitorch.model import kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_generate  # noqa: E402


def reported(row: dict) -> bool:
    """Figures were reported for a row: a prefill ratio, and a decode ratio unless the run was too short to measure
    decode against the noise of a busy machine (these tests time a few tokens once; see the noise test below)."""
    return row["prefill_speedup"] > 0 and (row.get("decode_speedup", 0) > 0 or "decode_not_measured" in row)


def logits_with(best: int, second: int, gap: float, vocab: int = 6) -> torch.Tensor:
    """One row of logits whose top token is `best` and runner-up `second`, `gap` nats apart in log-probability."""
    x = torch.full((vocab,), -10.0)
    x[best], x[second] = gap, 0.0
    return x


def test_compare_tokens_identical_near_tie_and_different():
    steps = [torch.stack([logits_with(1, 2, 3.0)]), torch.stack([logits_with(3, 4, 0.1)])]  # [B=1, V] each
    hf = [[1, 3]]
    lp = torch.log_softmax(torch.stack(steps, 1), -1)[0]
    ours_lp = [[float(lp[0, 1]), float(lp[1, 3])]]
    same = bench_generate.compare_tokens([[1, 3]], ours_lp, hf, steps, tol=0.0)
    assert same["ok"] and same["rows_diverged"] == 0 and same["max_logprob_diff"] < 1e-6
    tie = [[1, 4]]  # step 1: token 4 instead of 3, 0.1 nats below it in transformers' distribution
    assert bench_generate.compare_tokens(tie, ours_lp, hf, steps, tol=0.25)["ok"]
    strict = bench_generate.compare_tokens(tie, ours_lp, hf, steps, tol=0.0)
    assert not strict["ok"] and strict["first_divergence"] == 1 and strict["worst_tie_gap"] == pytest.approx(0.1)
    wrong = bench_generate.compare_tokens([[2, 3]], ours_lp, hf, steps, tol=0.25)  # 3 nats below at step 0
    assert not wrong["ok"] and "NOT a near-tie" in wrong["summary"]
    assert "WARNING" not in same["summary"]
    repeats = [torch.stack([logits_with(1, 2, 30.0)])] * 2  # an answer that repeats one token: a weak check
    echo = bench_generate.compare_tokens([[1, 1]], [[0.0, 0.0]], [[1, 1]], repeats, tol=0.0)
    assert echo["ok"] and echo["distinct_tokens"] == 1 and "WARNING: every answer repeats one token" in echo["summary"]


def test_attention_variants_agree_up_to_a_near_tie_in_16_bit_only():
    from palitorch.inference.answer import Result

    def answer(ids, lps):
        return Result("", ids, lps, "length", 3)

    ref = answer([5, 6, 7], [-1.0, -2.0, -0.5])
    assert bench_generate.same_answer(answer([5, 6, 7], [-1.0, -2.0, -0.5]), ref, tol=0.0)
    near = answer([5, 9, 4], [-1.0, -2.1, -3.0])  # differs at step 1, where both chose tokens 0.1 nats apart
    assert bench_generate.same_answer(near, ref, tol=0.5) and not bench_generate.same_answer(near, ref, tol=0.0)
    far = answer([5, 9, 4], [-1.0, -4.0, -3.0])  # 2 nats apart: not rounding
    assert not bench_generate.same_answer(far, ref, tol=0.5)
    assert not bench_generate.same_answer(answer([5, 6], [-1.0, -2.0]), ref, tol=0.5)


@pytest.mark.parametrize("size", ["pg1-mini", "pg2-mini"])
def test_benchmark_weights_give_answers_that_depend_on_the_input(tmp_path, size):
    """Random weights at the real vocab and masks (`inputs.randomize`): every answer differs and varies from step to
    step; weights drawn the usual way repeat the prompt's last token forever, whatever the input."""
    from inputs import checkpoint, workload

    folder, _ = checkpoint(size, tmp_path, "cpu", torch.float32)
    res = palitorch.load(folder).generate(*workload(3), max_new_tokens=8, min_new_tokens=8)
    assert len({tuple(r.token_ids) for r in res}) == 3
    assert len({t for r in res for t in r.token_ids}) >= 8  # of 24
    assert all(sum(r.logprobs) / len(r.logprobs) < -0.3 for r in res)  # not every token a certainty


def run_bench(tmp_path, monkeypatch, capsys, perturb: bool) -> tuple[dict, str]:
    if perturb:  # palitorch's final norm scales its output (the weights stay shared with transformers')
        load = palitorch.load

        def perturbed_load(*args, **kwargs):
            pipe = load(*args, **kwargs)
            norm = pipe.model.language_model.norm
            scale = torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(0)) * 3
            norm.forward = lambda x, forward=norm.forward: forward(x) * scale
            return pipe

        monkeypatch.setattr(palitorch, "load", perturbed_load)
    out = tmp_path / "record.json"
    monkeypatch.setattr(sys, "argv", ["bench_generate.py", "--sizes", "bundled", "--batches", "1,2", "--new-tokens",
                                      "4", "--reps", "1", "--no-compile", "--json", str(out)])
    bench_generate.main()
    return json.loads(out.read_text()), capsys.readouterr().out


def test_the_benchmark_reports_speed_only_for_the_same_tokens(tmp_path, monkeypatch, capsys):
    record, printed = run_bench(tmp_path, monkeypatch, capsys, perturb=False)
    rows = record["results"][0]["rows"]
    assert all(r["same_tokens"] and reported(r) for r in rows)
    assert "tokens differ" not in printed
    # the CPU's memory floor: measured, and left out for weights that stay in its caches (the bundled model's few MB)
    assert record["read_bandwidth_bytes_s"] > 1e8 and "read bandwidth" in printed
    for r in rows:  # (a busy machine can swamp 3 steps' time in noise: the row then says so and has no floor)
        assert ("limit_note" in r) != ("ours_pct_of_limit" in r) or "decode_not_measured" in r
        if "decode_not_measured" not in r:
            assert r["bytes_per_step"] > sum(p.numel() * 4 for p in palitorch.load().model.language_model.parameters())

    record, printed = run_bench(tmp_path, monkeypatch, capsys, perturb=True)
    rows = record["results"][0]["rows"]
    assert [r["same_tokens"] for r in rows] == [False, False]
    assert not any(key in r for r in rows for key in ("decode_speedup", "prefill_speedup", "ours_decode_tok_s"))
    assert printed.count("TOKENS DIFFER: no speed reported") == 2 and "tokens differ: no figures" in printed


@pytest.mark.parametrize("from_files", [False, True])
def test_transformers_runs_on_palitorchs_weight_tensors(from_files):
    """One copy of the weights: every transformers parameter is palitorch's memory (q/k/v and gate/up as views of
    the fused matrices), through either loading route, and the model computes what a separately loaded one does."""
    from transformers import PaliGemmaForConditionalGeneration

    pipe = palitorch.load(None)
    pipe.model.language_model.fuse_projections()
    hf, shared = bench_generate.load_transformers(pipe, pipe.path, torch.float32, torch.device("cpu"), from_files)
    assert shared == 1.0
    fused = pipe.model.language_model.layers[0].attn.qkv
    q = hf.model.language_model.layers[0].self_attn.q_proj.weight
    assert q.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert hf.lm_head.weight.data_ptr() == pipe.model.language_model.embed_tokens.weight.data_ptr()

    alone = PaliGemmaForConditionalGeneration.from_pretrained(pipe.path, dtype=torch.float32).eval()
    enc = pipe.processor.encode("answer en what color is the shape?")
    size = pipe.cfg.vision.image_size
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    inputs = {"input_ids": torch.tensor([enc.ids]), "token_type_ids": torch.tensor([enc.types]),
              "attention_mask": torch.ones(1, len(enc.ids), dtype=torch.long), "pixel_values": image}
    with torch.no_grad():
        torch.testing.assert_close(hf(**inputs).logits, alone(**inputs).logits, rtol=0, atol=0)  # the same numbers


def test_a_run_cut_short_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    """The GPU script runs each size under a time limit: each finished row is saved at once."""
    workload = bench_generate.workload

    def stopping(batch):
        if batch == 2:
            raise KeyboardInterrupt  # stands in for the time limit
        return workload(batch)

    monkeypatch.setattr(bench_generate, "workload", stopping)
    out = tmp_path / "record.json"
    monkeypatch.setattr(sys, "argv", ["bench_generate.py", "--sizes", "bundled", "--batches", "1,2", "--new-tokens",
                                      "3", "--reps", "1", "--no-compile", "--json", str(out)])
    with pytest.raises(KeyboardInterrupt):
        bench_generate.main()
    rows = json.loads(out.read_text())["results"][0]["rows"]
    assert [r["batch"] for r in rows] == [1] and rows[0]["same_tokens"] and reported(rows[0])


def test_a_checkpoint_folder_is_a_size(pg2, tmp_path, monkeypatch, capsys):
    """Real weights: a Hub-layout folder (here one that transformers wrote) is benchmarked as it is."""
    folder, _ = pg2
    out = tmp_path / "record.json"
    monkeypatch.setattr(sys, "argv", ["bench_generate.py", "--sizes", str(folder), "--batches", "1", "--new-tokens",
                                      "3", "--reps", "1", "--no-compile", "--json", str(out)])
    bench_generate.main()
    result = json.loads(out.read_text())["results"][0]
    assert result["weights"] == "checkpoint folder" and result["weights_shared"] == 1.0
    assert result["rows"][0]["same_tokens"] and reported(result["rows"][0])
    row = result["rows"][0]
    if "decode_speedup" in row:  # on CPU, the step's products alone, and transformers' step over them
        assert row["products_ms_per_step"] > 0
        assert row["hf_over_products"] == pytest.approx(row["hf_decode_ms_per_step"] / row["products_ms_per_step"])


def test_products_floor_runs_each_weight_of_a_step_once(monkeypatch):
    """The products-alone floor multiplies `batch` rows by every decoder weight once and by the LM head: 7 products
    a layer unfused, 4 with q/k/v and gate/up fused (as `compile()` leaves them)."""
    import torch.nn.functional as F
    from measure import products_ms

    pipe = palitorch.load()
    lm = pipe.model.language_model
    seen = []
    real = F.linear

    def counting(x, w, b=None):
        seen.append((x.shape[0], tuple(w.shape)))
        return real(x, w, b)

    monkeypatch.setattr(F, "linear", counting)
    layers = len(lm.layers)
    for fused, per_layer in ((False, 7), (True, 4)):
        if fused:
            lm.fuse_projections()
        seen.clear()
        assert products_ms(pipe.model, batch=3, reps=2) > 0
        assert len(seen) == 3 * (per_layer * layers + 1)  # a warm-up step and two timed ones
        assert {rows for rows, _ in seen} == {3}
        assert tuple(lm.embed_tokens.weight.shape) in {shape for _, shape in seen}


@pytest.mark.parametrize("size", ["mid", "pg2-mini"])
def test_bench_linear_times_the_fused_decoder_weights_of_a_size(size, monkeypatch, capsys):
    """bench_linear's shapes are those of the size's decoder with q/k/v and gate/up fused, as palitorch runs a
    step; a short run prints one line per row count for each kernel."""
    import bench_linear
    from inputs import _config, _tokenizer

    from palitorch.model import PaliGemma

    with torch.device("meta"):
        model = PaliGemma(_config(size, _tokenizer()))
    lm = model.language_model
    lm.fuse_projections()
    want = [tuple(t.shape) for layer in lm.layers for t in (layer.attn.qkv, layer.attn.o_proj.weight,
                                                          layer.mlp.gate_up, layer.mlp.down_proj.weight)]
    assert bench_linear.decoder_shapes(size) == want
    if size == "pg2-mini":
        for dtype in ("float32", "bfloat16"):
            monkeypatch.setattr(sys, "argv", ["bench_linear.py", "--size", size, "--rows", "1,3", "--reps", "1",
                                              "--dtype", dtype])
            bench_linear.main()
            lines = capsys.readouterr().out.splitlines()
            assert [ln.split()[0] for ln in lines[2:4]] == ["1", "3"] and "F.linear" in lines[1]
            assert dtype in lines[0] and ("oneDNN" in lines[1]) == (dtype == "float32" and kernels._onednn_works())


@pytest.mark.parametrize(("argv", "message"), [
    (["--sizes", "bundled,pg3-9b"], "unknown size 'pg3-9b'"),
    (["--sizes", "."], "a folder without a config.json"),
    (["--batches", "1,eight"], "--batches takes comma-separated whole numbers"),
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
])
def test_bad_arguments_get_a_one_line_error(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_generate.py", *argv])
    with pytest.raises(SystemExit) as e:
        bench_generate.main()
    assert e.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]


def test_decode_swamped_by_noise_is_not_reported(tmp_path, monkeypatch, capsys):
    """A run of N tokens timed no slower than a run of 1 (noise, or N too small) gives no decode figure at all,
    rather than a negative or infinite one. A clock whose every interval is the same stands in for the noise."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(bench_generate.time, "perf_counter", lambda: float(next(ticks)))
    out = tmp_path / "record.json"
    monkeypatch.setattr(sys, "argv", ["bench_generate.py", "--sizes", "bundled", "--batches", "1", "--new-tokens",
                                      "3", "--reps", "1", "--no-compile", "--json", str(out)])
    bench_generate.main()
    row = json.loads(out.read_text())["results"][0]["rows"][0]
    assert row["same_tokens"] and "raise --new-tokens" in row["decode_not_measured"]
    assert "decode_speedup" not in row and "ours_decode_tok_s" not in row and row["prefill_speedup"] == 1.0
    assert "decode not measured" in capsys.readouterr().out


def test_prefill_blocks_times_whole_against_blocks_on_the_same_tokens(pg2, monkeypatch, capsys):
    """benchmarks/prefill_blocks.py on a tiny checkpoint, with blocks small enough that its prefills use them: a
    timing per batch, after the tokens were found equal; the block budget is restored afterwards."""
    import prefill_blocks

    from palitorch.model import gemma

    folder, _ = pg2
    monkeypatch.setattr(kernels, "ROW_BLOCK_BYTES", 1)
    monkeypatch.setattr(kernels, "ROW_BLOCK_MIN_ROWS", 16)
    monkeypatch.setattr(gemma, "SCORE_BLOCK_BYTES", 1)
    monkeypatch.setattr(sys, "argv", ["prefill_blocks.py", "--size", str(folder), "--batches", "1,2", "--reps", "1"])
    prefill_blocks.main()
    out = capsys.readouterr().out
    assert out.count("in row blocks") == 2 and "same tokens" in out
    assert kernels.ROW_BLOCK_BYTES == 1 and gemma.SCORE_BLOCK_BYTES == 1


def test_top_logprobs_ab_times_both_steps_on_the_same_tokens(pg1, capsys):
    """benchmarks/top_logprobs_ab.py on a tiny checkpoint: both steps run (compiled), give the same tokens and
    alternatives, and each batch gets a timing."""
    import top_logprobs_ab

    rows = top_logprobs_ab.main(["--model", str(pg1[0]), "--batches", "1,2", "--reps", "1", "--new-tokens", "3"])
    assert [r["batch"] for r in rows] == [1, 2] and all(r["fused_ms"] > 0 and r["before_ms"] > 0 for r in rows)
    assert capsys.readouterr().out.count("fused") == 2


def test_int8_weights_are_timed_against_transformers_on_them_dequantized(tmp_path, monkeypatch, capsys):
    """bench_generate.py --quantize int8: transformers runs palitorch's int8 weights dequantized (its own copy), the
    tokens are compared as usual, and the memory floor counts the int8 bytes (about a quarter of float32's)."""
    out = tmp_path / "record.json"
    monkeypatch.setattr(sys, "argv", ["bench_generate.py", "--sizes", "bundled", "--batches", "1,2", "--new-tokens",
                                      "4", "--reps", "1", "--no-compile", "--quantize", "int8", "--json", str(out)])
    bench_generate.main()
    record, printed = json.loads(out.read_text()), capsys.readouterr().out
    result = record["results"][0]
    assert result["quantize"] == "int8" and result["weights_shared"] == 0.0
    assert "int8 weights dequantized to float32" in printed and "palitorch int8" in printed
    assert all(r["same_tokens"] and reported(r) for r in result["rows"])
    full = sum(p.numel() * 4 for p in palitorch.load().model.language_model.parameters())
    assert result["params"] == sum(p.numel() for p in palitorch.load().model.parameters())
    for r in result["rows"]:
        if "bytes_per_step" in r:
            assert r["bytes_per_step"] < full / 2


def test_the_int8_comparison_times_both_and_measures_their_agreement(tmp_path, monkeypatch, capsys):
    import quantized

    out = tmp_path / "q.json"
    monkeypatch.setattr(sys, "argv", ["quantized.py", "--sizes", "bundled", "--batches", "1,2", "--new-tokens", "4",
                                      "--reps", "1", "--no-compile", "--json", str(out)])
    quantized.main()
    result = json.loads(out.read_text())["results"][0]
    assert result["decoder_bytes"]["int8"] < result["decoder_bytes"]["full"] / 2
    for r in result["rows"]:
        assert r["full_prefill_ms"] > 0 and r["int8_prefill_ms"] > 0 and r["tokens"] == 4 * r["batch"]
        assert r["tokens_before_first_difference"] >= 1 and r["max_logprob_gap"] < 0.1
    assert "greedy tokens the same for" in capsys.readouterr().out


def test_the_feature_cache_benchmark_times_a_chat_three_ways_on_the_same_tokens(tmp_path, monkeypatch, capsys):
    """benchmarks/feature_cache.py on the bundled model: with the cache, without it and through transformers, the
    same tokens, a time for every request; and a cache that changed an answer stops it before any figure."""
    import feature_cache

    out = tmp_path / "fc.json"
    monkeypatch.setattr(sys, "argv", ["feature_cache.py", "--size", "bundled", "--rounds", "1", "--prompts", "2",
                                      "--new-tokens", "3", "--json", str(out)])
    feature_cache.main()
    medians = json.loads(out.read_text())["medians"]
    assert set(medians) == {"cached", "uncached", "transformers"}
    assert all(v["first_ms"] > 0 and v["later_ms"] > 0 for v in medians.values())
    assert "later requests: cached" in capsys.readouterr().out
    assert feature_cache.agree([1, 2], [1, 3], torch.log_softmax(torch.tensor([[0.0, 0, 0, 0], [0, 0, 1.0, 0.9]]),
                                                                   -1), 0.5)  # a near-tie at step 1
    assert not feature_cache.agree([1, 2], [1, 3], torch.log_softmax(torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 5.0]]),
                                                                       -1), 0.5)
    assert not feature_cache.agree([1, 2], [1, 2, 3], torch.zeros(3, 4), 0.5)  # one answer longer

    real = feature_cache.ours

    def changed(pipe, image, prompts, new_tokens):  # the cached run answers otherwise: no figures
        times, answers = real(pipe, image, prompts, new_tokens)
        return times, [a + [0] for a in answers] if pipe.feature_cache.max_bytes else answers

    monkeypatch.setattr(feature_cache, "ours", changed)
    with pytest.raises(SystemExit, match="the cache changed the answers"):
        feature_cache.main()
