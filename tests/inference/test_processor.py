"""Image preprocessing and prompt tokenization against transformers' PIL-based PaliGemma processor.

Tolerance for pixels: none against transformers (bit for bit: both rescale in float64), 1e-6 between palitorch's
own paths.
"""

import io
import json
import os
import select
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import palitorch
from palitorch.errors import InputError
from palitorch.inference import processor
from palitorch.inference.images import load_image

from hf_factory import hf_processor


def _rgb(h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def _modes():
    rgb = Image.fromarray(_rgb(97, 131))
    rgba = Image.fromarray(np.dstack([_rgb(50, 70, 1), np.random.RandomState(2).randint(0, 256, (50, 70))
                                      .astype(np.uint8)]))
    return {
        "rgb-odd": rgb,
        "rgb-exact": Image.fromarray(_rgb(224, 224, 3)),
        "rgb-tiny": Image.fromarray(_rgb(5, 3, 4)),
        "grey": rgb.convert("L"),
        "rgba": rgba,
        "palette": rgb.convert("P"),
        # over 4x the model's side: PIL's downscaling (every other image here is upscaled), where a shortcut such as
        # reducing_gap would give other pixels
        "rgb-large": Image.fromarray(_rgb(1000, 1100, 5)),
    }


@pytest.fixture(scope="module")
def procs(pg1):
    folder, _ = pg1
    return palitorch.load(folder).processor, hf_processor(folder)


@pytest.mark.parametrize("name", list(_modes()))
def test_pixels_match_transformers(procs, name):
    ours, hf = procs
    img = _modes()[name]
    ref = hf(images=[img], text=["caption en"], return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours.pixels(img), ref, atol=0, rtol=0)  # bit for bit


def assert_pixels_as_transformers_reads(pg1, tmp_path, edit):
    """A copy of pg1 whose preprocessor_config.json is `edit(its dict)`: palitorch's pixels of every image mode equal,
    bit for bit, those of transformers' SigLIP image processor read from the same folder."""
    import shutil

    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    folder = shutil.copytree(pg1[0], tmp_path / "ckpt")
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(edit(pre)))
    ours = palitorch.load(folder).processor
    theirs = SiglipImageProcessorPil.from_pretrained(folder)
    for img in _modes().values():
        ref = torch.as_tensor(np.asarray(theirs(images=[img], return_tensors="np")["pixel_values"][0])).float()
        torch.testing.assert_close(ours.pixels(img), ref, atol=0, rtol=0)


@pytest.mark.parametrize("flags", [{"resample": 2}, {"do_normalize": False}, {"do_rescale": False},
                                   {"rescale_factor": 1 / 127.5, "do_normalize": False},
                                   {"resample": 0, "do_rescale": False, "do_normalize": False},
                                   {"do_rescale": None}, {"do_normalize": None}])
def test_preprocessor_config_flags_as_transformers_reads_them(pg1, tmp_path, flags):
    """resample, do_rescale and do_normalize in preprocessor_config.json, which palitorch ignored (bicubic, both
    always on), give transformers' pixels (its image processor read from the same folder); a flag set to null is
    off, as transformers reads it (palitorch refused the file)."""
    assert_pixels_as_transformers_reads(pg1, tmp_path, lambda pre: pre | flags)


def test_bad_preprocessor_flags_are_one_line_errors(pg1, tmp_path):
    import shutil

    from palitorch.errors import CheckpointError

    folder = shutil.copytree(pg1[0], tmp_path / "ckpt")
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    for flags, why in (({"resample": 9}, "resample is 9"), ({"do_normalize": "yes"}, "do_normalize is 'yes'"),
                       ({"do_resize": False}, "do_resize False"),  # (transformers' pixels could not feed the model)
                       ({"size": {"height": pre["size"]["height"], "width": 7}}, "'width': 7")):
        (folder / "preprocessor_config.json").write_text(json.dumps(pre | flags))
        with pytest.raises(CheckpointError, match=why):
            palitorch.load(folder)


@pytest.mark.parametrize("threads", [True, False])
def test_a_batch_of_pixels_equals_the_images_one_by_one(pg1, monkeypatch, threads):
    """The pipeline resizes a batch (on threads when it is large enough, else on this thread) and normalises it at
    once (in torch, on the model's device): the same bits as `pixels` image by image, whose values the test above
    checks against transformers."""
    monkeypatch.setattr(processor, "THREADED_RESIZE_MIN_PIXELS", 0 if threads else 1 << 40)
    pipe = palitorch.load(pg1[0])
    imgs = list(_modes().values())
    resized, index = pipe._pixels(imgs)  # resized on the host; normalised on the device as the tower takes them
    batch = pipe.processor.normalize(resized.resized.to(pipe.device))
    s = pipe.processor.image_size
    assert batch.shape == (len(imgs), 3, s, s) and batch.dtype == torch.float32 and index is None
    assert torch.equal(batch, torch.stack([pipe.processor.pixels(im) for im in imgs]))
    assert torch.equal(pipe._pixels(imgs[:1])[0].resized, resized.resized[:1])
    repeated, index = pipe._pixels([imgs[1], imgs[0], imgs[1]])  # the same object twice: preprocessed once
    assert torch.equal(repeated.resized, resized.resized[[1, 0]]) and index.tolist() == [0, 1, 0]


def test_a_bad_image_in_a_batch_is_one_input_error(pg1, tmp_path):
    pipe = palitorch.load(pg1[0])
    with pytest.raises(InputError, match="does not exist"):
        pipe._pixels([_modes()["rgb-odd"], tmp_path / "missing.png"])


@pytest.mark.parametrize("prefix,suffix", [
    ("caption en", None),
    ("answer en what color is the shape?", "red"),
    ("detect cat ; dog", "<loc0010><loc0020><loc0500><loc0600> cat ; <loc0001><loc0002><loc0003><loc0004> dog"),
    ("ocr", "Ünïcödé 😀 text\nwith a newline"),
    ("", "empty prompt"),
])
def test_token_ids_match_transformers(procs, prefix, suffix):
    ours, hf = procs
    img = Image.fromarray(_rgb(32, 32))
    kw = {"suffix": [suffix]} if suffix is not None else {}
    ref = hf(images=[img], text=[prefix], return_tensors="pt", **kw)
    assert ours._head_ids is not None  # the image tokens and <bos> go in as ids; only the text is tokenised
    enc = ours.encode(prefix, suffix)
    assert enc.ids == ref["input_ids"][0].tolist()
    assert enc.types == ref["token_type_ids"][0].tolist()
    batch = ours.collate([enc])
    assert batch["labels"][0].tolist() == ref["labels"][0].tolist()
    head, ours._head_ids = ours._head_ids, None  # the fall-back: the whole string through the tokenizer
    try:
        assert ours.encode(prefix, suffix) == enc
    finally:
        ours._head_ids = head


def test_a_batch_pads_on_either_side(procs):
    ours, _ = procs
    a, b = ours.encode("caption en", "a cat"), ours.encode("answer en what color is the big shape here?")
    n, m = len(a.ids), len(b.ids)
    for side in ("left", "right"):
        batch = ours.collate([a, b], padding_side=side)
        t = max(n, m)
        assert all(v.shape == (2, t) and v.dtype == torch.long for v in batch.values())
        for row, e in enumerate((a, b)):
            pad = t - len(e.ids)
            real = slice(pad, t) if side == "left" else slice(0, len(e.ids))
            assert batch["input_ids"][row, real].tolist() == e.ids
            assert batch["token_type_ids"][row, real].tolist() == e.types
            assert batch["attention_mask"][row].sum() == len(e.ids) and batch["attention_mask"][row, real].all()
            assert (batch["input_ids"][row] == ours.pad_id).sum() == pad
            assert batch["labels"][row, real].tolist() == [-100 if y == 0 else i for i, y in zip(e.ids, e.types)]


def test_image_prefix_layout(procs):
    ours, _ = procs
    enc = ours.encode("caption en", "a cat")
    n = ours.num_image_tokens
    assert enc.ids[:n] == [ours.token_id("<image>")] * n
    assert enc.ids[n] == ours.token_id("<bos>")
    assert enc.ids[-1] == ours.token_id("<eos>")
    assert ours.tokenizer.decode([enc.ids[enc.types.index(1) - 1]]) == "\n"


def test_image_token_text_in_a_prompt_is_an_input_error(procs):
    """`<image>` in the text would be one more image position than the image has (the merge then fails deep in
    the model, and in a server batch it failed every request batched with it): refused up front, in one line."""
    ours, hf = procs
    for prefix, suffix in (("caption <image> en", None), ("<image>caption <image>en", None),
                           ("caption en", "a <image> cat")):
        with pytest.raises(InputError, match="contains <image>"):
            ours.encode(prefix, suffix)
    # ... but leading <image>s, as transformers' documentation writes prompts, are the images' own places: k of
    # them, k images (a pipeline refuses a count other than its images': test_multi_image)
    for prompt, k in (("<image>caption en", 1), ("<image> caption en", 1), ("<image><image>caption en", 2)):
        ref = hf(images=[[Image.new("RGB", (8, 8))] * k], text=[prompt], return_tensors="pt")["input_ids"][0]
        assert ours.encode(prompt).ids == ref.tolist()
    assert len(ours.encode("caption en <loc0001> <eos>").ids) > ours.num_image_tokens  # other special tokens pass


def test_exif_orientation_applied():
    arr = _rgb(20, 40)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=100)
    loaded = load_image(buf.getvalue())
    assert loaded.size == (20, 40)  # width and height swapped


def test_other_modes_become_rgb():
    sixteen = Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    assert sixteen.mode.startswith("I;16")
    out = load_image(sixteen)
    assert out.mode == "RGB" and np.asarray(out).max() > 200  # rescaled, not clipped to white
    assert np.asarray(out)[0, 0, 0] == 0
    cmyk = Image.fromarray(_rgb(10, 10)).convert("CMYK")
    assert load_image(cmyk).mode == "RGB"
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(load_image(transparent))[0, 0].tolist() == [255, 255, 255]  # composited onto white
    premultiplied = Image.new("La", (4, 4), (100, 128))  # PIL converts it only to LA (it raised ValueError)
    assert np.array_equal(np.asarray(load_image(premultiplied)), np.asarray(load_image(premultiplied.convert("LA"))))


def test_bad_images_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image"):
        load_image(bad)
    with pytest.raises(InputError, match="PIL image, a path, bytes or an array"):
        load_image(42)


def test_a_decompression_bomb_and_damaged_exif(tmp_path, monkeypatch):
    """An image over Pillow's pixel limit is a one-line InputError (it was Pillow's own exception), from a path or
    bytes, decided from the header; a JPEG whose EXIF block is garbage loads as stored, and loads again the same
    (the EXIF was parsed only when turning it upright, on every load, and raised SyntaxError)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses over twice the limit, warns over it
    big = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(big)
    for source in (big, big.read_bytes()):
        with pytest.raises(InputError, match="Pillow's safety limit"):
            load_image(source)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the limit's second half: no warning either
        assert load_image(big).size == (100, 100)
    damaged = tmp_path / "exif.jpg"
    Image.new("RGB", (8, 6), (200, 10, 10)).save(damaged, exif=b"Exif\0\0garbage")
    once = load_image(damaged)
    assert once.size == (8, 6) and load_image(once).size == (8, 6)


def test_text_that_is_not_valid_unicode_is_an_input_error(procs):
    ours, _ = procs
    for prefix, suffix in (("caption \udcff", None), ("caption en", "a \ud800 cat")):
        with pytest.raises(InputError, match="not valid Unicode"):
            ours.encode(prefix, suffix)


def test_arrays_of_pixels_are_images(procs):
    """numpy arrays and torch tensors as image inputs: [H, W, C] and [C, H, W] (channels last when both fit),
    greyscale, RGBA, uint8, uint16 (0-65535) or floats in [0, 1]: each gives the pixels of the same image given as a
    PIL image; a 16-bit greyscale array gives a 16-bit PNG's."""
    ours, _ = procs
    rgb = _rgb(37, 53)
    want = ours.pixels(Image.fromarray(rgb))
    for a in (rgb, torch.from_numpy(rgb), torch.from_numpy(rgb).permute(2, 0, 1), rgb.transpose(2, 0, 1).copy(),
              rgb.astype(np.float32) / 255, rgb.astype(np.int64), rgb.astype(np.uint16) * 257):
        torch.testing.assert_close(ours.pixels(a), want, atol=1e-6, rtol=0)
    grey = rgb[..., 0]
    for a in (grey, grey[..., None], grey[None]):
        torch.testing.assert_close(ours.pixels(a), ours.pixels(Image.fromarray(grey)), atol=1e-6, rtol=0)
    deep = grey.astype(np.uint16) * 257 + 100  # (not a multiple of 257: the rounding is the file's too)
    png = io.BytesIO()
    Image.fromarray(deep).save(png, format="PNG")
    assert Image.open(png).mode.startswith("I")  # (a 16-bit PNG, which load_image scales to 8 bits)
    torch.testing.assert_close(ours.pixels(deep), ours.pixels(png.getvalue()), atol=0, rtol=0)
    torch.testing.assert_close(ours.pixels(deep.astype(">u2")), ours.pixels(deep), atol=0, rtol=0)  # (big-endian)
    torch.testing.assert_close(ours.pixels(grey.astype(np.uint16)), ours.pixels(grey), atol=0, rtol=0)  # 8-bit values
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    torch.testing.assert_close(ours.pixels(rgba), want, atol=1e-6, rtol=0)
    for bad, why in ((rgb[None], "shape"), (np.zeros((5, 6, 2), np.uint8), "shape"), (rgb * 2.0, r"\[0, 1\]"),
                     (rgb.astype(np.int64) * 2, "outside 0-255"), (np.zeros((0, 5, 3), np.uint8), "shape")):
        with pytest.raises(InputError, match=why):
            load_image(bad)


def test_a_pipeline_takes_arrays(procs):
    pipe = palitorch.load()
    img = Image.fromarray(_rgb(64, 64))
    arr = np.asarray(img)
    assert pipe.generate(arr, "caption en").text == pipe.generate(img, "caption en").text
    assert [r.text for r in pipe.generate([arr, torch.from_numpy(arr)], "caption en")] == \
        [pipe.generate(img, "caption en").text] * 2


def test_prompt_longer_than_context_is_rejected(procs):
    ours, _ = procs
    with pytest.raises(InputError, match="context"):
        ours.encode("word " * 10000)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_threaded_resizing_works_in_a_forked_child(pg1, monkeypatch):
    """The resize pool is made once per process; a child forked after the parent made it (a DataLoader worker)
    must not hand work to threads that only the parent has."""
    monkeypatch.setattr(processor, "THREADED_RESIZE_MIN_PIXELS", 0)
    proc = palitorch.load(pg1[0]).processor
    imgs = list(_modes().values())
    expected = proc.resized_batch(imgs)  # the parent's pool now exists
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: resize on threads, report, leave without running pytest's teardown
        ok = False
        try:
            torch.set_num_threads(1)  # as a DataLoader worker does: torch's OpenMP threads do not survive a fork
            ok = torch.equal(proc.resized_batch(imgs), expected)
        finally:
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 60)
    got = os.read(read, 1) if ready else b"timeout"
    os.waitpid(pid, 0) if ready else os.kill(pid, 9)
    assert got == b"1", "the forked child could not resize on threads"


def test_loc_and_seg_text_is_one_token_when_the_tokenizer_lists_them_in_its_vocabulary_only(pg1, tmp_path):
    """Some Hub tokenizer.json files (converted from SentencePiece) hold <locNNNN> / <segNNN> in the vocabulary but
    not among the added tokens, so BPE spells typed "<loc0100>" in byte pieces. transformers' processor adds them
    when it loads; so does palitorch: a detection target tokenises alike (ids, types and labels)."""
    import shutil

    folder = shutil.copytree(pg1[0], tmp_path / "ckpt")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith(("<loc", "<seg"))]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    ours, hf = palitorch.load(folder).processor, hf_processor(folder)
    prefix, suffix = "detect cat", "<loc0100><loc0200> <loc0300><loc0400> cat ; <seg005><seg127>"
    e = ours.encode(prefix, suffix)
    ref = hf(images=[Image.new("RGB", (8, 8))], text=[prefix], suffix=[suffix], return_tensors="pt")
    assert e.ids == ref["input_ids"][0].tolist() and e.types == ref["token_type_ids"][0].tolist()
    pieces = [ours.tokenizer.id_to_token(i) for i in e.ids]
    assert [p for p in pieces if p.startswith(("<loc", "<seg"))] == ["<loc0100>", "<loc0200>", "<loc0300>",
                                                                      "<loc0400>", "<seg005>", "<seg127>"]


def test_a_sparse_preprocessor_config_gives_transformers_pixels(pg1, tmp_path):
    """A preprocessor_config.json that names only the size: palitorch's defaults for the rest (resample, rescale,
    mean, std) must be those of transformers' SigLIP image processor. Found by mutation testing: bilinear resampling
    or ImageNet's mean and std as defaults passed every test (each test folder spells every field out)."""
    names = ("image_processor_type", "processor_class", "size", "image_seq_length")
    assert_pixels_as_transformers_reads(pg1, tmp_path, lambda pre: {k: pre[k] for k in names})


def test_the_newline_is_tokenized_with_the_prompt(pg1, tmp_path):
    """transformers tokenizes `<image>... <bos> prompt \n` as one string, so a tokenizer with merges across the
    newline (Gemma's has "\n\n") spells a prompt that ends in a newline with the merged token. Found by mutation
    testing: tokenizing the newline apart passed every test (the test tokenizer spells "\n" as a byte token, which
    nothing merges). Here a "\n\n" merge is added to it."""
    import shutil

    from hf_factory import hf_processor

    folder = shutil.copytree(pg1[0], tmp_path / "ckpt")
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["\n"], vocab["\n\n"] = len(vocab), len(vocab) + 1
    spec["model"]["merges"].append(["\n", "\n"])
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    # (the model's vocabulary is now 2 short of the tokenizer's, which palitorch.load refuses: the processor alone)
    ours, hf = processor.Processor.from_folder(folder, 224, 256), hf_processor(folder)
    for prefix in ("caption en\n", "ocr", "answer en what is it?\n\n"):
        ref = hf(images=[Image.new("RGB", (8, 8))], text=[prefix], return_tensors="pt")["input_ids"][0].tolist()
        assert ours.encode(prefix).ids == ref, prefix
    assert ours.encode("caption en\n").ids[-1] == vocab["\n\n"]


def _edited_tokenizer(pg1, tmp_path, edit):
    """A copy of pg1 whose tokenizer.json is `edit(its dict)`: (palitorch's processor, transformers' processor)."""
    import shutil

    folder = shutil.copytree(pg1[0], tmp_path / "ckpt")
    spec = json.loads((folder / "tokenizer.json").read_text())
    edit(spec)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return palitorch.load(folder).processor, hf_processor(folder)


def test_image_bos_and_eos_are_tokens_when_the_tokenizer_lists_them_in_its_vocabulary_only(pg1, tmp_path):
    """A tokenizer.json holding <image>, <bos> and <eos> in its vocabulary but not among its added tokens:
    transformers adds them as special tokens when it loads (PaliGemmaProcessor adds <image>, the tokenizer the special
    tokens its config names). palitorch spelled the "<eos>" that ends every suffix in five byte pieces (the labels
    never taught the model to stop), and, the probe failing, every prompt's 256 "<image>" and its "<bos>" too."""
    def edit(spec):
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in ("<image>", "<bos>", "<eos>")]

    ours, hf = _edited_tokenizer(pg1, tmp_path, edit)
    for prefix, suffix in (("caption en", "a cat"), ("", "<loc0001> cat"), (" answer en  <bos>?", None)):
        kw = {"suffix": [suffix]} if suffix is not None else {}
        ref = hf(images=[Image.new("RGB", (8, 8))], text=[prefix], return_tensors="pt", **kw)
        e = ours.encode(prefix, suffix)
        assert e.ids == ref["input_ids"][0].tolist() and e.types == ref["token_type_ids"][0].tolist(), prefix
        assert ours.collate([e])["labels"][0].tolist() == ref["labels"][0].tolist()
    assert ours._head_ids is not None and ours.encode("ocr", "x").ids[-1] == ours.eos_id
    assert ours.decode(ours.encode("ocr", "x").ids) == "ocr\nx"  # (and they are left out of the text)


def test_a_prompt_starting_with_a_space_after_a_bos_that_strips_spaces(pg1, tmp_path):
    """A <bos> with rstrip (it eats the spaces after it): transformers tokenizes `<image>... <bos> prompt \\n` whole,
    so a prompt's leading spaces go. palitorch put <bos> in as an id and tokenized the prompt alone, keeping them:
    its probe, which starts with a letter, did not see the difference."""
    def edit(spec):
        for t in spec["added_tokens"]:
            if t["content"] == "<bos>":
                t["rstrip"] = True

    ours, hf = _edited_tokenizer(pg1, tmp_path, edit)
    for prefix in (" caption en", "  answer en what color is the shape?", "caption en"):
        ref = hf(images=[Image.new("RGB", (8, 8))], text=[prefix], suffix=[" red"], return_tensors="pt")
        e = ours.encode(prefix, " red")
        assert e.ids == ref["input_ids"][0].tolist() and e.types == ref["token_type_ids"][0].tolist(), prefix
