"""Generation: request limits, sampling, KV-cached decoding and streaming."""
from bastion.infer.generate import GenerationResult, check_request, generate, generate_chat, stream
from bastion.infer.sampling import sample_next

__all__ = ["GenerationResult", "check_request", "generate", "generate_chat", "sample_next", "stream"]
