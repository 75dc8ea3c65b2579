"""`palitorch eval --vae`: segmentation answers scored by their masks' IoU (RefCOCO's mIoU and overall IoU), from
the model's answers or --given ones."""

import json

import numpy as np
import pytest
import torch
from conftest import cli  # tests/cli/conftest.py

from palitorch.tasks import decode_mask, load_vae_params, parse_segmentations
from palitorch.tasks.segmentation import vae_shapes

CODES = "".join(f"<seg{i:03d}>" for i in range(16))


def seg(y0, x0, y1, x1, label="cat", codes=CODES):
    return f"<loc{y0:04d}><loc{x0:04d}><loc{y1:04d}><loc{x1:04d}>{codes} {label}"


@pytest.fixture
def box_vae(tmp_path):
    """A VQ-VAE whose decoder gives +1 everywhere (only its last bias is not 0): each mask is its whole box."""
    params = {k: np.zeros(s, np.float32) for k, s in vae_shapes(embed_dim=4).items()}
    params["decoder.12.bias"][:] = 1
    np.savez(tmp_path / "vae.npz", **params)
    return tmp_path / "vae.npz"


def box_pixels(text, size=(300, 200)):
    """The pixels of the first object's box as decode_mask rounds it, in the 300 x 200 test image."""
    (x0, y0, x1, y1) = (round(v) for v in parse_segmentations(text, *size)[0].box)
    m = np.zeros(size[::-1], bool)
    m[y0:y1, x0:x1] = True
    return m


ROWS = [  # prompt -> (target, answer)
    ("s1", seg(0, 0, 511, 511), seg(0, 0, 1023, 1023)),  # the target is a quarter of the image: IoU ~1/4
    ("s2", seg(100, 200, 700, 900), seg(100, 200, 700, 900)),  # the same mask: IoU 1
    ("s3", seg(100, 200, 700, 900), seg(100, 200, 700, 900, codes="")),  # a bare box: no mask, IoU 0
    ("d1", seg(0, 0, 511, 511, codes=""), seg(0, 0, 511, 511, codes="")),  # a detection: not a segmentation
    ("q1", "yes", "yes"),
]


def expected():
    pairs = [(box_pixels(t), box_pixels(a) if "<seg" in a else np.zeros((200, 300), bool)) for _, t, a in ROWS[:3]]
    inter = [int((t & a).sum()) for t, a in pairs]
    union = [int((t | a).sum()) for t, a in pairs]
    return [i / u for i, u in zip(inter, union)], sum(inter) / sum(union)


def test_mask_iou_of_segmentation_answers(fake_pipe, images, box_vae, tmp_path, capsys):
    said = {p: a for p, _, a in ROWS}
    pipe = fake_pipe(lambda im, p: said[p])
    pipe.model = torch.nn.Linear(1, 1)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": "imgs/red.png", "prefix": p, "suffix": t}) + "\n"
                                              for p, t, _ in ROWS))
    rc, out, err = cli(["eval", "--data", tmp_path / "d.jsonl", "--vae", box_vae, "--json", "--quiet",
                        "--predictions", tmp_path / "p.jsonl"], capsys)
    assert rc == 0, err
    each, overall = expected()
    assert 0.2 < each[0] < 0.3 and each[1:] == [1.0, 0.0]
    m = json.loads(out)
    assert m["segments"] == {"n": 3, "mean_iou": pytest.approx(sum(each) / 3), "overall_iou": pytest.approx(overall)}
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [x.get("mask_iou") for x in lines] == [pytest.approx(each[0]), 1.0, 0.0, None, None]
    rc, out, err = cli(["eval", "--data", tmp_path / "d.jsonl", "--vae", box_vae, "--quiet"], capsys)
    assert rc == 0 and f"  masks: mean IoU {sum(each) / 3:.4f}, overall IoU {overall:.4f} (n=3)" in out, err
    # the same answers given: the same figures, the images read for their sizes only
    rc, out, err = cli(["eval", "--data", tmp_path / "p.jsonl", "--given", "prediction", "--vae", box_vae, "--json",
                        "--quiet"], capsys)
    assert rc == 0 and json.loads(out)["segments"] == m["segments"], err


def test_masks_come_from_the_vae_at_the_images_size(fake_pipe, images, tmp_path, capsys):
    """A VQ-VAE of random weights: each example's IoU is that of decode_mask's masks at its image's own size."""
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in vae_shapes(embed_dim=4).items()}
    np.savez(tmp_path / "vae.npz", **params)
    vae = load_vae_params(tmp_path / "vae.npz")
    other = "".join(f"<seg{i:03d}>" for i in range(40, 56))
    rows = [("imgs/red.png", seg(50, 80, 900, 1000), seg(10, 10, 1000, 950, codes=other)),
            ("imgs/blue.png", seg(0, 0, 1023, 1023), seg(200, 100, 800, 900))]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": im, "prefix": "segment cat", "suffix": t,
                                                          "answer": a}) + "\n" for im, t, a in rows))
    rc, out, err = cli(["eval", "--data", tmp_path / "d.jsonl", "--given", "answer", "--vae", tmp_path / "vae.npz",
                        "--json", "--quiet"], capsys)
    assert rc == 0, err
    ious, inter, union = [], 0, 0
    for (_, t, a), size in zip(rows, [(300, 200), (120, 160)]):
        want, got = (parse_segmentations(x, *size)[0] for x in (t, a))
        mt, ma = (decode_mask(o.codes, o.box, vae, size) for o in (want, got))
        inter, union = inter + (mt & ma).sum(), union + (mt | ma).sum()
        ious.append((mt & ma).sum() / (mt | ma).sum())
    assert 0 < min(ious) and max(ious) < 1  # (masks neither empty nor equal: the figures say something)
    assert json.loads(out)["segments"] == {"n": 2, "mean_iou": pytest.approx(np.mean(ious)),
                                           "overall_iou": pytest.approx(inter / union)}
    # the same answers generated: the same figures, each mask at the size of the image answered
    said = {(300, 200): rows[0][2], (120, 160): rows[1][2]}
    pipe = fake_pipe(lambda im, p: said[im.size])
    pipe.model = torch.nn.Linear(1, 1)
    rc, again, err = cli(["eval", "--data", tmp_path / "d.jsonl", "--vae", tmp_path / "vae.npz", "--json", "--quiet"],
                         capsys)
    assert rc == 0 and json.loads(again)["segments"] == json.loads(out)["segments"], err


@pytest.mark.parametrize("vae, message", [
    ("nowhere.npz", "nowhere.npz"),
    ("", "--vae is empty: give the path of vae-oid.npz"),
])
def test_a_bad_vae_is_one_line_before_any_model(vae, message, tmp_path, no_model_load, capsys):
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "none.png", "prefix": "q", "suffix": "a"}) + "\n")
    rc, _, err = cli(["eval", "--data", tmp_path / "d.jsonl", "--vae", vae], capsys)
    assert rc == 2 and err.count("\n") == 1 and message in err, err


def test_an_example_about_several_images_has_no_mask_score(images, box_vae, tmp_path, capsys):
    """Its masks are in no one image's pixels (as its boxes: found by mutation testing)."""
    target = seg(0, 0, 511, 511)
    rows = [{"image": "imgs/red.png", "prefix": "segment cat", "suffix": target, "answer": seg(0, 0, 1023, 1023)},
            {"image": ["imgs/red.png", "imgs/blue.png"], "prefix": "segment cat", "suffix": target, "answer": target}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = cli(["eval", "--data", tmp_path / "d.jsonl", "--given", "answer", "--vae", box_vae, "--json",
                        "--quiet", "--predictions", tmp_path / "p.jsonl"], capsys)
    assert rc == 0, err
    assert json.loads(out)["segments"]["n"] == 1 and json.loads(out)["segments"]["mean_iou"] < 0.3
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert "mask_iou" in lines[0] and "mask_iou" not in lines[1]
