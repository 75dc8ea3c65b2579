"""The OpenAI request rules alone (no model, no sockets): parse_body, parse_chat; the response rules are in
test_openai_responses.py."""

import base64
import io

import pytest
from PIL import Image
from serverkit import chat, data_url, png_bytes

from palitorch.server.openai import ApiError, ChatRequest, parse_body, parse_chat
from palitorch.server.responses import chunk

MODEL = "tiny"
IMAGE = Image.new("RGB", (40, 30), (200, 30, 30))
URL = data_url(IMAGE)


def body(prompt="caption en", image=URL, **kw):
    return chat(image, prompt, **{"model": MODEL, **kw})


def parse(b, **kw) -> ChatRequest:
    return parse_chat(b, MODEL, **kw)


def refused(b, status=400, **kw) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse(b, **kw)
    assert e.value.status == status
    return e.value


def with_content(*parts) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}]}


def image_part(url=URL):
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text):
    return {"type": "text", "text": text}


def test_a_valid_request():
    req = parse(body("caption en"))
    assert req.image.size == (40, 30) and req.image.mode == "RGB" and req.image.getpixel((5, 5)) == (200, 30, 30)
    assert (req.prompt, req.options, req.n, req.stream, req.include_usage, req.logprobs) == \
        ("caption en", {}, 1, False, False, False)
    assert req.greedy


def test_image_url_as_a_plain_string_and_text_parts_joined_with_spaces():
    req = parse(with_content(text_part("answer en"), {"type": "image_url", "image_url": URL}, text_part("what?")))
    assert req.prompt == "answer en what?" and req.image.size == (40, 30)
    assert parse(with_content(image_part())).prompt == ""  # no text part: an empty prompt


def test_max_tokens_names():
    assert parse(body(max_tokens=5)).options == {"max_new_tokens": 5}
    assert parse(body(max_completion_tokens=7)).options == {"max_new_tokens": 7}
    assert parse(body(min_tokens=2, max_tokens=4)).options == {"min_new_tokens": 2, "max_new_tokens": 4}
    e = refused(body(max_tokens=5, max_completion_tokens=7))
    assert e.param == "max_tokens" and "not both" in e.message


def test_ignore_eos_makes_every_answer_max_tokens_long():
    """vLLM's ignore_eos (benchmark tools send it) bars EOS until max_tokens: the server's default length, else
    GenerationOptions' default."""
    assert parse(body(ignore_eos=True, max_tokens=7)).options == {"max_new_tokens": 7, "min_new_tokens": 7}
    assert parse(body(ignore_eos=True), defaults={"max_new_tokens": 20}).options["min_new_tokens"] == 20
    assert parse(body(ignore_eos=True)).options == {"min_new_tokens": 64}
    assert parse(body(ignore_eos=False, max_tokens=7)).options == {"max_new_tokens": 7}
    assert refused(body(ignore_eos="yes")).param == "ignore_eos"


def test_temperature_zero_is_greedy_whatever_else_is_set():
    req = parse(body(temperature=0, top_p=0.9, min_p=0.1), defaults={"top_k": 5})
    assert req.options == {"temperature": 0} and req.greedy
    req = parse(body(temperature=0.7, top_p=0.9))
    assert req.options == {"temperature": 0.7, "top_p": 0.9} and not req.greedy
    assert not parse(body(top_k=3)).greedy  # a filter alone asks for sampling, as in palitorch


def test_the_request_overrides_the_server_defaults():
    defaults = {"max_new_tokens": 10, "temperature": 0.5, "seed": 1}
    req = parse(body(max_tokens=3, seed=2), defaults=defaults)
    assert req.options == {"max_new_tokens": 3, "temperature": 0.5, "seed": 2}
    assert defaults == {"max_new_tokens": 10, "temperature": 0.5, "seed": 1}  # not modified
    assert parse(body(seed=None), defaults=defaults).options == defaults  # null: the default stays


def test_stop_as_a_string_or_a_list():
    assert parse(body(stop=".")).options == {"stop": "."}
    assert parse(body(stop=[".", "\n"])).options == {"stop": [".", "\n"]}
    assert "stop must be a list of non-empty strings" in refused(body(stop=[""])).message


@pytest.mark.parametrize("n", [0, 17, True, "2", 1.5, -1])
def test_n_must_be_an_integer_from_1_to_16(n):
    e = refused(body(n=n))
    assert e.param == "n" and "n must be" in e.message


def test_num_beams_is_bounded_on_a_server():
    assert parse(body(num_beams=16)).options == {"num_beams": 16}
    assert parse(body(num_beams=3, n=2)).n == 2  # the two best beams
    assert refused(body(num_beams=2, n=3)).param == "n"
    e = refused(body(num_beams=17))
    assert e.param == "num_beams" and "at most 16" in e.message


def test_n_and_logprobs():
    assert parse(body(n=16)).n == 16
    assert parse(body(logprobs=True)).logprobs
    assert refused(body(logprobs=1)).param == "logprobs"


@pytest.mark.parametrize("value", [1, "true", 0])
def test_stream_must_be_true_or_false(value):
    e = refused(body(stream=value))
    assert e.param == "stream" and "true or false" in e.message


def test_stream_options():
    req = parse(body(stream=True, stream_options={"include_usage": True}))
    assert req.stream and req.include_usage
    assert not parse(body(stream=True)).include_usage
    assert parse(body(stream=True, stream_options={"include_usage": True, "include_obfuscation": True})).include_usage
    for bad in ({"include_usage": "yes"}, ["include_usage"], {"include_usagee": True},
                {"continuous_usage_stats": True}):
        assert refused(body(stream=True, stream_options=bad)).param == "stream_options"
    e = refused(body(stream_options={"include_usage": True}))  # as OpenAI answers it
    assert e.param == "stream_options" and "only allowed when stream is true" in e.message


def test_a_beam_search_cannot_stream_but_n_answers_can():
    e = refused(body(stream=True, num_beams=2))
    assert e.param == "stream" and "stream: false" in e.message
    assert parse(body(stream=True, n=3, temperature=0.5)).n == 3  # their chunks name their choice's index
    req = parse(body(stream=True, logprobs=True, top_logprobs=2))  # logprobs come chunk by chunk
    assert req.stream and req.logprobs and req.options == {"top_logprobs": 2}


def test_a_chunk_carries_its_tokens_logprobs():
    entries = [{"token": "red", "logprob": -0.5, "bytes": list(b"red"), "top_logprobs": []}]
    out = chunk("c", 0, MODEL, {"content": "red"}, logprobs=entries)
    assert out["choices"][0]["logprobs"] == {"content": entries, "refusal": None}
    assert chunk("c", 0, MODEL, {"content": "red"})["choices"][0]["logprobs"] is None


def test_unknown_parameters_are_named_with_a_suggestion():
    e = refused(body(max_token=5))
    assert e.param == "max_token" and "unknown parameter 'max_token'" in e.message and "'max_tokens'" in e.message
    e = refused(body(frobnicate=1))
    assert e.param == "frobnicate" and "did you mean" not in e.message
    e = refused(body(reasoning_effort="low"))  # (not response_format, which is accepted at its neutral value only)
    assert e.message == "unknown parameter 'reasoning_effort'"
    assert "did you mean 'metadata'?" in refused(body(metdata={})).message  # (a near miss of one is still named)
    assert "did you mean 'response_format'?" in refused(body(response_fromat={"type": "text"})).message
    e = refused(body(do_sample=True))  # another tool's name for what this API asks otherwise
    assert e.message == "unknown parameter 'do_sample': use temperature (> 0 samples)"
    assert refused(body(max_new_tokens=5)).message == "unknown parameter 'max_new_tokens': use max_tokens"


def test_another_model_name_is_not_found():
    e = refused(body(model="gpt-4o"), status=404)
    assert (e.param, e.code) == ("model", "model_not_found") and "'tiny'" in e.message
    assert e.body()["error"]["type"] == "invalid_request_error"  # as OpenAI types a 404
    b = body()
    del b["model"]
    assert parse(b).prompt == "caption en"  # no model named: the one served


def messages_cases():
    user = {"role": "user", "content": [image_part(), text_part("caption en")]}
    png = base64.b64encode(png_bytes(IMAGE)).decode()
    return [
        ({"messages": [{"role": "system", "content": "be brief"}, user]}, "no system prompt"),
        ({"messages": [user, {"role": "assistant", "content": "red"}]}, "exactly one message"),
        ({"messages": [{"role": "user", "content": "caption en"}]}, "no image"),
        ({"messages": []}, "non-empty list"),
        ({"messages": "caption en"}, "non-empty list"),
        (with_content(*[image_part()] * 17, text_part("x")), "at most 16 images (their tokens share the model's "
                                                             "context), got 17: send fewer"),
        (with_content(text_part("caption en")), "the message has no image: add an image_url part"),
        (with_content(image_part(), {"type": "input_audio", "input_audio": {}}), "unsupported content part"),
        (with_content({"type": "image_url", "image_url": 5}), "an image_url part needs"),
        (with_content(image_part("data:image/png;base64," + png[:-7] + "!@#$%^&")), "base64 is damaged"),
        (with_content(image_part("data:image/png," + png)), "must be base64"),
        (with_content(image_part("data:image/png;base64," + base64.b64encode(b"hello").decode())),
         "cannot decode the image"),
        (with_content(image_part("ftp://example.com/cat.png")), "a data URL (data:image/png;base64,...) or an http"),
        (with_content(image_part("http://example.com/cat.png")), "does not fetch image URLs"),
    ]


@pytest.mark.parametrize("b, message", messages_cases())
def test_messages_paliGemma_cannot_answer_say_what_to_change(b, message):
    e = refused(b)  # fetch is None: http URLs are refused
    assert e.param == "messages" and message in e.message, e.message


def test_http_image_urls_go_to_fetch():
    asked = []

    def fetch(url):
        asked.append(url)
        return png_bytes(Image.new("RGB", (8, 6)))

    req = parse(with_content(image_part("https://example.com/a.png"), text_part("ocr")), fetch=fetch)
    assert asked == ["https://example.com/a.png"] and req.image.size == (8, 6) and req.prompt == "ocr"


@pytest.mark.parametrize("name, neutral, other, advice", [
    ("presence_penalty", 0, 0.5, "repetition_penalty"),
    ("frequency_penalty", 0, -1, "repetition_penalty"),
    ("response_format", {"type": "text"}, {"type": "json_object"}, "plain text"),
    ("tools", [], [{"type": "function"}], "calls no tools: put the task in the prompt"),
    ("tool_choice", "none", "auto", "calls no tools"),
    ("parallel_tool_calls", False, True, "calls no tools"),
])
def test_openai_options_palitorch_cannot_honour_are_refused_unless_neutral(name, neutral, other, advice):
    assert parse(body(**{name: neutral})).options == {}
    assert parse(body(**{name: None})).options == {}
    e = refused(body(**{name: other}))
    assert e.param == name and f"{name} is not supported" in e.message and advice in e.message


def test_bookkeeping_fields_are_accepted():
    assert parse(body(user="u1", metadata={"a": "b"}, store=False, safety_identifier="u1", prompt_cache_key="k",
                      prompt_cache_retention="24h")).prompt == "caption en"


@pytest.mark.parametrize("options, message", [
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"temperature": -1}, "temperature must be a finite number >= 0"),
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"max_completion_tokens": 2.5}, "max_completion_tokens must be an integer >= 1"),  # (as the client named it)
    ({"min_tokens": 5, "max_completion_tokens": 3}, "min_tokens (5) is more than max_completion_tokens (3)"),
    ({"min_tokens": -1}, "min_tokens must be an integer >= 0"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens (5) is more than max_tokens (2)"),
    ({"num_beams": 2, "temperature": 1}, "beam search is deterministic"),
])
def test_bad_option_values_are_named_as_openai_names_them(options, message):
    e = refused(body(**options))
    assert message in e.message and "new_tokens" not in e.message, e.message


@pytest.mark.parametrize("limit", [1000, 500])  # 40x30 = 1200 pixels: over the limit (a warning), over twice it
def test_a_decompression_bomb_is_refused(monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    e = refused(body())
    assert e.param == "messages" and "too many pixels" in e.message and f"{limit:,}" in e.message


def test_parse_body():
    assert parse_body(b'{"model": "x"}') == {"model": "x"}
    for raw, message in ((b'{"model": ', "not valid JSON"), (b"\xff\xfe\x00", "not valid JSON"),
                         (b"[1, 2]", "must be a JSON object, got list"), (b"", "not valid JSON")):
        with pytest.raises(ApiError) as e:
            parse_body(raw)
        assert e.value.status == 400 and message in e.value.message


def test_top_logprobs_need_logprobs_and_a_count_up_to_20():
    req = parse(body(logprobs=True, top_logprobs=3))
    assert req.logprobs and req.options == {"top_logprobs": 3}
    assert parse(body(top_logprobs=0)).options == {"top_logprobs": 0}  # 0 asks for nothing
    e = refused(body(top_logprobs=3))
    assert e.param == "top_logprobs" and "logprobs: true" in e.message
    for value in (21, -1, 2.5, True):
        message = refused(body(logprobs=True, top_logprobs=value)).message
        assert "top_logprobs must be an integer from 0 to 20" in message


def test_the_image_cache_gives_one_object_per_content_and_forgets_the_oldest():
    from palitorch.server.openai import ImageCache, decode_image

    cache, decoded = ImageCache(size=2), []

    def decode(data):
        decoded.append(data)
        return decode_image(data)

    a, b, c = (png_bytes(Image.new("RGB", (8, 8), color)) for color in ("red", "green", "blue"))
    first = cache.get(a, decode)
    assert cache.get(bytes(a), decode) is first and decoded == [a]  # equal bytes, not the same object
    assert cache.get(b, decode) is not first
    cache.get(a, decode)  # a is now the most recent: c pushes b out
    cache.get(c, decode)
    assert cache.get(a, decode) is first and decoded == [a, b, c]
    cache.get(b, decode)
    assert decoded == [a, b, c, b]


def test_small_leniencies_a_re_audit_asked_for():
    """stream_options.include_usage null counts as absent (as top-level nulls do); URL schemes are case-insensitive;
    a model id that is not a string is a 400 naming `model`, not a 404."""
    assert parse(body(stream=True, stream_options={"include_usage": None})).include_usage is False
    assert URL.startswith("data:")
    assert parse(body(image="DATA" + URL[4:])).image.size == parse(body()).image.size
    e = refused(body(model=5))
    assert e.status == 400 and e.param == "model" and "must be a string" in e.message


def test_the_image_cache_is_bounded_in_bytes():
    """Images are kept at full size: an audit pinned 2.5 GB with six 8900 x 8900 PNGs of 336 KB each. The cache
    keeps at most max_bytes of pixels, and an image over the whole budget is not kept at all."""
    from palitorch.server.openai import ImageCache, decode_image

    cache = ImageCache(size=32, max_bytes=3 * 16 * 16 * 3)  # room for three 16 x 16 RGB images
    small = [png_bytes(Image.new("RGB", (16, 16), (i, 0, 0))) for i in range(5)]
    kept = [cache.get(s, decode_image) for s in small]
    assert cache._bytes <= cache.max_bytes and len(cache._images) == 3
    assert cache.get(small[-1], decode_image) is kept[-1] and cache.get(small[0], decode_image) is not kept[0]
    big = png_bytes(Image.new("RGB", (64, 64)))
    assert cache.get(big, decode_image) is not cache.get(big, decode_image)  # decoded each time, never kept
    assert cache._bytes <= cache.max_bytes


# ------------------------------------------------------------------------------------------------ client input


def test_a_body_nested_too_deeply_is_invalid_json_not_a_crash():
    with pytest.raises(ApiError) as e:
        parse_body(b"[" * 100000 + b"]" * 100000)  # json's parser recurses per level: RecursionError
    assert e.value.status == 400 and "not valid JSON" in e.value.message


@pytest.mark.parametrize("options, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"temperature": -1}, "temperature"), ({"top_p": 2}, "top_p"), ({"top_k": 0}, "top_k"), ({"min_p": 2}, "min_p"),
    ({"seed": 1.5}, "seed"), ({"stop": [""]}, "stop"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"num_beams": 0}, "num_beams"), ({"length_penalty": "x"}, "length_penalty"),
    ({"num_beams": 2, "temperature": 1}, "num_beams"),
])
def test_a_bad_decoding_option_is_named_in_param(options, param):
    assert refused(body(**options)).param == param


def test_null_values_are_absent_even_for_unknown_keys():
    req = parse(body(reasoning_effort=None, max_tokens=5, max_completion_tokens=None, stream=None, n=None))
    assert req.options == {"max_new_tokens": 5} and req.n == 1 and not req.stream
    e = refused(body(reasoning_effort="low"))  # a value: still refused, by name
    assert e.param == "reasoning_effort" and "unknown parameter 'reasoning_effort'" in e.message


@pytest.mark.parametrize("data, message", [
    (b"hello", "cannot decode the image: it is not in a format Pillow can read (PNG, JPEG"),
    (b"", "cannot decode the image: it is empty (0 bytes)"),
    (png_bytes(IMAGE)[:60], "cannot decode the image"),  # a truncated PNG
])
def test_an_image_that_cannot_be_decoded_is_named_plainly(data, message):
    e = refused(with_content(image_part("data:image/png;base64," + base64.b64encode(data).decode())))
    assert e.param == "messages" and e.message.startswith(message), e.message
    assert " at 0x" not in e.message and "BytesIO" not in e.message


def test_an_eps_image_is_refused_before_ghostscript_could_run(monkeypatch):
    """Pillow decodes an EPS file by running Ghostscript on it (a PostScript interpreter with a history of
    remote-code-execution bugs; Pillow's security guidance: block EPS from untrusted sources). A client's EPS image
    is a 400 naming the format, and Ghostscript is never called, installed or not."""
    from PIL import EpsImagePlugin

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **kw: ran.append(a) or Image.new("RGB", (8, 8)).im)
    out = io.BytesIO()
    IMAGE.save(out, format="EPS")
    e = refused(with_content(image_part("data:application/postscript;base64," + base64.b64encode(out.getvalue())
                                        .decode())))
    assert e.status == 400 and e.param == "messages" and e.message.startswith("EPS images are not accepted")
    assert not ran


def test_base64_without_padding_or_url_safe_is_read():
    # a size whose PNG has "-" or "_" in URL-safe base64 and needs padding
    raw = next(r for r in (png_bytes(Image.new("RGB", (w, 5), (w, 250, 3))) for w in range(1, 200))
               if len(r) % 3 and {"-", "_"} & set(base64.urlsafe_b64encode(r).decode()))
    for text in (base64.b64encode(raw).decode().rstrip("="), base64.urlsafe_b64encode(raw).decode(),
                 base64.urlsafe_b64encode(raw).decode().rstrip("=")):
        assert parse(with_content(image_part("data:image/png;base64," + text))).image.size[1] == 5
    for garbage in ("!@#$", "abcde", "ab=c"):
        assert "base64 is damaged" in refused(with_content(image_part("data:image/png;base64," + garbage))).message
