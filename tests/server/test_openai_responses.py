"""The OpenAI response rules alone (no model, no sockets): token_entry, completion objects, stream chunks, error
objects."""

from PIL import Image

from palitorch.inference.answer import Result
from palitorch.server.openai import ApiError, ChatRequest
from palitorch.server.responses import chunk, completion, token_entry

MODEL = "tiny"
IMAGE = Image.new("RGB", (40, 30), (200, 30, 30))

# ------------------------------------------------------------------------------------------------ responses


class Tokenizer:
    pieces = {5: "\u2581word", 6: "<0xE2>", 7: "<loc0001>", 8: "red"}

    def id_to_token(self, i):
        return self.pieces.get(i)


def test_token_entry():
    tok = Tokenizer()
    assert token_entry(tok, 5, -0.25) == {"token": " word", "logprob": -0.25, "bytes": list(b" word"),
                                          "top_logprobs": []}
    byte = token_entry(tok, 6, -1.0)
    assert byte["bytes"] == [0xE2] and byte["token"] == "\\xe2"  # half a character: shown escaped, bytes exact
    assert token_entry(tok, 7, float("-inf"))["logprob"] == -9999.0
    assert token_entry(tok, 99, -2.0)["token"] == ""  # an id the tokenizer does not know


def request(prompt="caption en", **kw):
    return ChatRequest(IMAGE, prompt, {}, **kw)


def test_completion_object_finish_reasons_and_usage():
    results = [Result("red", [8], [-0.5], "eos", 70), Result("red", [8, 8], [-0.5, -0.7], "stop", 70),
               Result("word", [5, 5, 5], [-1.0] * 3, "length", 70)]
    out = completion("chatcmpl-1", 123, MODEL, request(n=3), results, Tokenizer())
    assert {k: out[k] for k in ("id", "object", "created", "model")} == \
        {"id": "chatcmpl-1", "object": "chat.completion", "created": 123, "model": MODEL}
    assert [c["finish_reason"] for c in out["choices"]] == ["stop", "stop", "length"]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "red", "refusal": None}
    assert all(c["logprobs"] is None and "detections" not in c for c in out["choices"])
    # the EOS that ended the first answer counts as generated; the prompt counts once
    assert out["usage"] == {"prompt_tokens": 70, "completion_tokens": 2 + 2 + 3, "total_tokens": 77}


def test_completion_with_top_logprobs():
    alternatives = [[(5, -0.5), (8, -1.0)], [(8, -0.25), (6, -1.5)]]
    result = Result("word", [5, 6], [-0.5, -1.5], "eos", 9, alternatives)
    content = completion("c", 0, MODEL, request(logprobs=True), [result], Tokenizer())["choices"][0]["logprobs"]
    first, second = content["content"]
    # the answer's first token loses the space the decoder drops from the text ("word"), in its entry and among the
    # alternatives, so that a client finds the chosen token there by its text
    assert first["token"] == "word" and first["top_logprobs"] == [
        {"token": "word", "logprob": -0.5, "bytes": list(b"word")},
        {"token": "red", "logprob": -1.0, "bytes": list(b"red")}]
    assert [(e["token"], e["logprob"]) for e in second["top_logprobs"]] == [("red", -0.25), ("\\xe2", -1.5)]


def test_completion_with_logprobs():
    out = completion("c", 0, MODEL, request(logprobs=True), [Result("word", [5, 6], [-0.5, -1.5], "eos", 9)],
                     Tokenizer())
    content = out["choices"][0]["logprobs"]["content"]
    # the answer's text starts without the first token's word mark (the decoder drops it): so does its entry
    assert [(e["token"], e["logprob"], e["bytes"]) for e in content] == [("word", -0.5, list(b"word")),
                                                                          ("\\xe2", -1.5, [0xE2])]


def test_logprob_tokens_join_into_the_content_the_tokenizer_decodes():
    """The tokenizer's decode is the content; the token entries join into it (their bytes into its bytes), with the
    bundled (Gemma) tokenizer, whose decoder drops the space that begins an answer ("  word": '▁', '▁', 'w'... is
    " word"), and with that tokenizer's decoder keeping it."""
    import json

    from tokenizers import Tokenizer as HFTokenizer

    import palitorch
    from palitorch.server.responses import joined

    spec = json.loads((palitorch.default_model_path() / "tokenizer.json").read_text())
    gemma = HFTokenizer.from_str(json.dumps(spec))
    spec["decoder"]["decoders"] = [d for d in spec["decoder"]["decoders"] if d["type"] != "Strip"]
    keeping = HFTokenizer.from_str(json.dumps(spec))
    for tokenizer, texts in ((gemma, ["word", " word", "  word", "   x  y", " "]), (keeping, [" word", "  word"])):
        for text in texts:
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            content = tokenizer.decode(ids)
            result = Result(content, ids, [-0.5] * len(ids), "eos", 9)
            entries = completion("c", 0, MODEL, request(logprobs=True), [result], tokenizer)["choices"][0]
            entries = entries["logprobs"]["content"]
            assert "".join(e["token"] for e in entries) == content, (text, content)
            assert b"".join(bytes(e["bytes"]) for e in entries) == content.encode(), (text, content)
    ids = gemma.encode("  word", add_special_tokens=False).ids[:2]  # a stream's first piece: " " and its 2 tokens
    assert [e["token"] for e in joined([token_entry(gemma, i, -0.5) for i in ids], gemma.decode(ids))] == ["", " "]
    out = completion("c", 0, MODEL, request(logprobs=True), [Result("", [], [], "eos", 9)], gemma)  # EOS at once
    assert out["choices"][0]["logprobs"] == {"content": [], "refusal": None}


def test_detect_and_segment_prompts_add_their_objects():
    text = "<loc0000><loc0000><loc1023><loc1023> cat"
    out = completion("c", 0, MODEL, request("detect cat"), [Result(text, [7], [-0.1], "eos", 9)], Tokenizer())
    assert out["choices"][0]["detections"] == [{"label": "cat", "box": [0, 0, 40, 30]}]  # the 40x30 image's pixels
    out = completion("c", 0, MODEL, request("segment cat"), [Result("cat", [8], [-0.1], "eos", 9)], Tokenizer())
    assert out["choices"][0]["segmentations"] == []  # nothing well-formed in the answer, but the field is there


def test_stream_chunks():
    first = chunk("c", 5, MODEL, {"role": "assistant", "content": ""})
    assert first == {"id": "c", "object": "chat.completion.chunk", "created": 5, "model": MODEL,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                  "logprobs": None}]}
    assert chunk("c", 5, MODEL, {}, "length")["choices"][0]["finish_reason"] == "length"
    assert chunk("c", 5, MODEL, {"content": "x"}, index=2)["choices"][0]["index"] == 2
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    last = chunk("c", 5, MODEL, {}, usage_=usage, choices=False)
    assert last["choices"] == [] and last["usage"] == usage


def test_api_error_body():
    e = ApiError(401, "no key", code="invalid_api_key")
    assert e.body() == {"error": {"message": "no key", "type": "authentication_error", "param": None,
                                  "code": "invalid_api_key"}}


def test_a_503_says_when_to_retry_and_other_errors_carry_their_headers():
    assert ApiError(503, "busy").headers == {"Retry-After": "1"}
    assert ApiError(405, "no", headers={"Allow": "GET"}).headers == {"Allow": "GET"}
    assert ApiError(400, "bad").headers == {}
