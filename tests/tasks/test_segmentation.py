"""Segmentation parsing, and the VQ-VAE mask decoder run on random weights (the real vae-oid.npz is not shipped).

The decoder is checked against an nn.Sequential laid out like the PyTorch model whose state dict vae-oid.npz
holds (its key names say decoder.N / decoder.N.net.M): same names, same shapes, logits within 1e-5; and against
masks that big_vision's own Flax decoder computed (data/make_vae_golden.py) at the real shapes, within 1e-5
relative to the largest logit (float32 sums of up to 4,608 products, in another library's order).
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from palitorch.errors import InputError
from palitorch.tasks import Segmentation, decode_codes, decode_mask, load_vae_params, parse_segmentations
from palitorch.tasks.segmentation import check_vae_params, vae_shapes

EMBED_DIM = 8


def seg_text(locs, codes, label):
    return "".join(f"<loc{v:04d}>" for v in locs) + "".join(f"<seg{c:03d}>" for c in codes) + " " + label


def test_parse_segmentations():
    codes = list(range(100, 116))
    text = seg_text((0, 0, 1023, 1023), codes, "cat") + " ; " + seg_text((0, 0, 511, 511), codes[:15], "short")
    text += " ; " + seg_text((0, 0, 10, 10), [200] + codes[1:], "bad code") + " ; " + seg_text((0, 0, 2, 2), [], "box")
    # Every object keeps its box; those without 16 codes in 0..127 (cut short, a code past the codebook, a bare
    # box, as a model also answers a segment prompt) have codes None, and JSON null.
    assert parse_segmentations(text, 64, 32) == [
        Segmentation("cat", (0.0, 0.0, 64.0, 32.0), tuple(codes)),
        Segmentation("short", (0.0, 0.0, 511 / 1023 * 64, 511 / 1023 * 32), None),
        Segmentation("bad code", (0.0, 0.0, 10 / 1023 * 64, 10 / 1023 * 32), None),
        Segmentation("box", (0.0, 0.0, 2 / 1023 * 64, 2 / 1023 * 32), None),
    ]
    assert parse_segmentations(text, 64, 32)[3].to_dict()["codes"] is None
    assert parse_segmentations("", 1, 1) == []


class ResBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(128, 128, 1))

    def forward(self, x):
        return x + self.net(x)


def reference_decoder():
    up = [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1) for a, b in ((128, 128), (128, 64), (64, 32), (32, 16))]
    return nn.Sequential(nn.Conv2d(EMBED_DIM, 128, 1), nn.ReLU(), ResBlock(), ResBlock(),
                         up[0], nn.ReLU(), up[1], nn.ReLU(), up[2], nn.ReLU(), up[3], nn.ReLU(), nn.Conv2d(16, 1, 1))


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    torch.manual_seed(0)
    decoder = reference_decoder()
    for p in decoder.parameters():
        nn.init.normal_(p, std=0.1)
    params = {f"decoder.{k}": v.numpy() for k, v in decoder.state_dict().items()}
    params["_vq_vae._embedding"] = torch.randn(128, EMBED_DIM).numpy()
    path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
    np.savez(path, **params)
    return path, decoder, params


def test_vae_file_is_read_and_checked(vae, tmp_path):
    path, _, params = vae
    loaded = load_vae_params(path)
    assert set(loaded) == set(vae_shapes(EMBED_DIM))
    with pytest.raises(InputError, match="do not exist"):
        load_vae_params(tmp_path / "nope.npz")
    with pytest.raises(InputError, match="is a folder; give the file itself"):  # (it exists: not "do not exist")
        load_vae_params(tmp_path)
    with pytest.raises(InputError, match="'/dev/null' is not a regular file"):
        load_vae_params("/dev/null")
    bad = dict(params, **{"decoder.4.weight": np.zeros((3, 3))})
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(InputError, match="decoder.4.weight"):
        load_vae_params(tmp_path / "bad.npz")
    np.savez(tmp_path / "pickled.npz", obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="plain .npz: it holds pickled objects"):
        load_vae_params(tmp_path / "pickled.npz")
    (tmp_path / "notes.txt").write_text("not weights")  # numpy would call this a pickle and say how to load it
    with pytest.raises(InputError, match="are not an .npz file") as e:
        load_vae_params(tmp_path / "notes.txt")
    assert "allow_pickle" not in str(e.value)


def test_decoder_matches_the_pytorch_layout(vae):
    path, decoder, params = vae
    codes = np.random.default_rng(0).integers(0, 128, size=(2, 16))
    ours = decode_codes(codes, load_vae_params(path))
    assert ours.shape == (2, 64, 64)
    emb = torch.from_numpy(params["_vq_vae._embedding"])[torch.from_numpy(codes)]  # [2, 16, D]
    with torch.no_grad():
        ref = decoder(emb.reshape(2, 4, 4, EMBED_DIM).permute(0, 3, 1, 2))[:, 0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="0..127"):
        decode_codes([128] * 16, params)


def test_the_decoder_gives_big_visions_logits():
    """The same weights through big_vision's JAX decoder (its conversion of the PyTorch state dict: kernels moved
    to [kh, kw, ., .], transposed convs at padding 2 with `transpose_kernel`) and through palitorch's."""
    data = Path(__file__).parent / "data"
    spec = importlib.util.spec_from_file_location("make_vae_golden", data / "make_vae_golden.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)  # (numpy only: jax is imported by the function that runs big_vision's model)
    with np.load(data / "vae_big_vision_golden.npz", allow_pickle=False) as golden:
        codes, want = golden["codes"], torch.from_numpy(golden["masks"])
    params = recipe.vae_weights()
    check_vae_params(params)  # the real file's names and shapes
    got = decode_codes(codes, params)
    assert 0.2 < (want > 0).double().mean() < 0.95, "the golden logits should have both signs"
    torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)


def test_decode_mask_pastes_into_the_box(vae):
    _, _, params = vae
    # A decoder whose output is +1 everywhere: bias of the last conv only, every other weight zeroed.
    ones = {k: np.zeros_like(v) for k, v in params.items()}
    ones["decoder.12.bias"] = np.ones(1, np.float32)
    mask = decode_mask([0] * 16, (10.4, 5.0, 30.0, 20.6), ones, image_size=(40, 25))
    assert mask.shape == (25, 40) and mask.dtype == bool
    expected = np.zeros((25, 40), bool)
    expected[5:21, 10:30] = True
    np.testing.assert_array_equal(mask, expected)
    assert not decode_mask([0] * 16, (10.0, 5.0, 10.0, 20.0), ones, image_size=(40, 25)).any()  # empty box
    with pytest.raises(InputError, match="no mask codes"):  # a bare box of parse_segmentations
        decode_mask(None, (10.0, 5.0, 30.0, 21.0), ones, image_size=(40, 25))
    # A 64 x 64 box needs no resizing: the mask is exactly the logits' sign, and random weights give both signs.
    codes = list(range(16))
    m = decode_mask(codes, (0.0, 0.0, 64.0, 64.0), params, image_size=(64, 64))
    logits = decode_codes(codes, params)[0].numpy()
    assert (logits > 0).any() and (logits <= 0).any()
    np.testing.assert_array_equal(m, logits > 0)


def test_codes_must_be_exactly_16_below_the_codebook_size():
    """128 is past the 128-entry codebook (0..127), and 17 codes are not the 4 x 4 grid: the box stays, codes None."""
    codes = list(range(112, 128))  # 16 codes up to 127: whole
    whole = (0, 0, 1023, 1023)
    text = " ; ".join([seg_text(whole, codes, "ok"), seg_text(whole, codes[1:] + [128], "past"),
                       seg_text(whole, codes + [0], "long")])
    assert [s.codes for s in parse_segmentations(text, 8, 8)] == [tuple(codes), None, None]


def test_a_mask_is_true_only_where_the_logits_are_above_zero(vae):
    """A decoder whose output is exactly 0 everywhere (every weight and bias zeroed) gives an empty mask: the
    threshold is > 0, as the docstring says (positive = inside)."""
    _, _, params = vae
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    assert not decode_mask([0] * 16, (0.0, 0.0, 30.0, 20.0), zeros, image_size=(40, 25)).any()


def test_a_mask_is_resized_into_its_box_bilinearly(vae):
    """The 64 x 64 logits are stretched onto a 160 x 96 box by bilinear interpolation: the mask is the sign of the
    interpolated logits (compared where they are not within 1e-3 of 0), which nearest-neighbour resizing misses at
    the edges of each region."""
    _, _, params = vae
    codes = list(range(16))
    mask = decode_mask(codes, (10.0, 4.0, 170.0, 100.0), params, image_size=(200, 120))
    logits = decode_codes(codes, params)
    smooth = torch.nn.functional.interpolate(logits[None], size=(96, 160), mode="bilinear", align_corners=False)[0, 0]
    sure = smooth.abs() > 1e-3
    inside = mask[4:100, 10:170]
    assert sure.float().mean() > 0.9 and (smooth > 0).any() and (smooth < 0).any()
    np.testing.assert_array_equal(inside[sure.numpy()], (smooth > 0).numpy()[sure.numpy()])
    assert not mask[:4].any() and not mask[100:].any() and not mask[:, :10].any() and not mask[:, 170:].any()


def test_codes_that_are_not_one_objects_16_whole_numbers_are_refused(vae):
    """decode_mask draws one object: 15 or 17 codes, two objects' [2, 16], or codes that are not whole numbers
    (1.5 would be read as 1) are an InputError naming the shape or type, not a torch reshape error or a mask
    decoded from the first object or from truncated codes. decode_codes takes [16] or [N, 16] (N may be 0)."""
    _, _, params = vae
    box, size = (0.0, 0.0, 10.0, 10.0), (10, 10)
    for codes in ([1] * 15, [1] * 17, [[1] * 16] * 2, []):
        with pytest.raises(InputError, match=r"16 segmentation codes per object .* got shape"):
            decode_mask(codes, box, params, image_size=size)
    for codes in ([1.5] * 16, ["1"] * 16):
        with pytest.raises(InputError, match="whole numbers"):
            decode_mask(codes, box, params, image_size=size)
    with pytest.raises(InputError, match="16 segmentation codes per object"):
        decode_codes([1] * 15, params)
    assert decode_codes(np.zeros((0, 16), np.int64), params).shape == (0, 64, 64)
    assert decode_codes(np.arange(16, dtype=np.uint8), params).shape == (1, 64, 64)
    assert decode_mask(tuple(range(16)), box, params, image_size=size).shape == (10, 10)


def test_a_mask_s_image_size_and_box_are_checked_in_one_line(vae):
    """decode_mask's image_size is whole pixels (40.0 is 40; 40.5, 0, a bool or one number are refused) and its box
    four finite numbers (a NaN corner was a ValueError from round), each an InputError naming the argument."""
    _, _, params = vae
    codes, box = list(range(16)), (0.0, 0.0, 10.0, 10.0)
    assert decode_mask(codes, box, params, image_size=(40.0, 25.0)).shape == (25, 40)
    assert np.array_equal(decode_mask(codes, box, params, image_size=(40.0, 25.0)),
                          decode_mask(codes, box, params, image_size=(40, 25)))
    for size in ((40.5, 25), (0, 25), (True, 25), 40, (40, 25, 3), (float("inf"), 25)):
        with pytest.raises(InputError, match="decode_mask: image_size is"):
            decode_mask(codes, box, params, image_size=size)
    for bad in ((0.0, float("nan"), 10.0, 10.0), (0, 0, 10), None):
        with pytest.raises(InputError, match="decode_mask: box is"):
            decode_mask(codes, bad, params, image_size=(40, 25))
