"""[eval] vae: a training run's evaluations score segmentation answers by their masks (mask_iou), as
`palitorch eval --vae` does, and [checkpoint] best may keep the best of them."""

import json

import numpy as np
import pytest

from palitorch.errors import ConfigError
from palitorch.tasks import parse_segmentations
from palitorch.tasks.segmentation import vae_shapes
from palitorch.train.best import Best
from palitorch.train.loop import Trainer

from trainkit import config, make_data

CODES = "".join(f"<seg{i:03d}>" for i in range(16))


@pytest.fixture
def seg_data(tmp_path):
    """The tiny data set, its held-out half as segmentation answers; a VQ-VAE whose masks are whole boxes."""
    data = make_data(tmp_path / "data")
    rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()][::2]
    for i, r in enumerate(rows):
        r.update(prefix="segment shape", suffix=f"<loc{100 * i:04d}><loc0100><loc0900><loc0900>{CODES} shape",
                 task="segment")
    (data / "seg.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {k: np.zeros(s, np.float32) for k, s in vae_shapes(embed_dim=4).items()}
    params["decoder.12.bias"][:] = 1
    np.savez(tmp_path / "vae.npz", **params)
    return data, tmp_path / "vae.npz", len(rows)


def test_a_runs_evaluation_scores_masks_and_best_can_keep_by_them(seg_data, tmp_path, monkeypatch):
    data, vae, n = seg_data
    cfg = config(data, tmp_path / "run", data__eval=str(data / "seg.jsonl"), eval__vae=str(vae), eval__every=2,
                 checkpoint__best="mask_iou", train__steps=2, eval__max_examples=0)
    trainer = Trainer(cfg)
    # the model's answers, as one that has learnt the first box would give them
    answer = "<loc0000><loc0100><loc0900><loc0900>" + CODES + " shape"
    monkeypatch.setattr("palitorch.inference.pipeline.Pipeline.generate",
                        lambda self, images, prompts, **kw: [type("R", (), {"text": answer})() for _ in prompts])
    result = trainer.evaluate()
    assert result["segments"]["n"] == n
    # the target boxes shrink from the top as i grows; each inside the answer's: IoU = its pixels / the answer's
    def pixels(text):
        x0, y0, x1, y1 = (round(v) for v in parse_segmentations(text, 24, 24)[0].box)
        return (x1 - x0) * (y1 - y0)

    ious = [pixels(e.suffix) / pixels(answer) for e in trainer.eval_examples]
    assert ious[0] == 1.0 and result["segments"]["mean_iou"] == pytest.approx(np.mean(ious))
    assert result["segments"]["overall_iou"] == pytest.approx(sum(map(pixels, (e.suffix for e in
                                                                                trainer.eval_examples))) /
                                                              (n * pixels(answer)))
    assert 0 < result["segments"]["mean_iou"] < 1
    best = Best("mask_iou", tmp_path / "run")
    assert best.figure(result) == result["segments"]["mean_iou"] and best.figure({"exact_match": 1.0}) is None


@pytest.mark.parametrize("over, message", [
    ({"eval__vae": "nowhere.npz"}, "[eval] vae 'nowhere.npz' is not a file: give the path of vae-oid.npz"),
    ({"checkpoint__best": "mask_iou", "eval__every": 2}, "or [eval] vae for mask_iou"),
    ({"data__eval": "", "eval__group_by": ["mask_iou"]}, "[eval] group_by 'mask_iou' is the name of an overall metric"),
])
def test_config_errors(seg_data, tmp_path, over, message):
    data, _, _ = seg_data
    with pytest.raises(ConfigError) as e:
        config(data, tmp_path / "run", **over)
    assert message in str(e.value)


def test_a_damaged_vae_stops_the_run_before_step_one(seg_data, tmp_path):
    data, _, _ = seg_data
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(Exception) as e:
        Trainer(config(data, tmp_path / "run", eval__vae=str(tmp_path / "bad.npz")))
    assert "bad.npz" in str(e.value) and not (tmp_path / "run" / "checkpoint-0000001").exists()
