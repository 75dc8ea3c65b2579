"""images.upright_size: an image file's size as load_image turns it (EXIF orientation), from its header alone."""

import pytest
from PIL import Image

from palitorch.errors import InputError
from palitorch.inference import load_image
from palitorch.inference.images import upright_size


@pytest.mark.parametrize("orientation", [None, 1, 2, 3, 4, 5, 6, 7, 8])
def test_the_size_load_image_gives(tmp_path, orientation):
    image = Image.new("RGB", (40, 30), (10, 20, 30))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(tmp_path / "a.jpg", exif=exif.tobytes())
    assert upright_size(tmp_path / "a.jpg") == load_image(tmp_path / "a.jpg").size
    assert upright_size(tmp_path / "a.jpg") == ((30, 40) if orientation in (5, 6, 7, 8) else (40, 30))


def test_an_unreadable_file_is_named(tmp_path):
    (tmp_path / "b.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image .*b.png"):
        upright_size(tmp_path / "b.png")
