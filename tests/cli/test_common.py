"""The options every command shares (palitorch.cli.common), checked directly: devices this machine may not have
(CUDA simulated by patching torch.cuda), decoding flags spelled as users type them, and a beam search's JSON."""

import argparse

import pytest
import torch

from palitorch.cli.common import add_decoding_options, decoding_options, resolve_device, result_fields
from palitorch.errors import InputError
from palitorch.inference.answer import Result


def test_devices_this_machine_has_and_has_not(monkeypatch):
    """cpu:0 is the one CPU (only other indices are refused); a device type torch knows but palitorch does not
    run on is refused; with two GPUs, `auto` is cuda and cuda:1 the last one there is."""
    assert resolve_device("cpu") == "cpu" and resolve_device("cpu:0") == "cpu:0"
    with pytest.raises(InputError, match="--device meta: palitorch runs on cpu, cuda or mps"):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(InputError, match=r"--device cuda:2: there are only 2 CUDA GPU\(s\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize(("value", "expected"), [("True", True), ("FALSE", False), ("Never", "never")])
def test_early_stopping_in_any_case(value, expected):
    """--early-stopping takes true, false or never in any case (as a shell user may write Python's True)."""
    parser = argparse.ArgumentParser()
    add_decoding_options(parser)
    args = parser.parse_args(["--num-beams", "2", "--early-stopping", value])
    assert decoding_options(args, one_request=True)["early_stopping"] == expected


def test_each_beam_s_json_has_its_own_finish_reason():
    """A beam search's beams end differently (one at its EOS, another at the token limit): each beam's JSON says
    how that beam ended, not how the best one did."""
    best = Result(text="a", token_ids=[5], logprobs=[-0.5], finish_reason="eos", prompt_tokens=3, beam_score=-0.5)
    other = Result(text="b c", token_ids=[6, 7], logprobs=[-1.0, float("-inf")], finish_reason="length",
                   prompt_tokens=3, beam_score=-2.0)
    result = Result(text="a", token_ids=[5], logprobs=[-0.5], finish_reason="eos", prompt_tokens=3,
                    beams=[best, other], beam_score=-0.5)
    fields = result_fields(result, "caption en", (224, 224), tokenizer=None)
    assert [b["finish_reason"] for b in fields["beams"]] == ["eos", "length"]
    assert fields["beams"][1] == {"text": "b c", "token_ids": [6, 7], "logprobs": [-1.0, None],
                                  "finish_reason": "length", "beam_score": -2.0}
