"""`grpo`: online RL with verifiable rewards (the GRPO family).

Each optimizer step, every rank takes `train.batch_size` prompts (finetune.train_file, see
data/prompts.py) and samples G = `grpo.group_size` completions of each with the current
policy, through the continuous-batching engine (infer/engine.py) on the very weights being
trained. The configured rewards (`rewards:`, bastion/rewards) score them; each completion's
advantage is its reward against its own group's:

    A_i = R_i - mean(R_group)            (divided by std(R_group) + 1e-4 when scaled)

and the loss is a clipped policy-ratio objective over completion tokens, with the ratio
r_t = pi(y_t | ...) / pi_old(y_t | ...) against the policy that sampled them:

    l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)  [+ kl_coef * KL_t]

Variants (`grpo.loss`), which differ only in normalisation and where the ratio lives:

    grpo     Shao et al. 2024 (DeepSeekMath): std-scaled advantages; each completion's
             token mean, then the mean over completions
    dr_grpo  Liu et al. 2025 ("Understanding R1-Zero-Like Training"): no std scaling and no
             length normalisation: the token sum over (completions x max_new_tokens)
    dapo     Yu et al. 2025 (DAPO): clip-higher (eps_high 0.28 unless set), the token-level
             mean over the whole batch, dynamic sampling (groups whose rewards are all equal
             carry no signal and are dropped); its soft overlong punishment is the
             `overlong` reward
    gspo     Zheng et al. 2025 (GSPO): one ratio per completion, exp(mean_t log r_t),
             clipped per completion, mean over completions (its eps is small, e.g. 4e-4)

KL_t is the k3 estimator exp(ref - logp) - (ref - logp) - 1 against the starting policy:
with LoRA the base with adapters switched off (no second model in memory), otherwise a
frozen copy (one more model's memory), made only when kl_coef > 0.

`grpo.num_iterations` > 1 reuses each batch of rollouts for that many optimizer steps with
the log-probs of the policy that sampled them (kept from the first step, when the weights
are still those). Log-probs are of the temperature-scaled distribution the engine sampled
from (top-k / top-p truncation aside, as in TRL).

Exact resume: rollouts are seeded from (train.seed, rollout round, prompt, sample), so the
same weights give the same completions; rollouts still to be reused are saved with the task
state. Under torchrun each rank generates the groups of its own prompts (a group never
straddles ranks) and the loss is normalised over the global batch, as in one process.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bastion.config.schema import BastionConfig, GRPOConfig
from bastion.data.batches import BatchCursor
from bastion.data.prompts import Prompt, PromptDataset, load_prompts
from bastion.errors import ConfigError
from bastion.infer.engine import Engine
from bastion.model.lora import lora_disabled
from bastion.rewards import RewardSet, Sample, build_rewards
from bastion.rewards.passk import pass_at_k
from bastion.train.distributed import sum_across_ranks
from bastion.train.tasks.base import Autocast, Forward, Stats, Task, register_task

ADVANTAGE_EPS = 1e-4  # as TRL: a group with a tiny spread must not blow advantages up
DAPO_EPSILON_HIGH = 0.28


# ---- the losses: pure functions of tensors (tests check them against hand-computed values) ----


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool) -> torch.Tensor:
    """rewards [N] (N = groups x G, each group contiguous) -> advantages [N]."""
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(1, keepdim=True) + ADVANTAGE_EPS)  # unbiased std, as TRL
    return advantages.flatten()


def varied_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[groups] bool: the groups whose rewards are not all equal (DAPO's dynamic sampling)."""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(1).values - grouped.min(1).values) > 0


def token_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(pi || ref) per token: exp(d) - d - 1, d = ref - logp (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def token_losses(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                 variant: str, eps_low: float, eps_high: float, kl_coef: float = 0.0,
                 ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses [N, T] (zero outside `mask`) and per-token "clipped" flags [N, T].
    logp / old_logp / ref_logp / mask: [N, T]; advantages: [N]."""
    a = advantages[:, None]
    if variant == "gspo":  # one ratio per completion: exp of the mean token log-ratio
        lengths = mask.sum(1).clamp(min=1)
        ratio = torch.exp(((logp - old_logp) * mask).sum(1) / lengths)[:, None].expand_as(logp)
    else:
        ratio = torch.exp(logp - old_logp)
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    losses = -torch.min(ratio * a, clipped_ratio * a)
    clipped = ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
    if kl_coef:
        assert ref_logp is not None
        losses = losses + kl_coef * token_kl(logp, ref_logp)
    return losses * mask, clipped & (mask > 0)


def loss_sum(losses: torch.Tensor, mask: torch.Tensor, variant: str) -> torch.Tensor:
    """The numerator of the variant's loss: per-completion token means summed (grpo, gspo),
    or the plain token sum (dapo, dr_grpo)."""
    if variant in ("grpo", "gspo"):
        return (losses.sum(1) / mask.sum(1).clamp(min=1)).sum()
    return losses.sum()


def loss_denominator(completions: int, tokens: int, variant: str, max_new_tokens: int) -> float:
    """What `loss_sum` is divided by, over the whole (global) batch."""
    if variant in ("grpo", "gspo"):
        return max(completions, 1)
    if variant == "dapo":
        return max(tokens, 1)
    return max(completions * max_new_tokens, 1)  # dr_grpo: a constant, no length bias


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                variant: str, eps_low: float, eps_high: float, max_new_tokens: int, kl_coef: float = 0.0,
                ref_logp: torch.Tensor | None = None) -> torch.Tensor:
    """The whole batch's loss in one process (the task splits the same sums across ranks)."""
    losses, _ = token_losses(logp, old_logp, advantages, mask, variant=variant, eps_low=eps_low,
                             eps_high=eps_high, kl_coef=kl_coef, ref_logp=ref_logp)
    return loss_sum(losses, mask, variant) / loss_denominator(logp.size(0), int(mask.sum()), variant, max_new_tokens)


def token_logprobs(forward: Forward, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, L] ids -> [N, L] log-probabilities of each token given the ones before it at
    `temperature` (column 0, which nothing predicts, is 0)."""
    logits, _ = forward(ids)
    logits = logits[:, :-1].float() / temperature
    logp = -F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.size(0), -1)
    return F.pad(logp, (1, 0))


# ---- rollouts -------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One micro-batch of completions: rows of prompt + completion, right-padded."""

    ids: torch.Tensor  # [N, L]
    mask: torch.Tensor  # [N, L] 1.0 on completion tokens
    advantages: torch.Tensor  # [N]
    old_logp: torch.Tensor | None = None  # [N, L], kept when the rollout is reused
    stats: dict[str, float] | None = None  # its rewards etc., logged at every step that trains on it


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


@register_task
class GRPOTask(Task):
    objective = "grpo"

    def __init__(self, cfg: BastionConfig, start, *, rank: int = 0, world: int = 1):
        super().__init__(cfg, start, rank=rank, world=world)
        self.g: GRPOConfig = cfg.grpo
        ft, tc = cfg.finetune, cfg.train
        if world > 1 and tc.parallel == "fsdp":
            raise ConfigError("train.objective grpo runs under DDP (train.parallel: ddp): rollouts decode on each "
                              "rank's own replica, which FSDP2's sharded parameters cannot do rank by rank")
        if not cfg.rewards:
            raise ConfigError("rewards: train.objective grpo needs at least one reward (see `bastion eval rewards`)",
                              [("rewards", "empty")])
        self.rewards: RewardSet = build_rewards([r.as_mapping() for r in cfg.rewards])
        self.variant = self.g.loss
        self.eps_low = self.g.epsilon
        self.eps_high = self.g.epsilon_high or (DAPO_EPSILON_HIGH if self.variant == "dapo" else self.g.epsilon)
        self.scale = self.g.scale_rewards if self.g.scale_rewards is not None else self.variant != "dr_grpo"
        self.dynamic = self.g.dynamic_sampling if self.g.dynamic_sampling is not None else self.variant == "dapo"
        self.train: PromptDataset = load_prompts(ft.train_file, start.chat, ft, cfg.data.allowed_roots)
        self.val = (load_prompts(ft.val_file, start.chat, ft, cfg.data.allowed_roots, what="finetune.val_file")
                    if ft.val_file else None)
        self.has_val = self.val is not None
        self._check_lengths(cfg, start)
        self.cursor = BatchCursor(self.train, tc.batch_size * world, 0, tc.seed)
        self.tokenizer = start.chat.tokenizer
        self.calls = 0  # micro-batches so far (with grad_accum and num_iterations: which rollout is used)
        self.rounds = 0  # rollout rounds so far (seeds the sampling)
        self.buffer: dict[int, Rollout] = {}  # micro-batch slot -> rollout still to be reused
        self.model: torch.nn.Module | None = None  # the policy, set by prepare (rollouts decode on it)
        self.device = torch.device("cpu")
        self.reference: torch.nn.Module | None = None

    def _check_lengths(self, cfg: BastionConfig, start) -> None:
        g, ceiling = self.g, cfg.generate.max_new_tokens_ceiling
        if g.max_new_tokens > ceiling:
            raise ConfigError(f"grpo.max_new_tokens ({g.max_new_tokens}) exceeds generate.max_new_tokens_ceiling "
                              f"({ceiling})", [("grpo.max_new_tokens", "over the generate ceiling")])
        longest = max(self.train.max_length, self.val.max_length if self.val else 0)
        context = start.model_cfg.max_seq_len
        if longest + g.max_new_tokens > context:
            raise ConfigError(f"the longest prompt ({longest} tokens) + grpo.max_new_tokens ({g.max_new_tokens}) "
                              f"exceeds the model's context ({context})", [("grpo.max_new_tokens", "too long")])

    # ---- before training ------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, device: torch.device, autocast: Autocast) -> None:
        self.model, self.device = model, device
        if self.g.kl_coef and not self.cfg.finetune.lora.enabled:
            # Full fine-tuning: the starting policy must stay as it is while the model moves.
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def describe(self) -> list[str]:
        notes = [f"train: {self.train.report.describe()}" if self.train.report else ""]
        if self.val is not None and self.val.report is not None:
            notes.append(f"val: {self.val.report.describe()}")
        notes.append(f"grpo ({self.variant}): {self.g.group_size} completions per prompt, up to "
                     f"{self.g.max_new_tokens} tokens, rewards {', '.join(self.rewards.labels)}")
        return [n for n in notes if n]

    def batch_unit(self) -> str:
        return f"prompts x {self.g.group_size} completions"

    @property
    def batches_per_epoch(self) -> float:
        return self.cursor.batches_per_epoch

    @property
    def n_examples(self) -> int:
        return len(self.train)

    # ---- steps ----------------------------------------------------------------------------
    def micro_batch_loss(self, forward: Forward, device: torch.device) -> tuple[torch.Tensor, int, Stats]:
        accum, mu = self.cfg.train.grad_accum, self.g.num_iterations
        slot, iteration = self.calls % accum, (self.calls // accum) % mu
        self.calls += 1
        rollout = self._new_rollout(device) if iteration == 0 else self.buffer.pop(slot)
        stats: Stats = {name: torch.tensor(value) for name, value in (rollout.stats or {}).items()}
        logp = token_logprobs(forward, rollout.ids, self.g.temperature)
        if iteration == 0:
            rollout.old_logp = logp.detach()  # the weights that sampled it: ratio 1 on its first use
        if iteration < mu - 1:
            self.buffer[slot] = rollout
        ref_logp = self._reference_logp(rollout.ids) if self.g.kl_coef else None
        losses, clipped = token_losses(logp, rollout.old_logp, rollout.advantages, rollout.mask,
                                       variant=self.variant, eps_low=self.eps_low, eps_high=self.eps_high,
                                       kl_coef=self.g.kl_coef, ref_logp=ref_logp)
        # Normalised over the global batch: every rank's share sums to one process's loss.
        mine = torch.tensor([rollout.mask.any(1).sum(), rollout.mask.sum()], dtype=torch.float64)
        completions, tokens = sum_across_ranks(mine.to(device), self.world).tolist()
        denominator = loss_denominator(int(completions), int(tokens), self.variant, self.g.max_new_tokens)
        loss = loss_sum(losses, rollout.mask, self.variant) * (self.world / denominator)
        counted = rollout.mask.sum().clamp(min=1)
        stats["clip_fraction"] = (clipped.sum() / counted).detach()
        if ref_logp is not None:
            stats["kl"] = ((token_kl(logp, ref_logp) * rollout.mask).sum() / counted).detach()
        return loss, int(tokens), stats

    @torch.no_grad()
    def _reference_logp(self, ids: torch.Tensor) -> torch.Tensor:
        if self.reference is not None:
            return token_logprobs(self.reference, ids, self.g.temperature)
        with lora_disabled(self.model):
            return token_logprobs(self.model, ids, self.g.temperature)

    def _new_rollout(self, device: torch.device) -> Rollout:
        indices = self.cursor.next_batch()["index"].tolist()
        b = self.cfg.train.batch_size
        mine = indices[self.rank * b:(self.rank + 1) * b]
        prompts = [self.train[i] for i in mine]
        round_ = self.rounds
        self.rounds += 1
        seeds = [_seed(self.cfg.train.seed, round_, i, k) for i in mine for k in range(self.g.group_size)]
        repeated = [p for p in prompts for _ in range(self.g.group_size)]  # groups contiguous
        results = self._generate(repeated, seeds, temperature=self.g.temperature)
        samples = [self._sample(p, r) for p, r in zip(repeated, results)]
        totals, parts = self.rewards.score(samples)
        rewards = torch.tensor(totals, dtype=torch.float32)
        advantages = group_advantages(rewards, self.g.group_size, self.scale)
        keep = torch.ones(len(samples), dtype=torch.bool)
        if self.dynamic:
            keep = varied_groups(rewards, self.g.group_size).repeat_interleave(self.g.group_size)
        rows = [p.ids + self._completion_ids(r) for p, r in zip(repeated, results)]
        kept = keep.nonzero().flatten().tolist() or [0]  # nothing to learn from: one row, weight 0
        ids, mask = self._pad([rows[i] for i in kept], [len(repeated[i].ids) for i in kept])
        if not keep.any():
            mask.zero_()
        stats = self._rollout_stats(rewards, parts, results, keep)
        return Rollout(ids.to(device), mask.to(device), advantages[kept].to(device), stats=stats)

    def _generate(self, prompts: list[Prompt], seeds: list[int], *, temperature: float) -> list[Any]:
        """Completions of `prompts` from the current weights, all decoded together."""
        g = self.g
        limits = self.cfg.generate.model_copy(update={
            "max_new_tokens": g.max_new_tokens, "max_new_tokens_ceiling": g.max_new_tokens,
            "max_prompt_tokens": max(len(p.ids) for p in prompts), "temperature": temperature,
            "top_k": g.top_k, "top_p": g.top_p})
        engine = Engine(self.model, self.tokenizer, limits, max_batch_size=len(prompts), max_queue=0,
                        mode=g.rollout_mode, threads=torch.get_num_threads())
        # All queued before the engine starts: every request joins at once, so the batch (and
        # the completions) depend only on the weights and the seeds.
        handles = [engine.submit(p.ids, engine.params(len(p.ids), seed=s, stop_ids=list(p.stop_ids)))
                   for p, s in zip(prompts, seeds)]
        engine.start()
        try:
            return [h.result() for h in handles]
        finally:
            engine.shutdown()

    def _sample(self, prompt: Prompt, result: Any) -> Sample:
        return Sample(completion=result.text, record=prompt.record, prompt=prompt.text,
                      completion_tokens=len(result.token_ids), max_new_tokens=self.g.max_new_tokens,
                      finish_reason="length" if result.finish_reason == "length" else "stop")

    @staticmethod
    def _completion_ids(result: Any) -> list[int]:
        """What the policy chose: the tokens, and the end token when it chose to stop."""
        return list(result.token_ids) + ([result.end_id] if result.end_id is not None else [])

    def _pad(self, rows: list[list[int]], prompt_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows right-padded into [N, L] ids, and the mask of their completion tokens."""
        length = max(len(row) for row in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length)
        for j, (row, start) in enumerate(zip(rows, prompt_lens)):
            ids[j, :len(row)] = torch.tensor(row)
            mask[j, start:len(row)] = 1.0
        return ids, mask

    def _rollout_stats(self, rewards: torch.Tensor, parts: dict[str, list[float]], results: list[Any],
                       keep: torch.Tensor) -> dict[str, float]:
        stats = {"reward": rewards.mean(), "reward_std": rewards.view(-1, self.g.group_size).std(1).mean(),
                 "solved": (rewards >= self.g.pass_threshold).float().mean(),
                 "completion_tokens": torch.tensor([len(r.token_ids) for r in results], dtype=torch.float32).mean(),
                 "truncated": torch.tensor([r.finish_reason == "length" for r in results], dtype=torch.float32).mean()}
        if len(parts) > 1:
            stats |= {f"reward_{label}": torch.tensor(values).mean() for label, values in parts.items()}
        if self.dynamic:
            stats["groups_kept"] = keep.float().mean()
        return {name: float(value) for name, value in stats.items()}

    # ---- validation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, forward: Forward, autocast: Autocast, device: torch.device, max_batches: int) -> dict[str, float]:
        """Rewards of completions to the validation prompts (greedy with grpo.eval_samples 1,
        else that many samples each, and pass@k); "loss" is minus the mean reward."""
        assert self.val is not None
        n_prompts = min(len(self.val), max_batches * self.cfg.train.batch_size * self.world)
        mine = list(range(n_prompts))[self.rank::self.world]
        k = self.g.eval_samples
        sums = torch.zeros(3 + (k > 1), dtype=torch.float64)  # reward sum, passes at 1, prompts, pass@k sum
        if mine:
            prompts = [self.val[i] for i in mine for _ in range(k)]
            seeds = [_seed(self.cfg.train.seed, 2**31, i, j) for i in mine for j in range(k)]
            results = self._generate(prompts, seeds, temperature=self.g.temperature if k > 1 else 0.0)
            totals, _ = self.rewards.score([self._sample(p, r) for p, r in zip(prompts, results)])
            passed = np.asarray(totals).reshape(len(mine), k) >= self.g.pass_threshold
            sums[0], sums[1], sums[2] = sum(totals) / k, passed.mean(1).sum(), len(mine)
            if k > 1:
                sums[3] = sum(pass_at_k(k, int(c), k) for c in passed.sum(1))
        sums = sum_across_ranks(sums.to(device), self.world).cpu()
        n = max(float(sums[2]), 1.0)
        metrics = {"loss": -float(sums[0]) / n, "reward": float(sums[0]) / n, "pass@1": float(sums[1]) / n}
        if k > 1:
            metrics[f"pass@{k}"] = float(sums[3]) / n
        return metrics

    def summary(self, metrics: dict[str, float]) -> str:
        if "reward" not in metrics:
            return ""
        return f", reward {metrics['reward']:.3f}, pass@1 {metrics['pass@1']:.3f}"

    # ---- resume ---------------------------------------------------------------------------
    @property
    def epochs_done(self) -> float:
        return self.cursor.epochs_done

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor.state_dict(), "calls": self.calls, "rounds": self.rounds,
                "buffer": {str(slot): _rollout_state(r) for slot, r in self.buffer.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor.load_state_dict(state["cursor"])
        self.calls, self.rounds = int(state["calls"]), int(state["rounds"])
        self.buffer = {int(slot): _rollout_from_state(r, self.device) for slot, r in state.get("buffer", {}).items()}

    def close(self) -> None:
        self.rewards.close()


def _rollout_state(r: Rollout) -> dict[str, Any]:
    """A rollout still to be reused, as JSON (floats round-trip exactly through repr)."""
    return {"ids": r.ids.tolist(), "mask": r.mask.tolist(), "advantages": r.advantages.tolist(),
            "old_logp": r.old_logp.tolist() if r.old_logp is not None else None, "stats": r.stats}


def _rollout_from_state(state: dict[str, Any], device: torch.device) -> Rollout:
    old = state.get("old_logp")
    return Rollout(torch.tensor(state["ids"], dtype=torch.long, device=device),
                   torch.tensor(state["mask"], dtype=torch.float32, device=device),
                   torch.tensor(state["advantages"], dtype=torch.float32, device=device),
                   torch.tensor(old, dtype=torch.float32, device=device) if old is not None else None,
                   stats=state.get("stats"))


__all__ = ["GRPOTask", "Rollout", "group_advantages", "loss_denominator", "loss_sum", "policy_loss",
           "token_kl", "token_logprobs", "token_losses", "varied_groups"]
