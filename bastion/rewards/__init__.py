"""Reward functions for online RL (GRPO) and generation evals: a registry of named, typed
functions configured in YAML (registry.py), the built-in rewards, and the sandbox that runs
completions' code against tests."""
from bastion.rewards.registry import (
    ENTRY_POINT_GROUP,
    REWARDS,
    Reward,
    RewardSet,
    Sample,
    build_reward,
    build_rewards,
    register_reward,
    reward_class,
)
from bastion.rewards import reward_model  # noqa: E402,F401  (registers reward_model)

__all__ = ["ENTRY_POINT_GROUP", "REWARDS", "Reward", "RewardSet", "Sample", "build_reward", "build_rewards",
           "register_reward", "reward_class"]
