"""The server on tiny random PaliGemma 1 and 2 checkpoints written by transformers (not the bundled model): a batch
of concurrent requests answers as transformers' greedy `generate` does, token for token (by text) and logprob for
logprob, PaliGemma 2's second EOS id included."""


import pytest
import torch
from PIL import Image
from serverkit import RecordingEngine, ask_all, chat

import palitorch
from palitorch.inference.generate import eos_ids

from hf_factory import diverse

PROMPTS = ["caption en", "answer en what color is the shape?", "detect cat ; dog", "ocr"]
MAX_TOKENS = 12
LOGPROB_TOL = 1e-4  # float32; the parity tests see agreement to the last bit, batching moves it by rounding only


def noise_image(seed: int, size: int = 96) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size + 8 * seed, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def transformers_answer(hf, pipe, image, prompt):
    """transformers' greedy tokens (cut at the first EOS) and their logprobs, on palitorch's preprocessing (whose
    parity with transformers' processor is tested in tests/inference)."""
    proc = pipe.processor
    enc = proc.encode(prompt)
    ids, types = torch.tensor([enc.ids]), torch.tensor([enc.types])  # types: the prefix-LM mask (PaliGemma 2 needs it)
    eos = eos_ids(pipe.model, proc)
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=types,
                          pixel_values=proc.pixels(image)[None],
                          max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=proc.pad_id,
                          output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    end = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
    logprobs = [torch.log_softmax(out.logits[i][0].float(), -1)[t].item() for i, t in enumerate(tokens[:end])]
    return proc.decode(tokens[:end]), logprobs, "stop" if end < len(tokens) else "length"


@pytest.mark.parametrize("version", [1, 2])
def test_a_batch_of_requests_answers_as_transformers_does(ckpt_factory, version):
    folder, hf = diverse(ckpt_factory, version)  # weights whose answers vary (hf_factory's plain ones echo)
    pipe = palitorch.load(folder)
    engine = RecordingEngine(palitorch.load(folder), start_after=len(PROMPTS))  # all four wait: one batch
    images = [noise_image(i) for i in range(len(PROMPTS))]
    answers = ask_all(engine, [chat(im, p, max_tokens=MAX_TOKENS, logprobs=True) for im, p in zip(images, PROMPTS)])
    assert engine.stats["largest_batch"] == len(PROMPTS)
    texts = []
    for i, prompt in enumerate(PROMPTS):
        status, out, _ = answers[i]
        assert status == 200, out
        choice = out["choices"][0]
        text, logprobs, finish = transformers_answer(hf, pipe, images[i], prompt)
        assert choice["message"]["content"] == text, (prompt, choice["message"]["content"], text)
        assert choice["finish_reason"] == finish
        got = [entry["logprob"] for entry in choice["logprobs"]["content"]]
        assert len(got) == len(logprobs)
        assert max((abs(a - b) for a, b in zip(got, logprobs)), default=0.0) <= LOGPROB_TOL
        assert out["usage"]["prompt_tokens"] == len(pipe.processor.encode(prompt).ids)
        texts.append(text)
    assert len(set("".join(texts))) > 3, f"the answers should not repeat one token: {texts}"
