"""The Python API's edges (from an audit): a pipeline shared between threads, live batches after their block and
their input checks, generate's batch_size, a stream iterated twice, one-line errors for odd arguments (compile's
mode and options, stream_batch's keep_going too), and a batch near the end of the context.

Runs on the bundled easy-VQA model (float32 on CPU): its answers differ from image to image, so an answer mixed up
with another request's shows. Greedy answers compared exactly.
"""

import threading
import time

import numpy as np
import pytest
from PIL import Image
from test_generate import images

import palitorch
from palitorch.errors import InputError
from palitorch.inference import generate as engine
from palitorch.inference.sampling import GenerationOptions

from hf_factory import diverse

ASSETS = palitorch.default_model_path().parent / "assets"
P = "caption en"
KW = {"max_new_tokens": 8}


@pytest.fixture(scope="module")
def pipe():
    return palitorch.load()


@pytest.fixture(scope="module")
def ims():
    return [Image.open(ASSETS / f"easyvqa_test_{i}.png").convert("RGB") for i in (0, 1, 2, 5, 7, 11)]


@pytest.fixture(scope="module")
def refs(pipe, ims):
    return [pipe.generate(im, P, **KW).text for im in ims]


def spy_generate(monkeypatch, pause: float = 0.0):
    """Wrap the engine's generate: record each call's batch size and the most calls running at once."""
    seen = {"sizes": [], "now": 0, "most": 0}
    real = engine.generate
    guard = threading.Lock()

    def spy(model, processor, pixels, prompts, *a, **k):
        with guard:
            seen["now"] += 1
            seen["most"] = max(seen["most"], seen["now"])
            seen["sizes"].append(len(prompts))
        try:
            time.sleep(pause)  # long enough for another thread to come in, were it let in
            return real(model, processor, pixels, prompts, *a, **k)
        finally:
            with guard:
                seen["now"] -= 1

    monkeypatch.setattr(engine, "generate", spy)
    return seen


# ---------------------------------------------------------------------------------------------- threads


def test_threads_sharing_a_pipeline_take_turns_and_get_their_own_answers(pipe, ims, refs, monkeypatch):
    seen = spy_generate(monkeypatch, pause=0.02)
    wrong, errors = [], []

    def worker(k):
        for j in range(4):
            i = (3 * k + j) % len(ims)
            try:
                if pipe.generate(ims[i], P, **KW).text != refs[i]:
                    wrong.append(i)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong
    assert seen["most"] == 1  # one generation at a time: the others waited


def test_an_open_stream_refuses_other_threads_and_its_own_loop_without_deadlock(pipe, ims, refs):
    started, finish, out = threading.Event(), threading.Event(), {}

    def consumer():
        s = pipe.stream(ims[0], P, **KW)
        pieces = []
        for piece in s:
            pieces.append(piece)
            if len(pieces) == 1:
                started.set()
                finish.wait(30)
        out["text"] = "".join(pieces)

    t = threading.Thread(target=consumer)
    t.start()
    assert started.wait(30)
    try:
        with pytest.raises(InputError, match="stream or live batch"):  # not a wait: it may be suspended for good
            pipe.generate(ims[1], P, **KW)
        with pytest.raises(InputError, match="stream or live batch"):
            pipe.compile()  # would fuse weights under the paused stream
        assert pipe.score(ims[1], P, "x").token_ids  # no KV cache: runs between the pieces
    finally:
        finish.set()
        t.join(30)
    assert out["text"] == refs[0]

    def inside():
        for _ in pipe.stream(ims[0], P, **KW):
            with pytest.raises(InputError, match="stream or live batch"):
                pipe.generate(ims[1], P, **KW)
        out["inside"] = True

    t = threading.Thread(target=inside)
    t.start()
    t.join(60)
    assert out.get("inside")  # the loop's own call raised rather than waited on the lock
    assert pipe.generate(ims[1], P, **KW).text == refs[1]


def test_an_open_live_batch_makes_other_calls_say_so(pipe, ims):
    with pipe.live(max_rows=2):
        with pytest.raises(InputError, match="a stream or live batch from this pipeline is still open"):
            pipe.generate(ims[0], P, **KW)


# ---------------------------------------------------------------------------------------------- live batches


def drain(live, events):
    texts = {}
    while True:
        for q, item in events:
            if not isinstance(item, str):
                texts[q.tag] = item.text
        if not live.active:
            return texts
        events = live.step()


def test_a_live_batch_after_its_block_refuses_every_call(pipe, ims, refs):
    with pipe.live(max_rows=2) as live:
        seqs, events = live.admit(ims[:1], [P], tags=[0], options=[GenerationOptions(**KW)])
        assert drain(live, events) == {0: refs[0]}
        seqs, _ = live.admit(ims[1:2], [P], tags=[1])
    for call in (lambda: live.admit(ims[4:5], [P]), live.step, lambda: live.release(seqs[0])):
        with pytest.raises(InputError, match="this live batch has ended"):
            call()
    assert pipe.generate(ims[0], P, **KW).text == refs[0]


def test_admit_checks_every_input_before_any_row_is_written(pipe, ims, refs):
    bad = [
        ((ims[0], P), "list of prompt strings, got str"),
        ((ims[:1], P), "list of prompt strings, got str"),
        ((ims[:1], [P, 3]), "list holding int"),
        ((ims[0], [P]), "list of images"),
        ((ims[:2], [P]), "1 prompts and 2 images"),
        ((ims[:1], [P, P]), "2 prompts and 1 images"),
        ((ims[:2], [P, P], ["a"]), "2 prompts and 1 tags"),
        ((ims[:2], [P, P], None, [True]), "2 prompts and 1 streams"),
        ((ims[:2], [P, P], None, None, [GenerationOptions()]), "2 prompts and 1 options"),
        ((ims[:1], [P], None, None, [GenerationOptions(max_new_tokens=0)]), "max_new_tokens must be an integer"),
        ((ims[:1], [P], None, None, [{"max_new_tokens": 0}]), "max_new_tokens must be an integer"),
        ((ims[:1], [P], None, None, [{"num_beams": 2}]), "num_beams=1"),
        ((ims[:1], [P], None, None, [{"max_tokens": 2}]), "unknown decoding option 'max_tokens'"),
        ((ims[:1], [P], None, None, [3]), "GenerationOptions or dicts"),
    ]
    with pipe.live(max_rows=4, max_new_tokens=8) as live:
        for args, message in bad:
            with pytest.raises(InputError, match=message):
                live.admit(*args)
            assert not live.active and live.free_rows == 4
        # a dict changes the batch's options: max_new_tokens=8 stays, stop is added
        seqs, events = live.admit(ims[:2], [P, P], tags=[0, 1], options=[{"stop": ["zzz"]}, {"max_new_tokens": 1}])
        assert seqs[0].budget == 8 and seqs[1].budget == 1
        got = drain(live, events)
        assert got[0] == refs[0] and refs[1].startswith(got[1])
        with pytest.raises(InputError, match="a Seq from admit"):
            live.release("x")


def test_release_refuses_a_sequence_of_another_live_batch(pipe, ims):
    with pipe.live(max_rows=2) as first:
        seqs, _ = first.admit(ims[:1], [P], options=[{"max_new_tokens": 20, "min_new_tokens": 20}])
    other = seqs[0]
    with pipe.live(max_rows=2) as live:
        mine, _ = live.admit(ims[1:2], [P], options=[{"max_new_tokens": 20, "min_new_tokens": 20}])
        with pytest.raises(InputError, match="not in this live batch"):
            live.release(other)
        assert live.seqs[mine[0].row] is mine[0]  # its row was not freed by the other batch's sequence


@pytest.mark.parametrize("rows", [0, -1, 1.5, "2", True])
def test_live_max_rows_must_be_a_whole_number_of_rows(pipe, rows):
    with pytest.raises(InputError, match="max_rows must be an integer >= 1"):
        with pipe.live(max_rows=rows):
            pass


def test_live_max_rows_takes_numpy_integers(pipe, ims, refs):
    with pipe.live(max_rows=np.int64(2)) as live:
        assert live.max_rows == 2 and type(live.max_rows) is int
        assert drain(live, live.admit(ims[:1], [P], tags=[0], options=[KW])[1]) == {0: refs[0]}


# ---------------------------------------------------------------------------------------------- batch_size


def test_generate_batch_size_runs_a_long_list_in_chunks_with_the_same_answers(pipe, ims, refs, monkeypatch):
    seen = spy_generate(monkeypatch)
    rs = pipe.generate(ims[:5], P, batch_size=2, **KW)
    assert [r.text for r in rs] == refs[:5]
    assert seen["sizes"] == [2, 2, 1]
    seen["sizes"].clear()
    assert [r.text for r in pipe.generate(ims[:3], [P] * 3, **KW)] == refs[:3]
    assert seen["sizes"] == [3]  # without batch_size: one batch
    assert pipe.generate(ims[0], P, batch_size=4, **KW).text == refs[0]  # one input: a Result, not a list
    for size in (0, 1.0, "2"):
        with pytest.raises(InputError, match="batch_size must be an integer >= 1"):
            pipe.generate(ims[:2], P, batch_size=size, **KW)


def test_score_batch_size_gives_the_same_scores_in_order(pipe, ims):
    answers = ["red triangle", "yellow rectangle", "blue", "brown circle", "x"]
    whole = pipe.score(ims[:5], P, answers)
    chunked = pipe.score(ims[:5], P, answers, batch_size=2)
    assert [s.token_ids for s in chunked] == [s.token_ids for s in whole]
    for a, b in zip(chunked, whole):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


# ---------------------------------------------------------------------------------------------- streams


def test_a_stream_iterated_again_raises_and_keeps_its_result(pipe, ims, refs):
    s = pipe.stream(ims[0], P, **KW)
    assert "".join(s) == refs[0]
    result = s.result
    with pytest.raises(InputError, match="already consumed: call pipe.stream again"):
        list(s)
    assert s.result is result
    assert pipe.generate(ims[1], P, **KW).text == refs[1]


def test_beams_are_refused_when_the_stream_is_made(pipe, ims):
    with pytest.raises(InputError, match="num_beams=1"):
        pipe.stream(ims[0], P, num_beams=2)
    with pytest.raises(InputError, match="num_beams=1"):
        pipe.stream_batch(ims[:2], P, num_beams=2)
    with pytest.raises(InputError, match="one image and one prompt"):
        pipe.stream(iter(ims[:2]), P)


# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("suffix", [None, 5, b"red"])
def test_score_refuses_an_answer_that_is_not_a_string(pipe, ims, suffix):
    with pytest.raises(InputError, match=r"an answer to score \(suffix\) must be a string"):
        pipe.score(ims[0], P, suffix)


def test_score_names_the_answer_when_the_answer_is_what_does_not_fit(pipe, ims):
    context, prompt = pipe.cfg.text.max_position_embeddings, len(pipe.processor.encode(P).ids)
    with pytest.raises(InputError, match=r"and its answer \(\d+ tokens, <eos> included\) .* shorten the answer$"):
        pipe.score(ims[0], P, "red " * context)
    with pytest.raises(InputError, match="the prompt is .* shorten it$"):  # a prompt over the context on its own
        pipe.score(ims[0], P + " red" * context, "red")
    answer = "red " * (context - prompt)
    while prompt + len(pipe.processor.suffix_ids(answer)) > context:  # the longest answer that fits: scored
        answer = answer[:-4]
    assert prompt + len(pipe.processor.suffix_ids(answer)) == context
    assert len(pipe.score(ims[0], P, answer).logprobs) == context - prompt


def test_options_as_a_dict_and_integers_of_any_integral_type(pipe, ims):
    want = pipe.generate(ims[0], P, max_new_tokens=2)
    assert pipe.generate(ims[0], P, {"max_new_tokens": 2}) == want
    assert pipe.generate(ims[0], P, options={"max_new_tokens": 5}, max_new_tokens=2) == want  # keywords win
    assert pipe.generate(ims[0], P, max_new_tokens=np.int64(2)) == want
    opts = GenerationOptions.from_kwargs(max_new_tokens=np.int32(3), top_k=np.uint8(4), seed=np.int64(7))
    assert (opts.max_new_tokens, opts.top_k, opts.seed) == (3, 4, 7) and type(opts.max_new_tokens) is int
    for bad in (2.0, np.float64(2.0), True, np.True_):
        with pytest.raises(InputError, match="max_new_tokens must be an integer"):
            pipe.generate(ims[0], P, max_new_tokens=bad)
    with pytest.raises(InputError, match="options must be a GenerationOptions or a dict"):
        pipe.generate(ims[0], P, options=[("max_new_tokens", 2)])


def test_generators_of_images_or_prompts_are_taken_as_lists(pipe, ims, refs):
    assert [r.text for r in pipe.generate((im for im in ims[:3]), P, **KW)] == refs[:3]
    assert [r.text for r in pipe.generate(ims[0], iter([P, P]), **KW)] == refs[:1] * 2
    with pytest.raises(InputError, match="empty batch"):
        pipe.generate(iter([]), P)


def test_an_empty_image_is_refused(pipe):
    for size in ((0, 0), (0, 10), (10, 0)):
        with pytest.raises(InputError, match=f"an image is {size[0]} x {size[1]} pixels"):
            pipe.generate(Image.new("RGB", size), P)
    with pytest.raises(InputError, match="an image is 0 x 0"):
        pipe.score(Image.new("RGB", (0, 0)), P, "x")


# ---------------------------------------------------------------------------------------------- the surface


@pytest.mark.parametrize("kw, why", [
    ({"mode": "bogus"}, "mode must be None or one of default"),
    ({"mode": "max-autotune", "options": ["x"]}, "options must be a dict"),
    ({"options": {"no_such_setting": 1}}, "'no_such_setting' is not an inductor setting"),
])
def test_compile_with_a_bad_mode_or_option_is_one_input_error_and_changes_nothing(pipe, ims, refs, kw, why):
    """`compile(mode=..., options=...)` passed them to torch.compile, whose RuntimeError (or TypeError) came out,
    with the unknown-option one listing hundreds of settings, after the weights had been fused. Now a one-line
    InputError before anything changes: the pipeline stays uncompiled, with the same answers (compared exactly)."""
    with pytest.raises(InputError, match=why) as e:
        pipe.compile(**kw)
    assert "\n" not in str(e.value) and len(str(e.value)) < 200
    assert pipe._steps is None
    assert all(layer.attn.qkv is None for layer in pipe.model.language_model.layers)
    assert pipe.generate(ims[0], P, **KW).text == refs[0]


def test_a_keep_going_that_is_not_a_function_is_refused_when_the_stream_is_made(pipe, ims, refs):
    """stream_batch(keep_going=5) raised TypeError "'int' object is not callable" at the first step, from inside the
    engine; now an InputError when the stream is made (which holds nothing), and a function still works."""
    with pytest.raises(InputError, match="keep_going must be a function"):
        pipe.stream_batch(ims[:2], P, keep_going=5, **KW)
    results = {i: r for i, r in pipe.stream_batch(ims[:2], P, keep_going=lambda: True, **KW) if not isinstance(r, str)}
    assert [results[i].text for i in range(2)] == refs[:2]

def test_public_names_repr_and_annotations(pipe):
    import inspect
    from pathlib import Path

    assert palitorch.Result is palitorch.inference.Result
    assert palitorch.GenerationOptions is GenerationOptions
    assert palitorch.ScoreResult is palitorch.inference.ScoreResult
    assert {"Result", "GenerationOptions", "ScoreResult"} <= set(palitorch.__all__)
    text = repr(pipe)
    assert str(pipe.path) in text and "PaliGemma 1" in text and "device=cpu" in text and "dtype=float32" in text
    assert "stream" in palitorch.Pipeline.__doc__ and "thread" in palitorch.Pipeline.__doc__
    for method in (palitorch.Pipeline.generate, palitorch.Pipeline.score):
        assert inspect.signature(method).return_annotation is not inspect.Signature.empty
    package = Path(palitorch.__file__).parent
    assert (package / "py.typed").is_file()
    assert '"py.typed"' in (package.parent / "pyproject.toml").read_text()


@pytest.mark.parametrize("version", [1, 2])
def test_a_short_prompt_keeps_its_room_in_a_batch_with_a_long_one(ckpt_factory, tmp_path, version):
    """Near the end of the context each row gets the tokens its own prompt leaves room for, batched or alone (a
    short prompt batched with a long one was cut to the long one's room)."""
    import json
    import shutil

    src, _ = diverse(ckpt_factory, version)
    folder = tmp_path / "short-context"
    shutil.copytree(src, folder)
    pipe = palitorch.load(src)
    short, long = "ocr", "answer en what color is the shape in the middle?"
    n_short, n_long = (len(pipe.processor.encode(p).ids) for p in (short, long))
    assert n_long >= n_short + 6
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = n_long + 4  # room: 4 tokens for long, more for short
    (folder / "config.json").write_text(json.dumps(cfg))
    pipe = palitorch.load(folder)
    imgs, kw = images(2), dict(max_new_tokens=40, min_new_tokens=40)
    alone = [pipe.generate(im, p, **kw) for im, p in zip(imgs, (short, long))]
    assert [len(r.token_ids) for r in alone] == [n_long + 4 - n_short, 4]
    assert all(r.finish_reason == "length" for r in alone)
    batched = pipe.generate(imgs, [short, long], **kw)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    streamed = {i: item for i, item in pipe.stream_batch(imgs, [short, long], **kw) if not isinstance(item, str)}
    assert [streamed[i].token_ids for i in range(2)] == [r.token_ids for r in alone]
