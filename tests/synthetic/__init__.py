"""Synthetic data for tests, benchmarks and docs - fixtures, not part of the `bastion` package.

    corpus.py   arithmetic / agreement-grammar / repetition corpora for pretraining
    chat.py     chat and preference JSONL for fine-tuning (reverse-the-words, greetings)
    pii.py      labelled documents with planted PII and secrets, for measuring redaction
    prepare_corpus.py  a corpus with work for every `data prepare` hygiene step; dataset byte comparison

Tests import them as `synthetic.<module>` (tests/ is on sys.path under pytest); bench/
scripts add tests/ to sys.path themselves.
"""
