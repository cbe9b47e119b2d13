"""GRPO: Bastion's `train.objective: grpo` vs TRL's `GRPOTrainer` (issue 14).

Same model on both sides: a small Llama-architecture model built here (random weights, a
byte-level BPE tokenizer trained on the prompts) and exported with `bastion export hf`, so
TRL loads the very same weights, tokenizer and chat template (the prompt ids are checked to
be identical before TRL trains). Same synthetic, verifiable task: each prompt names three
letters ("letters: a e k"); `--reward letters` (the default) pays the share of them that
occur in the completion (a random model starts near 0.6 at 32 new tokens; longer
completions hold more letters), `--reward letters_f1` the F1 of the completion's letters
against them (only the three letters and nothing else score 1, so completions shorten as
the policy learns: the regime of real RL tasks, whose answers end on their own at lengths
that vary); the same Python function scores both sides (a `Reward` subclass registered in `bastion.rewards.REWARDS` for Bastion,
the equivalent `reward_funcs` callable for TRL). Same settings: full fine-tuning, float32,
no compile, no gradient checkpointing, G completions per prompt, `--prompts` prompts per
step, `--max-new-tokens`, temperature 1, top-k / top-p off, loss type `--loss` (grpo,
dr_grpo or dapo: the normalisations both implement identically), clip epsilon 0.2 (0.28
above for dapo), beta / kl_coef 0 (no reference model on either side), num_iterations 1,
constant learning rate, AdamW (0.9, 0.95) fused, gradient clipping 1.0, the same intra-op
threads. TRL: `use_vllm=False` (transformers `generate()`, the only CPU path), logging,
saving, progress bars and completion logging off.

Each side runs in its own fresh subprocess (so its peak memory, VmHWM from
/proc/self/status, is its own and not the parent's: ru_maxrss would carry the parent's peak
across fork + exec); the two alternate, round by round, so machine noise hits both alike.
Measured per side:

    rollout tok/s   completion tokens generated (the end token included, as TRL counts
                    them) / seconds inside the generation call (Bastion: the engine,
                    `GRPOTask._generate`; TRL: `GRPOTrainer._generate_single_turn`)
    steps/s         whole optimizer steps (generation, rewards, log-probs, backward, AdamW),
                    steady state: after `--warmup` steps
    peak RSS        the child process's VmHWM (Python, imports and all)
    reward          the mean reward of each step's rollouts, averaged over the last 3 steps
                    of each run, and at equal wall-clock: over the last 3 steps each side had
                    finished when the shorter run of the round (timed from its first
                    rollout) ended

Policy (`--policy`): `random` trains the random model itself, which never samples its end
token, so every completion runs to --max-new-tokens (decoding is then rows x the limit on
both sides); `sft` first fine-tunes it with Bastion's SFT on answers of random length
(both sides then start from that checkpoint and its export), trained to end its answers
itself, as a real starting policy does. Measured (docs/benchmarks.md): with `--reward
letters` completions still averaged 29 of 32 tokens (the reward pays for length); with
`--reward letters_f1` they started at ~17 but reached the limit within 16 steps at lr 3e-3.

    python bench/grpo.py                          # defaults: ~5 min on a loaded 2-core CPU
    python bench/grpo.py --policy sft             # a policy that stops on its own
    python bench/grpo.py --policy sft --reward letters_f1   # ... and a reward that does not pay for length
    python bench/grpo.py --seconds 60             # each side trains for 60 s instead of --steps
    python bench/grpo.py --loss dr_grpo --group-size 16 --max-new-tokens 48 --json out.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This checkout's bastion, not whichever one the environment installed (a script's sys.path[0]
# is its own folder, so an editable install elsewhere would otherwise win).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; nothing is downloaded
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REWARD_NAME = "bench_letters"
LAST = 3  # steps averaged for "reward at the end" and "reward at equal wall-clock"


# ---- the task: the one reward function both sides call -----------------------------------------


def letters_reward(completion: str, letters: str) -> float:
    """Share of the prompt's `letters` that occur in the completion (0, 1/3, 2/3 or 1).
    It pays for length: a longer completion holds more letters."""
    return sum(c in completion for c in letters) / len(letters)


def letters_f1_reward(completion: str, letters: str) -> float:
    """F1 of the set of letters in the completion against the prompt's: every other letter
    costs precision, so the best answer is the three letters and nothing else, and a
    completion that goes on after them loses reward (lengths then fall as GRPO learns)."""
    seen = {c for c in completion if c in string.ascii_lowercase}
    hits = len(seen & set(letters))
    if not hits:
        return 0.0
    precision, recall = hits / len(seen), hits / len(letters)
    return 2 * precision * recall / (precision + recall)


REWARD_FUNCTIONS = {"letters": letters_reward, "letters_f1": letters_f1_reward}


def make_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        letters = "".join(sorted(rng.sample(string.ascii_lowercase, 3)))
        records.append({"prompt": "letters: " + " ".join(letters), "letters": letters})
    return records


class RewardLog:
    """What each side's reward function saw: (time, mean reward) per rollout batch."""

    def __init__(self, reward: str):
        self.reward = REWARD_FUNCTIONS[reward]
        self.batches: list[tuple[float, float]] = []

    def score(self, completions: list[str], letters: list[str]) -> list[float]:
        scores = [self.reward(c, l) for c, l in zip(completions, letters)]
        self.batches.append((time.perf_counter(), sum(scores) / max(len(scores), 1)))
        return scores


# ---- set-up (parent process) ----------------------------------------------------------------


def prepare(work: Path, args: argparse.Namespace) -> None:
    from bench_models import random_model_both_sides

    records = make_records(args.prompts_total, seed=1)
    rng = random.Random(2)
    texts = [r["prompt"] for r in records] + ["".join(rng.choices(string.ascii_lowercase + " ", k=40))
                                              for _ in range(2000)]
    random_model_both_sides(work, texts, vocab=args.vocab, d_model=args.d_model, layers=args.layers,
                            heads=args.heads, dropout=0.0)
    with open(work / "prompts.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    if args.policy == "sft":
        stopping_policy(work, records, args)


def stopping_policy(work: Path, records: list[dict], args: argparse.Namespace) -> None:
    """--policy sft: the random model fine-tuned (Bastion SFT, then exported again) on
    answers of 1 to --max-new-tokens random characters, so that it learns to end its
    answers itself, as a policy that GRPO starts from (an SFT or instruct model) does,
    unlike a random one, which never samples its end token."""
    from bastion.config import build_config
    from bastion.interop.hf import export_hf
    from bastion.train import train

    rng = random.Random(3)
    with open(work / "sft.jsonl", "w") as f:
        for _ in range(2000):
            r = rng.choice(records)
            answer = "".join(rng.choices(string.ascii_lowercase + " ", k=rng.randint(1, args.max_new_tokens)))
            f.write(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                             {"role": "assistant", "content": answer.strip() or "a"}]}) + "\n")
    result = train(build_config({
        "train": {"objective": "sft", "out_dir": str(work / "sft"), "seq_len": 128, "batch_size": 16,
                  "max_steps": args.sft_steps, "lr": 3e-3, "warmup_steps": 10, "device": "cpu", "dtype": "float32",
                  "log_every": 50, "seed": 0},
        "finetune": {"init_from": str(work / "base"), "train_file": str(work / "sft.jsonl"), "max_length": 128},
        "data": {"allowed_roots": [str(work)]},
        "checkpoint": {"every_steps": 10**8, "keep_last": 1}}), quiet=True)
    export_hf(result.checkpoint, work / "hf_sft")
    (work / "policy.json").write_text(json.dumps({"bastion": str(result.checkpoint), "hf": str(work / "hf_sft")}))


def policy_paths(work: Path) -> tuple[Path, Path]:
    """(the Bastion checkpoint, its Hugging Face export) both sides start from."""
    if (work / "policy.json").exists():
        chosen = json.loads((work / "policy.json").read_text())
        return Path(chosen["bastion"]), Path(chosen["hf"])
    return work / "base", work / "hf"


def bastion_config(work: Path, args: argparse.Namespace, out: str):
    from bastion.config import build_config

    grpo = {"group_size": args.group_size, "max_new_tokens": args.max_new_tokens, "loss": args.loss,
            "temperature": args.temperature, "kl_coef": 0.0, "num_iterations": 1, "epsilon": 0.2,
            "dynamic_sampling": False}  # TRL has no dynamic sampling (Bastion's dapo turns it on by default)
    if args.loss == "dapo":
        grpo["epsilon_high"] = 0.28
    return build_config({
        "train": {"objective": "grpo", "out_dir": str(work / out), "seq_len": 128, "batch_size": args.prompts,
                  "max_steps": args.steps if not args.seconds else 10**6, "lr": args.lr, "warmup_steps": 0,
                  "min_lr_ratio": 1.0, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0,
                  "log_every": 1, "eval_every": 10**8, "device": "cpu", "dtype": "float32", "compile": False,
                  "seed": 0, "threads": args.threads},
        "finetune": {"init_from": str(policy_paths(work)[0]), "train_file": str(work / "prompts.jsonl"),
                     "max_length": 64},
        "grpo": grpo,
        "rewards": [{"name": REWARD_NAME}],
        "data": {"allowed_roots": [str(work)]},
        "checkpoint": {"every_steps": 10**8, "keep_last": 1},
    })


# ---- jobs (one subprocess each) --------------------------------------------------------------


class Clock:
    """Step ends, generation calls and their completion tokens, and when the first rollout began."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0: float | None = None
        self.steps: list[float] = []
        self.gen: list[tuple[float, int]] = []  # (seconds, completion tokens) per generation call

    def generating(self) -> float:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
        return now

    def step_done(self) -> bool:
        """Record a finished step; whether the run should stop (--seconds)."""
        self.steps.append(time.perf_counter())
        return bool(self.args.seconds) and self.steps[-1] - self.t0 >= self.args.seconds


def job_bastion(work: Path, args: argparse.Namespace, clock: Clock, log: RewardLog) -> dict:
    from bastion.rewards import REWARDS, Reward
    from bastion.train import train
    from bastion.train.tasks.grpo import GRPOTask

    class Letters(Reward):
        """Share of the prompt's letters that occur in the completion (bench/grpo.py)."""

        name = REWARD_NAME

        def score(self, samples):
            return log.score([s.completion for s in samples], [s.record["letters"] for s in samples])

    REWARDS[REWARD_NAME] = Letters
    generate = GRPOTask._generate

    def timed_generate(self, prompts, seeds, *, temperature):
        start = clock.generating()
        results = generate(self, prompts, seeds, temperature=temperature)
        tokens = sum(len(r.token_ids) + (r.end_id is not None) for r in results)
        clock.gen.append((time.perf_counter() - start, tokens))
        return results

    GRPOTask._generate = timed_generate
    cfg = bastion_config(work, args, f"run_{time.time_ns()}")
    result = train(cfg, quiet=True, should_stop=lambda step: clock.step_done())
    peak = vm_hwm_bytes()  # before the check below loads anything
    # Sanity: the policy did move (relative change of the weights, all tensors together).
    from bastion.checkpoint import load_checkpoint

    start = load_checkpoint(policy_paths(work)[0], load_optimizer=False).model
    end = load_checkpoint(result.run_dir, load_optimizer=False).model
    moved = sum(float((end[k].float() - start[k].float()).norm() ** 2) for k in start) ** 0.5
    return {"peak_rss_bytes": peak,
            "relative_weight_change": moved / sum(float(t.float().norm() ** 2) for t in start.values()) ** 0.5}


def job_trl(work: Path, args: argparse.Namespace, clock: Clock, log: RewardLog) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    records = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    hf = policy_paths(work)[1]
    tokenizer = AutoTokenizer.from_pretrained(hf)
    _check_same_prompt_ids(work, tokenizer, records)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="sdpa")

    class Stamp(TrainerCallback):
        def on_step_end(self, _args, state, control, **kw):
            if clock.step_done():
                control.should_training_stop = True

    def bench_letters(completions, letters, **kw):  # conversational: [{"role": "assistant", "content": ...}]
        return log.score([c[0]["content"] if isinstance(c, list) else c for c in completions], letters)

    generate = GRPOTrainer._generate_single_turn

    def timed_generate(self, prompt_ids, *a, **k):
        start = clock.generating()
        completion_ids, logprobs = generate(self, prompt_ids, *a, **k)
        clock.gen.append((time.perf_counter() - start, sum(len(c) for c in completion_ids)))
        return completion_ids, logprobs

    GRPOTrainer._generate_single_turn = timed_generate
    config = GRPOConfig(
        output_dir=str(work / f"trl_{time.time_ns()}"), per_device_train_batch_size=args.prompts * args.group_size,
        gradient_accumulation_steps=1, num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
        loss_type=args.loss, scale_rewards="none" if args.loss == "dr_grpo" else "group", beta=0.0,
        num_iterations=1, epsilon=0.2, epsilon_high=0.28 if args.loss == "dapo" else None,
        max_steps=args.steps if not args.seconds else 10**6, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        optim="adamw_torch_fused", max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True,
        gradient_checkpointing=False, use_vllm=False, log_completions=False, logging_steps=10**6,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=0, dataloader_num_workers=0,
        torch_compile=False)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "letters": r["letters"]}
                                 for r in records])
    trainer = GRPOTrainer(model=model, reward_funcs=bench_letters, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Stamp()])
    trainer.train()
    peak = vm_hwm_bytes()  # before the check below loads anything
    # Sanity: the policy did move (relative change of the weights, all tensors together).
    from safetensors.torch import load_file

    before = load_file(hf / "model.safetensors")
    after = dict(model.named_parameters())
    moved = sum(float((after[k].detach() - t).norm() ** 2) for k, t in before.items() if k in after) ** 0.5
    return {"peak_rss_bytes": peak, "relative_weight_change":
            moved / sum(float(t.norm() ** 2) for k, t in before.items() if k in after) ** 0.5}


def _check_same_prompt_ids(work: Path, tokenizer, records: list[dict]) -> None:
    """TRL must see exactly the prompt tokens Bastion trains on (same tokenizer, same template)."""
    from bastion.checkpoint import load_checkpoint
    from bastion.checkpoint.contents import checkpoint_chat, checkpoint_tokenizer

    base = load_checkpoint(work / "base", load_optimizer=False)
    chat = checkpoint_chat(base, checkpoint_tokenizer(base))
    for r in records[:16]:
        messages = [{"role": "user", "content": r["prompt"]}]
        theirs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if list(theirs) != list(chat.encode_prompt(messages)):
            raise SystemExit(f"prompt ids differ between Bastion and the exported HF tokenizer for {r['prompt']!r}")


def vm_hwm_bytes() -> int:
    """This process's peak resident set (VmHWM): its own, unlike ru_maxrss after fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_job(side: str, work: Path, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    clock, log = Clock(args), RewardLog(args.reward)
    extra = {"bastion": job_bastion, "trl": job_trl}[side](work, args, clock, log)
    assert clock.t0 is not None and clock.steps, "no step ran"
    w = min(args.warmup, len(clock.steps) - 2)
    steady = clock.steps[w:]  # the steps after the warm-up ones: w + 1 .. end
    gen = clock.gen[w + 1:len(clock.steps)]
    elapsed = [t - clock.t0 for t in clock.steps]
    rewards = [r for _, r in log.batches]
    return {"steps": len(clock.steps), "steps_per_s": (len(steady) - 1) / (steady[-1] - steady[0]),
            "rollout_tokens_per_s": sum(n for _, n in gen) / sum(s for s, _ in gen),
            "generation_share": sum(s for s, _ in gen) / (steady[-1] - steady[0]),
            "completion_tokens_per_step": statistics.mean(n for _, n in clock.gen),
            "completion_tokens_first": statistics.mean(n for _, n in clock.gen[:LAST]),
            "completion_tokens_last": statistics.mean(n for _, n in clock.gen[-LAST:]),
            "elapsed": elapsed, "rewards": rewards[:len(elapsed)],
            "threads": torch.get_num_threads(), **extra}


# ---- orchestration ---------------------------------------------------------------------------


def reward_by(run: dict, seconds: float) -> float:
    """Mean reward of the last LAST steps `run` finished within `seconds` of its first rollout."""
    done = [r for t, r in zip(run["elapsed"], run["rewards"]) if t <= seconds] or run["rewards"][:1]
    return statistics.mean(done[-LAST:])


def summarize(results: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    sides = {}
    for side, runs in results.items():
        sides[side] = {
            "steps_per_s": statistics.median(r["steps_per_s"] for r in runs),
            "rollout_tokens_per_s": statistics.median(r["rollout_tokens_per_s"] for r in runs),
            "completion_tokens_per_step": statistics.median(r["completion_tokens_per_step"] for r in runs),
            "completion_tokens_first_last": [statistics.mean(r["completion_tokens_first"] for r in runs),
                                             statistics.mean(r["completion_tokens_last"] for r in runs)],
            "generation_share_of_step": statistics.median(r["generation_share"] for r in runs),
            "peak_rss_mib": max(r["peak_rss_bytes"] for r in runs) / 2**20,
            "steps": [r["steps"] for r in runs],
            "run_seconds": [round(r["elapsed"][-1], 1) for r in runs],
            "reward_first": statistics.mean(statistics.mean(r["rewards"][:LAST]) for r in runs),
            "reward_last": statistics.mean(statistics.mean(r["rewards"][-LAST:]) for r in runs),
            "relative_weight_change": statistics.mean(r["relative_weight_change"] for r in runs),
        }
    # Equal wall-clock, round by round: by the time the shorter run of the pair ended.
    for side in sides:
        values = []
        for b, t in zip(results["bastion"], results["trl"]):
            horizon = min(b["elapsed"][-1], t["elapsed"][-1])
            values.append(reward_by(b if side == "bastion" else t, horizon))
        sides[side]["reward_at_equal_time"] = statistics.mean(values)
    b, t = sides["bastion"], sides["trl"]
    ratios = {"steps_per_s": b["steps_per_s"] / t["steps_per_s"],
              "rollout_tokens_per_s": b["rollout_tokens_per_s"] / t["rollout_tokens_per_s"],
              "peak_rss": b["peak_rss_mib"] / t["peak_rss_mib"]}
    settings = {k: getattr(args, k) for k in ("reward", "policy", "d_model", "layers", "heads", "vocab", "prompts", "group_size",
                                              "max_new_tokens", "loss", "temperature", "lr", "steps", "seconds",
                                              "warmup", "rounds", "threads")}
    return {"settings": settings, "bastion": b, "trl": t, "ratios": ratios,
            "runs": {side: [{k: v for k, v in r.items() if k in ("elapsed", "rewards")} for r in runs]
                     for side, runs in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    parser.add_argument("--prompts-total", type=int, default=256, help="prompts in the dataset")
    parser.add_argument("--group-size", type=int, default=8, help="G: completions per prompt (TRL num_generations)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="per completion (TRL max_completion_length)")
    parser.add_argument("--loss", choices=["grpo", "dr_grpo", "dapo"], default="grpo")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--reward", choices=sorted(REWARD_FUNCTIONS), default="letters",
                        help="letters: the share of the prompt's three letters in the completion (pays for "
                             "length); letters_f1: F1 of the completion's letters against them (pays for the "
                             "three and nothing more, so completions shorten as GRPO learns)")
    parser.add_argument("--policy", choices=["random", "sft"], default="random",
                        help="random: the random model (every completion runs to --max-new-tokens); sft: that "
                             "model after --sft-steps of SFT on answers of random length (completions end "
                             "on their own, as a real policy's do)")
    parser.add_argument("--sft-steps", type=int, default=400, help="with --policy sft")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per run (ignored with --seconds)")
    parser.add_argument("--seconds", type=float, default=None, help="train each side for this long instead")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the throughput figures")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads, both sides (1: on a shared machine two-thread OpenMP "
                             "teams stall whenever a thread is descheduled, which hits transformers' generate "
                             "hardest; see docs/benchmarks.md)")
    parser.add_argument("--json", metavar="FILE", help="also write the summary (and every step's reward) here")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if importlib.util.find_spec("trl") is None:
        sys.exit("bench/grpo.py compares against TRL's GRPOTrainer, and TRL is not installed: "
                 "pip install trl (this venv pins trl 1.16), then run it again")
    if args.job:  # child process
        print(json.dumps(run_job(args.job, Path(args.work), args)))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    prepare(work, args)
    passthrough = [a for a in sys.argv[1:]]
    results: dict[str, list[dict]] = {"bastion": [], "trl": []}
    for round_ in range(args.rounds):
        for side in (("bastion", "trl") if round_ % 2 == 0 else ("trl", "bastion")):
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--job", side, "--work", str(work)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{side} failed:\n{proc.stderr[-4000:]}")
            results[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {side}: {results[side][-1]['steps']} steps, "
                  f"{time.perf_counter() - started:.0f} s with start-up", file=sys.stderr)

    summary = summarize(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    b, t, r = summary["bastion"], summary["trl"], summary["ratios"]
    print(f"GRPO ({args.loss}, {args.prompts} prompts x G {args.group_size}, {args.max_new_tokens} new tokens, "
          f"{args.threads} threads): Bastion/TRL steps/s {r['steps_per_s']:.2f}x "
          f"({b['steps_per_s']:.3f} vs {t['steps_per_s']:.3f}), rollout tok/s {r['rollout_tokens_per_s']:.2f}x "
          f"({b['rollout_tokens_per_s']:.0f} vs {t['rollout_tokens_per_s']:.0f}), peak RSS {r['peak_rss']:.2f}x "
          f"({b['peak_rss_mib']:.0f} vs {t['peak_rss_mib']:.0f} MiB), reward at equal time "
          f"{b['reward_at_equal_time']:.3f} vs {t['reward_at_equal_time']:.3f}, last {LAST} steps "
          f"{b['reward_last']:.3f} vs {t['reward_last']:.3f}")


if __name__ == "__main__":
    main()
