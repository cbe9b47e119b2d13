"""Stores in the workflows users run: training that pushes in the background, and the
`bastion ckpt push/pull/list` commands, against the real SeaweedFS S3 server."""
from helpers import tiny_config
from typer.testing import CliRunner

from bastion.checkpoint import list_checkpoints, load_checkpoint
from bastion.checkpoint.stores import S3Store
from bastion.cli import app
from bastion.train import train

runner = CliRunner()


def test_training_pushes_checkpoints_to_s3(arithmetic_data, tmp_path, s3):
    cfg = tiny_config(arithmetic_data, tmp_path / "run", max_steps=30)
    cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={
        "every_steps": 10, "keep_last": 3, "push_to": f"s3://{s3.bucket}/{s3.prefix}",
        "endpoint_url": s3.endpoint, "allow_http": True})})
    train(cfg, quiet=True)
    store = S3Store(s3.bucket, s3.prefix, endpoint_url=s3.endpoint, allow_http=True)
    assert store.list() == ["step_00000010", "step_00000020", "step_00000030"]
    pulled = store.pull("step_00000030", tmp_path / "pulled")
    local = load_checkpoint(tmp_path / "run" / "checkpoints").model
    remote = load_checkpoint(pulled).model
    assert all((local[k] == remote[k]).all() for k in local)


def test_ckpt_push_list_pull_commands(arithmetic_data, tmp_path, s3):
    train(tiny_config(arithmetic_data, tmp_path / "run", max_steps=5), quiet=True)
    url = f"s3://{s3.bucket}/{s3.prefix}"
    endpoint = ["--endpoint-url", s3.endpoint, "--allow-http"]
    pushed = runner.invoke(app, ["ckpt", "push", str(tmp_path / "run" / "checkpoints"), url, *endpoint])
    assert pushed.exit_code == 0, pushed.output
    listed = runner.invoke(app, ["ckpt", "list", url, *endpoint])
    assert "step_00000005  (latest)" in listed.output
    pulled = runner.invoke(app, ["ckpt", "pull", url, "latest", str(tmp_path / "got"), *endpoint])
    assert pulled.exit_code == 0, pulled.output
    assert runner.invoke(app, ["ckpt", "verify", str(tmp_path / "got")]).exit_code == 0
    local = runner.invoke(app, ["ckpt", "list", str(tmp_path / "run")])
    assert "latest" in local.output and len(list_checkpoints(tmp_path / "run" / "checkpoints")) == 1
    no_tls = runner.invoke(app, ["ckpt", "list", url, "--endpoint-url", s3.endpoint])
    assert no_tls.exit_code == 2 and "http" in no_tls.output
    assert s3.secret_key not in no_tls.output
