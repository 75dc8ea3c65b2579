"""draw_detections: an RGB copy of the image, same size, boxes and label tabs in per-label colours."""

import numpy as np
from PIL import Image

from palitorch.tasks import Detection, draw_detections
from palitorch.tasks.draw import PALETTE, label_colours


def test_draws_boxes_and_labels_and_saves_a_png_of_the_same_size(tmp_path):
    image = Image.new("RGB", (320, 200), (128, 128, 128))
    dets = [Detection("cat", (40.0, 60.0, 200.0, 180.0)), Detection("dog", (210.0, 0.0, 319.0, 90.0)),
            Detection("cat", (10.0, 10.0, 30.0, 30.0))]
    out = draw_detections(image, dets)
    out.save(tmp_path / "boxes.png")
    back = Image.open(tmp_path / "boxes.png")
    assert back.size == (320, 200) and back.mode == "RGB"
    px = np.asarray(back)
    cat, dog = label_colours(["cat", "dog"]).values()
    assert cat != dog
    assert tuple(px[120, 40]) == cat  # left edge of the first cat box
    assert tuple(px[60, 318]) == dog  # right edge of the dog box (x1 = 319, its last column 318; it touches the top:
    # its tab is drawn inside)
    assert tuple(px[20, 10]) == cat  # the second cat box shares the colour
    assert (px == cat).all(-1)[40:60, 40:120].any()  # the label tab above the first box
    assert tuple(np.asarray(image)[120, 40]) == (128, 128, 128)  # the input is not modified


def test_label_colours_are_distinct_then_cycle():
    labels = [f"l{i}" for i in range(len(PALETTE) + 1)]
    colours = label_colours(labels)
    assert len(set(list(colours.values())[: len(PALETTE)])) == len(PALETTE)
    assert colours[labels[-1]] == colours[labels[0]]


def test_masks_are_blended_and_other_modes_accepted():
    image = Image.new("L", (40, 30), 0)
    mask = np.zeros((30, 40), bool)
    mask[12:18, 12:20] = True
    out = draw_detections(image, [Detection("x", (5.0, 5.0, 35.0, 25.0))], masks=[mask])
    px = np.asarray(out).astype(int)
    assert out.mode == "RGB" and out.size == (40, 30)
    assert px[15, 15].sum() > 0 and px[2, 2].sum() == 0  # tinted inside the mask, untouched outside the box


def test_a_box_to_the_image_edge_is_drawn_on_its_last_pixels():
    # A box's x1, y1 are the edge past the object (the image's width and height for <loc1023>).
    out = np.asarray(draw_detections(Image.new("RGB", (400, 200)), [Detection("", (0.0, 0.0, 400.0, 200.0))]))
    lit = out.any(-1)
    assert lit[:, 399].all() and lit[199, :].all() and lit[:, 0].all() and lit[0, :].all()


def test_a_photo_is_drawn_upright_as_the_model_saw_it(tmp_path):
    photo = Image.new("RGB", (64, 128), (200, 200, 200))  # stored sideways; orientation 8 makes it 128 x 64
    exif = photo.getexif()
    exif[0x0112] = 8
    photo.save(tmp_path / "p.jpg", exif=exif)
    for image in (Image.open(tmp_path / "p.jpg"), tmp_path / "p.jpg"):
        assert draw_detections(image, [Detection("cat", (0.0, 0.0, 128.0, 64.0))]).size == (128, 64)
