"""model/quant.py: int8 rows and scales, and the two routes of an int8 product, against the dequantized weight.

Tolerances: the dequantized route computes x @ (Q * s).T in x's dtype: float32 rounding (rtol 1e-5 against a
float64 reference); torch's CPU int8 kernel rounds x and its result to bfloat16 (2^-8 relative each, so 1e-2 of
the result's scale, measured well under it).
"""

import pytest
import torch
import torch.nn.functional as F

from palitorch.model import quant


def reference(x, q, s):
    return (x.double() @ quant.dequantized(q, s, torch.float64).T)


def test_rows_are_within_half_a_step_of_the_weight_and_scales_are_bfloat16_values():
    torch.manual_seed(0)
    w = torch.randn(300, 70) * torch.logspace(-3, 2, 300)[:, None]  # rows of very different sizes
    w[5] = 0  # a row of zeros
    w[7, 3] = 1e4  # an outlier sets its row's step
    before = w.clone()
    q, s = quant.quantize_rows(w)
    assert torch.equal(w, before), "the weight itself is left as it was"
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and q.shape == w.shape
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1)[torch.arange(300) != 5] >= 126).all()
    step = s.float()[:, None]
    assert ((w - q.float() * step).abs() <= 0.5 * step * (1 + 2**-7)).all()
    assert (q[5] == 0).all() and torch.isfinite(s).all()


def test_rows_come_out_the_same_however_many_are_converted_at_a_time(monkeypatch):
    w = torch.randn(37, 48, dtype=torch.bfloat16)
    whole = quant.quantize_rows(w)
    monkeypatch.setattr(quant, "QUANTIZE_ROWS", 5)
    parts = quant.quantize_rows(w)
    assert torch.equal(whole[0], parts[0]) and torch.equal(whole[1], parts[1])


def test_weights_that_are_not_finite_or_not_matrices_are_refused():
    w = torch.randn(4, 16)
    w[2, 1] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        quant.quantize_rows(w)
    with pytest.raises(ValueError, match="2-D floating-point"):
        quant.quantize_rows(torch.randn(16))


def native_or_skip():
    if not quant.native_works():
        pytest.skip("palitorch's CPU kernel is not built here (no compiler, or PALITORCH_NATIVE=0)")


@pytest.mark.parametrize("rows", [1, 2, 5, 12, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_rows_take_palitorchs_kernel_in_float32(rows, dtype, monkeypatch):
    native_or_skip()
    torch.manual_seed(rows)
    q, s = quant.quantize_rows(torch.randn(83, 72))  # an odd number of outputs, a width no multiple of 16
    x = torch.randn(1, rows, 72).to(dtype)
    monkeypatch.setattr(torch, "_weight_int8pack_mm", None)  # (calling either other route would fail)
    monkeypatch.setattr(quant, "_dequantized_product", None)
    with torch.no_grad():
        y = quant.int8_linear(x, q, s)
    assert y.dtype == dtype and y.shape == (1, rows, 83)
    want = reference(x.float(), q, s)
    if dtype == torch.float32:  # the dequantized weight's float32 product, up to summation order
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    else:  # summed in float32, rounded to bfloat16 once
        torch.testing.assert_close(y.double(), want.to(dtype).double(), rtol=2**-8, atol=1e-2)


@pytest.mark.parametrize("case", ["17 rows", "switched off", "float16 rows", "unchecked"])
def test_other_few_row_products_take_torchs_int8_kernel(case, monkeypatch):
    native_or_skip()
    q, s = quant.quantize_rows(torch.randn(40, 64))
    x = torch.randn(17 if case == "17 rows" else 3, 64, dtype=torch.float16 if case == "float16 rows" else None)
    monkeypatch.setitem(quant._native, "enabled", case != "switched off")
    monkeypatch.setitem(quant._native, "works", None if case == "unchecked" else True)
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y = quant.int8_linear(x, q, s)
    assert calls == [1] and y.dtype == x.dtype
    assert ((y.double() - reference(x.float(), q, s)).abs().max() / y.abs().max()) < 1e-2


@pytest.mark.parametrize("rows", [1, 3, 17, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_few_rows_take_the_int8_kernel_within_bfloat16_rounding(rows, dtype, monkeypatch):
    monkeypatch.setitem(quant._native, "enabled", False)
    torch.manual_seed(rows)
    q, s = quant.quantize_rows(torch.randn(83, 64))  # an odd number of outputs
    x = torch.randn(2, rows, 64).to(dtype)
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y = quant.int8_linear(x[:1], q, s)
    assert calls and y.dtype == dtype and y.shape == (1, rows, 83)
    want = reference(x[:1], q, s)
    assert ((y.double() - want).abs().max() / want.abs().max()) < 1e-2


@pytest.mark.parametrize("case", ["many rows", "width not a multiple of 16", "autograd", "unaligned weight"])
def test_other_products_use_the_dequantized_weight_exactly(case, monkeypatch):
    torch.manual_seed(1)
    k = {"width not a multiple of 16": 24, "unaligned weight": 48}.get(case, 64)
    q, s = quant.quantize_rows(torch.randn(40, k))
    if case == "unaligned weight":
        q, s = q[1:], s[1:]  # a view 48 bytes in: on a 16-byte bound but not PACK_ALIGN's
    x = torch.randn(1, 40 if case == "many rows" else 2, k, requires_grad=case == "autograd")
    monkeypatch.setattr(torch, "_weight_int8pack_mm", None)  # (calling it would fail)
    with torch.set_grad_enabled(case == "autograd"):
        y = quant.int8_linear(x, q, s, bias=torch.ones(q.shape[0]))
    torch.testing.assert_close(y.double(), reference(x.detach(), q, s) + 1, rtol=1e-5, atol=1e-5)
    if case == "autograd":
        y.sum().backward()
        torch.testing.assert_close(x.grad[0, 0].double(), quant.dequantized(q, s, torch.float64).sum(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_convert_the_weight_in_blocks_with_the_same_result(dtype, monkeypatch):
    torch.manual_seed(3)
    q, s = quant.quantize_rows(torch.randn(43, 64))
    x = torch.randn(2, 50, 64).to(dtype)
    with torch.no_grad():
        whole = quant.int8_linear(x, q, s)
        monkeypatch.setattr(quant, "DEQUANT_BLOCK_ELEMENTS", 64 * 5)  # blocks of 5 rows, the last one of 3
        blocks = quant.int8_linear(x, q, s)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # (a block and a whole weight may take different kernels)
    torch.testing.assert_close(blocks.double(), whole.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(blocks.double(), reference(x.float(), q, s), rtol=tol, atol=tol)


def test_a_bfloat16_row_that_starts_off_a_vector_boundary_is_copied_for_the_kernel(monkeypatch):
    monkeypatch.setitem(quant._native, "enabled", False)
    torch.manual_seed(2)
    q, s = quant.quantize_rows(torch.randn(16, 32))
    x = torch.randn(1, 5, 33, dtype=torch.bfloat16)[..., 1:]  # rows of 32 values starting 2 bytes in
    with torch.no_grad():
        y = quant.int8_linear(x[:, 1:2], q, s)
    want = reference(x[:, 1:2].float(), q, s)
    assert ((y.double() - want).abs().max() / want.abs().max()) < 1e-2


def test_an_int8_embedding_looks_up_the_dequantized_rows_exactly():
    emb = torch.nn.Embedding(50, 32)
    m = quant.Int8Embedding.from_embedding(emb)
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    assert m.num_embeddings == 50 and m.weight.dtype == torch.int8
    torch.testing.assert_close(m(ids), F.embedding(ids, quant.dequantized(m.weight, m.weight_scale)), rtol=0,
                               atol=0)


def test_quantizing_twice_or_after_fusing_is_refused_or_a_no_op():
    from palitorch.config import TextConfig
    from palitorch.model import Gemma

    lm = Gemma(TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim=16))
    quant.quantize_(lm)
    q = lm.layers[0].attn.q_proj.weight
    quant.quantize_(lm)
    assert lm.layers[0].attn.q_proj.weight is q, "quantizing an int8 model again changes nothing"
    lm.fuse_projections()
    assert lm.layers[0].attn.qkv.dtype == torch.int8 and lm.layers[0].attn.qkv_scale.shape == (64,)
    assert lm.layers[0].attn.q_proj.weight.data_ptr() == lm.layers[0].attn.qkv.data_ptr(), "a view of the fused"
    with pytest.raises(ValueError, match="before fusing"):
        quant.quantize_(lm)
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quant.quantize_(lm, "int4")


@pytest.mark.parametrize("tied", [True, False])
def test_a_quantized_decoder_computes_as_the_float_one_with_the_dequantized_weights(tied):
    """Embedding, every layer and the LM head (the embedding itself, or a matrix of its own when untied), in one
    forward of many rows (the float32 blocks) and of a few (palitorch's kernel, or torch's int8 kernel)."""
    import copy

    from palitorch.config import TextConfig
    from palitorch.model import Gemma

    torch.manual_seed(4)
    lm = Gemma(TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, tie_embeddings=tied)).eval()
    for p in lm.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ref = copy.deepcopy(lm)
    quant.quantize_(lm)
    quant.prepare()  # (as a Pipeline does: the few-row products' route)
    assert isinstance(lm.embed_tokens, quant.Int8Embedding)
    assert tied == (lm.lm_head is None) and (tied or isinstance(lm.lm_head, quant.Int8Linear))
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.copy_(quant.dequantized(*quant.quantize_rows(m.weight)))
        for t in (40, 3):
            ids = torch.randint(0, 96, (2, t))
            pos = torch.arange(t).expand(2, t)
            mask = torch.ones(2, 1, t, t, dtype=torch.bool).tril()
            got = lm.logits(lm(lm.embed(ids), pos, mask))
            want = ref.logits(ref(ref.embed(ids), pos, mask))
            tol = 1e-4 if t > quant.PACK_MAX_ROWS or quant.native_works() else 3e-2
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
