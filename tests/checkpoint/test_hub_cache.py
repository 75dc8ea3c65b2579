"""Hub ids read from the local Hugging Face cache (`palitorch.load("google/paligemma2-3b-pt-224")`, `--model ID`):
the cache is laid out here as huggingface_hub lays it out (blobs named by their hash, snapshot files linking to
them, refs naming commits), and huggingface_hub itself, offline, is the reference for which folder a Hub id and
revision name and for where the cache is."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from run_cli import cli

import palitorch
from palitorch.checkpoint.hub import hub_cache
from palitorch.errors import CheckpointError, InputError

REPO = "google/paligemma-tiny"
MAIN, OLD = "a" * 40, "0123456789abcdef" * 2 + "01234567"


def add_snapshot(cache: Path, repo: str, commit: str, source: Path, refs=("main",)) -> Path:
    """Put `source`'s files into the cache as commit `commit` of `repo`, named by the branches/tags `refs`."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for f in sorted(source.iterdir()):
        if f.is_file():
            blob = hashlib.sha256(f.read_bytes()).hexdigest()
            if not (storage / "blobs" / blob).exists():
                shutil.copyfile(f, storage / "blobs" / blob)
            os.symlink(Path("..", "..", "blobs", blob), snapshot / f.name)  # relative, as huggingface_hub links
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # (no newline, as huggingface_hub writes it)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache in HF_HUB_CACHE; the working folder holds no folder named like a Hub id."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    return cache


def huggingface_hub_snapshot(cache: Path, repo: str, revision=None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True))


def test_a_cached_hub_id_loads_the_snapshot_huggingface_hub_names(cache):
    default = palitorch.default_model_path()
    add_snapshot(cache, REPO, MAIN, default, refs=("main", "v1"))
    pipe = palitorch.load(REPO)
    assert pipe.path == huggingface_hub_snapshot(cache, REPO) == cache / "models--google--paligemma-tiny" / \
        "snapshots" / MAIN
    image = Path(palitorch.__file__).parent / "assets" / "easyvqa_test_7.png"
    want = palitorch.load(default).generate(image, "answer en what is the green shape?")
    got = pipe.generate(image, "answer en what is the green shape?")
    assert (got.text, got.token_ids, got.logprobs) == (want.text, want.token_ids, want.logprobs)
    assert palitorch.load(REPO, revision="v1").path == huggingface_hub_snapshot(cache, REPO, "v1")
    assert palitorch.load(REPO, revision=MAIN).path == huggingface_hub_snapshot(cache, REPO, MAIN)


def test_a_revision_picks_a_branch_a_tag_a_pull_request_or_a_commit(cache, tmp_path):
    """Two commits, each with its own config: main, a tag and refs/pr/1 name the new one, the old one is read by
    its hash only; each resolves to huggingface_hub's folder."""
    src = tmp_path / "src"
    shutil.copytree(palitorch.default_model_path(), src)
    old = add_snapshot(cache, REPO, OLD, src, refs=())
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-5  # a new commit: a changed config.json (a blob of its own)
    (src / "config.json").write_text(json.dumps(config))
    new = add_snapshot(cache, REPO, MAIN, src, refs=("main", "v2", "refs/pr/1"))
    for revision, folder in ((None, new), ("main", new), ("v2", new), ("refs/pr/1", new), (OLD, old), (MAIN, new)):
        assert palitorch.load(REPO, revision=revision).path == folder == \
            huggingface_hub_snapshot(cache, REPO, revision), revision
    assert palitorch.load(REPO).cfg.text.rms_norm_eps == 1e-5
    assert palitorch.load(REPO, revision=OLD).cfg.text.rms_norm_eps == 1e-6


def test_what_the_cache_lacks_is_one_line_saying_how_to_fetch_it(cache):
    with pytest.raises(CheckpointError, match=rf"'google/paligemma-3b-pt-224' is neither a folder nor in the Hugging "
                                              rf"Face cache \({cache}\); palitorch does not download: fetch it with "
                                              r"`hf download google/paligemma-3b-pt-224` .*--local-dir DIR"):
        palitorch.load("google/paligemma-3b-pt-224")
    add_snapshot(cache, REPO, MAIN, palitorch.default_model_path(), refs=("main", "v1"))
    with pytest.raises(CheckpointError, match=r"holds 'google/paligemma-tiny' but not its revision 'v9' \(main, v1; "
                                              r"commits aaaaaaaaaaaa\): fetch it with `hf download "
                                              r"google/paligemma-tiny --revision v9`"):
        palitorch.load(REPO, revision="v9")
    with pytest.raises(CheckpointError, match="but not its revision '" + "b" * 40):
        palitorch.load(REPO, revision="b" * 40)  # a commit hash that is not cached
    (cache / "models--google--paligemma-tiny" / "refs" / "main").write_text("c" * 40)  # a ref without its snapshot
    with pytest.raises(CheckpointError, match=f"has no files of 'google/paligemma-tiny' at 'main' \\(commit "
                                              f"{'c' * 40}; .*: fetch them with `hf download google/paligemma-tiny`"):
        palitorch.load(REPO)
    with pytest.raises(InputError, match="revision must be a branch, tag or commit"):
        palitorch.load(REPO, revision="")


@pytest.mark.parametrize("kind", ["dataset", "space"])
def test_a_cached_dataset_or_space_is_named_as_not_a_model(cache, kind):
    """The cache keeps datasets and spaces beside the models (named as huggingface_hub names them): an id that is one
    of them is said to be so, not to be missing from the cache."""
    from huggingface_hub.file_download import repo_folder_name

    (cache / repo_folder_name(repo_id="HuggingFaceM4/VQAv2", repo_type=kind) / "snapshots" / ("a" * 40)).mkdir(
        parents=True)
    with pytest.raises(CheckpointError, match=rf"^'HuggingFaceM4/VQAv2' is a {kind} in the Hugging Face cache, not a "
                                              r"model: give a PaliGemma model's id \(google/paligemma2-3b-pt-224\)"):
        palitorch.load("HuggingFaceM4/VQAv2")


def test_a_partly_downloaded_snapshot_names_the_file_it_lacks(cache, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(palitorch.default_model_path(), src)
    (src / "model.safetensors").unlink()
    add_snapshot(cache, REPO, MAIN, src)
    with pytest.raises(CheckpointError, match=f"{MAIN}.*(no|model.safetensors)"):
        palitorch.load(REPO)


def test_a_folder_here_wins_over_the_cache_and_takes_no_revision(cache, tmp_path):
    add_snapshot(cache, REPO, MAIN, palitorch.default_model_path())
    (tmp_path / "google").mkdir()
    shutil.copytree(palitorch.default_model_path(), tmp_path / "google" / "paligemma-tiny")
    assert palitorch.load(REPO).path == Path(REPO)  # as transformers: a local folder of that name first
    with pytest.raises(CheckpointError, match="revision 'v1' applies to a Hub id .* is a folder"):
        palitorch.load(REPO, revision="v1")
    with pytest.raises(CheckpointError, match="revision 'v1' applies to a Hub id .* is a path"):
        palitorch.load(str(tmp_path / "nowhere"), revision="v1")


@pytest.mark.parametrize("env", [
    {},
    {"XDG_CACHE_HOME": "/x/cache"},
    {"XDG_CACHE_HOME": "/x/cache", "HF_HOME": "~/hf"},
    {"HF_HOME": "$PALITORCH_TEST_ROOT/hf"},
    {"HF_HOME": "$PALITORCH_TEST_TILDE/hf", "PALITORCH_TEST_TILDE": "~/t"},  # expanded, then "~" expanded too
    {"HF_HOME": "/h", "HUGGINGFACE_HUB_CACHE": "/legacy"},
    {"HF_HOME": "/h", "HUGGINGFACE_HUB_CACHE": "/legacy", "HF_HUB_CACHE": "~/new"},
    {"HF_HUB_CACHE": ""},
])
def test_the_cache_folder_is_where_huggingface_hub_looks(env, tmp_path):
    names = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")
    run_env = {k: v for k, v in os.environ.items() if k not in names} | env | \
        {"HOME": str(tmp_path), "PALITORCH_TEST_ROOT": "/root-var"}
    code = ("from huggingface_hub import constants\nfrom palitorch.checkpoint.hub import hub_cache\n"
            "print(constants.HF_HUB_CACHE)\nprint(hub_cache())")
    out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, check=True)
    theirs, ours = out.stdout.splitlines()
    assert Path(theirs) == Path(ours)


def test_the_default_cache_is_under_home(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache() == tmp_path / ".cache" / "huggingface" / "hub"


def test_the_command_line_reads_cached_ids_and_revisions(cache, tmp_path, capsys):
    from palitorch.cli.batch import model_record
    from palitorch.cli.serve import model_name

    snapshot = add_snapshot(cache, REPO, MAIN, palitorch.default_model_path(), refs=("main", "v1"))
    image = Path(palitorch.__file__).parent / "assets" / "easyvqa_test_7.png"
    rc, out, err = cli(["run", "--model", REPO, "--revision", "v1", "--image", image, "--prompt",
                        "answer en what is the green shape?", "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["text"] == palitorch.load().generate(image, "answer en what is the green shape?").text
    rc, out, err = cli(["run", "--revision", "v1", "--image", image, "--prompt", "caption en"], capsys)
    assert rc == 2 and "--revision applies to --model given as a Hub id" in err and "Traceback" not in err
    rc, out, err = cli(["run", "--model", "google/not-cached", "--image", image, "--prompt", "caption en"], capsys)
    assert rc == 2 and "is neither a folder nor in the Hugging Face cache" in err and "Traceback" not in err

    class Args:
        model, revision, adapter, served_model_name = REPO, None, None, None

    assert model_name(Args) == REPO  # served under its id (vLLM's naming), not the snapshot's commit
    assert model_record(Args, "float32")["path"] == str(snapshot.resolve())  # a result names the commit it came from


def test_a_cached_adapter_and_a_cached_base_merge_and_train(cache, pg1, tmp_path, capsys):
    """An adapter and its base model both given by Hub id: to load, to `palitorch merge`, and a fine-tuning run's
    [model] init."""
    from test_adapter import adapt, image
    from transformers import PaliGemmaForConditionalGeneration as HF

    from palitorch.train.config import load_config

    folder, _ = pg1
    adapt(HF.from_pretrained(folder).eval(), tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    add_snapshot(cache, "me/pg1", MAIN, folder)
    add_snapshot(cache, "me/pg1-lora", OLD, tmp_path / "a")
    img = image()
    want = palitorch.load(folder, adapter=tmp_path / "a").score(img, "caption en", "a dog").logprobs
    assert palitorch.load("me/pg1", adapter="me/pg1-lora").score(img, "caption en", "a dog").logprobs == want
    rc, _, err = cli(["merge", "--model", "me/pg1", "--adapter", "me/pg1-lora", "--out", tmp_path / "m"], capsys)
    assert rc == 0, err
    assert palitorch.load(tmp_path / "m").score(img, "caption en", "a dog").logprobs == want
    cfg = load_config(None, ["--model.init", "me/pg1", "--data.train", str(tmp_path / "t.jsonl"),
                             "--train.out", str(tmp_path / "run")])
    assert Path(cfg.model.init) == cache / "models--me--pg1" / "snapshots" / MAIN


def test_a_hub_id_is_what_huggingface_hub_takes_for_one(cache):
    """"owner/name" as huggingface_hub's validate_repo_id takes it (either part may begin or end with "_"; neither
    may begin or end with "." or "-", hold "--" or "..", be over 96 characters; no ".git" at the end): anything else
    is a path. (Names of no folder here: a folder of any name wins.)"""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from palitorch.checkpoint.hub import is_hub_id

    names = ["google/paligemma2-3b-pt-224", "A1/B_2.3", "_me/model", "me/_model", "me/model_", "me/model.",
             "me/model-", "me/.model", "-me/model", "me--you/model", "me/a..b", "me/model.git", "./model", "../model",
             "~/model", "me/" + "m" * 96, "me/" + "m" * 97, "me/a/b", "me", "me/", "me model/x"]
    for name in names:
        try:
            validate_repo_id(name)
            theirs = "/" in name  # (a bare name is a Hub id to huggingface_hub, a folder here)
        except HFValidationError:
            theirs = False
        assert is_hub_id(name) == theirs, name
    # A bare name is a (legacy) Hub id where the cache holds that repository, if huggingface_hub takes the name
    for name in ["gpt2", "_x", "x_", "a.b", "a..b", "a--b", "x.git", "-a", "a-", "m" * 97]:
        (cache / f"models--{name}").mkdir()
        try:
            validate_repo_id(name)
            theirs = True
        except HFValidationError:
            theirs = False
        assert is_hub_id(name) == theirs, name


def test_a_ref_that_names_no_snapshot_of_its_own_is_refused(cache):
    """A ref is a commit's name: one that climbs out of the snapshots folder ("..", a path, an absolute one) or is a
    folder of refs is no revision (it is not followed to another repository's files, nor read as a file); one that
    ends in a newline (a ref written by hand) still names its commit."""
    from palitorch.checkpoint.hub import find_checkpoint

    snapshot = add_snapshot(cache, REPO, MAIN, palitorch.default_model_path(), refs=("main", "refs/pr/1"))
    other = add_snapshot(cache, "google/other", OLD, palitorch.default_model_path())
    main = cache / "models--google--paligemma-tiny" / "refs" / "main"
    main.write_text(MAIN + "\n")
    assert find_checkpoint(REPO) == snapshot
    for ref in ("..", ".", f"../../models--google--other/snapshots/{OLD}", str(other), ""):
        main.write_text(ref)
        with pytest.raises(CheckpointError, match=r"holds 'google/paligemma-tiny' but not its revision 'main'"):
            find_checkpoint(REPO)
    for revision in ("refs", "refs/pr"):  # folders under refs/
        with pytest.raises(CheckpointError, match=f"but not its revision '{revision}'"):
            find_checkpoint(REPO, revision)


def test_a_missing_revision_names_the_branches_tags_and_first_commits_cached(cache, tmp_path):
    from palitorch.checkpoint.hub import find_checkpoint

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    for digit in "4321":
        add_snapshot(cache, REPO, digit * 40, src, refs=())
    with pytest.raises(CheckpointError, match=r"not its revision 'main' \(no branch or tag; commits 111111111111, "
                                              r"222222222222, 333333333333 \.\.\.\): fetch it with `hf download "
                                              r"google/paligemma-tiny`, or give a cached revision$"):
        find_checkpoint(REPO)
    refs = cache / "models--google--paligemma-tiny" / "refs"
    for ref in ("v1", "main", "refs/pr/1"):
        (refs / ref).parent.mkdir(parents=True, exist_ok=True)
        (refs / ref).write_text("5" * 40)
    with pytest.raises(CheckpointError, match=r"\(main, refs/pr/1, v1; commits 111111111111, 222222222222, "
                                              r"333333333333 \.\.\.\)"):
        find_checkpoint(REPO, "v2")
