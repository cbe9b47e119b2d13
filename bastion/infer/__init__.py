"""Generation: request limits, sampling, KV-cached decoding and streaming."""
from bastion.infer.generate import GenerationResult, check_request, generate, stream
from bastion.infer.sampling import sample_next

__all__ = ["GenerationResult", "check_request", "generate", "sample_next", "stream"]
