"""A prompt about several images on the command line: `run --image A --image B` and a batch line whose "image" is a
list of paths, each answering as `Pipeline.generate([[a, b]], [prompt])` does."""

import json

from conftest import cli  # tests/cli/conftest.py
from PIL import Image

import palitorch

KW = dict(max_new_tokens=6, min_new_tokens=6)


def reference(folder, paths, prompt, **kw):
    return palitorch.load(folder).generate([[Image.open(p) for p in paths]], [prompt], **KW, **kw)[0]


def test_run_takes_the_image_option_again_for_further_images(pg1, images, capsys):
    folder, _ = pg1
    pair = [images / "red.png", images / "blue.png"]
    argv = ["run", "--model", folder, "--image", pair[0], "--image", pair[1], "--max-new-tokens", "6",
            "--min-new-tokens", "6"]
    rc, out, err = cli([*argv, "--prompt", "detect red", "--json"], capsys)
    assert rc == 0, err
    got, want = json.loads(out), reference(folder, pair, "detect red")
    assert (got["token_ids"], got["prompt_tokens"]) == (want.token_ids, want.prompt_tokens)
    assert "detections" not in got  # boxes of a prompt about two images are in no one image's pixels
    assert want.prompt_tokens > 2 * palitorch.load(folder).processor.num_image_tokens
    rc, out, err = cli([*argv, "--prompt", "caption en", "--stream"], capsys)
    assert rc == 0 and out == reference(folder, pair, "caption en").text + "\n", err
    rc, _, err = cli([*argv, "--prompt", "detect red", "--draw", images / "out.png"], capsys)
    assert rc == 2 and "--draw draws the boxes on the one image they are in" in err and "Traceback" not in err


def test_a_batch_line_with_a_list_of_images(pg1, images, capsys):
    folder, _ = pg1
    src = images.parent / "requests.jsonl"
    lines = [
        {"image": ["imgs/red.png", "imgs/blue.png"], "prompt": "caption en"},
        {"image": "imgs/red.png", "prompt": "detect red"},
        {"image": ["imgs/blue.png", "imgs/missing.png"], "prompt": "caption en"},
        {"image": [], "prompt": "caption en"},
        {"image": ["imgs/red.png"] * 17, "prompt": "caption en"},
        {"image": ["imgs/blue.png", "imgs/red.png"], "prompt": "caption en", "temperature": 1.0, "seed": 3},
    ]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    dst = images.parent / "results.jsonl"
    rc, _, err = cli(["batch", "--model", folder, "--input", src, "--output", dst, "--max-new-tokens", "6",
                      "--min-new-tokens", "6"], capsys)
    assert rc == 1, err
    got = {r["index"]: r for r in map(json.loads, dst.read_text().splitlines())}
    red, blue = images / "red.png", images / "blue.png"
    assert got[1]["token_ids"] == reference(folder, [red, blue], "caption en").token_ids
    assert got[1]["image"] == ["imgs/red.png", "imgs/blue.png"]  # the line's fields as given
    assert "detections" in got[2]
    assert "missing.png" in got[3]["error"]
    assert got[4]["error"] == 'line 4 has no "image" path (a path, or a list of paths for a prompt about several ' \
        'images)'
    assert "17 images for one prompt; at most 16" in got[5]["error"]
    sampled = reference(folder, [blue, red], "caption en", temperature=1.0, seed=3)
    assert got[6]["token_ids"] == sampled.token_ids
    rc, _, err = cli(["batch", "--model", folder, "--input", src, "--output", dst, "--max-new-tokens", "6",
                      "--min-new-tokens", "6"], capsys)  # resumed: the list-of-images lines match their records
    assert rc == 1 and "another input" not in err, err


def test_run_takes_at_most_16_images_as_batch_lines_do(pg1, images, capsys, monkeypatch):
    """17 --image options are refused in one line before the model loads, as a batch line, a server request or a
    training example with 17 images is (MAX_IMAGES); before, run answered them."""
    import palitorch.cli.run as run_cli

    def no_load(*a, **kw):
        raise AssertionError("the model should not load")

    monkeypatch.setattr(run_cli, "load_pipeline", no_load)
    argv = ["run", "--model", pg1[0], *[a for _ in range(17) for a in ("--image", images / "red.png")], "--prompt",
            "caption en"]
    rc, _, err = cli(argv, capsys)
    assert rc == 2 and "--image is given 17 times; a prompt takes at most 16 images" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
