"""Checkpoint stores against a real S3 server (SeaweedFS, see conftest.py) and a local dir."""
import json
import logging
import os
import stat
import time
from pathlib import Path

import pytest
import torch

from bastion.checkpoint import (
    Checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from bastion.checkpoint.stores import (
    BackgroundPusher,
    LocalStore,
    S3Store,
    open_store,
    validate_name,
)
from bastion.errors import CheckpointError

MiB = 2**20


def make_ckpt(model_bytes: int = 4096, value: float = 1.0) -> Checkpoint:
    return Checkpoint(
        model={"w": torch.randn(model_bytes // 4), "b": torch.full((3,), value)},
        trainer_state={"step": 1},
        config_yaml="model:\n  n_layer: 1\n",
        tokenizer_json='{"model": {}}',
        optimizer={"state.0.exp_avg": torch.zeros(8)},
        optimizer_meta={"param_groups": "[]"},
    )


def s3_store(s3, **kwargs) -> S3Store:
    return S3Store(s3.bucket, s3.prefix, endpoint_url=s3.endpoint, allow_http=True, **kwargs)


def record_calls(store: S3Store, operation: str) -> list[dict]:
    """The API parameters of every `operation` call the store's real client makes."""
    calls: list[dict] = []
    store.client.meta.events.register(f"provide-client-params.s3.{operation}", lambda params, **_: calls.append(dict(params)))
    return calls


def assert_private(directory: Path) -> None:
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for child in directory.iterdir():
        assert stat.S_IMODE(child.stat().st_mode) == 0o600, child


def test_s3_push_list_pull_delete_round_trip(s3, tmp_path):
    ckpts = [save_checkpoint(tmp_path / "run", step, make_ckpt(value=step)) for step in (5, 10)]
    store = s3_store(s3)
    assert store.list() == [] and store.latest() is None
    for ckpt in ckpts:
        store.push(ckpt)
    assert store.list() == ["step_00000005", "step_00000010"]
    assert store.latest() == "step_00000010"

    dest = store.pull("step_00000005", tmp_path / "pulled" / "step_00000005")
    assert verify_checkpoint(dest)["files"] == verify_checkpoint(ckpts[0])["files"]
    assert torch.equal(load_checkpoint(dest).model["b"], torch.full((3,), 5.0))
    assert_private(dest)
    assert not (tmp_path / "pulled" / "step_00000005.part").exists()
    assert store.pull("step_00000005", dest) == dest  # already there: a no-op

    deletes = record_calls(store, "DeleteObject")
    store.delete("step_00000010")
    assert deletes[0]["Key"].endswith("step_00000010/MANIFEST.json")  # manifest first
    assert store.list() == ["step_00000005"] and store.latest() == "step_00000005"
    assert "Contents" not in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"{s3.prefix}/step_00000010/")
    with pytest.raises(CheckpointError, match="not found"):
        store.pull("step_00000010", tmp_path / "gone")


def test_multipart_upload_is_used_for_big_files(s3, tmp_path):
    ckpt = save_checkpoint(tmp_path / "run", 1, make_ckpt(model_bytes=6 * MiB))
    store = s3_store(s3, multipart_threshold=1 * MiB, multipart_chunksize=5 * MiB)
    parts = record_calls(store, "UploadPart")
    store.push(ckpt)
    model_parts = [p for p in parts if p["Key"].endswith("model.safetensors")]
    assert len(model_parts) == 2
    etag = s3.client().head_object(Bucket=s3.bucket, Key=f"{s3.prefix}/step_00000001/model.safetensors")["ETag"]
    assert "-2" in etag  # a multipart object's ETag is "<md5 of part md5s>-<part count>"
    verify_checkpoint(store.pull("step_00000001", tmp_path / "back"))


def test_pull_resumes_partial_files_with_a_range_request(s3, tmp_path):
    ckpt = save_checkpoint(tmp_path / "run", 3, make_ckpt(model_bytes=64 * 1024))
    store = s3_store(s3)
    store.push(ckpt)
    dest = tmp_path / "dl" / "step_00000003"
    part = tmp_path / "dl" / "step_00000003.part"
    part.mkdir(parents=True)
    model = (ckpt / "model.safetensors").read_bytes()
    (part / "model.safetensors.partial").write_bytes(model[:10_000])  # interrupted mid-file
    (part / "config.yaml").write_bytes((ckpt / "config.yaml").read_bytes())  # finished earlier
    (part / "tokenizer.json.partial").write_bytes(b"{X")
    (part / "junk").write_bytes(b"planted")
    gets = record_calls(store, "GetObject")

    store.pull("step_00000003", dest)

    by_file = {call["Key"].rsplit("/", 1)[1]: call for call in gets}
    assert by_file["model.safetensors"]["Range"] == "bytes=10000-"
    assert "config.yaml" not in by_file  # complete with the right SHA-256: skipped
    tokenizer_gets = [c for c in gets if c["Key"].endswith("tokenizer.json")]
    assert [c.get("Range") for c in tokenizer_gets] == ["bytes=2-", None]  # stale partial: refetched whole
    assert verify_checkpoint(dest) and not part.exists()
    assert (dest / "model.safetensors").read_bytes() == model


def test_tampered_object_fails_the_pull_and_leaves_nothing(s3, tmp_path):
    ckpt = save_checkpoint(tmp_path / "run", 4, make_ckpt())
    store = s3_store(s3)
    store.push(ckpt)
    key = f"{s3.prefix}/step_00000004/model.safetensors"
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=bytes(data))
    dest = tmp_path / "dl" / "step_00000004"
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*SHA-256"):
        store.pull("step_00000004", dest)
    assert not dest.exists() and not list((dest.parent / "step_00000004.part").glob("model*"))

    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=bytes(data) + b"more")  # longer than declared
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*more than"):
        store.pull("step_00000004", dest)
    assert not dest.exists()


def test_hostile_manifest_and_listing_cannot_escape_dest(s3, tmp_path):
    store = s3_store(s3)
    client = s3.client()
    evil = {"format": "bastion-checkpoint", "format_version": 1, "files": {"../../evil": {"size": 1, "sha256": "0" * 64}}}
    client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/evil/MANIFEST.json", Body=json.dumps(evil).encode())
    client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/evil/x", Body=b"x")
    dest = tmp_path / "a" / "b" / "evil"
    with pytest.raises(CheckpointError, match="unsafe file name"):
        store.pull("evil", dest)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "a" / "evil").exists() and not dest.exists()
    # listed keys with invalid names are ignored; a hostile `latest` is ignored too
    for bad in (".hidden", "bad name", "latest"):
        client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/{bad}/MANIFEST.json", Body=b"{}")
    client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/latest", Body=b"../../etc\n")
    assert store.list() == ["evil"] and store.latest() == "evil"
    # a huge manifest or a huge declared size is refused before anything is written
    client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/huge/MANIFEST.json", Body=b" " * (MiB + 1))
    with pytest.raises(CheckpointError, match="limit"):
        store.pull("huge", tmp_path / "huge")
    ckpt = save_checkpoint(tmp_path / "run", 1, make_ckpt())
    store.push(ckpt)
    with pytest.raises(CheckpointError, match="max_bytes"):
        store.pull("step_00000001", tmp_path / "small", max_bytes=100)
    assert not (tmp_path / "small").exists() and not (tmp_path / "small.part").exists()


def test_crashed_push_without_manifest_is_invisible(s3, tmp_path):
    ckpt = save_checkpoint(tmp_path / "run", 7, make_ckpt())
    store = s3_store(s3)
    store.push(ckpt, "step_00000006")
    client = s3.client()
    for file in ckpt.iterdir():  # everything but the manifest, as if the pusher died
        if file.name != "MANIFEST.json":
            client.upload_file(str(file), s3.bucket, f"{s3.prefix}/step_00000007/{file.name}")
    assert store.list() == ["step_00000006"]
    assert store.latest() == "step_00000006"
    with pytest.raises(CheckpointError, match="not found"):
        store.pull("step_00000007", tmp_path / "x")
    store.push(ckpt)  # a retried push completes it
    assert store.list() == ["step_00000006", "step_00000007"]


def test_bad_credentials_give_an_error_without_secrets(s3, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="bastion")
    ckpt = save_checkpoint(tmp_path / "run", 1, make_ckpt())
    wrong_secret = "wrong-" + s3.secret_key[::-1]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    store = s3_store(s3)
    messages = []
    for action in (store.list, lambda: store.push(ckpt), lambda: store.pull("step_00000001", tmp_path / "d")):
        with pytest.raises(CheckpointError) as info:
            action()
        messages.append(str(info.value))
        assert info.value.__cause__ is None and info.value.__context__ is None
    assert "SignatureDoesNotMatch" in messages[0] and s3.bucket in messages[0]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "BTNOSUCHKEY000000")
    with pytest.raises(CheckpointError, match="InvalidAccessKeyId") as info:
        s3_store(s3).list()
    messages.append(str(info.value))
    for text in [*messages, caplog.text]:
        for secret in (wrong_secret, s3.secret_key, s3.access_key, "BTNOSUCHKEY000000"):
            assert secret not in text


def test_endpoint_policy_tls_loopback_and_userinfo():
    for url in ("http://example.com", "http://10.0.0.1:9000", "http://127.0.0.1.nip.io"):
        with pytest.raises(CheckpointError, match="loopback"):
            S3Store("bucket", endpoint_url=url, allow_http=True)
    with pytest.raises(CheckpointError, match="https"):
        S3Store("bucket", endpoint_url="http://127.0.0.1:9000")  # loopback, but http not allowed
    for url in ("http://127.0.0.1:9000", "http://127.8.0.1", "http://[::1]:9000", "http://localhost:9000"):
        S3Store("bucket", endpoint_url=url, allow_http=True)
    S3Store("bucket", endpoint_url="https://s3.example.com")
    for url in ("https://AKIAEXAMPLE:sup3r-s3cret@s3.example.com", "http://AKIAEXAMPLE:sup3r-s3cret@127.0.0.1"):
        with pytest.raises(CheckpointError, match="credentials") as info:
            S3Store("bucket", endpoint_url=url, allow_http=True)
        assert "sup3r-s3cret" not in str(info.value) and "AKIAEXAMPLE" not in str(info.value)
    with pytest.raises(CheckpointError) as info:
        open_store("s3://AKIAEXAMPLE:sup3r-s3cret@bucket/p")
    assert "sup3r-s3cret" not in str(info.value)
    for url in ("ftp://127.0.0.1", "https://s3.example.com/?X-Amz-Signature=abc"):
        with pytest.raises(CheckpointError):
            S3Store("bucket", endpoint_url=url)


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 129, "latest", "a..b", "a b", "step_1\n"])
def test_hostile_names_are_refused(tmp_path, name):
    with pytest.raises(CheckpointError, match="invalid checkpoint name"):
        validate_name(name)
    store = LocalStore(tmp_path / "store")
    for action in (lambda: store.pull(name, tmp_path / "d"), lambda: store.delete(name)):
        with pytest.raises(CheckpointError, match="invalid checkpoint name"):
            action()
    with pytest.raises(CheckpointError, match="invalid checkpoint name"):
        store.push(save_checkpoint(tmp_path / "run", 1, make_ckpt()), name)
    assert not (tmp_path / "x").exists() and sorted(p.name for p in (tmp_path / "store").iterdir()) == []


def test_valid_names():
    for name in ("step_00000001", "step_123456789", "best-v1.2", "final_A"):
        assert validate_name(name) == name


def test_open_store_schemes(tmp_path):
    assert isinstance(open_store(str(tmp_path / "a")), LocalStore)
    local = open_store(f"file://{tmp_path}/b")
    assert isinstance(local, LocalStore) and local.root == tmp_path / "b"
    s3 = open_store("s3://my-bucket/runs/exp1", endpoint_url="https://s3.example.com")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("my-bucket", "runs/exp1")
    for url in ("gs://bucket/x", "https://host/x", "file://otherhost/x", "file://relative", "s3://bucket/../x", "s3://B_ad/x"):
        with pytest.raises(CheckpointError):
            open_store(url)


def test_local_store_round_trip_and_atomicity(tmp_path):
    store = LocalStore(tmp_path / "nas")
    first = save_checkpoint(tmp_path / "run", 1, make_ckpt(value=1.0))
    store.push(first)
    store.push(first, "best")
    assert store.list() == ["best", "step_00000001"] and store.latest() == "best"
    assert_private(tmp_path / "nas" / "step_00000001")
    assert stat.S_IMODE((tmp_path / "nas").stat().st_mode) == 0o700
    store.push(first)
    assert resolve_checkpoint(tmp_path / "nas").name == "step_00000001"  # a normal checkpoint root

    # a source that no longer matches its manifest is refused; the old copy stays intact
    second = save_checkpoint(tmp_path / "run2", 1, make_ckpt(value=2.0))
    with open(second / "config.yaml", "ab") as fh:
        fh.write(b"# tampered\n")
    with pytest.raises(CheckpointError, match="config.yaml"):
        store.push(second)
    assert sorted(p.name for p in (tmp_path / "nas").iterdir()) == ["best", "latest", "step_00000001"]
    verify_checkpoint(tmp_path / "nas" / "step_00000001")

    dest = store.pull("step_00000001", tmp_path / "back" / "ck")
    assert torch.equal(load_checkpoint(dest).model["b"], torch.full((3,), 1.0))
    assert_private(dest)
    store.delete("step_00000001")
    assert store.list() == ["best"] and store.latest() == "best"
    (tmp_path / "occupied").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        store.pull("best", tmp_path / "occupied")


def test_background_pusher_does_not_block_and_drains(s3, tmp_path):
    ckpts = [save_checkpoint(tmp_path / "run", step, make_ckpt(model_bytes=MiB)) for step in (1, 2)]
    store = s3_store(s3, max_bandwidth=MiB)  # about 1 s of upload per checkpoint
    pusher = BackgroundPusher(store)
    start = time.monotonic()
    for ckpt in ckpts:
        pusher.submit(ckpt)
    submitted = time.monotonic() - start
    assert pusher.close(timeout=60)
    total = time.monotonic() - start
    assert submitted < 0.05 and total > 1.0, (submitted, total)  # upload: ~2 MiB at 1 MiB/s
    assert pusher.errors == [] and pusher.pushed == ["step_00000001", "step_00000002"]
    assert store.list() == ["step_00000001", "step_00000002"] and store.latest() == "step_00000002"
    with pytest.raises(CheckpointError, match="closed"):
        pusher.submit(ckpts[0])


def test_background_pusher_retries_reports_failures_and_skips_vanished(s3, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="bastion")
    ckpt = save_checkpoint(tmp_path / "run", 1, make_ckpt())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "bad-" + s3.secret_key)
    pusher = BackgroundPusher(s3_store(s3), retries=2, backoff_s=0.01)
    pusher.submit(tmp_path / "run" / "step_00000099")  # deleted by retention before its turn
    pusher.submit(ckpt)
    assert pusher.close(timeout=30)
    assert len(pusher.errors) == 1 and "SignatureDoesNotMatch" in pusher.errors[0]
    assert "vanished" in caplog.text and caplog.text.count("retrying") == 2
    for text in (pusher.errors[0], caplog.text):
        assert s3.secret_key not in text and s3.access_key not in text


def test_background_pusher_queue_keeps_the_newest(tmp_path):
    class SlowStore(LocalStore):  # a real LocalStore whose pushes take a while
        def push(self, *args, **kwargs):
            time.sleep(0.3)
            super().push(*args, **kwargs)

    ckpts = [save_checkpoint(tmp_path / "run", step, make_ckpt()) for step in range(1, 6)]
    pusher = BackgroundPusher(SlowStore(tmp_path / "nas"), max_queue=2)
    for ckpt in ckpts:
        pusher.submit(ckpt)
    assert pusher.close(timeout=10)
    assert pusher.pushed[-2:] == ["step_00000004", "step_00000005"] and len(pusher.pushed) <= 3
    assert os.path.isdir(tmp_path / "nas" / "step_00000005")
