"""Exceptions with messages meant for the user: which field, which file, what limit."""
from __future__ import annotations


class BastionError(Exception):
    """Base class: the CLI prints these as a one-line error and exits with status 2."""


class ConfigError(BastionError):
    """A config file or override is invalid; `problems` holds (field path, message) pairs."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


class DataError(BastionError):
    """An input file or dataset is unusable (missing, too large, not UTF-8, corrupt shard)."""


class CheckpointError(BastionError):
    """A checkpoint is missing, incomplete, tampered with, or does not match the model."""


class GenerationLimitError(BastionError):
    """A generation request exceeds a configured limit (max_new_tokens, prompt length...)."""


class QueueFullError(BastionError):
    """The generation engine's waiting queue is full (back-pressure): retry later, e.g. HTTP 503."""


class EngineClosedError(BastionError):
    """The generation engine is shut down (or stopped by a failure) and accepts no new requests."""
