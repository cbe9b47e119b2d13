"""`bastion serve`: an OpenAI-compatible HTTP API with API keys, rate limits, an access log
and an optional output filter, all locked down by default."""
