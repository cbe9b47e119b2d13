"""Typed configs: YAML + ${ENV} interpolation, bounds on every number, secret redaction."""
from bastion.config.load import build_config, load_config, redact_text, redacted_dict, to_yaml
from bastion.config.schema import (
    BastionConfig,
    CheckpointConfig,
    DataConfig,
    GenerateConfig,
    ModelConfig,
    TokenizerConfig,
    TrainConfig,
)

__all__ = [
    "BastionConfig", "CheckpointConfig", "DataConfig", "GenerateConfig", "ModelConfig",
    "TokenizerConfig", "TrainConfig", "build_config", "load_config", "redact_text",
    "redacted_dict", "to_yaml",
]
