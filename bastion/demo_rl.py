"""`bastion demo --rl`: a demo that shows reinforcement learning with a verifiable reward
learn. The task is synthetic addition ("4 7 + 7 8 =", answer "5 2 1": 47 + 78 = 125 written
from its last digit, see `question` and `answer`), checked exactly, so "it got better" is a
number, not an impression:

    1. data      the SFT sums as text -> `prepare_dataset` (tokenizer + shards)
    2. pretrain  a small model from scratch on that text (objective clm)
    3. sft       the same sums as chat turns (objective sft), in rounds until the model is
                 right on about a third of the dev sums: room for RL to act
    4. grpo      online RL on other sums, prompts only, with the `exact` reward (objective grpo)

Accuracy is measured on held-out problems that appear in no training file (a deterministic
rule, `is_held_out`), greedily, with the same code (`eval_generate`, reward `exact`) for the
SFT and the GRPO checkpoint. Digits are written with spaces between them so that the
byte-level BPE tokenizer keeps one token per digit (it would otherwise learn tokens for
frequent digit pairs, and a model that must add "47" as one symbol learns much slower).
Everything is generated here; nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

from bastion.config import build_config
from bastion.config.schema import BastionConfig
from bastion.data import prepare_dataset
from bastion.errors import BastionError
from bastion.eval.finetune import eval_generate
from bastion.train import train
from bastion.train.metrics import plot_run

T = TypeVar("T")
HELD_OUT_FRACTION = 0.1  # one problem in ten is held out (see is_held_out)


@dataclass(frozen=True)
class RLDemoSize:
    """How big each stage is. `full()` is `bastion demo --rl`; tests use a smaller one."""

    digits: int = 2  # operands are 0 .. 10**digits - 1
    pretrain_steps: int = 250
    pretrain_lr: float = 6e-3
    # SFT runs in rounds of `sft_round` steps (constant learning rate) until greedy exact match
    # on the dev sums reaches `sft_target`, or `sft_steps` in all: addition is learnt in a
    # sudden climb whose timing varies from run to run (seed, CPU), and a fixed step count
    # lands anywhere from 6% to 93% (docs/alignment.md); GRPO needs a policy part-way up.
    sft_steps: int = 5000
    sft_round: int = 250
    sft_target: float = 0.3
    sft_lr: float = 2e-3  # constant (see sft_config)
    grpo_steps: int = 300
    grpo_lr: float = 2e-4  # 10x lower than SFT's: 1.5e-3 collapses the policy within 30 steps
    grpo_temperature: float = 0.7  # rollouts; 1.0 learns more slowly from this policy (measured)
    n_sft: int = 3_000  # problems with answers: the pretraining text and the SFT turns
    n_prompts: int = 4_000  # GRPO prompts, disjoint from those (8,983 problems are not held out)
    n_held_out: int = 500  # held-out problems accuracy is measured on, of the 1,017 there are
    n_dev: int = 300  # training-side sums in no training file: when SFT stops (never the held-out set)
    # 128 x 4, not 96 x 3: the smaller model's SFT climb came late or not at all (seed 0 stayed
    # near 10% through 4,750 steps); this one passed the target at 1,500-2,500 steps for the
    # four seeds measured, 0-3 (docs/alignment.md).
    d_model: int = 128
    n_layer: int = 4
    batch_size: int = 16  # pretraining and SFT rows (of 128 tokens) per step
    grpo_batch: int = 16  # GRPO prompts per step
    group_size: int = 8
    eval_points: int = 5  # GRPO validations over the run (the accuracy curve)
    seed: int = 0

    @classmethod
    def full(cls, grpo_steps: int | None = None) -> "RLDemoSize":
        return cls() if grpo_steps is None else cls(grpo_steps=grpo_steps)


@dataclass
class StageResult:
    name: str
    steps: int
    seconds: float
    accuracy: float | None = None  # held-out exact match after the stage, where measured


@dataclass
class RLDemoResult:
    stages: list[StageResult] = field(default_factory=list)
    sft_accuracy: float = 0.0
    grpo_accuracy: float = 0.0
    plot: Path | None = None
    checkpoint: Path | None = None


# ---- the task: synthetic addition with a held-out rule ------------------------------------------


def spaced(n: int, width: int) -> str:
    """(123, 4) -> "0 1 2 3": one token per digit (see the module docstring)."""
    return " ".join(str(n).zfill(width))


def question(a: int, b: int, digits: int = 2) -> str:
    """Operands zero-padded to `digits` (7 + 45 -> "0 7 + 4 5 ="): every digit then sits at
    the same distance from the answer digits that need it, which attention learns fast."""
    return f"{spaced(a, digits)} + {spaced(b, digits)} ="


def answer(a: int, b: int, digits: int = 2) -> str:
    """The sum, digits + 1 wide, from the least significant digit (47 + 78 = 125 -> "5 2 1";
    3 + 4 -> "7 0 0"): the order a carry travels, so each digit depends on two operand
    digits and one carry already written - far easier for a small model than 125's order."""
    return " ".join(reversed(str(a + b).zfill(digits + 1)))


def is_held_out(a: int, b: int) -> bool:
    """Whether a + b is held out: a fixed rule of the operands, so no training file can
    contain a held-out problem whatever is sampled, and the test set is the same every run.
    A hash, not arithmetic: a rule such as (7a + 3b) % 10 == 0 holds out exactly the sums
    whose operands share a units digit, a combination training would then never show, and
    the held-out set would measure that leap instead of how well the model adds."""
    digest = hashlib.sha256(f"{a}+{b}".encode()).digest()
    return int.from_bytes(digest[:8], "little") < HELD_OUT_FRACTION * 2**64


def sample_problems(n: int, digits: int, rng: random.Random, *, held_out: bool) -> list[tuple[int, int]]:
    """`n` distinct problems a + b (0 <= a, b < 10**digits) on one side of the held-out rule."""
    side = [(a, b) for a in range(10 ** digits) for b in range(10 ** digits) if is_held_out(a, b) == held_out]
    if n > len(side):
        raise BastionError(f"{n} problems asked for, but {digits}-digit addition has only {len(side)} "
                           f"{'held-out' if held_out else 'training'} problems; use more digits or fewer problems")
    return rng.sample(side, n)


def _write_jsonl(path: Path, records: Iterator[dict[str, Any]]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    return path


@dataclass(frozen=True)
class DemoFiles:
    corpus: Path  # pretraining documents (JSONL, "text")
    sft: Path  # chat JSONL
    prompts: Path  # GRPO prompt JSONL (training problems)
    val_prompts: Path  # GRPO prompt JSONL (held-out problems): the accuracy curve
    held_out: Path  # the same held-out problems as chat prompts, for eval_generate
    dev: Path  # dev problems as chat prompts: SFT's stopping rule reads these, never held_out


def write_demo_data(folder: Path, size: RLDemoSize) -> DemoFiles:
    """Every file the demo trains and measures on, under `folder`. Four disjoint sets of
    problems: the SFT set (also the pretraining text), the GRPO prompts (their answers are
    only in the reward's `answer` field: the model never trains on them as text), the dev
    set (when SFT stops) and the held-out set."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(size.seed)
    train_side = sample_problems(size.n_sft + size.n_prompts + size.n_dev, size.digits, rng, held_out=False)
    sft_set, prompt_set = train_side[:size.n_sft], train_side[size.n_sft:size.n_sft + size.n_prompts]
    dev_set = train_side[size.n_sft + size.n_prompts:]
    test_set = sample_problems(size.n_held_out, size.digits, rng, held_out=True)
    q = {p: question(*p, size.digits) for p in train_side + test_set}
    a = {p: answer(*p, size.digits) for p in train_side + test_set}
    lines = [f"{q[p]} {a[p]}" for p in sft_set]
    per_doc = 32  # many small documents: the data split and shuffling work by document
    docs = ({"text": "\n".join(lines[i:i + per_doc]) + "\n"} for i in range(0, len(lines), per_doc))
    turns = ({"messages": [{"role": "user", "content": q[p]}, {"role": "assistant", "content": a[p]}]}
             for p in sft_set)
    return DemoFiles(
        corpus=_write_jsonl(folder / "corpus.jsonl", docs),
        sft=_write_jsonl(folder / "sft.jsonl", turns),
        prompts=_write_jsonl(folder / "prompts.jsonl", ({"prompt": q[p], "answer": a[p]} for p in prompt_set)),
        val_prompts=_write_jsonl(folder / "val_prompts.jsonl", ({"prompt": q[p], "answer": a[p]} for p in test_set)),
        held_out=_write_jsonl(folder / "held_out.jsonl",
                              ({"messages": [{"role": "user", "content": q[p]}], "answer": a[p]} for p in test_set)),
        dev=_write_jsonl(folder / "dev.jsonl",
                         ({"messages": [{"role": "user", "content": q[p]}], "answer": a[p]} for p in dev_set)),
    )


# ---- the stages' configs ---------------------------------------------------------------------------


def _common(out_dir: Path, size: RLDemoSize) -> dict[str, Any]:
    return {"data": {"allowed_roots": [str(out_dir)]},  # read and write only under --out
            "checkpoint": {"every_steps": 1_000_000, "keep_last": 1},  # the final one is what the next stage needs
            "generate": {"max_new_tokens": size.digits + 3, "temperature": 0.0}}


def _train_section(out_dir: Path, name: str, steps: int, **settings: Any) -> dict[str, Any]:
    return {"out_dir": str(out_dir / name), "run_name": name, "max_steps": steps, "log_every": max(1, steps // 30),
            "dtype": "float32", "device": "cpu", "weight_decay": 0.0, **settings}


def pretrain_config(out_dir: Path, files: DemoFiles, size: RLDemoSize) -> BastionConfig:
    common = _common(out_dir, size)
    return build_config({
        **common,
        "model": {"d_model": size.d_model, "n_layer": size.n_layer, "n_head": 4, "n_kv_head": 2, "max_seq_len": 128},
        "data": {**common["data"], "sources": [str(files.corpus)], "output_dir": str(out_dir / "data"),
                 "val_fraction": 0.02, "tokenizer": {"vocab_size": 300, "min_frequency": 1},
                 # Synthetic sums hold no personal data, and spaced digits look like phone
                 # numbers to the sanitizer; documents of sums share most 5-word shingles, so
                 # near-duplicate removal would throw most of them away.
                 "sanitize": {"enabled": False}, "dedup": {"near": False}},
        "train": _train_section(out_dir, "pretrain", size.pretrain_steps, data_dir=str(out_dir / "data"), seq_len=128,
                                batch_size=size.batch_size, lr=size.pretrain_lr, warmup_steps=20, eval_every=size.pretrain_steps,
                                eval_batches=4, seed=size.seed),
    }, source="rl demo: pretrain")


def sft_config(out_dir: Path, files: DemoFiles, base: Path, size: RLDemoSize, steps: int) -> BastionConfig:
    """SFT up to `steps` at the constant size.sft_lr (no cosine: its shape depends on a total
    that SFT in rounds does not know in advance, and a resumed round must continue exactly)."""
    return build_config({
        **_common(out_dir, size),
        "finetune": {"init_from": str(base), "train_file": str(files.sft), "max_length": 96},
        "train": _train_section(out_dir, "sft", steps, objective="sft", seq_len=128, batch_size=size.batch_size,
                                lr=size.sft_lr, min_lr_ratio=1.0, warmup_steps=10, seed=size.seed,
                                log_every=max(1, size.sft_round // 10)),
    }, source="rl demo: sft")


def sft_until_target(out_dir: Path, files: DemoFiles, base: Path, size: RLDemoSize, quiet: bool,
                     console: Console) -> tuple[Any, int, float]:
    """SFT in rounds until dev accuracy reaches size.sft_target (or size.sft_steps in all):
    (the last round's TrainResult, steps, dev accuracy)."""
    steps, dev = 0, 0.0
    while True:
        steps = min(steps + size.sft_round, size.sft_steps)
        result = train(sft_config(out_dir, files, base, size, steps), resume=steps > size.sft_round, quiet=quiet)
        dev = accuracy(result.checkpoint, files.dev)
        console.print(f"sft step {steps}: dev exact match {dev:.1%}", highlight=False)
        if dev >= size.sft_target:
            return result, steps, dev
        if steps >= size.sft_steps:
            console.print(f"[yellow]sft stopped at {steps} steps below its target ({size.sft_target:.0%} on the dev "
                          "sums): from a policy this weak GRPO has not raised held-out accuracy in our runs "
                          "(docs/alignment.md)[/yellow]")
            return result, steps, dev


def grpo_config(out_dir: Path, files: DemoFiles, base: Path, size: RLDemoSize) -> BastionConfig:
    steps = size.grpo_steps
    return build_config({
        **_common(out_dir, size),
        "finetune": {"init_from": str(base), "train_file": str(files.prompts), "val_file": str(files.val_prompts),
                     "max_length": 96},
        "train": _train_section(out_dir, "grpo", steps, objective="grpo", seq_len=128, batch_size=size.grpo_batch,
                                lr=size.grpo_lr, warmup_steps=20, log_every=max(1, steps // 100),
                                eval_every=max(1, steps // size.eval_points),
                                eval_batches=-(-size.n_held_out // size.grpo_batch), seed=size.seed),
        "grpo": {"group_size": size.group_size, "max_new_tokens": size.digits + 3, "temperature": size.grpo_temperature,
                 "eval_samples": 1},  # 1: greedy validation, the same measure as held_out_accuracy
        "rewards": [{"name": "exact"}],
    }, source="rl demo: grpo")


def accuracy(checkpoint: Path, problems: Path) -> float:
    """Greedy exact match on a file of chat prompts with answers."""
    result = eval_generate(checkpoint, problems, [{"name": "exact"}], roots=[str(problems.parent)],
                           temperature=0.0, batch_size=32)
    return result.pass_at_k[1]


def held_out_accuracy(checkpoint: Path, files: DemoFiles) -> float:
    """Greedy exact match on the held-out problems (the same measure for every checkpoint)."""
    return accuracy(checkpoint, files.held_out)


# ---- the demo ------------------------------------------------------------------------------------


def _fresh_folder(out_dir: Path) -> None:
    """--out is replaced, but only when it is empty or an earlier demo's folder."""
    if out_dir.exists():
        ours = {"problems", "data", "pretrain", "sft", "grpo"}
        if any(out_dir.iterdir()) and not any((out_dir / name).exists() for name in ours):
            raise BastionError(f"{out_dir} exists and is not a demo folder; choose another --out")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)


def _timed(run: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    value = run()
    return value, time.perf_counter() - start


def run_rl_demo(out_dir: Path, size: RLDemoSize | None = None, *, quiet: bool = False,
                console: Console | None = None) -> RLDemoResult:
    """Data -> pretrain -> SFT -> GRPO on synthetic addition; prints each stage and a summary
    table (held-out accuracy after SFT and after GRPO, steps, wall time, the plot)."""
    console = console or Console()
    size = size or RLDemoSize.full()
    out_dir = Path(out_dir).absolute()
    _fresh_folder(out_dir)
    result = RLDemoResult()

    console.rule(f"1. data: {size.n_sft} sums with answers, {size.n_prompts} GRPO prompts, {size.n_held_out} held out")
    files, seconds = _timed(lambda: write_demo_data(out_dir / "problems", size))
    cfg = pretrain_config(out_dir, files, size)
    report, more = _timed(lambda: prepare_dataset(cfg.data))
    result.stages.append(StageResult("data", 0, seconds + more))
    console.print(f"tokenizer: {report.vocab_size} tokens; {report.train.tokens} training tokens", highlight=False)

    console.rule(f"2. pretrain: a {size.d_model}-wide, {size.n_layer}-layer model from scratch on the sums as text")
    pretrained, seconds = _timed(lambda: train(cfg, quiet=quiet))
    result.stages.append(StageResult("pretrain", pretrained.steps, seconds))

    console.rule(f"3. sft: the sums as chat turns, until {size.sft_target:.0%} right on {size.n_dev} dev sums")
    (sft, sft_steps, _), seconds = _timed(lambda: sft_until_target(out_dir, files, pretrained.checkpoint, size,
                                                                   quiet, console))
    result.sft_accuracy, more = _timed(lambda: held_out_accuracy(sft.checkpoint, files))
    result.stages.append(StageResult("sft", sft_steps, seconds + more, result.sft_accuracy))
    console.print(f"held-out exact match after sft: {result.sft_accuracy:.1%}", highlight=False)

    console.rule(f"4. grpo: {size.group_size} samples per prompt, reward exact")
    grpo, seconds = _timed(lambda: train(grpo_config(out_dir, files, sft.checkpoint, size), quiet=quiet))
    result.grpo_accuracy, more = _timed(lambda: held_out_accuracy(grpo.checkpoint, files))
    result.stages.append(StageResult("grpo", grpo.steps, seconds + more, result.grpo_accuracy))
    console.print(f"held-out exact match after grpo: {result.grpo_accuracy:.1%}", highlight=False)
    result.plot, result.checkpoint = plot_run(grpo.run_dir), grpo.checkpoint
    _summary(console, result)
    return result


def _summary(console: Console, result: RLDemoResult) -> None:
    table = Table(title="rl demo: held-out exact match (greedy); wall time includes the held-out eval")
    for column in ("stage", "steps", "wall time", "held-out accuracy"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage in result.stages:
        accuracy = f"{stage.accuracy:.1%}" if stage.accuracy is not None else ""
        table.add_row(stage.name, str(stage.steps or ""), f"{stage.seconds:.0f} s", accuracy)
    table.add_row("total", "", f"{sum(s.seconds for s in result.stages):.0f} s",
                  f"{result.grpo_accuracy - result.sft_accuracy:+.1%} from grpo")
    console.print(table)
    console.print(f"reward and accuracy curves: {result.plot}", highlight=False)
    console.print(f"checkpoint                : {result.checkpoint}", highlight=False)
