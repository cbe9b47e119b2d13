"""Uploading a cleared publication to the Hugging Face Hub with `huggingface_hub`'s own client.

    create_repo   POST {endpoint}/api/repos/create          private unless --public
                  (the repo exists: GET /api/models/{repo} - a public repo is refused while
                  private was asked for: publishing into it would make the model public)
    create_commit POST /api/validate-yaml                    the card's metadata
                  POST /api/models/{repo}/preupload/main     regular / LFS per file
                  (LFS or Xet transfers for the files the Hub asks for)
                  POST /api/models/{repo}/commit/main        one commit, NDJSON

What is committed is exactly what the gate cleared: the folder's files are listed again and
must be the cleared ones, each one's size and SHA-256 as `huggingface_hub` computes them must
be those the secret scan read, and the operations are built from that list only (never a
folder walk of its own). The token comes from HF_TOKEN only, goes to the client as an argument
(never a login file), and is removed from any message an error carries; `http://` endpoints
are allowed on the loopback interface only, so the token never crosses a network in clear.
"""
from __future__ import annotations

import ipaddress
import os
import re
from urllib.parse import urlsplit

import bastion
from bastion.config.load import redact_text
from bastion.interop.filescan import listed_files
from bastion.interop.publish import Publication, PublishError, PublishRefused

TOKEN_ENV = "HF_TOKEN"
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
LOOPBACK_NAMES = frozenset({"localhost"})


def hub_token(environ: dict[str, str] | None = None) -> str:
    """The upload token from HF_TOKEN (the only place it is read from)."""
    token = (environ if environ is not None else os.environ).get(TOKEN_ENV, "").strip()
    if not token:
        raise PublishError(f"no Hugging Face token: set {TOKEN_ENV} to a token with write access "
                           "(or use --dry-run to write the folder only)")
    return token


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise PublishError(f"--repo {repo_id[:120]!r}: expected NAMESPACE/NAME (letters, digits, '.', '_', '-'; "
                           "at most 96 characters each)")
    return repo_id


def check_endpoint(endpoint: str) -> str:
    """`endpoint` if it is https://, or http:// on the loopback interface (a local test server)."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return endpoint.rstrip("/")
    if parts.scheme == "http" and _is_loopback(host):
        return endpoint.rstrip("/")
    raise PublishError(f"--endpoint {endpoint[:200]!r}: must be an https:// URL (http:// only on the loopback "
                       "interface), so the token never travels in clear")


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _operations(pub: Publication) -> list:
    from huggingface_hub import CommitOperationAdd

    cleared = {f.name: f for f in pub.files}
    now = listed_files(pub.folder)
    if sorted(cleared) != now:
        extra, gone = sorted(set(now) - set(cleared)), sorted(set(cleared) - set(now))
        raise PublishError(f"{pub.folder}: changed since the gate cleared it (new: {extra[:5]}, gone: {gone[:5]}); "
                           "run publish again")
    operations = []
    for name, scanned in cleared.items():
        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(pub.folder / name))
        if op.upload_info.size != scanned.size or op.upload_info.sha256.hex() != scanned.sha256:
            raise PublishError(f"{pub.folder / name}: changed since the gate scanned it; run publish again")
        operations.append(op)
    return operations


def upload_publication(pub: Publication, repo_id: str, *, token: str, endpoint: str | None = None,
                       private: bool = True, message: str | None = None) -> str:
    """Create `repo_id` (private unless `private` is False) and commit the cleared folder to it
    in one commit; returns the commit's URL. Refuses a publication the gate did not clear."""
    if not pub.cleared:
        raise PublishRefused(pub.reasons, pub.folder)
    check_repo_id(repo_id)
    try:
        from huggingface_hub import HfApi, constants
    except ImportError:
        raise PublishError("uploading needs huggingface_hub: pip install 'bastion[publish]' (--dry-run works "
                           "without it)") from None

    endpoint = check_endpoint(endpoint or constants.ENDPOINT)
    operations = _operations(pub)
    api = HfApi(endpoint=endpoint, token=token, library_name="bastion", library_version=bastion.__version__)
    try:
        _create_repo(api, repo_id, private)
        info = api.create_commit(repo_id, operations, commit_message=message or "Publish with bastion",
                                 repo_type="model", revision="main")
    except PublishError:
        raise
    except Exception as exc:  # the client's and the network's errors, whatever their class
        raise PublishError(f"upload to {endpoint} failed: {_clean(exc, token)}") from None
    return str(info.commit_url)


def _create_repo(api, repo_id: str, private: bool) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=False)
        return
    except HfHubHTTPError as exc:
        if exc.response is None or exc.response.status_code != 409:
            raise
    if private and not api.model_info(repo_id).private:
        raise PublishError(f"{repo_id} already exists and is public; publishing into it would make this model "
                           "public: pass --public to mean it, or choose another --repo")


def _clean(exc: BaseException, token: str) -> str:
    """One line naming the error, the token removed wherever it appears."""
    text = redact_text(" ".join(str(exc).split()), [token]) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:600]


__all__ = ["TOKEN_ENV", "check_endpoint", "check_repo_id", "hub_token", "upload_publication"]
