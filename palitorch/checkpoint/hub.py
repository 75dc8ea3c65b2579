"""Checkpoints already in the local Hugging Face cache, found by their Hub id; palitorch never downloads.

`hf download google/paligemma2-3b-pt-224` (or transformers' `from_pretrained`) stores a repository as

    $HF_HUB_CACHE/models--google--paligemma2-3b-pt-224/
        refs/main                      the commit that the branch "main" pointed to, as text
        snapshots/<commit>/config.json ...   the files of that commit (links into blobs/)
        blobs/<hash>                   the files' contents

and `palitorch.load("google/paligemma2-3b-pt-224")` reads the snapshot folder as it would any checkpoint folder.
The cache folder is found as huggingface_hub finds it: $HF_HUB_CACHE, else $HUGGINGFACE_HUB_CACHE, else
$HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub. A revision is a branch or tag
(looked up in refs/) or a commit hash (a snapshot's own name), "main" by default, as in huggingface_hub's
`snapshot_download(local_files_only=True)`, or the first 7 or more digits of a cached commit's hash. A snapshot that
lacks a file palitorch reads (a download of some files only, an interrupted one, a deleted blob) is refused with
the files it lacks and the `hf download` that fetches them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from palitorch.errors import CheckpointError

# "owner/name" as huggingface_hub's validate_repo_id takes a repository id: each part 1 to 96 of A-Z a-z 0-9 _ . -,
# beginning and ending with none of ". -"; no "--" or ".." (the cache's folder names would be ambiguous), no ".git" end
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"(?!.*(?:--|\.\.))(?!.*\.git$){_PART}/{_PART}")
_LEGACY = re.compile(rf"(?!.*(?:--|\.\.))(?!.*\.git$){_PART}")  # a repository of the Hub's first years, no owner
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHORT = re.compile(r"[0-9a-f]{7,39}")  # a commit hash as git and the Hub abbreviate it


def hub_cache() -> Path:
    """The Hugging Face cache folder, from the environment exactly as huggingface_hub reads it (a variable set to
    "" counts as set)."""
    def expand(path: str) -> str:
        return os.path.expandvars(os.path.expanduser(path))

    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    home = expand(os.environ.get("HF_HOME", os.path.join(xdg, "huggingface")))
    legacy = os.environ.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub"))
    return Path(expand(os.environ.get("HF_HUB_CACHE", legacy)))


def repo_folder(repo_id: str) -> Path:
    """Where the cache keeps a model repository: models--owner--name (absolute, as huggingface_hub names it)."""
    return hub_cache().resolve() / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The cached snapshot folder of `repo_id` at `revision` (default "main"), or a one-line CheckpointError saying
    what the cache lacks and how to fetch it. A short commit hash (7 or more hex digits) names the one cached
    commit it begins, as git and the Hub read it."""
    revision = revision or "main"
    repo = repo_folder(repo_id)
    fetch = f"`hf download {repo_id}{'' if revision == 'main' else f' --revision {revision}'}`"
    if not repo.is_dir():
        for kind in ("datasets", "spaces"):  # (the cache keeps them beside the models, as datasets--owner--name)
            if (repo.parent / f"{kind}--{repo_id.replace('/', '--')}").is_dir():
                raise CheckpointError(f"{repo_id!r} is a {kind[:-1]} in the Hugging Face cache, not a model: give a "
                                      "PaliGemma model's id (google/paligemma2-3b-pt-224) or folder")
        raise CheckpointError(f"{repo_id!r} is neither a folder nor in the Hugging Face cache ({hub_cache()}); "
                              f"palitorch does not download: fetch it with {fetch} (into that cache), or with "
                              f"`hf download {repo_id} --local-dir DIR` and pass DIR")
    held = sorted(p.name for p in (repo / "snapshots").glob("*") if p.is_dir())
    commit = None
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8", errors="replace").strip()
    elif _COMMIT.fullmatch(revision):
        commit = revision
    elif _SHORT.fullmatch(revision):
        begun = [h for h in held if h.startswith(revision)]
        if len(begun) > 1:
            raise CheckpointError(f"revision {revision!r} begins {len(begun)} cached commits of {repo_id!r} "
                                  f"({', '.join(h[:12] for h in begun[:3])}): give more of the hash")
        commit = begun[0] if begun else None
    snapshot = repo / "snapshots" / commit if commit and "/" not in commit and commit not in (".", "..") else None
    if snapshot is not None and not snapshot.is_dir() and ref.is_file():
        raise CheckpointError(f"the Hugging Face cache has no files of {repo_id!r} at {revision!r} (commit "
                              f"{commit}; a download that fetched none, or a deleted snapshot): fetch them with "
                              f"{fetch}")
    if snapshot is None or not snapshot.is_dir():
        refs = sorted(p.relative_to(repo / "refs").as_posix() for p in (repo / "refs").rglob("*") if p.is_file())
        have = ", ".join(refs) if refs else "no branch or tag"
        if held:
            have += f"; commits {', '.join(h[:12] for h in held[:3])}{' ...' if len(held) > 3 else ''}"
        raise CheckpointError(f"the Hugging Face cache holds {repo_id!r} but not its revision {revision!r} "
                              f"({have}): fetch it with {fetch}, or give a cached revision")
    if lacking := missing_files(repo, snapshot):
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        raise CheckpointError(f"the cached snapshot of {repo_id!r} at {revision!r} (commit {snapshot.name}) "
                              f"lacks {', '.join(lacking[:3])}{more}: fetch {'it' if len(lacking) == 1 else 'them'} "
                              f"with {fetch}")
    return snapshot


def missing_files(repo: Path, snapshot: Path) -> list[str]:
    """The files palitorch reads that a cached snapshot lacks: a link whose blob is gone, and of a checkpoint
    config.json, tokenizer.json and the weights (model.safetensors, or the shards its index lists), of a PEFT adapter
    adapter_model.safetensors, unless the repository has no such file (huggingface_hub's tree listing of the
    commit, trees/<commit>.json, or .no_exist/<commit>/, where a download records a file the repository lacks)."""
    gone = sorted(p.relative_to(snapshot).as_posix() + " (its blob was deleted)" for p in snapshot.rglob("*")
                  if p.is_symlink() and not p.exists())
    listing = None
    try:
        listing = json.loads((repo / "trees" / f"{snapshot.name}.json").read_bytes())["files"].keys()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass

    def here(name: str) -> bool:  # (a link to a deleted blob too: `gone` names it)
        return (snapshot / name).exists() or (snapshot / name).is_symlink()

    def lacks(name: str) -> bool:
        in_repo = (listing is None or name in listing) and not (repo / ".no_exist" / snapshot.name / name).exists()
        return in_repo and not here(name)

    if (snapshot / "adapter_config.json").is_file():
        return gone + [n for n in ("adapter_model.safetensors",) if lacks(n)]
    needed = ["config.json", "tokenizer.json"]
    single, index = "model.safetensors", "model.safetensors.index.json"
    if here(single):
        pass
    elif (snapshot / index).is_file():  # a sharded checkpoint: its shards
        try:
            shards = json.loads((snapshot / index).read_bytes())["weight_map"].values()
            needed += sorted({n for n in shards if isinstance(n, str) and ".." not in Path(n).parts})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # (an index that is no index: reading the checkpoint says so)
    else:  # neither: the one file, unless the repository is known to hold only an index
        needed.append(single if lacks(single) else index)
    return gone + [n for n in needed if not Path(n).is_absolute() and lacks(n)]


def snapshot_id(folder) -> tuple[str, str] | None:
    """(Hub id, commit) of a snapshot folder of the Hugging Face cache (`cached_snapshot`'s answer), else None."""
    folder = Path(folder).expanduser().absolute()
    repo = folder.parent.parent
    repo_id = repo.name.removeprefix("models--").replace("--", "/")
    if folder.parent.name != "snapshots" or repo.parent != hub_cache().resolve() or not repo.name.startswith(
            "models--") or not (HUB_ID.fullmatch(repo_id) or _LEGACY.fullmatch(repo_id)) or not _COMMIT.fullmatch(
            folder.name):
        return None
    return repo_id, folder.name


def is_hub_id(text: str) -> bool:
    """Whether `text` names a Hub repository ("owner/name") that is no folder here (a folder of that name wins); a
    legacy id without an owner ("gpt2") when the cache holds it (as transformers reads one), else it is a folder
    name."""
    if Path(text).expanduser().exists():
        return False
    return HUB_ID.fullmatch(text) is not None or _LEGACY.fullmatch(text) is not None and repo_folder(text).is_dir()


def find_checkpoint(text: str, revision: str | None = None) -> Path:
    """A checkpoint folder named by `text`: the folder itself ("~" expanded) when it exists, else, for a Hub id
    ("google/paligemma2-3b-pt-224"), its snapshot in the Hugging Face cache. `revision` applies to Hub ids only."""
    folder = Path(text).expanduser()
    if not is_hub_id(text):
        if revision is not None:
            raise CheckpointError(f"revision {revision!r} applies to a Hub id read from the Hugging Face cache, and "
                                  f"{text!r} is a {'folder' if folder.exists() else 'path'}: leave the revision out")
        return folder
    return cached_snapshot(text, revision)
