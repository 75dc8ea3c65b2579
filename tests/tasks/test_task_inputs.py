"""The task helpers' arguments: a generator of detections is drawn, and what is not an answer's text, an image
side that is no size, or a mask of another shape is a one-line InputError."""

import numpy as np
import pytest
from PIL import Image

from palitorch.errors import InputError
from palitorch.inference import Result
from palitorch.tasks import Detection, draw_detections, parse_detections, parse_segmentations, task_outputs

DETS = [Detection("cat", (40.0, 60.0, 200.0, 180.0)), Detection("dog", (210.0, 0.0, 319.0, 90.0))]


def test_a_generator_of_detections_is_drawn_as_a_list_is():
    image = Image.new("RGB", (320, 200), (128, 128, 128))
    want = np.asarray(draw_detections(image, DETS))
    assert not (want == np.asarray(image)).all()
    assert (np.asarray(draw_detections(image, (d for d in DETS))) == want).all()
    masks = [np.ones((200, 320), bool), None]
    assert (np.asarray(draw_detections(image, iter(DETS), iter(masks))) ==
            np.asarray(draw_detections(image, DETS, masks))).all()


def test_masks_must_fit_the_image_and_pair_with_the_detections():
    image = Image.new("RGB", (320, 200))
    with pytest.raises(InputError, match=r"mask 0 has shape \(10, 10\), the image is 200 x 320"):
        draw_detections(image, DETS[:1], masks=[np.ones((10, 10), bool)])
    with pytest.raises(InputError, match=r"mask 0 has shape \(320, 200\)"):  # (width, height): transposed
        draw_detections(image, DETS[:1], masks=[np.ones((320, 200), bool)])
    with pytest.raises(InputError, match="1 masks for 2 detections"):
        draw_detections(image, DETS, masks=[None])
    with pytest.raises(InputError, match="objects with .label and .box.*got dict"):
        draw_detections(image, [d.to_dict() for d in DETS])


@pytest.mark.parametrize("parse", [parse_detections, parse_segmentations])
def test_the_answer_must_be_text(parse):
    with pytest.raises(InputError, match=r"takes the answer's text \(Result.text\), got Result"):
        parse(Result("<loc0001><loc0002><loc0003><loc0004> x", [], [], "eos", 0), 64, 64)
    with pytest.raises(InputError, match="takes the answer's text, got NoneType"):
        parse(None, 64, 64)


@pytest.mark.parametrize("width,height", [(0, 10), (10, 0), (-10, 5), ("640", 480), (float("nan"), 5), (True, 4)])
def test_image_sides_must_be_sizes(width, height):
    answer = "<loc0100><loc0200><loc0300><loc0400> x"
    for parse in (parse_detections, parse_segmentations):
        with pytest.raises(InputError, match="must be a number of pixels > 0"):
            parse(answer, width, height)
    assert parse_detections(answer, 640.0, np.int64(480))[0].label == "x"  # floats and numpy integers are sizes
    assert task_outputs("detect x", answer, 640, 480)["detections"][0]["label"] == "x"
