"""Checkpoint variants that a fuzz against transformers found palitorch reading otherwise (each test failed before
its fix): folders transformers re-saved with SigLIP's unused pooling head, an untied LM head, EOS ids in
generation_config.json, Gemma 1 with a final soft-cap or `hidden_act: "gelu"`. Each must give transformers' greedy
tokens, and logprobs within DIVERSE_LOGPROB_TOL (3e-4: float32 on CPU, chaotic weights, see hf_factory)."""

import json

import pytest
import safetensors
import torch
from test_generate import PROMPTS, images

import palitorch

from hf_factory import DIVERSE_LOGPROB_TOL, diverse_weights, hf_generate, write_checkpoint

STEPS = 12


def variant(tmp_path, name: str, text_json: dict | None = None, **kw):
    """A tiny checkpoint whose answers vary token to token (the `diverse` weights), saved by transformers, and
    transformers' model read back from the folder (so that it reads generation_config.json as a user's would).
    `text_json`: fields written into config.json's text_config afterwards (as a hand-made config has them)."""
    from transformers import PaliGemmaForConditionalGeneration

    folder, hf = write_checkpoint(tmp_path / name, **kw)
    diverse_weights(hf, 7)
    hf.save_pretrained(folder)
    if text_json:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["text_config"].update(text_json)
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder, PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def same_answers(folder, hf, min_new_tokens: int = STEPS):
    pipe = palitorch.load(folder)
    imgs = images(3)
    ours = pipe.generate(imgs, PROMPTS, max_new_tokens=STEPS, min_new_tokens=min_new_tokens)
    toks, lps = hf_generate(folder, hf, imgs, PROMPTS, max_new_tokens=STEPS, min_new_tokens=min_new_tokens)
    for r, t, lp in zip(ours, toks.tolist(), lps):
        n = len(r.token_ids)
        assert r.token_ids == [i for i in t if i != 0][:n]  # transformers pads a finished row with pad (0)
        torch.testing.assert_close(torch.tensor(r.logprobs), lp[:n], atol=DIVERSE_LOGPROB_TOL, rtol=0)
    return ours


def test_a_folder_transformers_saved_with_siglip_s_pooling_head(tmp_path):
    """Hub PaliGemma 1 configs leave out vision_use_head, whose SigLIP default is true: transformers then builds the
    pooling head (PaliGemma never uses it) and writes it when it saves, as every fine-tune does."""
    folder, hf = variant(tmp_path, "head", vision_extra={"vision_use_head": True})
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert any(".head." in k for k in f.keys())
    same_answers(folder, hf)


@pytest.mark.parametrize("version", [1, 2])
def test_an_untied_lm_head(tmp_path, version):
    folder, hf = variant(tmp_path, f"untied{version}", version=version, top_extra={"tie_word_embeddings": False})
    assert not torch.equal(hf.lm_head.weight, hf.model.language_model.embed_tokens.weight)
    same_answers(folder, hf)
    pipe = palitorch.load(folder)
    saved = palitorch.checkpoint.save_model(pipe.model, tmp_path / f"resaved{version}")
    again = palitorch.checkpoint.load_model(saved)
    assert torch.equal(again.language_model.lm_head.weight, pipe.model.language_model.lm_head.weight)
    with safetensors.safe_open(str(saved / "model.safetensors"), "pt") as f:  # the newer layout's name, as the
        assert "lm_head.weight" in f.keys()  # folder's other keys ("language_model.lm_head" is the old one)


def test_a_stored_lm_head_decides_tying_as_transformers_reads_it(tmp_path):
    """transformers ties the head to the embedding unless both are stored with different values, whatever the
    config says: (a) an untied model as an older transformers saved it (tie_word_embeddings: false only in
    text_config, the top level's default left out), whose head palitorch dropped (every token differed); (b) a tied
    model that stores only lm_head.weight, which palitorch refused (no embed_tokens)."""
    from safetensors.torch import load_file, save_file
    from transformers import PaliGemmaForConditionalGeneration

    folder, _ = variant(tmp_path, "untied", top_extra={"tie_word_embeddings": False})
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["tie_word_embeddings"]
    cfg["text_config"]["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(cfg))
    hf = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    assert not torch.equal(hf.lm_head.weight, hf.model.language_model.embed_tokens.weight)
    same_answers(folder, hf)

    folder, _ = variant(tmp_path, "head-only")
    tensors = load_file(folder / "model.safetensors")
    [embed] = [k for k in tensors if k.endswith("embed_tokens.weight")]
    tensors = {("lm_head.weight" if k == embed else k): v for k, v in tensors.items() if k != "lm_head.weight"}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    same_answers(folder, PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval())


def test_eos_ids_from_generation_config_json(tmp_path):
    """transformers' generate stops at generation_config.json's EOS ids (before config.json's top level, before
    text_config's): a frequent token made an EOS there ends answers early, in both."""
    folder, _ = variant(tmp_path, "gen")
    plain = palitorch.load(folder).generate(images(3), PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS)
    stop = plain[0].token_ids[3]  # a token the first answer makes: now an end of answer
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, stop],
                                                                "pad_token_id": 0}))
    from transformers import PaliGemmaForConditionalGeneration

    hf = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ours = same_answers(folder, hf, min_new_tokens=0)
    assert ours[0].finish_reason == "eos" and len(ours[0].token_ids) <= 3


def test_a_generation_config_json_without_eos_ids_hides_config_json_s(tmp_path):
    """transformers' generate reads a folder's generation_config.json alone: one that gives no eos_token_id leaves
    config.json's EOS ids unread, so a frequent token listed only there does not end answers (palitorch stopped at
    it: it read config.json's ids whenever generation_config.json had none)."""
    folder, _ = variant(tmp_path, "gen-no-eos")
    plain = palitorch.load(folder).generate(images(3), PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS)
    stop = plain[0].token_ids[3]  # a token the first answer makes: an EOS in config.json only
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=[1, stop])))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "pad_token_id": 0}))
    from transformers import PaliGemmaForConditionalGeneration

    hf = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ours = same_answers(folder, hf, min_new_tokens=0)
    assert len(ours[0].token_ids) == STEPS and ours[0].finish_reason == "length"


@pytest.mark.parametrize("text_json", [{"final_logit_softcapping": 2.0}, {"hidden_act": "gelu"},
                                       {"hidden_act": "gelu", "hidden_activation": "gelu"}])
def test_gemma1_fields_as_transformers_reads_them(tmp_path, text_json):
    """Gemma 1 with a final soft-cap (transformers' PaliGemma applies one that any text_config sets), and with
    `hidden_act: "gelu"` (transformers' Gemma reads it as the tanh approximation, and ignores hidden_activation)."""
    folder, hf = variant(tmp_path, "g1", text_json)
    same_answers(folder, hf)


@pytest.mark.parametrize("version, text_json, vision_act", [(1, {"hidden_act": "gelu_accurate"}, "gelu_python"),
                                                            (2, {"hidden_activation": "gelu_python"}, "gelu_accurate")])
def test_other_gelu_names_and_stored_rope_buffers(tmp_path, version, text_json, vision_act):
    """transformers' other names for GELU (gelu_python: exact; gelu_accurate: the tanh approximation), which
    palitorch refused, and RoPE's inv_freq buffers that older transformers saved, refused as unexpected tensors."""
    from safetensors.torch import load_file, save_file

    folder, _ = variant(tmp_path, "acts", text_json, version=version, vision_extra={"hidden_act": vision_act})
    tensors = load_file(folder / "model.safetensors")
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)
    tensors |= {f"model.language_model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for i in range(2)}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    from transformers import PaliGemmaForConditionalGeneration

    same_answers(folder, PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval())
