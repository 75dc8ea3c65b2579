"""LoRA variants of PEFT's LoraConfig beyond the plain one. Those whose model at inference is W + s B A merge as PEFT
runs them (float32: logprobs within 1e-4, as in test_adapter.py): BD-LoRA (block-diagonal A or B, saved as their
blocks), MonteCLoRA and VeLoRA (which save training state beside A and B). The others are one-line CheckpointErrors
naming why, never a silently different model: aLoRA (no merged form), KaSA, and the initialisations after which PEFT
changes the base weights at every load (PiSSA, OLoRA...), unless the adapter was converted to a plain LoRA."""

import json

import pytest
import torch
from test_adapter import TOL, adapt, image, suffix_logprobs

import palitorch
from palitorch.checkpoint import CheckpointError

from hf_factory import hf_processor

PROMPT = ("caption en", "two dogs play in the snow")


def peft_logprobs(folder, adapter):
    """PEFT's own forward of the adapter saved in `adapter`, loaded over transformers' model of `folder`."""
    from peft import PeftModel
    from transformers import PaliGemmaForConditionalGeneration as HF

    model = PeftModel.from_pretrained(HF.from_pretrained(folder).eval(), adapter).eval()
    return suffix_logprobs(model, hf_processor(folder), image(), *PROMPT)


def test_variants_that_run_as_a_plain_lora_merge_as_peft_runs_them(pg1, tmp_path):
    """BD-LoRA's block-diagonal factors (an A on q_proj, a B on o_proj, two blocks each) are its blocks stacked in
    the file: merged as the full matrices. MonteCLoRA's sampler and VeLoRA's compressed activations act in training
    only and are left out. Each is compared with PEFT's forward of the saved adapter."""
    from peft.tuners.lora.config import BdLoraConfig, MontecloraConfig, VeloraConfig
    from transformers import PaliGemmaForConditionalGeneration as HF

    folder, _ = pg1
    variants = {"bdlora": dict(r=4, target_modules=["q_proj", "o_proj", "fc1"], use_bdlora=BdLoraConfig(
                    target_modules_bd_a=["q_proj"], target_modules_bd_b=["o_proj"], nblocks=2, match_strict=False)),
                "monteclora": dict(r=2, target_modules=["q_proj", "fc1"], monteclora_config=MontecloraConfig()),
                "velora": dict(r=2, target_modules=["q_proj", "fc1"], velora_config=VeloraConfig())}
    plain = torch.tensor(palitorch.load(folder).score(image(), *PROMPT).logprobs)
    for name, kw in variants.items():
        adapt(HF.from_pretrained(folder).eval(), tmp_path / name, lora_alpha=4, **kw)
        want = peft_logprobs(folder, tmp_path / name)
        assert (plain - want).abs().max() > 0.05, name  # the adapter changes the answer
        got = palitorch.load(folder, adapter=tmp_path / name).score(image(), *PROMPT).logprobs
        torch.testing.assert_close(torch.tensor(got), want, atol=TOL, rtol=0, msg=name)


@pytest.mark.parametrize(("kw", "message"), [
    (dict(alora_invocation_tokens=[5, 7]), "alora_invocation_tokens is set: an Activated LoRA .*no merged weight"),
    (dict(init_lora_weights="pissa"), "init_lora_weights 'pissa': PEFT changes the base weights when it loads"),
    (dict(init_lora_weights="olora"), "init_lora_weights 'olora': PEFT changes the base weights when it loads"),
    (dict(kasa={}), "kasa_config is set: a KaSA adapter .* is not a plain LoRA"),
])
def test_variants_that_are_no_update_of_the_checkpoint_s_weights_are_refused(pg1, tmp_path, kw, message):
    """aLoRA changes only the tokens from its invocation sequence on; after a PiSSA or OLoRA initialisation PEFT
    subtracts the adapter's initial value from the base weights whenever it loads the adapter; KaSA truncates them
    and puts a diagonal between A and B. PEFT's model then differs from W + s B A (checked for the first three),
    so palitorch refuses each by name."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import KasaConfig
    from transformers import PaliGemmaForConditionalGeneration as HF

    folder, _ = pg1
    if "kasa" in kw:
        kw = {"kasa_config": KasaConfig()}
    torch.manual_seed(0)
    init = kw.pop("init_lora_weights", False)
    model = get_peft_model(HF.from_pretrained(folder).eval(), LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "fc1"], init_lora_weights=init, **kw))
    with torch.no_grad():  # as after training: A and B moved from their initial values
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path / "a")
    if "kasa_config" not in kw:  # merged as a plain LoRA, the model would be another than PEFT's
        want = peft_logprobs(folder, tmp_path / "a")
        settings = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(
            {**settings, "alora_invocation_tokens": None, "init_lora_weights": True}))
        (tmp_path / "b" / "adapter_model.safetensors").write_bytes(
            (tmp_path / "a" / "adapter_model.safetensors").read_bytes())
        got = palitorch.load(folder, adapter=tmp_path / "b").score(image(), *PROMPT).logprobs
        assert (torch.tensor(got) - want).abs().max() > 1e-3
    with pytest.raises(CheckpointError, match=message):
        palitorch.load(folder, adapter=tmp_path / "a")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_pissa_or_olora_adapter_converted_to_a_plain_lora_merges(pg1, tmp_path, init):
    """An adapter saved with path_initial_model_for_weight_conversion (PEFT's way to make such an adapter a plain
    LoRA of the unchanged base, of twice the rank, here with a rank_pattern) merges into the trained model: PEFT's
    model over its changed base weights is the reference."""
    from peft import LoraConfig, get_peft_model
    from transformers import PaliGemmaForConditionalGeneration as HF

    folder, _ = pg1
    torch.manual_seed(0)
    model = get_peft_model(HF.from_pretrained(folder).eval(), LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "fc1"], init_lora_weights=init, rank_pattern={"fc1": 3}))
    model.peft_config["default"].init_lora_weights = True  # (as PEFT's documentation saves the initial adapter)
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = init
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    want = suffix_logprobs(model.eval(), hf_processor(folder), image(), *PROMPT)
    got = palitorch.load(folder, adapter=tmp_path / "final").score(image(), *PROMPT).logprobs
    torch.testing.assert_close(torch.tensor(got), want, atol=TOL, rtol=0)
