"""Checkpoint stores: copy committed checkpoints to a directory (a NAS) or an S3 bucket and
pull them back verified.

Layout in a store: `<prefix>/<name>/<file>` for every file of a checkpoint, MANIFEST.json
written LAST (a checkpoint without its manifest is invisible, so a crashed push is never seen
as a checkpoint) and `<prefix>/latest` (the newest name) written after the manifest. `delete`
removes the manifest first. A pull downloads into `<dest>.part/` (resumable), checks every
file's size and SHA-256 against the pulled manifest, and only then renames it to `<dest>`.

S3 credentials come ONLY from the environment / the standard AWS config chain (boto3's
default session); they are never arguments and never read from Bastion configs. Error texts
carry the operation, the bucket/key and the S3 error code, never a request or its headers.
"""
from __future__ import annotations

import collections
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from bastion.checkpoint import resolve_checkpoint, verify_checkpoint
from bastion.checkpoint.formats import verify_contents
from bastion.checkpoint.manifest import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    parse_manifest,
    read_manifest_bytes,
    verify_directory,
)
from bastion.errors import CheckpointError
from bastion.safeio import (
    FILE_MODE,
    fsync_dir,
    make_private_dir,
    open_private,
    replace_file,
    sha256_file,
    write_bytes,
)

log = logging.getLogger(__name__)

LATEST = "latest"
DEFAULT_MAX_BYTES = 1 * 2**40  # refuse pulls declaring more than 1 TiB unless asked
CHUNK = 1 * 2**20
_STEP = re.compile(r"step_(\d{8,})")
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def validate_name(name: str) -> str:
    """A checkpoint name: `step_XXXXXXXX` or [A-Za-z0-9._-]{1,128}, no leading dot, not `latest`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name or name == LATEST:
        raise CheckpointError(
            f"invalid checkpoint name {name!r:.80}: use step_XXXXXXXX or 1-128 of [A-Za-z0-9._-] "
            "without a leading dot or '..' (and not 'latest')"
        )
    return name


def _is_name(name: str) -> bool:
    try:
        validate_name(name)
        return True
    except CheckpointError:
        return False


def _sort_key(name: str) -> tuple[int, int, str]:
    """Named checkpoints first (alphabetical), then step_ checkpoints by step."""
    match = _STEP.fullmatch(name)
    return (1, int(match.group(1)), name) if match else (0, 0, name)


def _write_chunks(path: Path, chunks: Iterator[bytes], limit: int, truncate: bool) -> int:
    """Append (or write from scratch) at most `limit` bytes; returns how many were written."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if truncate else os.O_APPEND)
    fd = os.open(path, flags, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    written = 0
    with os.fdopen(fd, "wb") as fh:
        for chunk in chunks:
            written += len(chunk)
            if written > limit:
                break
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return written


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class Store(ABC):
    """Where checkpoints go besides the training disk. Subclasses provide the primitives."""

    # ---- primitives ----
    @abstractmethod
    def _begin(self, name: str) -> Any:
        """Start writing checkpoint `name`; returns a handle for _put/_commit/_abort."""

    @abstractmethod
    def _put(self, handle: Any, file: str, src: Path, entry: dict[str, Any]) -> None: ...

    @abstractmethod
    def _commit(self, handle: Any, manifest_raw: bytes, set_latest: bool) -> None:
        """Write MANIFEST.json (this makes the checkpoint visible), then `latest`."""

    def _abort(self, handle: Any) -> None:
        """Clean up after a failed push (S3: nothing; the objects stay invisible)."""

    @abstractmethod
    def _get_manifest(self, name: str) -> bytes | None:
        """The raw manifest (at most MAX_MANIFEST_BYTES), None if the checkpoint is absent."""

    @abstractmethod
    def _read_range(self, name: str, file: str, offset: int) -> Iterator[bytes]:
        """Chunks of the stored file from `offset` to its end."""

    @abstractmethod
    def _read_latest(self) -> str | None: ...

    @abstractmethod
    def _write_latest(self, name: str | None) -> None: ...

    @abstractmethod
    def list(self) -> list[str]:
        """Complete checkpoints (those with a manifest), named first, then by step."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove a checkpoint, manifest first; repoint `latest` if it named it."""

    # ---- shared logic ----
    def push(self, local_ckpt_dir: str | Path, name: str | None = None, set_latest: bool = True) -> None:
        """Verify a committed local checkpoint (a directory or a root with `latest`: every
        file's size, SHA-256 and format), upload its files, then MANIFEST.json, then (unless
        set_latest=False) the `latest` pointer."""
        directory = resolve_checkpoint(local_ckpt_dir)
        manifest, manifest_raw = read_manifest_bytes(directory)  # the bytes uploaded are the bytes verified
        verify_contents(directory, manifest)
        self._upload(directory, validate_name(directory.name if name is None else name), manifest, manifest_raw,
                     set_latest)

    def push_folder(self, directory: Path, name: str, verify: Callable[[Path], Any]) -> None:
        """Upload a folder that is not a checkpoint but is laid out like one (files + a
        MANIFEST.json; e.g. a compile-cache entry): `verify(directory)` checks it first
        (raising CheckpointError), then its files go up as `push` sends a checkpoint's,
        manifest last. `latest` is left alone."""
        verify(directory)
        manifest, manifest_raw = read_manifest_bytes(directory)
        verify_directory(directory, manifest)  # the manifest uploaded matches the files uploaded
        self._upload(directory, validate_name(name), manifest, manifest_raw, set_latest=False)

    def has(self, name: str) -> bool:
        """Whether a complete `name` (its manifest present) is in the store."""
        return self._get_manifest(validate_name(name)) is not None

    def _upload(self, directory: Path, name: str, manifest: dict[str, Any], manifest_raw: bytes,
                set_latest: bool) -> None:
        handle = self._begin(name)
        try:
            for file, entry in sorted(manifest["files"].items()):
                self._put(handle, file, directory / file, entry)
            self._commit(handle, manifest_raw, set_latest)
        except FileNotFoundError:
            self._abort(handle)
            raise CheckpointError(f"{directory}: a file vanished during the push (deleted by retention?)") from None
        except BaseException:
            self._abort(handle)
            raise
        log.info("pushed %s to %s", name, self)

    def latest(self) -> str | None:
        """The name `latest` points at if that checkpoint is complete, else the newest listed."""
        name = self._read_latest()
        if name and _is_name(name) and self._get_manifest(name) is not None:
            return name
        names = self.list()
        return names[-1] if names else None

    def pull(self, name: str, local_dest_dir: str | Path, max_bytes: int = DEFAULT_MAX_BYTES,
             verify: Callable[[Path], Any] = verify_checkpoint) -> Path:
        """Download checkpoint `name` so that it becomes the directory `local_dest_dir` (which
        must not exist, unless it already holds this very checkpoint). Resumable: a retry skips
        files already complete in `<dest>.part/` and resumes `.partial` files where they end.
        `verify(folder)` checks the download before it is renamed into place (by default: a
        checkpoint's sizes, SHA-256s, formats and signature); it returns the manifest."""
        name = validate_name(name)
        dest = Path(local_dest_dir)
        raw = self._get_manifest(name)
        if raw is None:
            raise CheckpointError(f"checkpoint {name} not found in {self} (absent, or an incomplete push)")
        files = parse_manifest(raw, f"{self}/{name}/{MANIFEST}")["files"]
        total = sum(entry["size"] for entry in files.values())
        if total > max_bytes:
            raise CheckpointError(f"checkpoint {name} declares {total} bytes, over the limit of {max_bytes} (max_bytes)")
        if dest.exists() or dest.is_symlink():
            complete = dest.is_dir() and not dest.is_symlink() and (dest / MANIFEST).is_file()
            if complete and verify(dest)["files"] == files:
                return dest  # already pulled
            raise CheckpointError(f"{dest} already exists; choose a new destination")
        part = dest.with_name(dest.name + ".part")
        if part.is_symlink() or (part.exists() and not part.is_dir()):
            raise CheckpointError(f"{part} is not a directory")
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        make_private_dir(part)
        wanted = set(files) | {f + ".partial" for f in files}
        for child in part.iterdir():  # stale entries of an older attempt (or planted links)
            if child.name not in wanted or child.is_symlink() or not child.is_file():
                _remove(child)
        for file, entry in sorted(files.items()):
            self._pull_file(name, file, entry, part)
        write_bytes(part / MANIFEST, raw)
        fsync_dir(part)
        try:
            verify(part)
        except CheckpointError:
            shutil.rmtree(part, ignore_errors=True)
            raise
        os.replace(part, dest)
        fsync_dir(dest.parent)
        log.info("pulled checkpoint %s from %s to %s", name, self, dest)
        return dest

    def _pull_file(self, name: str, file: str, entry: dict[str, Any], part: Path) -> None:
        final, partial = part / file, part / (file + ".partial")
        size, sha = entry["size"], entry["sha256"]
        if final.is_file():
            if final.stat().st_size == size and sha256_file(final) == sha:
                return  # completed by an earlier attempt
            final.unlink()
        offset = partial.stat().st_size if partial.is_file() else 0
        for resumed in (offset > 0, False):
            if offset > size:
                offset = 0
            written = offset
            if offset < size:
                written += _write_chunks(partial, self._read_range(name, file, offset), size - offset, truncate=offset == 0)
            elif offset == 0:
                _write_chunks(partial, iter(()), 0, truncate=True)
            if written > size:
                partial.unlink()
                raise CheckpointError(f"{name}/{file}: the store sent more than the {size} bytes in the manifest")
            if written < size:
                raise CheckpointError(f"{name}/{file}: download stopped at {written} of {size} bytes; pull again to resume")
            if sha256_file(partial) == sha:
                os.replace(partial, final)
                return
            partial.unlink()
            if not resumed:
                break
            offset = 0  # the partial may be from an older object: retry once from scratch
        raise CheckpointError(f"{name}/{file}: SHA-256 does not match the manifest (modified or corrupt in the store)")


class LocalStore(Store):
    """A directory (e.g. a mounted NAS) laid out like a training checkpoint root: every
    checkpoint appears by an atomic rename of a finished, fsynced temp dir; 0700/0600."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        if self.root.is_symlink():
            raise CheckpointError(f"{self.root}: store root must not be a symbolic link")
        make_private_dir(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def __str__(self) -> str:
        return f"file://{self.root}"

    def _begin(self, name: str) -> tuple[str, Path]:
        tmp = self.root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        make_private_dir(tmp)
        return name, tmp

    def _put(self, handle: tuple[str, Path], file: str, src: Path, entry: dict[str, Any]) -> None:
        digest = hashlib.sha256()
        with open(src, "rb") as fin, open_private(handle[1] / file) as fout:
            while block := fin.read(CHUNK):
                digest.update(block)
                fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
        if digest.hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{src}: changed while being copied (SHA-256 no longer matches its manifest)")

    def _commit(self, handle: tuple[str, Path], manifest_raw: bytes, set_latest: bool) -> None:
        name, tmp = handle
        write_bytes(tmp / MANIFEST, manifest_raw)
        fsync_dir(tmp)
        final = self.root / name
        if final.exists() or final.is_symlink():
            trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            os.replace(tmp, final)
            _remove(trash)
        else:
            os.replace(tmp, final)
        fsync_dir(self.root)
        if set_latest:
            self._write_latest(name)

    def _abort(self, handle: tuple[str, Path]) -> None:
        shutil.rmtree(handle[1], ignore_errors=True)

    def _checkpoint_dir(self, name: str) -> Path | None:
        path = self.root / name
        if path.is_symlink() or not path.is_dir() or (path / MANIFEST).is_symlink() or not (path / MANIFEST).is_file():
            return None
        return path

    def _get_manifest(self, name: str) -> bytes | None:
        path = self._checkpoint_dir(validate_name(name))
        if path is None:
            return None
        with open(os.open(path / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW), "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CheckpointError(f"{path / MANIFEST}: over the {MAX_MANIFEST_BYTES}-byte limit")
        return raw

    def _read_range(self, name: str, file: str, offset: int) -> Iterator[bytes]:
        try:
            fd = os.open(self.root / name / file, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise CheckpointError(f"{self.root / name / file}: cannot read ({exc.strerror})") from None
        with open(fd, "rb") as fh:
            fh.seek(offset)
            while block := fh.read(CHUNK):
                yield block

    def _read_latest(self) -> str | None:
        path = self.root / LATEST
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1024:
            return None
        return path.read_text(encoding="utf-8", errors="replace").strip()

    def _write_latest(self, name: str | None) -> None:
        if name is None:
            (self.root / LATEST).unlink(missing_ok=True)
        else:
            replace_file(self.root / LATEST, (name + "\n").encode())

    def list(self) -> list[str]:
        names = [p.name for p in self.root.iterdir() if _is_name(p.name) and self._checkpoint_dir(p.name)]
        return sorted(names, key=_sort_key)

    def delete(self, name: str) -> None:
        path = self.root / validate_name(name)
        if not path.exists() and not path.is_symlink():
            raise CheckpointError(f"checkpoint {name} not found in {self}")
        trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
        os.replace(path, trash)  # disappears (manifest included) in one atomic step
        fsync_dir(self.root)
        _remove(trash)
        if self._read_latest() == name:
            names = self.list()
            self._write_latest(names[-1] if names else None)


def check_endpoint_url(endpoint_url: str, allow_http: bool = False) -> str:
    """Refuse credentials in the URL (without echoing them) and plain http, except on a
    loopback host with allow_http=True."""
    if "@" in endpoint_url:
        raise CheckpointError(
            "endpoint_url must not contain credentials (user:secret@host); provide them through "
            "the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) or an AWS profile"
        )
    try:
        parts = urlsplit(endpoint_url)
        host = parts.hostname or ""
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        raise CheckpointError("endpoint_url is not a valid URL") from None
    if parts.scheme not in ("https", "http") or not host:
        raise CheckpointError(f"endpoint_url must be https://host[:port] (got scheme {parts.scheme!r:.20})")
    if parts.query or parts.fragment:
        raise CheckpointError(f"endpoint_url for {host} must not have a query string or fragment")
    if parts.scheme == "http":
        if not allow_http:
            raise CheckpointError(f"endpoint_url http://{host} is not encrypted; use https (or allow_http for a loopback test server)")
        if not _is_loopback(host):
            raise CheckpointError(f"plain http is allowed only to a loopback address, not {host}; use https")
    return endpoint_url


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _s3_error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore/boto3 exception (or its type name): nothing else."""
    from botocore.exceptions import (
        ClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ClientError):
            code = str(seen.response.get("Error", {}).get("Code") or "")
            return re.sub(r"[^A-Za-z0-9._-]", "", code)[:64] or "UnknownError"
        if isinstance(seen, (NoCredentialsError, PartialCredentialsError)):
            return "NoCredentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile)"
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


class S3Store(Store):
    """An S3 (or S3-compatible) bucket. Credentials come from boto3's default chain only."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        allow_http: bool = False,
        multipart_threshold: int = 64 * 2**20,
        multipart_chunksize: int = 64 * 2**20,
        max_concurrency: int = 4,
        max_bandwidth: int | None = None,
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not _BUCKET.fullmatch(bucket or "") or ".." in bucket:
            raise CheckpointError("invalid S3 bucket name: use 3-63 of [a-z0-9.-] (not echoed: it may hold a pasted secret)")
        segments = [s for s in (prefix or "").split("/") if s]
        if any(not _NAME.fullmatch(s) or ".." in s for s in segments):
            raise CheckpointError(f"invalid S3 prefix {prefix!r:.200}: segments of [A-Za-z0-9._-], no leading dot")
        self.bucket, self.prefix = bucket, "/".join(segments)
        if endpoint_url is not None:
            check_endpoint_url(endpoint_url, allow_http)
        config = Config(
            s3={"addressing_style": "path"} if endpoint_url else {},
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        )
        # Default session = env vars / shared config / instance role; never explicit keys.
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            max_bandwidth=max_bandwidth,
        )

    def __repr__(self) -> str:
        return f"S3Store({self.bucket!r}, {self.prefix!r})"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts] if self.prefix else parts)

    def _call(self, op: str, key: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a boto3 call; any failure becomes a CheckpointError with the code only."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            code = _s3_error_code(exc)
        raise CheckpointError(f"S3 {op} s3://{self.bucket}/{key} failed: {code}")

    def _missing(self, op: str, key: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """Like _call, but None when the key does not exist."""
        try:
            return self._call(op, key, fn, Bucket=self.bucket, Key=key, **kwargs)
        except CheckpointError as exc:
            if str(exc).endswith((": NoSuchKey", ": 404")):
                return None
            raise

    def _begin(self, name: str) -> str:
        key = self._key(name, MANIFEST)  # hide an older version while it is overwritten
        self._call("DeleteObject", key, self.client.delete_object, Bucket=self.bucket, Key=key)
        return name

    def _put(self, name: str, file: str, src: Path, entry: dict[str, Any]) -> None:
        key = self._key(name, file)
        self._call("upload", key, self.client.upload_file, str(src), self.bucket, key, Config=self.transfer)

    def _commit(self, name: str, manifest_raw: bytes, set_latest: bool) -> None:
        key = self._key(name, MANIFEST)
        self._call("PutObject", key, self.client.put_object, Bucket=self.bucket, Key=key, Body=manifest_raw)
        if set_latest:
            self._write_latest(name)

    def _get_manifest(self, name: str) -> bytes | None:
        key = self._key(validate_name(name), MANIFEST)
        resp = self._missing("GetObject", key, self.client.get_object)
        if resp is None:
            return None
        body = resp["Body"]
        if resp.get("ContentLength", 0) > MAX_MANIFEST_BYTES:
            body.close()
            raise CheckpointError(f"s3://{self.bucket}/{key}: over the {MAX_MANIFEST_BYTES}-byte manifest limit")
        raw = self._call("GetObject", key, body.read, MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CheckpointError(f"s3://{self.bucket}/{key}: over the {MAX_MANIFEST_BYTES}-byte manifest limit")
        return raw

    def _read_range(self, name: str, file: str, offset: int) -> Iterator[bytes]:
        key = self._key(name, file)
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self._call("GetObject", key, self.client.get_object, Bucket=self.bucket, Key=key, **extra)
        body = resp["Body"]
        try:
            if offset and not str(resp.get("ContentRange", "")).startswith(f"bytes {offset}-"):
                raise CheckpointError(f"s3://{self.bucket}/{key}: the server ignored the Range request")
            chunks = body.iter_chunks(CHUNK)
            while True:
                chunk = self._call("GetObject", key, next, chunks, b"")
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    def _read_latest(self) -> str | None:
        key = self._key(LATEST)
        resp = self._missing("GetObject", key, self.client.get_object)
        if resp is None:
            return None
        with resp["Body"] as body:
            raw = self._call("GetObject", key, body.read, 1025)
        return raw.decode("utf-8", errors="replace").strip() if len(raw) <= 1024 else None

    def _write_latest(self, name: str | None) -> None:
        key = self._key(LATEST)
        if name is None:
            self._call("DeleteObject", key, self.client.delete_object, Bucket=self.bucket, Key=key)
        else:
            self._call("PutObject", key, self.client.put_object, Bucket=self.bucket, Key=key, Body=(name + "\n").encode())

    def _keys(self, prefix: str) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in self._call("ListObjectsV2", prefix, _list_pages, pages):
            for obj in page.get("Contents", []):
                yield obj["Key"]

    def list(self) -> list[str]:
        base = self._key("")
        names = []
        for key in self._keys(base):
            parts = key[len(base):].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST and _is_name(parts[0]):  # hostile keys ignored
                names.append(parts[0])
        return sorted(names, key=_sort_key)

    def delete(self, name: str) -> None:
        keys = list(self._keys(self._key(validate_name(name), "")))
        if not keys:
            raise CheckpointError(f"checkpoint {name} not found in {self}")
        manifest_key = self._key(name, MANIFEST)
        self._call("DeleteObject", manifest_key, self.client.delete_object, Bucket=self.bucket, Key=manifest_key)
        for key in keys:
            if key != manifest_key:
                self._call("DeleteObject", key, self.client.delete_object, Bucket=self.bucket, Key=key)
        if self._read_latest() == name:
            names = self.list()
            self._write_latest(names[-1] if names else None)


def _list_pages(pages: Any) -> list[dict[str, Any]]:
    return list(pages)


def open_store(url: str, endpoint_url: str | None = None, allow_http: bool = False, **s3_options: Any) -> Store:
    """`s3://bucket/prefix`, `file:///abs/path` or a plain path -> a Store."""
    if "://" not in url:
        if not url:
            raise CheckpointError("empty store URL")
        return LocalStore(url)
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("s3", "file") and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        raise CheckpointError(f"{scheme}:// store URLs must not contain credentials; use the environment or an AWS profile")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise CheckpointError(f"malformed {scheme}:// store URL") from None
    if parts.query or parts.fragment:
        raise CheckpointError(f"{scheme}:// store URLs take no query string or fragment")
    if scheme == "s3":
        return S3Store(parts.netloc, parts.path.strip("/"), endpoint_url=endpoint_url, allow_http=allow_http, **s3_options)
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise CheckpointError("file:// store URLs must be absolute local paths: file:///abs/path")
        return LocalStore(unquote(parts.path))
    raise CheckpointError(f"unsupported store URL scheme {scheme!r:.20}: use s3://bucket/prefix or file:///abs/path")


class BackgroundPusher:
    """Pushes committed checkpoints from one worker thread so training never waits for the
    network. The queue is bounded: when full, the OLDEST waiting checkpoint is dropped (a newer
    one supersedes it). Failures are retried with exponential backoff, then logged and kept
    in `errors` (messages carry no credentials)."""

    def __init__(self, store: Store, max_queue: int = 4, retries: int = 3, backoff_s: float = 2.0, max_backoff_s: float = 60.0):
        self.store = store
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.errors: list[str] = []
        self.pushed: list[str] = []
        self._queue: collections.deque[tuple[Path, str]] = collections.deque(maxlen=max_queue)
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="bastion-ckpt-push", daemon=True)
        self._thread.start()

    def submit(self, ckpt_dir: str | Path, name: str | None = None) -> None:
        """Queue a committed checkpoint directory; returns at once (no copying, no I/O)."""
        path = Path(ckpt_dir)
        name = validate_name(path.name if name is None else name)
        with self._cond:
            if self._closing:
                raise CheckpointError("BackgroundPusher is closed")
            if len(self._queue) == self._queue.maxlen:
                dropped = self._queue[0][1]
                log.warning("checkpoint push queue full: skipping %s (superseded by %s)", dropped, name)
            self._queue.append((path, name))
            self._cond.notify()

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting work, wait up to `timeout` for the queue to drain; True if drained."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                path, name = self._queue.popleft()
            self._push(path, name)

    def _push(self, path: Path, name: str) -> None:
        for attempt in range(self.retries + 1):
            try:
                if not path.is_dir():
                    log.warning("checkpoint %s vanished before it was pushed (retention?); skipped", path)
                    return
                self.store.push(path, name)
                self.pushed.append(name)
                return
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything
                message = str(exc) if isinstance(exc, (CheckpointError, OSError)) else type(exc).__name__
                if not path.is_dir():
                    log.warning("checkpoint %s vanished during its push (retention?); skipped", path)
                    return
                if attempt == self.retries:
                    self.errors.append(f"push {name} to {self.store}: {message}")
                    log.error("giving up pushing checkpoint %s after %d attempts: %s", name, attempt + 1, message)
                    return
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                log.warning("pushing checkpoint %s failed (%s); retrying in %.1fs", name, message, delay)
                time.sleep(delay)
