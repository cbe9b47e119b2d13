"""`kto`: KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization") on unpaired completions, each labelled desirable or undesirable (data format:
bastion/data/finetune.py).

    r(x, y) = log pi(y|x) - log pi_ref(y|x)          summed over the completion's tokens
    z0      = max(0, mean of r(x, y') over the batch)  y': another prompt's completion; no gradient
    desirable:    lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable:  lambda_U * (1 - sigmoid(beta * (z0 - r)))
    loss = mean over the batch's completions

z0 estimates KL(pi || pi_ref): the reference point the implied reward must rise above
(desirable) or fall below (undesirable). Each example's mismatched "KL" sequence is fixed by
the data (`kl_partners`: its prompt with the completion of the next example whose prompt
differs), so the reference log-probs of both its sequences can be computed once, in
`prepare`, with the starting weights, as DPO does: [N, 2] floats and no reference model in
memory. Costs per step: one forward+backward over the completions, plus one forward without
gradients over the KL sequences (the policy's side of z0).

Under torchrun each rank computes the KL log-ratios of its rows of the global batch and one
all-reduce (two numbers) makes z0 the mean over the whole global batch, so every rank uses
the z0 of one process with the global batch and the gradients match it exactly; the loss is
a mean over completions, split among ranks like the preference pairs.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from bastion.config.schema import BastionConfig, PreferenceConfig
from bastion.data.batches import batch_to_device
from bastion.data.finetune import KTODataset, load_kto
from bastion.errors import DataError
from bastion.train.distributed import sum_across_ranks
from bastion.train.tasks.base import Autocast, Forward, Stats, register_task
from bastion.train.tasks.files import FileTask, eval_batches
from bastion.train.tasks.orpo import refuse_label_smoothing
from bastion.train.tasks.preference import reference_logprobs, summed_logprobs

if TYPE_CHECKING:
    from bastion.train.checkpoints import StartPoint

RECOMMENDED_BALANCE = (1.0, 4.0 / 3.0)  # lambda_D n_D / (lambda_U n_U), KTO paper section 4.2


class KTORows(NamedTuple):
    losses: torch.Tensor  # [B] each completion's weighted loss (with gradient)
    rewards: torch.Tensor  # [B] beta * r, detached
    z0: torch.Tensor  # [] the batch's KL reference point (no gradient)
    desirable: torch.Tensor  # [B] bool
    beta: float


def kto_losses(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor, *,
               beta: float, desirable_weight: float, undesirable_weight: float) -> KTORows:
    """Per-completion KTO losses from summed log-probs of policy and reference, labels, z0."""
    r = policy - reference
    z0 = z0.detach()
    gain = torch.where(desirable, beta * (r - z0), beta * (z0 - r))  # how far on the label's side of z0
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(gain.dtype)
    return KTORows(weight * (1.0 - torch.sigmoid(gain)), (beta * r).detach(), z0, desirable, beta)


def kto_stats(rows: KTORows) -> Stats:
    """Per-batch statistics, defined whatever the batch's labels: z0 ("kl"), how often the
    implied reward lies on the label's side of z0 ("reward_accuracy"), and the mean signed
    distance beta * (r - z0), + for desirable and - for undesirable ("reward_margin")."""
    side = torch.where(rows.desirable, 1.0, -1.0).to(rows.rewards.dtype)
    shifted = side * (rows.rewards - rows.beta * rows.z0)
    return {"kl": rows.z0.float(), "reward_accuracy": (shifted > 0).float().mean(), "reward_margin": shifted.mean()}


@torch.no_grad()
def kl_reference_point(kl_ratios: torch.Tensor, *, real: bool = True, world: int = 1) -> torch.Tensor:
    """z0 = max(0, mean KL log-ratio over the global batch): each rank's rows summed, then
    the ranks' sums (a rank whose rows are only filler, `real` False, adds nothing)."""
    part = torch.stack([kl_ratios.double().sum(), torch.tensor(kl_ratios.numel(), dtype=torch.float64,
                                                                device=kl_ratios.device)])
    total, count = sum_across_ranks(part * float(real), world)
    return (total / count).clamp(min=0).float()


def kto_columns(forward: Forward, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B, 2] summed log-probs of each completion and of its KL sequence (the reference table)."""
    return torch.stack([summed_logprobs(forward, batch["ids"], batch["labels"])[0],
                        summed_logprobs(forward, batch["kl_ids"], batch["kl_labels"])[0]], dim=1)


def kto_rows(forward: Forward, batch: Mapping[str, torch.Tensor], reference: torch.Tensor, pc: PreferenceConfig, *,
             real: bool = True, world: int = 1) -> KTORows:
    """The KTO losses of this rank's rows of a batch: the KL forward without gradients first
    (z0 is a constant of the loss), then the completions with them."""
    ref = reference[batch["index"]]
    with torch.no_grad():
        kl_policy, _ = summed_logprobs(forward, batch["kl_ids"], batch["kl_labels"])
    z0 = kl_reference_point(kl_policy - ref[:, 1], real=real, world=world)
    policy, _ = summed_logprobs(forward, batch["ids"], batch["labels"])
    return kto_losses(policy, ref[:, 0], batch["desirable"], z0, beta=pc.beta,
                      desirable_weight=pc.kto_desirable_weight, undesirable_weight=pc.kto_undesirable_weight)


@torch.no_grad()
def evaluate_kto(forward: Forward, dataset: KTODataset, reference: torch.Tensor, pc: PreferenceConfig, *,
                 batch_size: int, seq_len: int, device: torch.device, autocast: Autocast,
                 max_batches: int | None = None, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Completion-weighted means over held-out labelled completions (z0 per batch, as in
    training), plus each label's mean implied reward beta * r where that label occurs."""
    sums = torch.zeros(9, dtype=torch.float64, device=device)
    for batch, real in eval_batches(dataset, batch_size, seq_len, max_batches, rank, world, device):
        with autocast():
            rows = kto_rows(forward, batch, reference, pc, real=real, world=world)
        sums += _eval_sums(rows) * float(real)
    loss, accuracy, margin, kl, n, good, n_good, bad, n_bad = sum_across_ranks(sums, world).tolist()
    if n == 0:
        raise DataError("no KTO examples to evaluate")
    out = {"loss": loss / n, "reward_accuracy": accuracy / n, "reward_margin": margin / n, "kl": kl / n}
    if n_good:
        out["reward_desirable"] = good / n_good
    if n_bad:
        out["reward_undesirable"] = bad / n_bad
    return out | {"examples": n, "desirable": n_good, "undesirable": n_bad}


def _eval_sums(rows: KTORows) -> torch.Tensor:
    n = rows.losses.numel()
    stats = kto_stats(rows)
    good = rows.desirable.double()
    rewards = rows.rewards.double()
    values = [rows.losses.double().sum(), stats["reward_accuracy"] * n, stats["reward_margin"] * n,
              stats["kl"] * n, n, (rewards * good).sum(), good.sum(), (rewards * (1 - good)).sum(), (1 - good).sum()]
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=rows.losses.device) for v in values])


@register_task
class KTOTask(FileTask):
    objective = "kto"
    load = staticmethod(load_kto)

    def __init__(self, cfg: BastionConfig, start: StartPoint, *, rank: int = 0, world: int = 1):
        refuse_label_smoothing(cfg)
        super().__init__(cfg, start, rank=rank, world=world)
        self.rank_batch_size = cfg.train.batch_size
        good, bad = self.train.counts
        if not good or not bad:
            raise DataError(f"{cfg.finetune.train_file}: all {len(self.train)} examples are labelled "
                            f"{'true' if good else 'false'}; KTO needs desirable (true) and undesirable (false) ones")
        self.reference: torch.Tensor | None = None  # [N, 2]: each completion and its KL sequence
        self.val_reference: torch.Tensor | None = None

    def prepare(self, model: torch.nn.Module, device: torch.device, autocast: Autocast) -> None:
        """The starting weights are the reference: every completion's and KL sequence's log-probs."""
        kwargs: dict[str, Any] = dict(batch_size=self.rank_batch_size, seq_len=self.seq_len, device=device,
                                      autocast=autocast, rank=self.rank, world=self.world, columns=kto_columns)
        self.reference = reference_logprobs(model, self.train, **kwargs)
        if self.val is not None:
            self.val_reference = reference_logprobs(model, self.val, **kwargs)

    def describe(self) -> list[str]:
        return super().describe() + [self.balance_note()]

    def balance_note(self) -> str:
        """The class balance, with the paper's advice when the weights do not offset it."""
        good, bad = self.train.counts
        pc = self.cfg.finetune.preference
        balance = pc.kto_desirable_weight * good / (pc.kto_undesirable_weight * bad)
        note = f"kto: {good} desirable, {bad} undesirable; lambda_D*n_D / (lambda_U*n_U) = {balance:.2f}"
        low, high = RECOMMENDED_BALANCE
        if not low <= balance <= high:
            note += (f" (the KTO paper suggests {low:g} to {high:.2f}: set finetune.preference."
                     "kto_desirable_weight / kto_undesirable_weight)")
        return note

    def batch_unit(self) -> str:
        return f"completions of up to {self.seq_len} tokens (and their KL sequences)"

    def micro_batch_loss(self, forward: Forward, device: torch.device) -> tuple[torch.Tensor, int, Stats]:
        assert self.reference is not None, "prepare() computes the reference before training"
        full, mine, real = self._next_rows()
        batch = batch_to_device(mine, device)
        rows = kto_rows(forward, batch, self.reference, self.cfg.finetune.preference, real=real, world=self.world)
        loss, stats = rows.losses.mean(), kto_stats(rows)
        if self.world > 1:  # this rank's share of the global batch's completions
            share = (len(mine["index"]) if real else 0) * self.world / len(full["index"])
            loss, stats = loss * share, {name: value * share for name, value in stats.items()}
        return loss, int(full["num_tokens"]), stats

    def evaluate(self, forward: Forward, autocast: Autocast, device: torch.device, max_batches: int) -> dict[str, float]:
        assert self.val is not None and self.val_reference is not None
        return evaluate_kto(forward, self.val, self.val_reference, self.cfg.finetune.preference,
                            batch_size=self.batch_size, seq_len=self.seq_len, device=device, autocast=autocast,
                            max_batches=max_batches, rank=self.rank, world=self.world)

    def summary(self, metrics: dict[str, float]) -> str:
        if "reward_accuracy" not in metrics:
            return ""
        return (f", reward accuracy {metrics['reward_accuracy']:.3f}, margin {metrics['reward_margin']:.3f}, "
                f"kl {metrics['kl']:.3f}")
