"""Signed checkpoints: `bastion ckpt sign`, the trust list, and --require-signature on every
command that loads a checkpoint. Signatures are OpenSSF model-signing bundles."""
import base64
import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from bastion.checkpoint import load_checkpoint
from bastion.checkpoint.manifest import MANIFEST, build_manifest, manifest_bytes, read_manifest
from bastion.checkpoint.signing import (
    SIGNATURE,
    SignaturePolicy,
    check_signature,
    generate_key,
    set_signature_policy,
    sign_checkpoint,
    trust,
)
from bastion.cli import app
from bastion.errors import CheckpointError
from helpers import make_base_checkpoint

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_policy_left_over():
    """A command sets the process's signature policy; never let one leak into another test."""
    yield
    set_signature_policy(SignaturePolicy())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_checkpoint(tmp_path_factory.mktemp("base"))


@pytest.fixture
def ckpt(base, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(base, copy)
    return copy


@pytest.fixture
def keys(tmp_path):
    """(private, public): the signer the tests trust."""
    (tmp_path / "keys").mkdir()
    return generate_key(tmp_path / "keys" / "signer.pem")


@pytest.fixture
def stranger(tmp_path):
    (tmp_path / "other").mkdir()
    return generate_key(tmp_path / "other" / "stranger.pem")


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def verify_required(path, public):
    return invoke("ckpt", "verify", path, "--require-signature", "--trusted-key", public)


def test_sign_then_verify(ckpt, keys):
    private, public = keys
    code, out = invoke("ckpt", "sign", ckpt, "--key", private)
    assert code == 0 and (ckpt / SIGNATURE).is_file(), out
    assert oct((ckpt / SIGNATURE).stat().st_mode & 0o777) == "0o600"
    code, out = verify_required(ckpt, public)
    assert code == 0 and "signed by key" in out, out
    with trust(require=True, trusted_keys=[public]):
        assert load_checkpoint(ckpt).model  # the loaders' path: load_checkpoint checks it
    assert load_checkpoint(ckpt).model  # no policy: a signature is simply an allowed extra file


def test_bundle_is_model_signing_format_both_ways(ckpt, keys, tmp_path):
    """model_signing's own verifier accepts a Bastion signature, and Bastion accepts one made
    by model_signing's signer (SHA-256 file hashing, its default)."""
    from model_signing import hashing, signing, verifying

    private, public = keys
    sign_checkpoint(ckpt, private)
    verifying.Config().use_elliptic_key_verifier(public_key=public).verify(ckpt, ckpt / SIGNATURE)
    bundle = json.loads((ckpt / SIGNATURE).read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert {r["name"] for r in statement["predicate"]["resources"]} == {MANIFEST, *read_manifest(ckpt)["files"]}
    (ckpt / SIGNATURE).unlink()
    signing.Config().use_elliptic_key_signer(private_key=private).set_hashing_config(
        hashing.Config().set_ignored_paths(paths=[SIGNATURE])).sign(ckpt, tmp_path / "lib.sig")
    shutil.copy(tmp_path / "lib.sig", ckpt / SIGNATURE)
    with trust(require=True, trusted_keys=[public]):
        assert check_signature(ckpt)


def test_tampered_file_fails(ckpt, keys):
    private, public = keys
    sign_checkpoint(ckpt, private)
    os.chmod(ckpt / "tokenizer.json", 0o600)
    with open(ckpt / "tokenizer.json", "r+b") as fh:
        fh.seek(10)
        fh.write(b"#")
    code, out = verify_required(ckpt, public)
    assert code == 2 and "tokenizer.json" in out and "SHA-256" in out


def _reforge(ckpt, other):
    """Replace model.safetensors by another checkpoint's and rewrite MANIFEST.json so that
    every size and hash in it is right again."""
    os.chmod(ckpt / "model.safetensors", 0o600)
    shutil.copy(other / "model.safetensors", ckpt / "model.safetensors")
    names = read_manifest(ckpt)["files"]
    os.chmod(ckpt / MANIFEST, 0o600)
    (ckpt / MANIFEST).write_bytes(manifest_bytes(build_manifest({n: ckpt / n for n in names})))


def test_reforged_manifest_fails(ckpt, keys, tmp_path):
    private, public = keys
    sign_checkpoint(ckpt, private)
    _reforge(ckpt, make_base_checkpoint(tmp_path / "other", seed=1))
    assert invoke("ckpt", "verify", ckpt)[0] == 0  # hashes alone cannot see it
    code, out = verify_required(ckpt, public)
    assert code == 2 and "MANIFEST.json is not the one that was signed" in out and "model.safetensors" in out
    with trust(require=True, trusted_keys=[public]), pytest.raises(CheckpointError, match="not the one that was signed"):
        load_checkpoint(ckpt)


def test_untrusted_key_fails(ckpt, keys, stranger):
    sign_checkpoint(ckpt, stranger[0])
    code, out = verify_required(ckpt, keys[1])
    assert code == 2 and "not a trusted key" in out
    code, _ = invoke("ckpt", "verify", ckpt, "--require-signature", "--trusted-key", keys[1], "--trusted-key", stranger[1])
    assert code == 0


def test_forged_or_damaged_signature_fails(ckpt, keys, stranger):
    private, public = keys
    sign_checkpoint(ckpt, private)
    bundle = json.loads((ckpt / SIGNATURE).read_text())
    sign_checkpoint(ckpt, stranger[0])  # a valid signature by another key, relabelled as ours
    forged = json.loads((ckpt / SIGNATURE).read_text())
    forged["verificationMaterial"] = bundle["verificationMaterial"]
    (ckpt / SIGNATURE).write_text(json.dumps(forged))
    code, out = verify_required(ckpt, public)
    assert code == 2 and "does not verify with any trusted key" in out
    for junk, message in ((b"[" * 5000, "nested"), (b"{}", "not a model-signing signature"), (b"\xff", "UTF-8")):
        (ckpt / SIGNATURE).write_bytes(junk)
        code, out = verify_required(ckpt, public)
        assert code == 2 and message in out and "Traceback" not in out and len(out.strip().splitlines()) == 1


def test_missing_signature_and_no_verify_under_require(ckpt, keys):
    code, out = verify_required(ckpt, keys[1])
    assert code == 2 and "not signed" in out
    code, out = invoke("ckpt", "verify", ckpt, "--require-signature")
    assert code == 2 and "no trusted key" in out
    sign_checkpoint(ckpt, keys[0])
    code, out = invoke("generate", "--checkpoint", ckpt, "-p", "a", "--no-verify", "--require-signature",
                       "--trusted-key", keys[1])
    assert code == 2 and "--no-verify cannot be combined" in out


def test_loose_key_permissions_refused(ckpt, keys):
    private, public = keys
    os.chmod(private, 0o640)
    code, out = invoke("ckpt", "sign", ckpt, "--key", private)
    assert code == 2 and "readable by group or others" in out and not (ckpt / SIGNATURE).exists()
    os.chmod(private, 0o600)
    sign_checkpoint(ckpt, private)
    os.chmod(public, 0o664)
    code, out = verify_required(ckpt, public)
    assert code == 2 and "writable by group or others" in out
    os.chmod(public, 0o644)
    assert verify_required(ckpt, public)[0] == 0


def test_keygen_never_overwrites(tmp_path):
    code, out = invoke("ckpt", "keygen", tmp_path / "k.pem")
    assert code == 0 and oct((tmp_path / "k.pem").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "k.pem.pub").stat().st_mode & 0o777) == "0o644"
    code, out = invoke("ckpt", "keygen", tmp_path / "k.pem")
    assert code == 2 and "never overwritten" in out


def test_keygen_makes_a_private_folder_and_refuses_a_file_in_its_way(tmp_path):
    code, out = invoke("ckpt", "keygen", tmp_path / "keys" / "release.pem")
    assert code == 0 and oct((tmp_path / "keys").stat().st_mode & 0o777) == "0o700"
    (tmp_path / "a_file").write_text("x")
    code, out = invoke("ckpt", "keygen", tmp_path / "a_file" / "k.pem")  # the OS refuses: one line, exit 2
    assert code == 2 and out.startswith("error:") and "a_file" in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1


def test_env_requires_everywhere(ckpt, keys, monkeypatch):
    monkeypatch.setenv("BASTION_REQUIRE_SIGNATURE", "1")
    monkeypatch.setenv("BASTION_TRUSTED_KEYS", str(keys[1]))
    code, out = invoke("ckpt", "inspect", ckpt)
    assert code == 2 and "not signed" in out
    sign_checkpoint(ckpt, keys[0])
    assert invoke("ckpt", "inspect", ckpt)[0] == 0


def test_adapter_folder_signed_at_save_and_checked(tmp_path, keys):
    from bastion.adapters import read_adapter, save_adapter
    from bastion.config.schema import LoraConfig
    from bastion.model.lora import apply_lora
    from helpers import lora_test_model

    model = lora_test_model()
    cfg = LoraConfig(enabled=True, rank=4)
    apply_lora(model, cfg)
    unsigned = save_adapter(model, cfg, tmp_path / "plain", "0" * 64)
    signed = save_adapter(model, cfg, tmp_path / "signed", "0" * 64, signing_key=keys[0])
    with trust(require=True, trusted_keys=[keys[1]]):
        assert read_adapter(signed).tensors
        with pytest.raises(CheckpointError, match="not signed"):
            read_adapter(unsigned)


def test_training_signs_every_checkpoint_and_requires_signed_starts(arithmetic_data, tmp_path, keys):
    from bastion.checkpoint import list_checkpoints
    from bastion.config import build_config
    from bastion.train import train
    from bastion.train.checkpoints import start_point
    from helpers import tiny_config

    private, public = keys
    cfg = tiny_config(arithmetic_data, tmp_path / "run", max_steps=4, eval_every=100)
    cfg.checkpoint.every_steps = 2
    cfg.checkpoint.signing_key = str(private)
    train(cfg, quiet=True)
    saved = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert saved and all((p / SIGNATURE).is_file() for p in saved)
    cfg.train.max_steps = 6
    cfg.checkpoint.require_signature, cfg.checkpoint.trusted_keys = True, [str(public)]
    assert train(cfg, quiet=True, resume=True).steps == 6  # resume checked the signature
    os.remove(list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / SIGNATURE)
    cfg.train.max_steps = 8
    with pytest.raises(CheckpointError, match="not signed"):
        train(cfg, quiet=True, resume=True)
    unsigned = make_base_checkpoint(tmp_path / "base")
    fine = build_config({"train": {"objective": "sft", "seq_len": 64}, "data": {"allowed_roots": ["/"]},
                         "finetune": {"init_from": str(unsigned), "train_file": str(tmp_path / "x.jsonl")},
                         "checkpoint": {"require_signature": True, "trusted_keys": [str(public)]}})
    with pytest.raises(CheckpointError, match="not signed"):
        start_point(fine, fine_tunes=True)


def test_import_hf_signs_the_checkpoint(ckpt, keys, tmp_path):
    from bastion.interop import export_hf

    hf = export_hf(ckpt, tmp_path / "hf")
    code, out = invoke("import", "hf", hf, tmp_path / "imported", "--signing-key", keys[0])
    assert code == 0, out
    assert verify_required(tmp_path / "imported", keys[1])[0] == 0
    os.chmod(keys[0], 0o644)
    code, out = invoke("import", "hf", hf, tmp_path / "again", "--signing-key", keys[0])
    assert code == 2 and "readable by group or others" in out and not (tmp_path / "again").exists()


def _loader_commands(ckpt, adapter, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    (files / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                                               {"role": "assistant", "content": "b"}]}) + "\n")
    (files / "prefs.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    from dataclasses import asdict

    from bastion.data.canaries import RECORDS_FORMAT, RECORDS_VERSION, make_canaries

    records = {"format": RECORDS_FORMAT, "version": RECORDS_VERSION,
               "canaries": [asdict(c) for c in make_canaries("pin {secret}", 3, [1], 1)]}
    (files / "canaries.jsonl").write_text(json.dumps(records))
    root = ["--root", str(files)]
    return {
        "generate": ["generate", "--checkpoint", ckpt, "-p", "a"],
        "serve": ["serve", "--checkpoint", ckpt],
        "export hf": ["export", "hf", ckpt, tmp_path / "o1"],
        "export gguf": ["export", "gguf", ckpt, tmp_path / "o2.gguf"],
        "export peft": ["export", "peft", adapter, tmp_path / "o3"],
        "eval loss": ["eval", "loss", "--checkpoint", ckpt, "--file", files / "chat.jsonl", *root],
        "eval preferences": ["eval", "preferences", "--checkpoint", ckpt, "--file", files / "prefs.jsonl", *root],
        "eval generate": ["eval", "generate", "--checkpoint", ckpt, "--file", files / "prefs.jsonl", "--reward", "exact",
                          *root],
        "eval memorization": ["eval", "memorization", "--checkpoint", ckpt, "--canaries", files / "canaries.jsonl"],
        "merge": ["merge", ckpt, adapter, tmp_path / "o4"],
        "ckpt verify": ["ckpt", "verify", ckpt],
        "ckpt inspect": ["ckpt", "inspect", ckpt],
        "ckpt push": ["ckpt", "push", ckpt, tmp_path / "store"],
    }


def test_every_loader_command_honours_require_signature(ckpt, keys, tmp_path):
    from bastion.adapters import save_adapter
    from bastion.config.schema import LoraConfig
    from bastion.model.lora import apply_lora
    from helpers import lora_test_model

    model = lora_test_model()
    apply_lora(model, LoraConfig(enabled=True, rank=4))
    adapter = save_adapter(model, LoraConfig(enabled=True, rank=4), tmp_path / "adapter", "0" * 64)
    for name, args in _loader_commands(ckpt, adapter, tmp_path).items():
        code, out = invoke(*args, "--require-signature", "--trusted-key", keys[1])
        assert code == 2 and "not signed" in out and len(out.strip().splitlines()) == 1, (name, out)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5)) and not (tmp_path / "store").exists()
    sign_checkpoint(ckpt, keys[0])
    code, out = invoke("generate", "--checkpoint", ckpt, "-p", "a", "--max-new-tokens", "2",
                       "--require-signature", "--trusted-key", keys[1])
    assert code == 0, out
