"""Training objectives, one file each, registered by their `train.objective` name.

    clm     pretraining: token shards, next-token loss on every token        clm.py
    sft     chat JSONL: next-token loss on assistant tokens                  sft.py
    dpo     preference JSONL: sigmoid DPO against reference log-probs        dpo.py
    simpo   preference JSONL: SimPO, reference-free                          simpo.py
    grpo    prompt JSONL + rewards: online RL (GRPO, Dr. GRPO, DAPO, GSPO)   grpo.py
    reward  preference JSONL: a reward model (score head), Bradley-Terry     reward.py
    orpo    preference JSONL: ORPO, NLL + odds-ratio term, reference-free    orpo.py
    kto     labelled completions JSONL: KTO against reference log-probs      kto.py
    classify  labelled texts JSONL: K-class score head, cross-entropy        classify.py
    regress   labelled texts JSONL: one-value score head, MSE / L1 / Huber   classify.py

To add an objective: a new file here with a `Task` subclass (base.py) and its loss,
decorated with `@register_task`, and its import below.
"""
from bastion.train.tasks.base import TASKS, Task, register_task, task_class
from bastion.train.tasks import classify, clm, dpo, grpo, kto, orpo, reward, sft, simpo  # noqa: E402,F401  (each registers its task)

__all__ = ["TASKS", "Task", "register_task", "task_class"]
