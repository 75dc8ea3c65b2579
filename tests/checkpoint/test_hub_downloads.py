"""Hub ids read from caches that huggingface_hub itself wrote, by downloading from a stand-in Hub (hub_server.py):
short commit hashes, a relative HF_HUB_CACHE, and snapshots a download left incomplete (some files fetched, a shard
skipped, a blob deleted or interrupted, nothing fetched but `.no_exist`), each named in one line with the `hf
download` that completes it, which then loads. huggingface_hub, offline, is the reference for the folders."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from hub_server import fetch, stand_in_hub
from huggingface_hub.errors import EntryNotFoundError
from run_cli import cli

import palitorch
from palitorch.checkpoint.hub import find_checkpoint
from palitorch.errors import CheckpointError

REPO = "google/paligemma-tiny"
C1, C2 = "abcdef01" * 5, "abcdef02" * 5


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with stand_in_hub(tmp_path, monkeypatch) as h:
        yield h


def fetch_file(hub, repo, name, revision=None):
    """huggingface_hub's hf_hub_download of one file (as transformers' AutoConfig fetches config.json)."""
    from huggingface_hub import hf_hub_download

    server, cache = hub
    return hf_hub_download(repo, name, revision=revision, cache_dir=cache, endpoint=server.url)


def cached(hub, repo, revision=None, **kw) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision, cache_dir=hub[1], local_files_only=True, **kw))


def sharded(tmp_path) -> Path:
    from palitorch.checkpoint import load_model, save_model
    from palitorch.train.build import tokenizer_files

    default = palitorch.default_model_path()
    save_model(load_model(default), tmp_path / "sharded", extra_files=tokenizer_files(default),
               max_shard_bytes=1 << 20)
    return tmp_path / "sharded"


def test_a_short_commit_hash_reads_the_cached_commit_it_begins(hub, tmp_path):
    """As git and the Hub read a revision: the error that lists cached commits lists them by such prefixes."""
    server, cache = hub
    src = tmp_path / "src"
    shutil.copytree(palitorch.default_model_path(), src)
    server.add(REPO, C1, src, refs=("v1",))
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-5
    (src / "config.json").write_text(json.dumps(config))
    server.add(REPO, C2, src, refs=("main",))
    fetch(hub, REPO), fetch(hub, REPO, "v1")
    assert palitorch.load(REPO, revision=C1[:8]).path == cached(hub, REPO, C1)
    assert palitorch.load(REPO, revision=C1[:8]).cfg.text.rms_norm_eps == 1e-6
    with pytest.raises(CheckpointError, match="not its revision 'v9' .*commits (abcdef01abcd), (abcdef02abcd)") as e:
        find_checkpoint(REPO, "v9")
    for listed in e.value.args[0].split("commits ")[1].split(")")[0].split(", "):
        assert find_checkpoint(REPO, listed).name.startswith(listed)  # what the error offers is a revision
    with pytest.raises(CheckpointError, match=r"revision 'abcdef0' begins 2 cached commits .* give more of the hash"):
        find_checkpoint(REPO, "abcdef0")
    with pytest.raises(CheckpointError, match="not its revision '0123456'"):
        find_checkpoint(REPO, "0123456")
    assert find_checkpoint(REPO, "main") == find_checkpoint(REPO, C2[:12]) == cached(hub, REPO)


def test_a_relative_cache_folder_gives_the_absolute_snapshot_huggingface_hub_gives(hub, monkeypatch):
    server, cache = hub
    server.add(REPO, C1, palitorch.default_model_path())
    fetch(hub, REPO)
    monkeypatch.setenv("HF_HUB_CACHE", "hub")  # (the working folder is the cache's parent)
    want = cached((server, "hub"), REPO)
    assert want.is_absolute() and find_checkpoint(REPO) == palitorch.load(REPO).path == want


def test_an_incomplete_snapshot_names_what_it_lacks_and_the_download_that_completes_it(hub, tmp_path, capsys):
    server, cache = hub
    default, shards = palitorch.default_model_path(), sharded(tmp_path)
    for repo in ("me/config-only", "me/deleted-blob", "me/interrupted", "me/none-fetched", "me/pr"):
        server.add(repo, C1, default, refs=("main", "refs/pr/3"))
    server.add("me/sharded", C2, shards)
    server.add("me/sharded-config-only", C2, shards)
    fetch_file(hub, "me/config-only", "config.json")
    skipped = sorted(shards.glob("model-*.safetensors"))[1].name
    fetch(hub, "me/sharded", ignore_patterns=[skipped])
    fetch_file(hub, "me/sharded-config-only", "config.json")
    with pytest.raises(EntryNotFoundError):  # transformers asks for the one file first: the cache records its absence
        fetch_file(hub, "me/sharded-config-only", "model.safetensors")
    deleted = fetch(hub, "me/deleted-blob")
    os.remove(os.path.realpath(deleted / "model.safetensors"))
    snapshot = fetch(hub, "me/interrupted")  # as a download stopped midway leaves it: a blob.incomplete, no link
    blob = Path(os.path.realpath(snapshot / "model.safetensors"))
    (snapshot / "model.safetensors").unlink()
    blob.rename(blob.with_name(blob.name + ".incomplete"))
    with pytest.raises(EntryNotFoundError):  # a file the repository lacks: refs/main and .no_exist, no snapshot
        fetch_file(hub, "me/none-fetched", "adapter_config.json")
    fetch_file(hub, "me/pr", "config.json", "refs/pr/3")
    at = f"at 'main' (commit {C1}) lacks"
    cases = {
        "me/config-only": f"{at} tokenizer.json, model.safetensors: fetch them with `hf download me/config-only`",
        "me/sharded": f"at 'main' (commit {C2}) lacks {skipped}: fetch it with `hf download me/sharded`",
        "me/sharded-config-only": "lacks tokenizer.json, model.safetensors.index.json: fetch them with",
        "me/deleted-blob": f"{at} model.safetensors (its blob was deleted): fetch it with "
                           "`hf download me/deleted-blob`",
        "me/interrupted": f"{at} model.safetensors: fetch it with `hf download me/interrupted`",
        "me/none-fetched": f"the Hugging Face cache has no files of 'me/none-fetched' at 'main' (commit {C1}; "
                           "a download that fetched none, or a deleted snapshot): fetch them with "
                           "`hf download me/none-fetched`",
    }
    for repo, message in cases.items():
        start = "" if repo == "me/none-fetched" else f"the cached snapshot of '{repo}' "
        with pytest.raises(CheckpointError, match=f"^{re.escape(start)}.*{re.escape(message)}"):
            palitorch.load(repo)
    with pytest.raises(CheckpointError, match=re.escape(f"at 'refs/pr/3' (commit {C1}) lacks tokenizer.json, "
                                                      "model.safetensors: fetch them with `hf download me/pr "
                                                      "--revision refs/pr/3`")):
        palitorch.load("me/pr", revision="refs/pr/3")
    # (huggingface_hub offline: IncompleteSnapshotError); the snapshot given as a folder: one line, no FileNotFoundError
    with pytest.raises(CheckpointError, match=r"model.safetensors is a link to a file that is gone \(../../blobs/"):
        palitorch.load(deleted)
    image = Path(palitorch.__file__).parent / "assets" / "easyvqa_test_7.png"
    capsys.readouterr()  # (the downloads' progress bars)
    rc, _, err = cli(["run", "--model", "me/config-only", "--image", image, "--prompt", "caption en"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "fetch them with `hf download me/config-only`" in err, err
    for repo in [*cases, "me/pr"]:  # what the line says to run is what makes the snapshot whole
        fetch(hub, repo, "refs/pr/3" if repo == "me/pr" else None)
        assert palitorch.load(repo, revision="refs/pr/3" if repo == "me/pr" else None).path == \
            cached(hub, repo, "refs/pr/3" if repo == "me/pr" else None)


def test_what_a_repository_does_not_hold_is_not_asked_for(hub, tmp_path):
    """A download of the files palitorch reads only (`--include "*.json" "*.safetensors"`) is whole; a sharded
    repository's snapshot needs no model.safetensors; the cache copied instead of linked (as on Windows) loads."""
    from huggingface_hub import file_download

    server, cache = hub
    files = {p.name: p.read_bytes() for p in Path(palitorch.default_model_path()).iterdir() if p.is_file()}
    server.add("me/extras", C1, files | {"README.md": b"# tiny", "flax_model.msgpack": b"\0" * 64})
    fetch(hub, "me/extras", allow_patterns=["*.json", "*.safetensors"])  # (whole to huggingface_hub given them too)
    assert palitorch.load("me/extras").path == cached(hub, "me/extras", allow_patterns=["*.json", "*.safetensors"])
    server.add("me/sharded", C2, sharded(tmp_path))
    fetch(hub, "me/sharded")
    assert palitorch.load("me/sharded").path == cached(hub, "me/sharded")
    server.add("me/copied", C1, files)
    real = file_download.are_symlinks_supported
    file_download.are_symlinks_supported = lambda *args, **kwargs: False
    try:
        fetch(hub, "me/copied")
    finally:
        file_download.are_symlinks_supported = real
    snapshot = cached(hub, "me/copied")
    assert not (snapshot / "model.safetensors").is_symlink() and palitorch.load("me/copied").path == snapshot


def test_a_legacy_id_without_an_owner_reads_the_cache_as_transformers_does(hub):
    """("gpt2"-style ids, of the Hub's first years): read when the cache holds one, else still a folder name."""
    from transformers import AutoConfig

    server, cache = hub
    server.add("paligemma-tiny", C1, palitorch.default_model_path())
    fetch(hub, "paligemma-tiny")
    config = AutoConfig.from_pretrained("paligemma-tiny", cache_dir=cache, local_files_only=True)
    assert config.model_type == "paligemma"
    assert palitorch.load("paligemma-tiny").path == cached(hub, "paligemma-tiny")
    assert find_checkpoint("paligemma-tiny", C1[:8]) == cached(hub, "paligemma-tiny")
    with pytest.raises(CheckpointError, match="checkpoint folder 'paligemma-tinyy' does not exist"):
        palitorch.load("paligemma-tinyy")  # (a folder's name mistyped is not sent to the cache)
