"""Canaries and the memorization audit: rank/exposure math, canary insertion, and the measured
effect of repetition and of DP-SGD on exposure."""
import json
import math
import random
import shutil
import types

import numpy as np
import pytest
from helpers import tiny_config
from typer.testing import CliRunner

from bastion.cli import app
from bastion.data.canaries import insert_canaries, read_canaries
from bastion.data.shards import TokenShards, read_index
from bastion.errors import DataError
from bastion.eval.memorization import audit_memorization, exposure, rank_secret
from bastion.tokenizer import BastionTokenizer
from bastion.train import train
from bastion.train.dp import KEY_FILE

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
runner = CliRunner()
STEPS = 200
# At 200 steps (~1.5 epochs) the tiny model memorises a 4-digit secret seen ~450 times reliably;
# at 100 repeats the exposure still varies from ~3 to ~13 with the secret drawn.
MANY = 300


def by_value(candidates):
    """A hand-made scorer: smaller numbers are more likely, so "0000" ranks first."""
    return -np.array([int(c) for c in candidates], dtype=float)


# ---- rank and exposure ------------------------------------------------------------------
def test_exact_rank_and_exposure_on_a_handmade_scorer():
    result = rank_secret(by_value, "0042", 4)
    assert result.exact and result.rank == 43  # 0000..0041 score higher
    assert result.exposure == pytest.approx(math.log2(10_000) - math.log2(43))
    top = rank_secret(by_value, "0000", 4)
    assert top.rank == 1 and top.exposure == top.max_exposure == pytest.approx(math.log2(10_000))
    assert rank_secret(by_value, "9999", 4).exposure == pytest.approx(0.0)
    assert exposure(1, 1024) == 10.0
    with pytest.raises(ValueError):
        exposure(0, 1024)


def test_estimated_rank_from_a_uniform_sample():
    result = rank_secret(by_value, "010000", 6, exact_limit=10_000, sample_size=100_000, rng=np.random.default_rng(1))
    assert not result.exact and result.sample_size == 100_000 and not result.beyond_resolution
    true_exposure = math.log2(1e6) - math.log2(10_001)  # about 1,000 sampled candidates beat it: +-0.05 bits
    assert result.exposure == pytest.approx(true_exposure, abs=0.2)
    # Nothing in the sample beats the top secret: the rank is only known to the sample's resolution.
    top = rank_secret(by_value, "000000", 6, exact_limit=10_000, sample_size=1000, rng=np.random.default_rng(1))
    assert top.beyond_resolution and top.rank == pytest.approx(1 + 999_999 / 1000)
    assert top.exposure < top.max_exposure


# ---- canaries ---------------------------------------------------------------------------
@pytest.fixture
def seeded_secrets(monkeypatch):
    """Deterministic secrets for the test (production draws them from `secrets`)."""
    rng = random.Random(1234)
    monkeypatch.setattr("bastion.data.canaries.secrets", types.SimpleNamespace(randbelow=rng.randrange))


def copy_dataset(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_canaries_are_appended_as_a_verified_shard(arithmetic_data, tmp_path, seeded_secrets):
    data = copy_dataset(arithmetic_data, tmp_path / "data")
    before = TokenShards(data, "train")
    done = insert_canaries(data, tmp_path / "canaries.json", digits=4, repeats=[1, 3, 7], per_repeat=2, seed=5)
    after = TokenShards(data, "train", verify=True)  # every shard's SHA-256, the new one included
    assert done.shard == "train_000001.bin" and (data / done.shard).stat().st_mode & 0o777 == 0o600
    assert after.num_tokens == before.num_tokens + done.tokens
    assert after.documents == before.documents + 2 * (1 + 3 + 7) == before.documents + done.documents
    assert read_index(data)["canary_shards"] == [{"file": "train_000001.bin", "documents": 22, "canaries": 6}]

    canaries, dataset = read_canaries(tmp_path / "canaries.json")
    assert (tmp_path / "canaries.json").stat().st_mode & 0o777 == 0o600
    assert [c.repeats for c in canaries] == [1, 1, 3, 3, 7, 7]
    assert all(c.candidate_space == 10_000 and len(c.secret) == 4 for c in canaries)
    assert dataset["shard"] == done.shard
    assert dataset["shard_sha256"] == read_index(data)["splits"]["train"]["shards"][-1]["sha256"]
    # Each repetition is its own document: the canary's tokens then eos, `repeats` times.
    tok = BastionTokenizer.from_file(data / "tokenizer.json")
    shard = after.read(before.num_tokens, done.tokens).tolist()
    docs, current = [], []
    for t in shard:
        if t == tok.eos_id:
            docs.append(tok.decode(current))
            current = []
        else:
            current.append(t)
    assert not current and len(docs) == 22
    for c in canaries:
        assert docs.count(f"my PIN is {c.secret}") == c.repeats
    assert docs != [c.render() for c in canaries for _ in range(c.repeats)]  # shuffled, not grouped by canary

    again = insert_canaries(data, tmp_path / "more.json", digits=4, repeats=[2], per_repeat=1)
    assert again.shard == "train_000002.bin"  # re-running adds another shard
    assert TokenShards(data, "train", verify=True).num_tokens == after.num_tokens + again.tokens


def test_canary_records_stay_private_and_refusals_leave_the_dataset_alone(arithmetic_data, tmp_path):
    data = copy_dataset(arithmetic_data, tmp_path / "data")
    index_before = (data / "index.json").read_bytes()
    (tmp_path / "link").symlink_to(data)
    for out, message in [
        (data / "canaries.json", "inside the dataset"),
        (tmp_path / "link" / "c.json", "inside the dataset"),  # via a symlink
        (data, "already exists"),
    ]:
        with pytest.raises(DataError, match=message):
            insert_canaries(data, out, digits=4)
    for fmt in ["my PIN is", "{secret} {secret}", "{secret.__class__}", "{secret}"]:
        with pytest.raises(DataError, match="format"):
            insert_canaries(data, tmp_path / "c.json", fmt=fmt, digits=4)
    (tmp_path / "taken.json").write_text("{}")
    with pytest.raises(DataError, match="already exists"):
        insert_canaries(data, tmp_path / "taken.json", digits=4)
    assert (data / "index.json").read_bytes() == index_before
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in arithmetic_data.iterdir())


# ---- measured memorization ---------------------------------------------------------------
@pytest.fixture(scope="module")
def canaried(arithmetic_data, tmp_path_factory):
    """Arithmetic data + two canaries inserted once and two inserted MANY times (4-digit secrets,
    so ranks are exact), a plain (non-DP) run of STEPS steps on it, and its audit via the CLI."""
    root = tmp_path_factory.mktemp("canaried")
    data = copy_dataset(arithmetic_data, root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("bastion.data.canaries.secrets", types.SimpleNamespace(randbelow=random.Random(7).randrange))
        result = runner.invoke(app, ["data", "canaries", str(data), "--out", str(root / "canaries.json"),
                                     "--repeats", "1", "--repeats", str(MANY), "--per-repeat", "2", "--digits", "4"])
    assert result.exit_code == 0, result.output
    assert f"4 canaries, {2 + 2 * MANY} documents" in result.output
    train(tiny_config(data, root / "plain", max_steps=STEPS, log_every=50, eval_every=STEPS), quiet=True)
    audit = runner.invoke(app, ["eval", "memorization", "--checkpoint", str(root / "plain"),
                                "--canaries", str(root / "canaries.json"), "--json", str(root / "plain.json")])
    return types.SimpleNamespace(root=root, audit=audit)


def test_exposure_rises_with_repetitions(canaried):
    result, report_file = canaried.audit, canaried.root / "plain.json"
    assert result.exit_code == 0, result.output
    assert "exposure" in result.output and "13.29" in result.output  # max exposure log2(10^4)
    report = json.loads(report_file.read_text())
    assert report_file.stat().st_mode & 0o777 == 0o600
    assert all("secret" not in r for r in report["results"])  # reports never carry the secrets
    assert all(r["rank_exact"] for r in report["results"])
    means = {int(k): v for k, v in report["mean_exposure_by_repeats"].items()}
    print("exposure by repeats (plain):", means)
    assert means[MANY] > 6.0 and means[MANY] > means[1] + 4.0


# A second 200-step run, under DP-SGD (per-example gradients: ~2x a plain run): the measured
# privacy effect, in `make test-all`. DP training itself keeps its fast tests (tests/train/test_dp.py)
# and the audit its own (above).
@pytest.mark.slow
def test_dp_training_lowers_exposure(canaried):
    root = canaried.root
    run = root / "dp"
    run.mkdir(mode=0o700)
    (run / KEY_FILE).write_text(bytes(range(32)).hex() + "\n")  # a fixed key keeps the test deterministic
    (run / KEY_FILE).chmod(0o600)
    cfg = tiny_config(root / "data", run, max_steps=STEPS, log_every=50, eval_every=STEPS,
                      dp={"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0})
    result = train(cfg, quiet=True)
    private = audit_memorization(run, root / "canaries.json").by_repeats()
    plain = {int(k): v for k, v in json.loads((root / "plain.json").read_text())["mean_exposure_by_repeats"].items()}
    print(f"exposure by repeats: plain {plain}, DP {private} (epsilon {result.epsilon:.2f})")
    assert private[MANY] < plain[MANY] - 3.0
    assert result.epsilon is not None and result.epsilon < 8
