"""`palitorch.load(..., quantize="int8")` against transformers running the same int8 weights, dequantized.

The reference: transformers' PaliGemma from the same checkpoint, with every weight of its language model (the
attention and MLP projections and the tied embedding / LM head) replaced by Q * s, the weight that palitorch's int8
layers compute with (quantize_rows is deterministic, so both sides hold the same Q and s). The vision tower and
the projector are not quantized on either side.

Tolerances:
- products in float32 with the dequantized weight (palitorch's CPU kernel at a decode step's few rows, the blocks
  of a prefill's many rows, a scoring forward): greedy tokens equal, logprobs within DIVERSE_LOGPROB_TOL (3e-4,
  float32 rounding on these chaotic weights, as in every parity test);
- a CPU decode step's products through torch's int8 kernel (where palitorch's is not built) round their input rows
  and results to bfloat16 (~2e-3 relative each; palitorch/model/quant.py): on these weights, which multiply a
  vector's norm by ~4 a matrix, that moved logprobs by at most ~0.03 from the float32 reference; allowed:
  PACKED_LOGPROB_TOL = 0.06, and greedy tokens equal except after a near-tie (where the reference's top two
  logprobs are within 2 x that tolerance).
"""

import numpy as np
import pytest
import torch
from PIL import Image

import palitorch
from palitorch.model import quant

from hf_factory import DIVERSE_LOGPROB_TOL, diverse, hf_generate, hf_processor, hf_suffix_logprobs

PACKED_LOGPROB_TOL = 0.06
PROMPTS = ["caption en", "answer en is there a blue circle in the image?", "detect cat ; dog"]
STEPS = 16


def dequantized_reference(hf):
    """A copy of transformers' model whose language model computes with the int8 weights palitorch makes."""
    import copy

    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for module in ref.model.language_model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(quant.dequantized(*quant.quantize_rows(module.weight)))
    return ref


def images(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30 + 11 * i, 47, 3), dtype=np.uint8)) for i in range(3)]


@pytest.fixture(scope="module", params=[1, 2], ids=["pg1", "pg2"])
def case(request, ckpt_factory):
    folder, hf = diverse(ckpt_factory, request.param)
    ref = dequantized_reference(hf)
    imgs = images(request.param)
    want, want_lp = hf_generate(folder, ref, imgs, PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS)
    return folder, ref, imgs, want, want_lp


def near_tie_before(ref, folder, imgs, row: int, step: int) -> bool:
    """Whether the reference's top two logprobs were within 2 x PACKED_LOGPROB_TOL at some step <= `step`."""
    proc = hf_processor(folder)
    proc.tokenizer.padding_side = "left"
    inputs = proc(images=imgs, text=PROMPTS, return_tensors="pt", padding=True)
    out = ref.generate(**inputs, do_sample=False, output_logits=True, return_dict_in_generate=True,
                       max_new_tokens=STEPS, min_new_tokens=STEPS)
    logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)[row, :step + 1]
    top = logp.topk(2, dim=-1).values
    return bool(((top[:, 0] - top[:, 1]) < 2 * PACKED_LOGPROB_TOL).any())


@pytest.mark.parametrize("route", ["palitorch's kernel", "compiled", "float32 blocks"])
def test_int8_decoding_matches_transformers_with_the_dequantized_weights(case, route, monkeypatch):
    folder, ref, imgs, want, want_lp = case
    if route == "float32 blocks":
        monkeypatch.setattr(quant, "NATIVE_MAX_ROWS", 0)  # every product: (x @ Q.float().T) * s, in blocks
        monkeypatch.setattr(quant, "PACK_MAX_ROWS", 0)
        monkeypatch.setattr(quant, "DEQUANT_BLOCK_ELEMENTS", 1000)
    elif not quant.native_works():
        pytest.skip("palitorch's CPU kernel is not built here")
    pipe = palitorch.load(folder, quantize="int8")
    assert "quantize=int8" in repr(pipe)
    if route == "compiled":
        pipe.compile()
    taken = []
    native = quant._native_route
    monkeypatch.setattr(quant, "_native_route", lambda *a: taken.append(native(*a)) or taken[-1])
    got = pipe.generate(imgs, PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS)
    assert len({tuple(r.token_ids) for r in got}) > 1, "the answers should depend on the input"
    for r, ids, lp in zip(got, want.tolist(), want_lp):
        assert r.token_ids == ids
        torch.testing.assert_close(torch.tensor(r.logprobs), lp, atol=DIVERSE_LOGPROB_TOL, rtol=0)
    if route == "palitorch's kernel":
        assert any(taken), "decode steps should take palitorch's kernel"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_int8_decoding_through_torchs_int8_kernel_stays_near_the_reference(case, compiled, monkeypatch):
    folder, ref, imgs, want, want_lp = case
    quant.use_native(False)
    try:
        pipe = palitorch.load(folder, quantize="int8")
        calls = {"n": 0}
        real = torch._weight_int8pack_mm

        def counting(*a):
            calls["n"] += 1
            return real(*a)

        if compiled:
            pipe.compile()
        else:
            monkeypatch.setattr(torch, "_weight_int8pack_mm", counting)  # (eager: a compiled graph calls the op)
        got = pipe.generate(imgs, PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS)
    finally:
        quant.use_native(True)
    assert compiled or calls["n"] > 0, "decode steps should take torch's int8 kernel"
    for row, (r, ids, lp) in enumerate(zip(got, want.tolist(), want_lp)):
        same = next((i for i, (a, b) in enumerate(zip(r.token_ids, ids)) if a != b), len(ids))
        if same < len(ids):
            assert near_tie_before(ref, folder, imgs, row, same), f"row {row} left the reference at step {same}"
        torch.testing.assert_close(torch.tensor(r.logprobs[:same]), lp[:same], atol=PACKED_LOGPROB_TOL, rtol=0)


def test_int8_scoring_matches_transformers_with_the_dequantized_weights(case):
    folder, ref, imgs, *_ = case
    pipe = palitorch.load(folder, quantize="int8")
    suffix = "<loc0010><loc0020><loc0500><loc0600> cat ; a dog"
    scored = pipe.score(imgs[1], "ocr", suffix)
    ids, want = hf_suffix_logprobs(hf_processor(folder), ref, imgs[1], "ocr", suffix)
    assert scored.token_ids == ids
    torch.testing.assert_close(torch.tensor(scored.logprobs), want, atol=DIVERSE_LOGPROB_TOL, rtol=0)


def test_quantize_replaces_the_language_model_weights_only(case):
    folder, *_ = case
    pipe = palitorch.load(folder, quantize="INT8")
    lm = pipe.model.language_model
    assert quant.quantization_of(lm) == "int8"
    int8 = {n for n, b in lm.named_buffers() if b.dtype == torch.int8}
    assert "embed_tokens.weight" in int8 and "layers.0.mlp.down_proj.weight" in int8
    assert not [n for n, p in lm.named_parameters() if p.dim() == 2], "no float matrix left in the decoder"
    assert all(p.dtype == torch.float32 for p in pipe.model.vision_tower.parameters())
    assert pipe.dtype == torch.float32


def test_an_unknown_scheme_is_refused_before_loading(tmp_path):
    with pytest.raises(palitorch.InputError, match="quantize must be None or 'int8', not 'int4'"):
        palitorch.load(tmp_path / "nothing-here", quantize="int4")


def test_a_pipeline_made_from_a_model_quantized_by_hand_checks_the_int8_route(monkeypatch):
    from palitorch.inference import Pipeline

    pipe = palitorch.load()
    quant.quantize_(pipe.model.language_model)
    monkeypatch.setitem(quant._native, "works", None)  # as in a fresh process
    Pipeline(pipe.model, pipe.processor)
    assert quant._native["works"] is not None, "the check ran before any forward reads its verdict"


def test_an_adapter_is_merged_before_the_weights_are_quantized(pg1, tmp_path):
    """load(..., adapter=A, quantize="int8") holds exactly the int8 weights of the merged float model, quantized."""
    from peft import LoraConfig, get_peft_model
    from transformers import PaliGemmaForConditionalGeneration as HF

    folder, _ = pg1
    torch.manual_seed(0)
    lora = get_peft_model(HF.from_pretrained(folder), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                 target_modules=["q_proj", "down_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    got = palitorch.load(folder, adapter=tmp_path / "adapter", quantize="int8").model.language_model
    merged = palitorch.load(folder, adapter=tmp_path / "adapter").model.language_model
    plain = palitorch.load(folder).model.language_model
    assert not torch.equal(merged.layers[0].attn.q_proj.weight, plain.layers[0].attn.q_proj.weight)
    quant.quantize_(merged)
    for (name, a), (_, b) in zip(got.named_buffers(), merged.named_buffers()):
        assert torch.equal(a, b), name
    assert sum(1 for n, b in got.named_buffers() if b.dtype == torch.int8) == 1 + 7 * len(got.layers)
