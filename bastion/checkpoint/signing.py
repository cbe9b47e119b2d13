"""Signed checkpoints: OpenSSF model-signing bundles, checked against a trust list of keys.

A manifest's hashes catch corruption, not a forger who rewrites MANIFEST.json too. A
signature, `model.sig` beside MANIFEST.json, is what the OpenSSF `model-signing` library
writes (`model_signing sign key`): a Sigstore bundle holding a DSSE envelope over an
in-toto statement that lists every file of the folder with its SHA-256 - MANIFEST.json and
each file it names - signed with an elliptic-curve private key (P-256/384/521, no network).
`model_signing verify key --signature CKPT/model.sig --public_key KEY.pub CKPT` accepts a
Bastion checkpoint, and Bastion accepts that tool's signatures when made with SHA-256 file
hashing (its default).

    sign_manifest(raw, key, name)    the signature of a folder whose MANIFEST.json is `raw`
    sign_checkpoint(directory, key)  verify every file of a folder, then write its model.sig
    check_signature(directory, raw)  what loaders call (load_checkpoint, verify_checkpoint,
                                     read_adapter): enforces the process's SignaturePolicy
    trust(require, keys)             a stricter policy for a block (commands, train, serve)

Binding: a loader passes the exact MANIFEST.json bytes it then checks every file against;
the signature must list the SHA-256 of those bytes and exactly the manifest's files with
their SHA-256. So a file a loader reads (hashed against that manifest) is signed, and a
re-forged manifest fails even when every hash in it is right.
"""
from __future__ import annotations

import hashlib
import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from bastion.errors import CheckpointError
from bastion.safeio import parse_json, read_regular, replace_file, write_bytes

if TYPE_CHECKING:
    from bastion.config.schema import CheckpointConfig

SIGNATURE = "model.sig"  # model_signing's default name; allowed beside MANIFEST.json
MAX_SIGNATURE_BYTES = 4 * 2**20  # a manifest is at most 1 MiB; its signature ~1.5x that
MAX_KEY_BYTES = 64 * 2**10
KEY_ID_CHARS = 16


@dataclass(frozen=True)
class SignaturePolicy:
    """`require`: every checkpoint loaded must carry a signature by one of `trusted_keys`.
    Without it, a signature present is still checked whenever trusted keys are configured."""

    require: bool = False
    trusted_keys: tuple[Path, ...] = ()

    def merged(self, require: bool, trusted_keys: Iterable[str | Path]) -> "SignaturePolicy":
        keys = tuple(dict.fromkeys([*self.trusted_keys, *(Path(k) for k in trusted_keys)]))
        return SignaturePolicy(self.require or require, keys)


_policy = SignaturePolicy()


def signature_policy() -> SignaturePolicy:
    return _policy


def set_signature_policy(policy: SignaturePolicy) -> SignaturePolicy:
    """Make `policy` the process's (a command sets it from its flags); returns the old one."""
    global _policy
    previous, _policy = _policy, policy
    return previous


@contextmanager
def trust(require: bool = False, trusted_keys: Iterable[str | Path] = ()) -> Iterator[SignaturePolicy]:
    """The current policy made stricter (never weaker) for the block."""
    previous = set_signature_policy(_policy.merged(require, trusted_keys))
    try:
        yield _policy
    finally:
        set_signature_policy(previous)


def trust_config(cc: "CheckpointConfig"):
    """`trust` as a config's checkpoint section asks (require_signature, trusted_keys)."""
    return trust(cc.require_signature, cc.trusted_keys)


# ---------------------------------------------------------------- keys
def _read_key_file(path: Path, private: bool) -> bytes:
    """A key file's bytes; a private key group/other can read, or a public key they can
    write (who could then swap the trust), is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the key ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path}: the key is not a regular file")
        if info.st_mode & (0o077 if private else 0o022):
            what, fix = ("private key readable", "600") if private else ("public key writable", "644")
            raise CheckpointError(f"{path}: {what} by group or others (mode {stat.S_IMODE(info.st_mode):o}); "
                                  f"run chmod {fix} on it")
        data = fh.read(MAX_KEY_BYTES + 1)
    if len(data) > MAX_KEY_BYTES:
        raise CheckpointError(f"{path}: over {MAX_KEY_BYTES} bytes; not a PEM key")
    return data


def _check_curve(key: Any, path: Path) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise CheckpointError(f"{path}: not an elliptic-curve key on P-256, P-384 or P-521 (what model-signing signs with)")
    return key


def load_private_key(path: str | Path) -> Any:
    """The signing key at `path` (unencrypted PEM, mode 0600), checked before any work."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    try:
        key = serialization.load_pem_private_key(_read_key_file(path, private=True), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CheckpointError(f"{path}: not an unencrypted PEM private key ({str(exc)[:120]})") from None
    return _check_curve(key, path)


def load_public_key(path: str | Path) -> Any:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    try:
        key = serialization.load_pem_public_key(_read_key_file(path, private=False))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CheckpointError(f"{path}: not a PEM public key ({str(exc)[:120]})") from None
    return _check_curve(key, path)


def key_id(public_key: Any) -> str:
    """SHA-256 of the key's PEM: the `hint` model-signing records in a signature."""
    from cryptography.hazmat.primitives import serialization

    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def generate_key(private_path: str | Path) -> tuple[Path, Path]:
    """A new P-256 key pair: PRIVATE (0600) and PRIVATE.pub (0644). Never overwrites; a missing
    folder is created owner-only (0700), as a key folder should be."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise CheckpointError(f"{path} already exists; keys are never overwritten")
    if not private_path.parent.is_dir():
        private_path.parent.mkdir(mode=0o700, parents=True)
    key = ec.generate_private_key(ec.SECP256R1())
    write_bytes(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    write_bytes(public_path, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    os.chmod(public_path, 0o644)
    return private_path, public_path


# ---------------------------------------------------------------- signing
def _manifest_files(manifest_raw: bytes, where: Path | str) -> dict[str, str]:
    """{file: SHA-256} a signature must list: MANIFEST.json itself and every file it names."""
    from bastion.checkpoint.manifest import MANIFEST, parse_manifest

    files = parse_manifest(manifest_raw, where)["files"]
    return {MANIFEST: hashlib.sha256(manifest_raw).hexdigest(), **{n: e["sha256"] for n, e in files.items()}}


def sign_manifest(manifest_raw: bytes, private_key: str | Path, name: str = "checkpoint") -> bytes:
    """A model-signing bundle over the folder whose MANIFEST.json is `manifest_raw` (its
    files' hashes are taken from the manifest, which their writer computed); `name` is the
    informative model name model-signing records."""
    from model_signing import manifest as ms
    from model_signing._hashing.hashing import Digest
    from model_signing._signing import sign_ec_key, signing

    class KeySigner(sign_ec_key.Signer):  # the library's signer, from a key already checked
        def __init__(self, key: Any):
            self._private_key = key

    key = load_private_key(private_key)
    items = [ms.FileManifestItem(path=PurePosixPath(file), digest=Digest("sha256", bytes.fromhex(sha)))
             for file, sha in sorted(_manifest_files(manifest_raw, name).items())]
    serialization = ms.SerializationType.from_args(
        {"method": "files", "hash_type": "sha256", "allow_symlinks": False, "ignore_paths": [SIGNATURE]})
    payload = signing.Payload(ms.Manifest(name, items, serialization))
    return KeySigner(key).sign(payload).bundle.to_json().encode()


def sign_checkpoint(directory: str | Path, private_key: str | Path) -> str:
    """Verify every file of a checkpoint (or adapter) folder against its manifest, then write
    its signature atomically; returns the key id."""
    from bastion.checkpoint.manifest import read_manifest_bytes, verify_directory

    directory = Path(directory)
    key = load_private_key(private_key)  # refused (loose mode, not EC) before hashing anything
    manifest, raw = read_manifest_bytes(directory)
    verify_directory(directory, manifest, hash_files=True)
    replace_file(directory / SIGNATURE, sign_manifest(raw, private_key, directory.name))
    return key_id(key.public_key())[:KEY_ID_CHARS]


# ---------------------------------------------------------------- verification
def _bundle(raw: bytes, where: Path) -> Any:
    """The signature file as model-signing's signature object, parsed from these bytes
    (bounded) with the library's own compatibility fixes."""
    from model_signing._signing import sign_sigstore_pb
    from sigstore_models.bundle import v1 as bundle_pb

    parsed = parse_json(raw, CheckpointError, f"{where}")
    try:
        material = parsed["verificationMaterial"]
        material.setdefault("tlogEntries", [])
        if isinstance(material.get("publicKey"), dict):
            material["publicKey"].setdefault("hint", None)
            for old in ("rawBytes", "keyDetails"):
                material["publicKey"].pop(old, None)
        return sign_sigstore_pb.Signature(bundle_pb.Bundle.from_dict(parsed))
    except Exception as exc:  # pydantic / KeyError / TypeError: a malformed bundle either way
        raise CheckpointError(f"{where}: not a model-signing signature ({type(exc).__name__})") from None


def _signed_files(raw: bytes, trusted_keys: tuple[Path, ...], where: Path) -> tuple[dict[str, str], str]:
    """({file: SHA-256} the signature vouches for, the id of the trusted key it verifies
    with); CheckpointError when no trusted key made it or the bundle does not verify."""
    from model_signing._signing import sign_ec_key

    class KeyVerifier(sign_ec_key.Verifier):  # the library's verifier, from a key already checked
        def __init__(self, key: Any):
            self._public_key = key

    signature = _bundle(raw, where)
    keys = {key_id(k): k for k in (load_public_key(p) for p in trusted_keys)}
    material = signature.bundle.verification_material
    hint = material.public_key.hint if material.public_key else None  # None: an older bundle, or a certificate
    if hint and hint not in keys:
        raise CheckpointError(f"{where}: signed by key {hint[:KEY_ID_CHARS]}, which is not a trusted key")
    for kid in [hint] if hint else list(keys):
        try:
            manifest = KeyVerifier(keys[kid]).verify(signature)
        except Exception:  # InvalidSignature, ValueError, a payload that is not a manifest
            continue
        if manifest.serialization_type.get("method") != "files":
            raise CheckpointError(f"{where}: signs file shards; Bastion checks signatures over whole files")
        digests = {rd.identifier: rd.digest for rd in manifest.resource_descriptors()}
        if any(d.algorithm != "sha256" for d in digests.values()):
            raise CheckpointError(f"{where}: signs other hashes than SHA-256 (sign with `bastion ckpt sign`)")
        return {name: d.digest_hex for name, d in digests.items()}, kid[:KEY_ID_CHARS]
    raise CheckpointError(f"{where}: the signature does not verify with any trusted key (forged or damaged)")


def _difference(signed: dict[str, str], actual: dict[str, str]) -> str:
    from bastion.checkpoint.manifest import MANIFEST

    if signed.get(MANIFEST) != actual.get(MANIFEST):
        changed = sorted(n for n in signed.keys() & actual.keys() if n != MANIFEST and signed[n] != actual[n])
        extra = sorted(actual.keys() - signed.keys())
        detail = f"; changed or added: {', '.join(changed + extra)[:200]}" if changed or extra else ""
        return f"{MANIFEST} is not the one that was signed (re-forged or rewritten){detail}"
    return "the signed file list differs from the manifest's"


def check_signature(directory: Path, manifest_raw: bytes | None = None, *, hashes_checked: bool = True) -> str | None:
    """Enforce the signature policy on a checkpoint (or adapter) folder whose MANIFEST.json
    is `manifest_raw` (read here when None). `hashes_checked`: the caller checks every file
    it reads against that manifest. Returns the signing key's id when a signature was
    verified, None when the policy asks for no check."""
    policy = _policy
    path = directory / SIGNATURE
    present = path.exists() or path.is_symlink()
    if not policy.require and (not present or not policy.trusted_keys or not hashes_checked):
        return None
    if not policy.trusted_keys:
        raise CheckpointError("a signed checkpoint is required, but no trusted key is configured "
                              "(checkpoint.trusted_keys or --trusted-key)")
    if not present:
        raise CheckpointError(f"{directory}: not signed (no {SIGNATURE}), and a signature is required")
    if not hashes_checked:
        raise CheckpointError(f"{directory}: --no-verify cannot be combined with a required signature "
                              "(the signature covers the files through their hashes)")
    if manifest_raw is None:
        from bastion.checkpoint.manifest import read_manifest_bytes

        manifest_raw = read_manifest_bytes(directory)[1]
    raw = read_regular(path, MAX_SIGNATURE_BYTES, CheckpointError)
    if len(raw) > MAX_SIGNATURE_BYTES:
        raise CheckpointError(f"{path}: over the {MAX_SIGNATURE_BYTES}-byte signature limit")
    signed, signer = _signed_files(raw, policy.trusted_keys, path)
    actual = _manifest_files(manifest_raw, directory)
    if signed != actual:
        raise CheckpointError(f"{path}: {_difference(signed, actual)}")
    return signer
