"""A PEFT adapter given without its model (`palitorch.load(adapter="user/lora")`, `--adapter` without `--model`)
is merged into the base model its adapter_config.json names, as peft's AutoPeftModel loads it; and a palitorch LoRA
run fine-tuned from a Hub id names its base by that id, as PEFT does. Caches are written by huggingface_hub itself,
from a stand-in Hub (hub_server.py)."""

import json
import shutil
from pathlib import Path

import pytest
from hub_server import fetch, stand_in_hub
from run_cli import cli
from test_adapter import adapt, image

import palitorch
from palitorch.errors import CheckpointError

C1, C2, C3 = "1" * 40, "2" * 40, "3" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with stand_in_hub(tmp_path, monkeypatch) as h:
        yield h


def cached(hub, repo, revision=None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision, cache_dir=hub[1], local_files_only=True))


def edit_config(folder: Path, **settings) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | settings))


def test_an_adapter_without_a_model_is_merged_into_the_base_it_names(hub, pg1, tmp_path, capsys):
    """The base read as peft's AutoPeftModel reads it (from_pretrained of base_model_name_or_path at the config's
    revision, offline), not the bundled model: by load, run, merge and batch's record of the model."""
    from peft import AutoPeftModel
    from transformers import PaliGemmaForConditionalGeneration as HF

    from palitorch.cli.batch import model_record

    server, cache = hub
    folder, _ = pg1
    server.add("me/pg1", C1, folder, refs=("v1",))
    server.add("me/pg1", C2, folder, refs=("main",))
    fetch(hub, "me/pg1"), fetch(hub, "me/pg1", "v1")
    base = HF.from_pretrained("me/pg1", cache_dir=cache, local_files_only=True).eval()  # named by the id, as PEFT
    adapt(base, tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj"])  # writes it
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/pg1"
    server.add("me/pg1-lora", C3, tmp_path / "lora")
    fetch(hub, "me/pg1-lora")
    peft = AutoPeftModel.from_pretrained(cached(hub, "me/pg1-lora"), cache_dir=cache, local_files_only=True)
    assert peft.get_base_model().name_or_path == "me/pg1"
    img = image()
    want = palitorch.load("me/pg1", adapter="me/pg1-lora").score(img, "caption en", "a dog").logprobs
    pipe = palitorch.load(adapter="me/pg1-lora")
    assert pipe.path == cached(hub, "me/pg1") and pipe.score(img, "caption en", "a dog").logprobs == want
    img.save(tmp_path / "i.png")
    capsys.readouterr()  # (the downloads' progress bars)
    rc, out, err = cli(["run", "--adapter", "me/pg1-lora", "--image", tmp_path / "i.png", "--prompt", "caption en",
                        "--json"], capsys)
    assert rc == 0 and json.loads(out)["text"] == pipe.generate(tmp_path / "i.png", "caption en").text, err
    rc, _, err = cli(["merge", "--adapter", "me/pg1-lora", "--out", tmp_path / "m"], capsys)
    assert rc == 0, err
    assert palitorch.load(tmp_path / "m").score(img, "caption en", "a dog").logprobs == want

    class Args:
        model, revision, adapter = None, None, "me/pg1-lora"

    assert model_record(Args, "float32") == {"path": str(cached(hub, "me/pg1")), "adapter": str(
        cached(hub, "me/pg1-lora")), "dtype": "float32"}
    edit_config(tmp_path / "lora", revision="v1")  # peft's revision: the base model's
    assert palitorch.load(adapter=tmp_path / "lora").path == cached(hub, "me/pg1", "v1")


def test_a_base_that_is_not_here_is_one_line_saying_to_give_it(hub, pg1, tmp_path, capsys):
    from transformers import PaliGemmaForConditionalGeneration as HF

    folder, _ = pg1
    adapt(HF.from_pretrained(folder).eval(), tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj"])
    config = tmp_path / "lora" / "adapter_config.json"
    assert json.loads(config.read_text())["base_model_name_or_path"] == str(folder)  # a folder: read as such
    assert palitorch.load(adapter=tmp_path / "lora").path == folder
    edit_config(tmp_path / "lora", base_model_name_or_path="google/paligemma-3b-pt-224")
    with pytest.raises(CheckpointError, match=rf"^{config} names base model 'google/paligemma-3b-pt-224': .*fetch it "
                                              r"with `hf download google/paligemma-3b-pt-224` .*; or give the base "
                                              r"model with --model \(path= in palitorch.load\)$"):
        palitorch.load(adapter=tmp_path / "lora")
    capsys.readouterr()  # (transformers' progress bars)
    rc, _, err = cli(["merge", "--adapter", tmp_path / "lora", "--out", tmp_path / "m"], capsys)
    assert rc == 2 and "names base model 'google/paligemma-3b-pt-224'" in err and err.count("\n") == 1, err
    edit_config(tmp_path / "lora", base_model_name_or_path=str(tmp_path / "gone"))
    with pytest.raises(CheckpointError, match=f"names base model '{tmp_path / 'gone'}', which is not a folder here"):
        palitorch.load(adapter=tmp_path / "lora")
    assert palitorch.load(folder, adapter=tmp_path / "lora").path == folder  # a model given: the adapter's name aside


def test_an_adapter_that_names_no_base_goes_on_the_bundled_model(tmp_path):
    from transformers import PaliGemmaForConditionalGeneration as HF

    default = palitorch.default_model_path()
    adapt(HF.from_pretrained(default).eval(), tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj"])
    edit_config(tmp_path / "lora", base_model_name_or_path=None)
    img = image()
    want = palitorch.load(default, adapter=tmp_path / "lora").score(img, "caption en", "a dog").logprobs
    pipe = palitorch.load(adapter=tmp_path / "lora")
    assert pipe.path == default and pipe.score(img, "caption en", "a dog").logprobs == want


def test_a_lora_run_from_a_hub_id_names_its_base_by_the_id_and_commit(hub, tmp_path):
    """What PEFT writes for a base loaded by id (the id, not this machine's cache folder), with the commit the run
    started from as PEFT's `revision`: peft's AutoPeftModel, offline, loads that commit's snapshot, as palitorch
    does."""
    from peft import AutoPeftModel

    from palitorch.checkpoint import load_model
    from palitorch.train import lora

    server, cache = hub
    src = tmp_path / "src"
    shutil.copytree(palitorch.default_model_path(), src)
    server.add("me/tiny", C1, src)
    snapshot = fetch(hub, "me/tiny")
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-5
    (src / "config.json").write_text(json.dumps(config))
    server.add("me/tiny", C2, src)  # main moves on after the run started (a commit of its own)
    model = load_model(snapshot)
    lora.apply(model, ["language_model.layers.0.attn.q_proj"], rank=2, alpha=4.0, dropout=0.0, seed=0)
    lora.save_peft(model, tmp_path / "peft", base=str(snapshot))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("me/tiny", C1)
    fetch(hub, "me/tiny")
    peft = AutoPeftModel.from_pretrained(tmp_path / "peft", cache_dir=cache, local_files_only=True)
    assert peft.get_base_model().config.text_config.rms_norm_eps == 1e-6  # C1's, not main's
    assert palitorch.load(adapter=tmp_path / "peft").path == snapshot == cached(hub, "me/tiny", C1)
    lora.save_peft(model, tmp_path / "peft-folder", base=str(src))  # a folder stays a folder
    config = json.loads((tmp_path / "peft-folder" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(src) and config.get("revision") is None
