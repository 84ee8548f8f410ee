"""A fake Hugging Face Hub for tests: the few HTTP endpoints ``HfApi.create_repo`` and ``HfApi.upload_folder``
call (huggingface_hub 2.x), as a Starlette app to serve with ``_serving.serving`` and point HF_ENDPOINT at.

- ``POST /api/repos/create``: a model repo with one branch, ``main``; 409 (with its url) if it exists,
  which create_repo's ``exist_ok`` takes as found.
- ``POST /api/validate-yaml``: the README.md card's metadata header, checked before anything is uploaded; as
  the real hub does, a ``base_model`` or ``datasets`` entry that is not a repo id (a local path) is a 400.
- ``POST /api/models/{owner}/{name}/preupload/{revision}``: every file goes the "regular" way (base64 inside
  the commit), so no LFS or Xet storage is needed: the client uploads through Xet only what the hub marks "lfs".
- ``POST /api/models/{owner}/{name}/commit/{revision}``: the NDJSON commit; each ``file`` line's content is
  stored under ``root/<owner>/<name>/<path>``.

What the real hub would refuse is refused here too: a request without a bearer token (401), a repo that was
not created (404 RepoNotFound), a revision that is not a branch (404 RevisionNotFound), a commit whose first
line is not the header with a summary, an LFS reference the hub never asked for, a path leaving the repo
(400). ``fail_commit=<status>`` answers every commit with that status (500 with ``Retry-After: 0``, so
huggingface_hub's retries wait one second each, not up to eight).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


@dataclass
class Commit:
    """One commit the fake hub accepted."""

    repo_id: str
    branch: str
    summary: str
    oid: str
    files: list[str]


@dataclass
class FakeHub:
    """The hub's state: its repos (id -> visibility), the commits it took, the commit requests it answered."""

    root: Path
    fail_commit: int | None = None
    repos: dict[str, str] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)
    commit_attempts: int = 0

    def app(self) -> Starlette:
        repo = "/api/models/{owner}/{name}"
        return Starlette(
            routes=[
                Route("/api/repos/create", self.create_repo, methods=["POST"]),
                Route("/api/validate-yaml", validate_yaml, methods=["POST"]),
                Route(repo + "/preupload/{revision}", self.preupload, methods=["POST"]),
                Route(repo + "/commit/{revision}", self.commit, methods=["POST"]),
            ]
        )

    def files(self, repo_id: str) -> dict[str, bytes]:
        """Every file the repo holds, by its path in the repo."""
        base = self.root / repo_id
        return {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}

    async def create_repo(self, request: Request) -> JSONResponse:
        if (refused := _unauthorised(request)) is not None:
            return refused
        body = await request.json()
        if body.get("type", "model") != "model":
            return _error(400, "only model repos here")
        repo_id = f"{body['organization']}/{body['name']}"
        url = f"{_base(request)}/{repo_id}"
        if repo_id in self.repos:  # the real hub's 409 names the repo's url too: create_repo(exist_ok) reads it
            return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
        self.repos[repo_id] = body.get("visibility", "public")
        return JSONResponse({"url": url, "name": repo_id})

    async def preupload(self, request: Request) -> JSONResponse:
        if (refused := self._refuse(request)) is not None:
            return refused
        files = (await request.json())["files"]
        return JSONResponse(
            {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        )

    async def commit(self, request: Request) -> JSONResponse:
        if (refused := self._refuse(request)) is not None:
            return refused
        self.commit_attempts += 1
        if self.fail_commit is not None:
            headers = {"Retry-After": "0"} if self.fail_commit >= 500 else None
            return _error(self.fail_commit, "the fake hub refuses this commit", headers)
        if request.headers.get("content-type") != "application/x-ndjson":
            return _error(400, "a commit is NDJSON")
        lines = [json.loads(line) for line in (await request.body()).splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header" or not lines[0]["value"].get("summary"):
            return _error(400, "a commit starts with its header line, which has a summary")
        contents = {}
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                return _error(400, f"not offered by this hub: {line['key']}")
            path = PurePosixPath(line["value"]["path"])
            if path.is_absolute() or ".." in path.parts:
                return _error(400, f"path outside the repo: {path}")
            contents[path.as_posix()] = base64.b64decode(line["value"]["content"])
        repo_id, branch = _repo_id(request), request.path_params["revision"]
        for path, content in contents.items():  # stored once the whole commit is read: a commit is atomic
            target = self.root / repo_id / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        oid = hashlib.sha1(f"{len(self.commits)}:{sorted(contents)}".encode()).hexdigest()
        self.commits.append(Commit(repo_id, branch, lines[0]["value"]["summary"], oid, sorted(contents)))
        url = f"{_base(request)}/{repo_id}/commit/{oid}"
        return JSONResponse({"commitUrl": url, "commitOid": oid, "success": True})

    def _refuse(self, request: Request) -> JSONResponse | None:
        """The real hub's answer to a request on a repo it cannot write: no token, no repo, no such branch."""
        if (refused := _unauthorised(request)) is not None:
            return refused
        if _repo_id(request) not in self.repos:
            return _error(404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
        if request.path_params["revision"] != "main":
            return _error(404, "Revision not found", {"X-Error-Code": "RevisionNotFound"})
        return None


async def validate_yaml(request: Request) -> JSONResponse:
    """The card header's repo references, as the hub checks them; ``warnings`` is read even on success."""
    header = re.match(r"---\n(.*?)\n---\n", (await request.json())["content"], re.DOTALL)
    metadata = (yaml.safe_load(header.group(1)) if header else None) or {}
    errors = []
    for key in ("base_model", "datasets"):
        values = metadata.get(key) or []
        for value in [values] if isinstance(values, str) else values:
            try:
                validate_repo_id(value)
            except HFValidationError:
                errors.append({"message": f'"{key}" with value "{value}" is not valid. Use a repo id.'})
    return JSONResponse({"errors": errors, "warnings": []}, status_code=400 if errors else 200)


def _repo_id(request: Request) -> str:
    return f"{request.path_params['owner']}/{request.path_params['name']}"


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _unauthorised(request: Request) -> JSONResponse | None:
    if not request.headers.get("authorization", "").startswith("Bearer "):
        return _error(401, "Invalid credentials in Authorization header")
    return None


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)
