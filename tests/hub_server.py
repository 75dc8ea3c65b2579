"""A stand-in for the Hugging Face Hub on 127.0.0.1, so that huggingface_hub's own `snapshot_download` and
`hf_hub_download` (given `endpoint=`) lay out a local cache exactly as they do from huggingface.co: blobs, snapshot
links, refs, the tree listing, `.no_exist`. It answers the routes they call: a revision's commit and file list
(/api/models/ID/revision/REV, /api/models/ID/tree/REV) and a file (/ID/resolve/REV/FILE, HEAD and GET); an ID is
"owner/name", or a legacy "name" alone."""

import hashlib
import json
import threading
import urllib.parse
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Hub:
    """`add(repo_id, commit, folder_or_files, refs)` publishes a commit; `url` is the endpoint to download from."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(*hub.route(self.path), body=False)

            def do_GET(self):
                self.answer(*hub.route(self.path), body=True)

            def answer(self, code, data, headers, body):
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo_id: str, commit: str, files, refs=("main",)) -> None:
        if isinstance(files, (str, Path)):
            files = {p.name: p.read_bytes() for p in sorted(Path(files).iterdir()) if p.is_file()}
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        repo["commits"][commit] = dict(files)
        repo["refs"].update({ref: commit for ref in refs})

    def commit(self, repo_id: str, revision: str) -> str | None:
        """A branch, tag or pull request ref, or a commit hash or the start of one (as the Hub reads them)."""
        repo = self.repos.get(repo_id, {"refs": {}, "commits": {}})
        if revision in repo["refs"]:
            return repo["refs"][revision]
        begun = [c for c in repo["commits"] if c.startswith(revision)]
        return begun[0] if len(begun) == 1 else None

    def route(self, path: str) -> tuple[int, bytes, dict]:
        parts = [urllib.parse.unquote(p) for p in urllib.parse.urlparse(path).path.strip("/").split("/")]
        n = 1 if parts[0] in self.repos or parts[:2] == ["api", "models"] and parts[2] in self.repos else 2  # segments
        if parts[:2] == ["api", "models"] and len(parts) >= 4 + n:
            repo_id, what, revision = "/".join(parts[2:2 + n]), parts[2 + n], "/".join(parts[3 + n:])
        elif len(parts) >= 3 + n and parts[n] == "resolve":
            repo_id, what, revision = "/".join(parts[:n]), "file", parts[n + 1]
        else:
            return 404, b"{}", {"X-Error-Code": "RepoNotFound"}
        commit = self.commit(repo_id, revision)
        if commit is None:
            return 404, b"{}", {"X-Error-Code": "RevisionNotFound"}
        files = self.repos[repo_id]["commits"][commit]
        if what == "revision":
            info = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": f} for f in files]}
            return 200, json.dumps(info).encode(), {"Content-Type": "application/json"}
        if what == "tree":
            tree = [{"type": "file", "path": f, "size": len(d), "oid": _oid(d)} for f, d in files.items()]
            return 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}
        name = "/".join(parts[n + 2:])
        if name not in files:
            return 404, b"{}", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}
        return 200, files[name], {"X-Repo-Commit": commit, "ETag": f'"{_oid(files[name])}"'}


def _oid(data: bytes) -> str:
    """A file's git blob id, which the Hub gives as its ETag (and the cache names its blob by)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@contextmanager
def stand_in_hub(tmp_path: Path, monkeypatch):
    """(a stand-in Hub, the cache folder it downloads into: HF_HUB_CACHE, empty); the working folder is tmp_path."""
    server = Hub()
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    try:
        yield server, cache
    finally:
        server.close()


def fetch(hub, repo, revision=None, **kw) -> Path:
    """`hf download REPO [--revision REV]`: huggingface_hub's snapshot_download into the cache."""
    from huggingface_hub import snapshot_download

    server, cache = hub
    return Path(snapshot_download(repo, revision=revision, cache_dir=cache, endpoint=server.url, **kw))
