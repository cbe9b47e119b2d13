"""DP-SGD: per-example gradients, clipping + noise, Poisson sampling, the accountant, resume,
and refusals (DP happens or the run fails)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import tiny_config

from bastion.checkpoint import load_checkpoint
from bastion.errors import CheckpointError, ConfigError
from bastion.model import Transformer
from bastion.config.presets import model_config
from bastion.train import train
from bastion.train.dp import KEY_FILE, PrivateTraining, _epsilon
from bastion.train.metrics import read_metrics



def write_fixed_key(run):
    """The same secret key for several runs, so they draw the same batches and noise."""
    run.mkdir(mode=0o700, exist_ok=True)
    (run / KEY_FILE).write_text(bytes(range(32)).hex() + "\n")
    (run / KEY_FILE).chmod(0o600)


pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def dp_config(data, run, dp=None, **train_settings):
    return tiny_config(data, run, dp={"enabled": True, **(dp or {})}, **train_settings)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(model_config("tiny", vocab_size=300, dropout=0.0))


def private(model, n_examples=1000, total_steps=10, **dp):
    tc = tiny_config("d", "r", dp={"enabled": True, **dp}).train
    return PrivateTraining(model, tc, n_examples=n_examples, total_steps=total_steps)


def test_per_example_gradients_clipping_and_noise():
    """Opacus hooks + our RMSNorm rule give each example's own gradient (tied embedding/lm_head
    included), and privatize() = (sum of clipped per-example grads + noise) / expected batch."""
    model = tiny_model()
    dp = private(model, noise_multiplier=0.5, max_grad_norm=0.05)
    dp.key = bytes(32)
    x, y = torch.randint(0, 300, (5, 16)), torch.randint(0, 300, (5, 16))
    model(x, y)[1].backward()
    per_example = {name: p.grad_sample.clone() for name, p in model.named_parameters()}
    for i in range(5):
        reference = tiny_model()
        reference(x[i:i + 1], y[i:i + 1])[1].backward()
        for name, p in reference.named_parameters():
            torch.testing.assert_close(per_example[name][i], p.grad, atol=1e-6, rtol=1e-4)

    norms = torch.stack([g.reshape(5, -1).pow(2).sum(1) for g in per_example.values()]).sum(0).sqrt()
    assert (norms > 0.05).all()  # so every example is actually clipped
    scale = 0.05 / (norms + 1e-6)
    dp.privatize(step=3, batch_size=5)
    noise = {}
    for name, p in model.named_parameters():
        clipped_sum = torch.einsum("n,n...->...", scale, per_example[name])
        noise[name] = p.grad * dp.expected_batch - clipped_sum
        assert p.grad_sample is None
    flat = torch.cat([n.flatten() for n in noise.values()])
    assert flat.std().item() == pytest.approx(0.5 * 0.05, rel=0.05)  # sigma * C
    assert dp.history == [(0.5, dp.sample_rate, 1)]


def test_empty_batch_is_a_noise_only_step():
    model = tiny_model()
    dp = private(model, noise_multiplier=1.0)
    dp.key = bytes(32)
    dp.privatize(step=0, batch_size=0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert dp.history[-1][2] == 1


def test_poisson_sampling_is_keyed_by_step_and_has_the_right_rate():
    dp = private(tiny_model(), n_examples=1000, noise_multiplier=1.0)
    dp.key = bytes(32)
    assert dp.sample(5) == dp.sample(5) and dp.sample(5) != dp.sample(6)
    sizes = [len(dp.sample(s)) for s in range(3000)]
    assert np.mean(sizes) == pytest.approx(8, rel=0.05) and len(set(sizes)) > 5  # q * n = batch_size, varying
    assert all(len(set(dp.sample(s))) == len(dp.sample(s)) for s in range(50))
    other = private(tiny_model(), n_examples=1000, noise_multiplier=1.0)
    other.key = bytes([1] * 32)
    assert [other.sample(s) for s in range(5)] != [dp.sample(s) for s in range(5)]  # the secret key decides


class Scale(nn.Module):
    """A layer Opacus has no per-example rule for."""

    def __init__(self, dim):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gain


def test_unsupported_layers_are_refused_by_name(arithmetic_data, tmp_path, monkeypatch):
    model = tiny_model()
    model.layers[0].attention_norm = Scale(64)
    with pytest.raises(ConfigError, match=r"layers\.0\.attention_norm .*Scale.* no per-example gradient rule"):
        private(model, noise_multiplier=1.0)
    model = tiny_model()
    model.layers[1].feed_forward.dropout = nn.BatchNorm1d(64, affine=False)  # no parameters, still mixes examples
    with pytest.raises(ConfigError, match="BatchNorm1d.*mixes examples"):
        private(model, noise_multiplier=1.0)

    class Patched(Transformer):  # what train() builds: refused before any step or checkpoint
        def __init__(self, cfg):
            super().__init__(cfg)
            self.norm = Scale(cfg.d_model)

    monkeypatch.setattr("bastion.train.loop.Transformer", Patched)
    with pytest.raises(ConfigError, match="Scale"):
        train(dp_config(arithmetic_data, tmp_path / "run", {"noise_multiplier": 1.0}, max_steps=3), quiet=True)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("setting, message", [
    ({"compile": True}, "train.compile"),
    ({"grad_accum": 2}, "grad_accum"),
    ({"dp": {"enabled": True, "poisson_sampling": False}}, "poisson_sampling"),
    ({"dp": {"enabled": True, "noise_multiplier": 0.3, "target_epsilon": 1.0}}, "would spend epsilon"),
    ({"batch_size": 1024, "seq_len": 128}, "smaller than the number of training blocks"),
])
def test_settings_that_would_break_privacy_are_refused(arithmetic_data, tmp_path, setting, message):
    cfg = tiny_config(arithmetic_data, tmp_path / "run", **{"dp": {"enabled": True}, **setting})
    with pytest.raises(ConfigError, match=message):
        train(cfg, quiet=True)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_epsilon_grows_and_ends_within_target(arithmetic_data, tmp_path):
    run = tmp_path / "run"
    # A fixed key makes the run deterministic. (With a random one, ~1% of such runs draw an empty
    # Poisson batch somewhere: a noise-only step whose loss is NaN.)
    write_fixed_key(run)
    result = train(dp_config(arithmetic_data, run, {"target_epsilon": 4.0}, max_steps=30, log_every=5, eval_every=15),
                   quiet=True)
    eps = [r["epsilon"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert len(eps) == 6 and all(a < b for a, b in zip(eps, eps[1:]))
    assert 3.9 < eps[-1] <= 4.0 and result.epsilon == eps[-1]
    state = load_checkpoint(run / "checkpoints").trainer_state["dp"]
    assert sum(n for _, _, n in state["history"]) == 30 and state["epsilon"] == pytest.approx(eps[-1])
    assert (run / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert KEY_FILE not in {p.name for p in (run / "checkpoints").rglob("*")}  # the key never ships
    assert all(math.isfinite(x) for x in result.losses) and result.losses[-1] < result.losses[0]


def test_resume_restores_accountant_and_curve_exactly(arithmetic_data, tmp_path):
    """2N DP steps in one go == N steps, stop, resume, N more: same losses, weights, epsilon."""
    for name in ("full", "part"):
        write_fixed_key(tmp_path / name)
    kw = dict(dp={"noise_multiplier": 1.0}, max_steps=24, log_every=1)
    full = train(dp_config(arithmetic_data, tmp_path / "full", **kw), quiet=True)
    part = train(dp_config(arithmetic_data, tmp_path / "part", **kw), quiet=True, should_stop=lambda s: s == 11)
    assert part.steps == 11
    half = load_checkpoint(tmp_path / "part" / "checkpoints").trainer_state["dp"]["epsilon"]
    rest = train(dp_config(arithmetic_data, tmp_path / "part", **kw), quiet=True, resume=True)
    assert rest.steps == 24 and 0 < half < rest.epsilon
    assert rest.epsilon == full.epsilon
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["kind"] == "train"]
              for name in ("full", "part")}
    assert losses["part"] == losses["full"] and len(losses["full"]) == 24
    a = load_checkpoint(tmp_path / "full" / "checkpoints")
    b = load_checkpoint(tmp_path / "part" / "checkpoints")
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert a.trainer_state["dp"] == b.trainer_state["dp"]
    saved = a.trainer_state["dp"]
    assert _epsilon([tuple(h) for h in saved["history"]], saved["delta"]) == full.epsilon


def test_dp_and_non_dp_checkpoints_do_not_mix_on_resume(arithmetic_data, tmp_path):
    train(tiny_config(arithmetic_data, tmp_path / "plain", max_steps=2), quiet=True)
    with pytest.raises(CheckpointError, match="trained without DP"):
        train(dp_config(arithmetic_data, tmp_path / "plain", {"noise_multiplier": 1.0}, max_steps=4), quiet=True,
              resume=True)
    train(dp_config(arithmetic_data, tmp_path / "private", {"noise_multiplier": 1.0}, max_steps=2), quiet=True)
    with pytest.raises(CheckpointError, match="continue without privacy"):
        train(tiny_config(arithmetic_data, tmp_path / "private", max_steps=4), quiet=True, resume=True)


def test_resume_without_the_key_file_continues_privately_with_a_new_key(arithmetic_data, tmp_path, capsys):
    run = tmp_path / "run"
    kw = dict(dp={"noise_multiplier": 1.0}, max_steps=6)
    train(dp_config(arithmetic_data, run, **kw), quiet=True, should_stop=lambda s: s == 3)
    old_key = (run / KEY_FILE).read_text()
    (run / KEY_FILE).unlink()
    result = train(dp_config(arithmetic_data, run, **kw), resume=True)
    assert result.steps == 6 and "resuming with a new secret key" in capsys.readouterr().err
    assert (run / KEY_FILE).read_text() != old_key
    history = load_checkpoint(run / "checkpoints").trainer_state["dp"]["history"]
    assert sum(n for _, _, n in history) == 6


def test_a_readable_key_file_is_refused(arithmetic_data, tmp_path):
    write_fixed_key(tmp_path / "run")
    (tmp_path / "run" / KEY_FILE).chmod(0o644)
    with pytest.raises(ConfigError, match="too open"):
        train(dp_config(arithmetic_data, tmp_path / "run", {"noise_multiplier": 1.0}, max_steps=2), quiet=True)
