"""What an adapter's files may leave out or get wrong: settings PEFT fills with its defaults, settings that are not
numbers, settings that make an adapter other than a plain LoRA, and LoRA pairs that are incomplete or do not fit
their weight. PEFT's own model is the reference where it loads the adapter (float32: logprobs within 1e-4, as in
test_adapter.py); the rest are one-line CheckpointErrors, never a silently different model."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_adapter import TOL, adapt, image, suffix_logprobs

import palitorch
from palitorch.checkpoint import CheckpointError, load_model, merge_adapter

from hf_factory import hf_processor


def test_r_and_lora_alpha_left_out_are_peft_s_defaults(pg1, tmp_path):
    """A config without r or lora_alpha (written by hand or by another tool) means LoraConfig's defaults (r 8,
    lora_alpha 8), as PeftModel.from_pretrained reads it: a rank-8 adapter then has s = 1."""
    from peft import PeftModel
    from transformers import PaliGemmaForConditionalGeneration as HF

    folder, _ = pg1
    adapt(HF.from_pretrained(folder).eval(), tmp_path / "a", r=8, lora_alpha=8, target_modules=["q_proj", "fc1"])
    config = tmp_path / "a" / "adapter_config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({k: v for k, v in settings.items() if k not in ("r", "lora_alpha")}))
    reference = PeftModel.from_pretrained(HF.from_pretrained(folder).eval(), tmp_path / "a").eval()
    assert (reference.peft_config["default"].r, reference.peft_config["default"].lora_alpha) == (8, 8)
    img, prefix, suffix = image(), "caption en", "two dogs play in the snow"
    want = suffix_logprobs(reference, hf_processor(folder), img, prefix, suffix)
    got = palitorch.load(folder, adapter=tmp_path / "a").score(img, prefix, suffix).logprobs
    torch.testing.assert_close(torch.tensor(got), want, atol=TOL, rtol=0)


@pytest.fixture
def q_adapter(pg1, tmp_path):
    """(base folder, a rank-2 adapter of q_proj, its settings, its tensors)."""
    from transformers import PaliGemmaForConditionalGeneration as HF

    folder, _ = pg1
    adapt(HF.from_pretrained(folder).eval(), tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj", "fc1"])
    settings = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    return folder, tmp_path / "a", settings, load_file(tmp_path / "a" / "adapter_model.safetensors")


@pytest.mark.parametrize(("change", "message"), [
    ({"lora_alpha": True}, r"lora_alpha True \(for .*\) is not a number"),  # (a bool is an int to Python)
    ({"lora_alpha": "4"}, r"lora_alpha '4' \(for .*\) is not a number"),
    ({"rank_pattern": {"q_proj": None}}, r"r None \(for .*q_proj\) is not a number"),
    ({"use_dora": True}, "use_dora is set: a DoRA adapter"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out is set: a fan_in_fan_out adapter"),
    ({"lora_bias": True}, "lora_bias is set: an adapter with LoRA biases"),
    ({"use_qalora": True}, "use_qalora is set: a QA-LoRA adapter"),
])
def test_settings_that_are_no_number_or_no_plain_lora_are_refused(q_adapter, change, message):
    """Each setting that makes an adapter something other than W + s B A is refused by name (merging it as a plain
    LoRA would give another model silently), and so is an alpha or a rank that is not a number."""
    folder, adapter, settings, _ = q_adapter
    (adapter / "adapter_config.json").write_text(json.dumps({**settings, **change}))
    with pytest.raises(CheckpointError, match=message):
        merge_adapter(load_model(folder, "cpu", torch.float32), adapter)


def test_pairs_that_are_incomplete_or_do_not_fit_are_refused(q_adapter):
    """A LoRA pair must be exactly A and B, of its weight's shape: B A transposed has the weight's number of
    elements (fc1 is not square) but is not its update; a module saved whole must have its shape; a file with no
    tensor at all is no adapter."""
    folder, adapter, _, tensors = q_adapter
    fc1 = next(k.removesuffix(".lora_A.weight") for k in tensors if ".fc1.lora_A" in k)
    a, b = tensors[f"{fc1}.lora_A.weight"], tensors[f"{fc1}.lora_B.weight"]
    assert b.shape[0] != a.shape[1]  # out != in: the transposed update is another shape
    cases = [({f"{fc1}.lora_A.weight": a}, r"has \['A'\] of a LoRA pair"),
             ({f"{fc1}.lora_A.weight": a, f"{fc1}.lora_B.weight": b, f"{fc1}.lora_embedding_A.weight": a.clone()},
              r"has \['A', 'B', 'embedding_A'\] of a LoRA pair"),
             ({f"{fc1}.lora_A.weight": b.t().contiguous(), f"{fc1}.lora_B.weight": a.t().contiguous()},
              "does not fit its weight .*the adapter belongs to another model"),
             ({"base_model.model.model.language_model.norm.weight": torch.ones(3)},  # (saved whole: modules_to_save)
              r"norm.weight has shape \(3,\), the model's is .*the adapter belongs to another model"),
             ({}, "holds no LoRA weights")]
    for kept, message in cases:
        save_file(kept, adapter / "adapter_model.safetensors")
        with pytest.raises(CheckpointError, match=message):
            merge_adapter(load_model(folder, "cpu", torch.float32), adapter)
