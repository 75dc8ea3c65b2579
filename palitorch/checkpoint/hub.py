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
`snapshot_download(local_files_only=True)`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from palitorch.errors import CheckpointError

# "owner/name" as the Hugging Face Hub spells a repository id
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")


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
    """Where the cache keeps a model repository: models--owner--name."""
    return hub_cache() / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The cached snapshot folder of `repo_id` at `revision` (default "main"), or a one-line CheckpointError saying
    what the cache lacks and how to fetch it."""
    revision = revision or "main"
    repo = repo_folder(repo_id)
    fetch = f"`hf download {repo_id}{'' if revision == 'main' else f' --revision {revision}'}`"
    if not repo.is_dir():
        raise CheckpointError(f"{repo_id!r} is neither a folder nor in the Hugging Face cache ({hub_cache()}); "
                              f"palitorch does not download: fetch it with {fetch} (into that cache), or with "
                              f"`hf download {repo_id} --local-dir DIR` and pass DIR")
    commit = None
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8", errors="replace").strip()
    elif _COMMIT.fullmatch(revision):
        commit = revision
    snapshot = repo / "snapshots" / commit if commit and "/" not in commit and commit not in (".", "..") else None
    if snapshot is None or not snapshot.is_dir():
        held = sorted(p.name for p in (repo / "snapshots").glob("*") if p.is_dir())
        refs = sorted(p.relative_to(repo / "refs").as_posix() for p in (repo / "refs").rglob("*") if p.is_file())
        have = ", ".join(refs) if refs else "no branch or tag"
        if held:
            have += f"; commits {', '.join(h[:12] for h in held[:3])}{' ...' if len(held) > 3 else ''}"
        raise CheckpointError(f"the Hugging Face cache holds {repo_id!r} but not its revision {revision!r} "
                              f"({have}): fetch it with {fetch}, or give a cached revision")
    return snapshot


def is_hub_id(text: str) -> bool:
    """Whether `text` names a Hub repository ("owner/name") that is no folder here (a folder of that name wins)."""
    return HUB_ID.fullmatch(text) is not None and not Path(text).expanduser().exists()


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
