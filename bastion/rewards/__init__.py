"""Reward functions for online RL (GRPO) and generation evals: a registry of named, typed
functions configured in YAML (registry.py), the built-in rewards (builtin.py, registered on
import), and the sandbox that runs completions' code against tests."""
from bastion.rewards import builtin  # registers the built-in rewards
from bastion.rewards.registry import (
    ENTRY_POINT_GROUP,
    REWARDS,
    Reward,
    RewardSet,
    Sample,
    build_reward,
    build_rewards,
    entry_point_names,
    register_reward,
    reward_class,
)
from bastion.rewards.code import CodeTestsReward  # registers code_tests
from bastion.rewards.specs import parse_reward_spec
from bastion.rewards import reward_model  # noqa: E402,F401  (registers reward_model)

__all__ = ["CodeTestsReward", "ENTRY_POINT_GROUP", "REWARDS", "Reward", "RewardSet", "Sample", "build_reward",
           "build_rewards", "builtin", "entry_point_names", "parse_reward_spec", "register_reward", "reward_class"]
