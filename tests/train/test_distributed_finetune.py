"""Fine-tuning under torchrun (2 CPU processes, gloo): SFT, DPO, SimPO, ORPO, KTO, reward, classify and regress,
full or LoRA, with
DDP or FSDP2, follow the loss curve and validation numbers of one process with the same
global batch, including short last batches that leave a rank without rows; a LoRA+FSDP
checkpoint written by 2 ranks resumes on 1."""
import json
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import finetune_config, make_base_checkpoint

from bastion.checkpoint import load_checkpoint
from synthetic.chat import greeting_kto_records, greeting_preference_records, reverse_chat_records, write_jsonl
from synthetic.labelled import classify_records, regress_records
from bastion.adapters import read_adapter
from bastion.model.lora import is_lora_name
from bastion.train import train

STEPS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-ft")
    # Sizes chosen so global batches of 8 end each epoch short: 41 examples (unpacked) leave
    # one row in the last batch, so rank 1 has none; 43 pairs leave 3, split 1 + 2 (a plain
    # mean of the ranks' means would weight them wrongly); 13 validation items end on 5.
    write_jsonl(root / "sft.jsonl", reverse_chat_records(41, seed=1))
    write_jsonl(root / "sft_val.jsonl", reverse_chat_records(13, seed=2))
    write_jsonl(root / "pref.jsonl", greeting_preference_records(43, seed=1))
    write_jsonl(root / "pref_val.jsonl", greeting_preference_records(13, seed=2))
    write_jsonl(root / "kto.jsonl", greeting_kto_records(43, seed=1))
    write_jsonl(root / "kto_val.jsonl", greeting_kto_records(13, seed=2))
    write_jsonl(root / "classify.jsonl", classify_records(41, seed=1))
    write_jsonl(root / "classify_val.jsonl", classify_records(13, seed=2))
    write_jsonl(root / "regress.jsonl", regress_records(41, seed=1))
    write_jsonl(root / "regress_val.jsonl", regress_records(13, seed=2))
    return {"root": root, "base": make_base_checkpoint(root / "base")}


def config(data, out, objective, batch_size, **extra):
    name = {"sft": "sft", "kto": "kto", "classify": "classify", "regress": "regress"}.get(objective, "pref")
    files = (f"{name}.jsonl", f"{name}_val.jsonl")
    if objective == "classify":
        extra["sequence"] = {"labels": ["neg", "neu", "pos"]}
    cfg = finetune_config(data["base"], data["root"] / files[0], out, objective=objective,
                          val_file=data["root"] / files[1], max_steps=STEPS, batch_size=batch_size, lr=2e-3,
                          log_every=1, eval_every=6, eval_batches=100, threads=1, **extra)
    return cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"every_steps": 6, "keep_last": 3})})


def torchrun(cfg, tmp_path, *extra):
    path = tmp_path / f"cfg-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "bastion.cli", "train", "-c", str(path), "--quiet", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["kind"], r["step"]): r for r in rows}


CASES = {
    # objective, parallel, extra config
    "sft-ddp-unpacked": ("sft", "ddp", {"pack": False}),
    "sft-fsdp-packed-lora": ("sft", "fsdp", {"lora": {"rank": 4}}),
    "dpo-fsdp-lora": ("dpo", "fsdp", {"lora": {"rank": 4}}),
    "simpo-ddp": ("simpo", "ddp", {}),
    "reward-fsdp": ("reward", "fsdp", {}),  # the score head sharded with the rest
    "orpo-ddp": ("orpo", "ddp", {}),
    "kto-fsdp-lora": ("kto", "fsdp", {"lora": {"rank": 4}}),  # z0: one all-reduce per micro-batch
    "classify-ddp": ("classify", "ddp", {}),  # validation: the ranks' scores joined by one all-reduce
    "regress-fsdp": ("regress", "fsdp", {}),
}


def build(data, out, case, batch_size, **train_settings):
    objective, parallel, extra = CASES[case]
    cfg = config(data, out, objective, batch_size, lora=extra.get("lora"), parallel=parallel, **train_settings)
    if "pack" in extra:
        cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"pack": extra["pack"]})})
    return cfg


# Each case is a torchrun launch (2 ranks starting Python and torch) plus a one-process run. The
# default suite keeps one case per distributed code path; these repeat one another's and run in
# `make test-all`: SimPO and ORPO only change PreferenceTask's pair loss (its rank shares, reference
# and evaluation all-reduces are DPO's, run under FSDP above), and regress is ClassifyTask's score
# table (classify-ddp) with a sharded score head (reward-fsdp).
REPEATS = {"simpo-ddp", "orpo-ddp", "regress-fsdp"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in REPEATS else c for c in CASES])
def test_two_ranks_follow_one_process(data, tmp_path, case):
    one = train(build(data, tmp_path / "one", case, batch_size=8), quiet=True)
    torchrun(build(data, tmp_path / "two", case, batch_size=4), tmp_path)
    single, double = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert set(single) == set(double)
    for key, row in single.items():
        for name, value in row.items():
            if name in ("loss", "tokens", "pairs", "perplexity", "kl", "examples", "nll", "log_odds_ratio", "accuracy",
                        "macro_f1", "mae", "pearson", "acc2_nonneg", "acc2_nonzero", "acc7") \
                    or name.startswith("reward"):
                assert double[key][name] == pytest.approx(value, rel=1e-4, abs=1e-5), (key, name)
    assert ("val", 12) in single and single[("train", STEPS)]["epoch"] >= 2  # epoch ends were crossed
    state = load_checkpoint(tmp_path / "two" / "checkpoints", load_optimizer=False).trainer_state
    assert state["tokens_seen"] == one.tokens
    if CASES[case][2].get("lora"):  # rank 0 wrote the gathered adapters, whole
        ckpt = load_checkpoint(tmp_path / "two" / "checkpoints", load_optimizer=False)
        assert ckpt.model and all(is_lora_name(k) for k in ckpt.model)
        adapter = read_adapter(tmp_path / "two" / "adapter")
        assert adapter.tensors.keys() == ckpt.model.keys()
        assert all((adapter.tensors[k] == ckpt.model[k]).all() for k in ckpt.model)


def test_lora_fsdp_checkpoint_resumes_on_one_process_and_on_two(data, tmp_path):
    """Adapters gathered by 2 FSDP ranks at step 6 continue the same curve in one process,
    and sharded again onto 2 ranks (each rank loading its slice of the adapters and of
    their AdamW state)."""
    case = "dpo-fsdp-lora"
    torchrun(build(data, tmp_path / "two", case, batch_size=4), tmp_path)
    straight = metrics(tmp_path / "two")
    for nproc in (1, 2):
        resumed = tmp_path / f"resumed-{nproc}"
        shutil.copytree(tmp_path / "two", resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_00000012")
        (resumed / "checkpoints" / "latest").write_text("step_00000006")
        if nproc == 1:
            train(build(data, resumed, case, batch_size=8), resume=True, quiet=True)
        else:
            torchrun(build(data, resumed, case, batch_size=4), tmp_path, "--resume")
        again = metrics(resumed)
        for step in range(7, STEPS + 1):
            assert again[("train", step)]["loss"] == pytest.approx(straight[("train", step)]["loss"], abs=1e-4), (nproc, step)
        assert again[("val", STEPS)]["reward_accuracy"] == pytest.approx(straight[("val", STEPS)]["reward_accuracy"])
