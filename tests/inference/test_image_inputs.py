"""load_image's edges: paths that are URLs or empty, bytes-like inputs, arrays whose reading is ambiguous or whose
values are out of range, 16/32-bit and float images scaled to 8 bits, transparency as transformers composites it,
and a damaged EXIF block dropped from the result but not from the caller's image. Found by mutation testing; and
tensors of dtypes numpy lacks, PIL images whose file is read only when used (truncated, or closed by then).

Tolerance for pixels: none (bit for bit) unless a line says otherwise.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from palitorch.errors import InputError
from palitorch.inference.images import load_image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("path", ["http://example.com/cat.jpg", "HTTPS://Example.com/cat.jpg"])
def test_a_url_of_either_scheme_in_any_case_is_named_as_a_url(path):
    """Not 'does not exist': the user is told to download it (http as well as https, and schemes in capitals)."""
    with pytest.raises(InputError, match="is a URL: palitorch reads image files"):
        load_image(path)


@pytest.mark.parametrize("path", ["", "   "])
def test_an_empty_path_is_named_as_empty(path):
    """Not "image file '.' is not a file" (Path("") is the current folder)."""
    with pytest.raises(InputError, match="the image path is empty"):
        load_image(path)


def test_a_bytearray_is_read_as_bytes_are():
    data = _png(Image.fromarray(np.random.RandomState(0).randint(0, 256, (6, 9, 3), dtype=np.uint8)))
    assert np.array_equal(np.asarray(load_image(bytearray(data))), np.asarray(load_image(data)))


def test_an_array_that_reads_either_way_is_channels_last():
    """[3, 5, 4] fits [H, W, C] (an RGBA image 5 wide) and [C, H, W] (RGB, 4 wide): channels last, as documented."""
    a = np.random.RandomState(1).randint(0, 256, (3, 5, 4), dtype=np.uint8)
    out = load_image(a)
    assert out.size == (5, 3)
    assert np.array_equal(np.asarray(out), np.asarray(load_image(Image.fromarray(a, "RGBA"))))


@pytest.mark.parametrize("a, why", [
    (np.full((4, 4), -0.25, np.float32), r"floats must hold pixels in \[0, 1\]"),
    (np.full((4, 4), -1, np.int16), "outside 0-255"),  # (would wrap to 255 as uint8)
    (np.full((4, 4), 70000, np.uint32), "outside 0-255"),  # only uint16 is read as 16-bit pixels
    (np.full((4, 4), 300, np.int32), "outside 0-255"),
])
def test_arrays_out_of_range_are_refused(a, why):
    with pytest.raises(InputError, match=why):
        load_image(a)


def test_float_pixels_go_to_the_nearest_8_bit_level():
    """0.4 of a level below or above level k is k (truncation would make k - 0.4 into k - 1)."""
    levels = np.arange(256, dtype=np.float64)
    a = np.clip(np.stack([levels - 0.4, levels + 0.4]) / 255, 0, 1)
    assert np.array_equal(np.asarray(load_image(a))[..., 0], np.stack([levels, levels]).astype(np.uint8))


def test_every_16_bit_value_of_an_array_is_scaled_as_a_16_bit_png_is():
    """All 65536 values (the existing test's values sit 100/257 above a level, where floor and rounding agree)."""
    deep = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    png = _png(Image.fromarray(deep))
    assert Image.open(io.BytesIO(png)).mode.startswith("I;16")
    assert np.array_equal(np.asarray(load_image(deep)), np.asarray(load_image(png)))


def test_a_16_bit_image_of_small_values_is_still_scaled_by_its_depth():
    """A 16-bit file's scale is its bit depth, not its values: 255 of 65535 is dark (an array of uint16 values all
    <= 255 is taken as 8-bit pixels instead, as the docstring of from_array says)."""
    values = np.array([[0, 128, 129, 255]], np.uint16)
    img = Image.open(io.BytesIO(_png(Image.fromarray(values))))
    assert img.mode.startswith("I;16")
    assert np.asarray(load_image(img))[0, :, 0].tolist() == np.rint(values[0] / 257).tolist() == [0, 0, 1, 1]


def test_32_bit_and_float_images_are_scaled_and_clipped_to_8_bits():
    """Mode I (32-bit) holding 16-bit values reads as the I;16 image of the same values; values below 0 or past
    65535 are clipped (not wrapped). Mode F in [0, 1] (1.0 included) reads as the float array; F with values past 1
    (up to 255) is taken as 0-255, clipped too."""
    deep = np.arange(0, 65536, 7, dtype=np.uint16)[None]
    assert np.array_equal(np.asarray(load_image(Image.fromarray(deep.astype(np.int32)))),
                          np.asarray(load_image(Image.fromarray(deep))))
    wide = Image.fromarray(np.array([[-1000, 0, 70000]], np.int32))
    assert wide.mode == "I" and np.asarray(load_image(wide))[0, :, 0].tolist() == [0, 0, 255]
    unit = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    assert Image.fromarray(unit).mode == "F"
    assert np.array_equal(np.asarray(load_image(Image.fromarray(unit))), np.asarray(load_image(unit)))
    f = Image.fromarray(np.array([[-0.5, 0.5, 1.0]], np.float32))
    assert np.asarray(load_image(f))[0, :, 0].tolist() == [0, 128, 255]
    f = Image.fromarray(np.array([[-3.0, 2.4, 128.6, 255.0]], np.float32))
    assert np.asarray(load_image(f))[0, :, 0].tolist() == [0, 2, 129, 255]


def _transparent_modes():
    rs = np.random.RandomState(3)
    rgb = Image.fromarray(rs.randint(0, 256, (12, 10, 3), dtype=np.uint8))
    alpha = Image.fromarray(rs.randint(0, 256, (12, 10), dtype=np.uint8))
    la = rgb.convert("L")
    la.putalpha(alpha)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3  # a palette index that is transparent (a GIF's, a PNG's tRNS)
    rgb_t = rgb.copy()
    rgb_t.info["transparency"] = tuple(int(v) for v in np.asarray(rgb)[0, 0])  # a colour that is transparent
    pa = pal.convert("PA")
    pa.putalpha(alpha)
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    return {"LA": la, "PA": pa, "P-transparency": pal_t, "RGB-transparency": rgb_t, "RGBA": rgba, "P": pal,
            "L": rgb.convert("L"), "1": rgb.convert("1")}


@pytest.mark.parametrize("name", list(_transparent_modes()))
def test_transparency_is_composited_onto_white_as_transformers_does(name):
    """Every kind of transparency (an alpha band, a transparent palette index or colour) is composited onto white,
    as transformers' convert_to_rgb does for PIL images: a grey or palette image with alpha too, not only RGBA."""
    from transformers.image_transforms import convert_to_rgb

    img = _transparent_modes()[name]
    assert np.array_equal(np.asarray(load_image(img)), convert_to_rgb(img, return_numpy=True))


def test_a_damaged_exif_block_is_dropped_from_the_result_not_from_the_callers_image():
    """An image whose EXIF block is garbage (ImageOps.exif_transpose raises on it) loads as stored, without the
    block, so that turning the result upright again, as a caller may, does not raise; the caller's own image keeps
    its info."""
    def damaged():
        im = Image.new("RGB", (8, 6), (200, 10, 10))
        im.info["exif"] = b"Exif\0\0garbage"
        return im

    with pytest.raises(SyntaxError):  # (only the first time: Pillow keeps what it parsed)
        ImageOps.exif_transpose(damaged())
    im = damaged()
    out = load_image(im)
    assert im.info["exif"] == b"Exif\0\0garbage"
    assert out.size == (8, 6) and "exif" not in out.info
    assert ImageOps.exif_transpose(out).size == (8, 6)


def test_a_jpeg_file_with_a_damaged_exif_block_loads_without_it(tmp_path):
    """Pillow opening a JPEG file tolerates a damaged EXIF block (exif_transpose does not raise on it), but a copy,
    such as load_image's result, parses the block again: the block is dropped, so that turning the result upright
    (as README tells users to do for a photo's size) does not raise SyntaxError."""
    path = tmp_path / "damaged.jpg"
    Image.new("RGB", (8, 6), (200, 10, 10)).save(path, exif=b"Exif\0\0garbage")
    for source in (path, path.read_bytes()):
        out = load_image(source)
        assert out.size == (8, 6) and "exif" not in out.info
        assert ImageOps.exif_transpose(out).size == (8, 6)


def test_tensors_of_dtypes_numpy_lacks_are_read_or_refused_in_one_line():
    """A bfloat16 (or float8) tensor of pixels in [0, 1] reads as the float32 tensor of the same values, bit for
    bit (it raised TypeError "Got unsupported ScalarType BFloat16" from `.numpy()`); a tensor with no data (meta),
    a sparse one and one of raw bits are one-line InputErrors, not errors from inside torch."""
    rgb = torch.from_numpy(np.random.RandomState(4).randint(0, 256, (3, 7, 9), dtype=np.uint8))
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        t = (rgb.float() / 255).to(dtype)
        assert np.array_equal(np.asarray(load_image(t)), np.asarray(load_image(t.float())))
        assert np.array_equal(np.asarray(load_image(t[None, 0])), np.asarray(load_image(t[0].float())))  # grey
    for bad, why in ((torch.zeros(3, 4, 4, device="meta"), "meta device"),
                     (torch.zeros(3, 4, 4).to_sparse(), "dense"),
                     (torch.zeros(3, 4, 4, dtype=torch.uint8).view(torch.bits8), "bits8"),
                     (torch.zeros(3, 4, 4, dtype=torch.bool), "got bool pixels")):
        with pytest.raises(InputError, match=why) as e:
            load_image(bad)
        assert "\n" not in str(e.value)


def test_a_pil_image_whose_file_is_truncated_or_closed_is_one_input_error(tmp_path):
    """`Image.open` reads a file's pixels only when they are used: a truncated file given as an opened PIL image
    raised Pillow's OSError, and one whose `with` block had ended an AssertionError (or ValueError), from inside
    the resize. Now InputErrors, as the same file given by its path is; an image loaded inside its block still
    reads after it."""
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.RandomState(5).randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(InputError, match="truncated"):
        load_image(path)
    with pytest.raises(InputError, match="cannot read the PIL image's pixels: image file is truncated"):
        load_image(Image.open(path))
    path.write_bytes(whole)
    with Image.open(path) as unread:
        pass
    with Image.open(path) as read:
        read.load()
    closed = Image.open(path)
    closed.load()
    closed.close()
    for im in (unread, closed):
        with pytest.raises(InputError, match="cannot read the PIL image's pixels .*call .load.. inside it") as e:
            load_image(im)
        assert "\n" not in str(e.value)
    assert np.array_equal(np.asarray(load_image(read)), np.asarray(load_image(path)))
