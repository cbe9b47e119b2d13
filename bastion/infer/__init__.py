"""Generation: request limits, sampling, KV-cached decoding and streaming."""
from bastion.infer.generate import (GenerationResult, SamplingParams, check_request, generate, generate_chat,
                                    sampling_params, stream)
from bastion.infer.sampling import sample_next

__all__ = ["GenerationResult", "SamplingParams", "check_request", "generate", "generate_chat", "sample_next",
           "sampling_params", "stream"]
