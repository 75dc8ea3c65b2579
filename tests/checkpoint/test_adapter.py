"""PEFT LoRA adapters merged at load (`palitorch.load(path, adapter=DIR)`, `--adapter DIR`), against PEFT itself
over transformers' model, float32: logprobs within 1e-4 (the parity tests' logit tolerance; merged weights differ
from PEFT's separate low-rank product by float32 rounding only)."""

import json
import subprocess
import sys

import pytest
import torch

import palitorch
from palitorch.checkpoint import CheckpointError

from hf_factory import hf_processor

TOL = 1e-4
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def image():
    from PIL import Image

    g = torch.Generator().manual_seed(5)
    return Image.fromarray(torch.randint(0, 256, (90, 120, 3), generator=g, dtype=torch.uint8).numpy())


def adapt(hf, folder, **lora):
    """A PEFT LoRA adapter of `hf` with random A and B (so that it changes the answers), saved in `folder`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(hf, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():  # B is small at random init: make the update matter
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.mul_(4)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


def suffix_logprobs(model, proc, img, prefix, suffix):
    inputs = proc(images=[img], text=[prefix], suffix=[suffix], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    ids = inputs["input_ids"][0]
    start = int(inputs["token_type_ids"][0].tolist().index(1))
    return torch.log_softmax(logits[start - 1:-1], -1).gather(-1, ids[start:, None])[:, 0]


@pytest.mark.parametrize("version", [1, 2])
def test_an_adapter_answers_as_peft_does(ckpt_factory, tmp_path, version):
    """Every kind of linear layer adapted (decoder, vision tower, projector), rsLoRA scaling, per-module alpha and
    rank, and a module saved whole (modules_to_save): PEFT's own forward over transformers is the reference."""
    from transformers import PaliGemmaForConditionalGeneration as HF

    folder, _ = ckpt_factory(f"adapter-pg{version}", version=version, kv_heads=2 if version == 2 else 1)
    proc = hf_processor(folder)
    peft_model = adapt(HF.from_pretrained(folder).eval(), tmp_path / "adapter", r=4, lora_alpha=8,
                       target_modules=[*ALL_LINEAR, "fc1", "out_proj", "linear"], use_rslora=version == 2,
                       alpha_pattern={"v_proj": 32}, rank_pattern={"o_proj": 2},
                       modules_to_save=["model.language_model.norm"])
    img, prefix, suffix = image(), "caption en", "two dogs play in the snow"
    ref = suffix_logprobs(peft_model, proc, img, prefix, suffix)
    plain = palitorch.load(folder).score(img, prefix, suffix)
    assert (torch.tensor(plain.logprobs) - ref).abs().max() > 0.1  # the adapter changes the answer
    adapted = palitorch.load(folder, adapter=tmp_path / "adapter")
    torch.testing.assert_close(torch.tensor(adapted.score(img, prefix, suffix).logprobs), ref, atol=TOL, rtol=0)
    with torch.no_grad():  # greedy answers too
        inputs = proc(images=[img], text=["answer en what color is the shape?"], return_tensors="pt")
        want = peft_model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    got = adapted.generate(img, "answer en what color is the shape?", max_new_tokens=8, min_new_tokens=8)
    assert got.token_ids == want.tolist()[:len(got.token_ids)] and len(got.token_ids) == 8


def test_a_pattern_names_whole_module_names_as_peft_matches_them(pg1, tmp_path):
    """alpha_pattern / rank_pattern keys match a module's last name parts whole ("(.*\\.)?(key)$", as PEFT does):
    "_proj" and "q" are no module's name (though "q" begins "q_proj") and change nothing, "self_attn.o_proj" is the
    decoder's and the vision tower's."""
    from transformers import PaliGemmaForConditionalGeneration as HF

    folder, _ = pg1
    peft_model = adapt(HF.from_pretrained(folder).eval(), tmp_path / "adapter", r=4, lora_alpha=8,
                       target_modules=ALL_LINEAR, alpha_pattern={"_proj": 64, "q": 32, "self_attn.o_proj": 2})
    img, prefix, suffix = image(), "caption en", "two dogs play in the snow"
    ref = suffix_logprobs(peft_model, hf_processor(folder), img, prefix, suffix)
    got = palitorch.load(folder, adapter=tmp_path / "adapter").score(img, prefix, suffix)
    torch.testing.assert_close(torch.tensor(got.logprobs), ref, atol=TOL, rtol=0)


def test_adapters_of_the_embedding_and_the_patch_convolution_merge_as_peft_merges(pg1, tmp_path):
    """Embedding and Conv2d LoRA: palitorch merges as PEFT's merge_and_unload does (with tied embeddings the merged
    update then reaches the output layer too, as it does in a model merged by PEFT)."""
    from transformers import PaliGemmaForConditionalGeneration as HF

    folder, _ = pg1
    peft_model = adapt(HF.from_pretrained(folder).eval(), tmp_path / "adapter", r=3, lora_alpha=6,
                       target_modules=["embed_tokens", "patch_embedding", "q_proj"])
    merged = peft_model.merge_and_unload().eval()
    img, prefix, suffix = image(), "ocr", "the quick brown fox"
    ref = suffix_logprobs(merged, hf_processor(folder), img, prefix, suffix)
    got = palitorch.load(folder, adapter=tmp_path / "adapter").score(img, prefix, suffix)
    torch.testing.assert_close(torch.tensor(got.logprobs), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("case", ["saved_embedding", "saved_embedding_tied", "embedding_lora_tied", "head_lora",
                                  "saved_embedding_and_head_lora", "changed_base_embedding"])
def test_the_tied_embedding_and_output_layer_as_peft_has_them(pg1, tmp_path, case):
    """Every released PaliGemma ties its output layer to the token embedding. An embedding saved whole
    (modules_to_save) replaces the input side only, unless ensure_weight_tying (palitorch then holds the output
    layer apart); LoRA on either of them changes the one shared tensor, as merge_and_unload writes it."""
    from peft import PeftModel
    from transformers import PaliGemmaForConditionalGeneration as HF

    folder, _ = pg1
    kw = {"saved_embedding": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
          "saved_embedding_tied": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                       ensure_weight_tying=True),
          "embedding_lora_tied": dict(target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True),
          "head_lora": dict(target_modules=["lm_head", "q_proj"]),
          "saved_embedding_and_head_lora": dict(target_modules=["lm_head", "q_proj"], modules_to_save=["embed_tokens"]),
          "changed_base_embedding": dict(target_modules=["embed_tokens", "q_proj"])}[case]
    hf = HF.from_pretrained(folder).eval()
    if case == "changed_base_embedding":  # rows changed before the adapter (new tokens): PEFT saves its base_layer
        with torch.no_grad():
            hf.get_input_embeddings().weight[:50] += torch.randn(50, hf.get_input_embeddings().weight.shape[1])
    peft_model = adapt(hf, tmp_path / "a", r=2, lora_alpha=4, **kw)
    if "modules_to_save" in kw:  # the saved copy must differ from the base embedding to tell the cases apart
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "modules_to_save" in n and "embed" in n:
                    p.add_(torch.randn_like(p) * 0.3)
        peft_model.save_pretrained(tmp_path / "a")
    reference = PeftModel.from_pretrained(HF.from_pretrained(folder).eval(), tmp_path / "a")
    if case != "embedding_lora_tied":  # (there PEFT 0.21's merge adds the tied pair's update twice: its forward)
        reference = reference.merge_and_unload()
    img, prefix, suffix = image(), "ocr", "the quick brown fox"
    want = suffix_logprobs(reference.eval(), hf_processor(folder), img, prefix, suffix)
    pipe = palitorch.load(folder, adapter=tmp_path / "a")
    got = torch.tensor(pipe.score(img, prefix, suffix).logprobs)
    # (the embedding's random update makes logprobs of thousands there: float32 rounds them at ~1e-7 relative)
    torch.testing.assert_close(got, want, atol=TOL, rtol=1e-6 if case == "embedding_lora_tied" else 0)
    assert (pipe.model.language_model.lm_head is None) == (case not in ("saved_embedding",
                                                                       "saved_embedding_and_head_lora"))


def test_an_adapter_in_the_older_transformers_names_and_a_tied_head_merge(pg2, tmp_path):
    """Adapters saved under transformers 4 name the modules `language_model.model.layers...`,
    `vision_tower.vision_model...`: the same weights under those names give the same model."""
    from safetensors.torch import load_file, save_file
    from transformers import PaliGemmaForConditionalGeneration as HF

    folder, _ = pg2
    adapt(HF.from_pretrained(folder).eval(), tmp_path / "new", r=2, lora_alpha=4, target_modules=["q_proj", "fc2"])
    tensors = load_file(tmp_path / "new" / "adapter_model.safetensors")
    old = {k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model.")
            .replace("base_model.model.model.vision_tower.", "base_model.model.vision_tower.vision_model."): v
           for k, v in tensors.items()}
    assert set(old) != set(tensors)
    (tmp_path / "old").mkdir()
    save_file(old, tmp_path / "old" / "adapter_model.safetensors")
    (tmp_path / "old" / "adapter_config.json").write_bytes((tmp_path / "new" / "adapter_config.json").read_bytes())
    img = image()
    a = palitorch.load(folder, adapter=tmp_path / "new").score(img, "caption en", "yes")
    b = palitorch.load(folder, adapter=tmp_path / "old").score(img, "caption en", "yes")
    assert a.logprobs == b.logprobs


def test_bad_adapters_are_one_line_errors(pg1, pg2, tmp_path):
    from transformers import PaliGemmaForConditionalGeneration as HF

    folder, _ = pg1
    with pytest.raises(CheckpointError, match="adapter folder .*nowhere' does not exist"):
        palitorch.load(folder, adapter=tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="has no adapter_config.json"):
        palitorch.load(folder, adapter=folder)
    with pytest.raises(CheckpointError, match="config.json' is a file"):
        palitorch.load(folder, adapter=folder / "config.json")
    adapt(HF.from_pretrained(folder).eval(), tmp_path / "mine", r=2, target_modules=["q_proj"])
    with pytest.raises(CheckpointError, match="is a PEFT adapter folder, not a checkpoint: give it with --adapter"):
        palitorch.load(tmp_path / "mine")
    adapt(HF.from_pretrained(pg2[0]).eval(), tmp_path / "of-pg2", r=2, target_modules=["k_proj"])  # 2 KV heads, not 1
    with pytest.raises(CheckpointError, match="does not fit its weight .*the adapter belongs to another model"):
        palitorch.load(folder, adapter=tmp_path / "of-pg2")
    settings = json.loads((tmp_path / "of-pg2" / "adapter_config.json").read_text())
    for change, message in [({"use_dora": True}, "use_dora is set: a DoRA adapter is not a plain LoRA"),
                            ({"peft_type": "IA3"}, "peft_type 'IA3': palitorch merges LoRA adapters only"),
                            ({"r": 8}, "rank 8, its weights have rank 2: the adapter's files do not belong")]:
        (tmp_path / "of-pg2" / "adapter_config.json").write_text(json.dumps({**settings, **change}))
        with pytest.raises(CheckpointError, match=message):
            palitorch.load(pg2[0], adapter=tmp_path / "of-pg2")
    (tmp_path / "of-pg2" / "adapter_config.json").write_text(json.dumps(settings))
    adapt(HF.from_pretrained(folder).eval(), tmp_path / "tokens", r=2, target_modules=["q_proj"],
          trainable_token_indices=[5, 7])
    with pytest.raises(CheckpointError, match=r"trainable-tokens delta \(trainable_token_indices\)"):
        palitorch.load(folder, adapter=tmp_path / "tokens")
    (tmp_path / "of-pg2" / "adapter_model.safetensors").rename(tmp_path / "of-pg2" / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors .*palitorch never unpickles"):
        palitorch.load(pg2[0], adapter=tmp_path / "of-pg2")
    from safetensors.torch import save_file

    save_file({"base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8),
               "base_model.model.model.text_model.extra.weight": torch.zeros(2)},
              tmp_path / "of-pg2" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="'base_model.model.model.text_model.extra.weight' names no weight"):
        palitorch.load(pg2[0], adapter=tmp_path / "of-pg2")
    proc = subprocess.run([sys.executable, "-m", "palitorch", "run", "--model", str(folder), "--adapter",
                           str(tmp_path / "nowhere"), "--image", "x.png", "--prompt", "ocr"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "does not exist" in proc.stderr


def test_palitorch_merge_writes_the_adapted_model_as_a_folder_of_its_own(pg1, tmp_path, capsys):
    """`palitorch merge`: the adapted model as a plain Hub folder (the checkpoint's dtype, its tokenizer and
    preprocessing), which palitorch and transformers load without PEFT and which answers as --adapter does."""
    from transformers import PaliGemmaForConditionalGeneration as HF

    from palitorch.cli import main

    folder, _ = pg1
    adapt(HF.from_pretrained(folder).eval(), tmp_path / "a", r=2, lora_alpha=4,
          target_modules=["q_proj", "fc1"], modules_to_save=["embed_tokens"])  # (an untied output layer too)
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(folder), "--adapter", str(tmp_path / "a"), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= \
        {f.name for f in out.iterdir()}
    img, prefix, suffix = image(), "caption en", "two dogs play in the snow"
    want = palitorch.load(folder, adapter=tmp_path / "a").score(img, prefix, suffix).logprobs
    assert palitorch.load(out).score(img, prefix, suffix).logprobs == want
    theirs = suffix_logprobs(HF.from_pretrained(out).eval(), hf_processor(out), img, prefix, suffix)
    torch.testing.assert_close(theirs, torch.tensor(want), atol=TOL, rtol=0)
    assert main(["merge", "--model", str(folder), "--adapter", str(tmp_path / "a"), "--out", str(out)]) == 2
    assert "is not empty: give a new folder" in capsys.readouterr().err


def test_palitorch_merge_keeps_a_bfloat16_checkpoint_s_dtype_and_shards_by_megabytes(pg1, tmp_path):
    """Without --dtype the merged model is in the checkpoint's dtype (bfloat16 here, not float32), and
    --max-shard-size counts megabytes (MiB): the shards save_model makes with that many bytes."""
    from safetensors import safe_open
    from transformers import PaliGemmaForConditionalGeneration as HF

    from palitorch.checkpoint import load_model, merge_adapter, save_model
    from palitorch.cli import main
    from palitorch.train.build import tokenizer_files

    folder, _ = pg1
    half = save_model(load_model(folder, "cpu", torch.bfloat16), tmp_path / "bf16", tokenizer_files(folder))
    adapt(HF.from_pretrained(folder).eval(), tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(half), "--adapter", str(tmp_path / "a"), "--out", str(out),
                 "--max-shard-size", "1"]) == 0
    model = load_model(half, "cpu", torch.bfloat16)
    merge_adapter(model, tmp_path / "a")
    want = save_model(model, tmp_path / "want", max_shard_bytes=1 << 20)
    shards = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert shards == json.loads((want / "model.safetensors.index.json").read_text())["weight_map"]
    for name in set(shards.values()):
        with safe_open(out / name, "pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}, name
