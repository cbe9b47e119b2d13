"""Access log (no prompt text unless enabled, private file, never raises) and output filters
(whole text and streamed deltas, secrets split across deltas)."""
import json
import os
import random
import stat
import threading

import pytest

from bastion.errors import ConfigError
from bastion.serve.accesslog import AccessLog
from bastion.serve.filters import OutputFilter, StreamFilter

PROMPT = "my secret prompt about project NIGHTJAR"
COMPLETION = "the hidden completion text ZEPHYR"


def entry(**kw):
    base = {"request_id": "req-1", "key_id": "key_1234abcd", "method": "POST", "path": "/v1/completions",
            "status": 200, "latency_ms": 12.3456, "prompt_tokens": 7, "completion_tokens": 5,
            "finish_reason": "stop", "prompt": PROMPT, "completion": COMPLETION}
    base.update(kw)
    return base


# ---- access log -----------------------------------------------------------------------------------


def test_file_log_private_and_without_text(tmp_path):
    path = tmp_path / "access.jsonl"
    old = os.umask(0o022)
    try:
        log = AccessLog(str(path), log_prompts=False)
    finally:
        os.umask(old)
    log.log(**entry())
    log.log(**entry(request_id="req-2", status=429, error="rate limited", path="/v1/chat/completions?api_key=SEKRIT",
                    prompt=[{"role": "user", "content": PROMPT}]))
    log.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    raw = path.read_text()
    assert "NIGHTJAR" not in raw and "ZEPHYR" not in raw and "SEKRIT" not in raw
    lines = [json.loads(line) for line in raw.splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert set(first) == {"time", "request_id", "key_id", "method", "path", "status", "latency_ms", "model",
                          "prompt_tokens", "completion_tokens", "finish_reason", "error"}
    assert first["time"].endswith("Z") and first["key_id"] == "key_1234abcd" and first["latency_ms"] == 12.346
    assert lines[1]["status"] == 429 and lines[1]["error"] == "rate limited"
    assert lines[1]["path"] == "/v1/chat/completions"


def test_prompts_logged_only_when_enabled(tmp_path):
    path = tmp_path / "access.jsonl"
    with AccessLog(path, log_prompts=True) as log:
        log.log(**entry())
    rec = json.loads(path.read_text())
    assert rec["prompt"] == PROMPT and rec["completion"] == COMPLETION


def test_append_only_and_existing_file_made_private(tmp_path):
    path = tmp_path / "access.jsonl"
    path.write_text('{"old": 1}\n')
    os.chmod(path, 0o644)
    with AccessLog(path, log_prompts=False) as log:
        log.log(**entry())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"old": 1} and len(lines) == 2


def test_symlink_and_non_regular_refused(tmp_path):
    target = tmp_path / "target"
    target.write_text("")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(ConfigError, match="symlink"):
        AccessLog(tmp_path / "link", log_prompts=False)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigError, match="not a regular file"):
        AccessLog(tmp_path / "fifo", log_prompts=False)
    with pytest.raises(ConfigError):
        AccessLog(tmp_path / "no" / "such" / "dir.jsonl", log_prompts=False)


def test_stderr_default(capsys):
    log = AccessLog(None, log_prompts=False)
    log.log(**entry())
    err = capsys.readouterr().err
    rec = json.loads(err)
    assert rec["request_id"] == "req-1" and "prompt" not in rec and "NIGHTJAR" not in err


def test_write_failure_never_raises(tmp_path, capsys):
    log = AccessLog(tmp_path / "a.jsonl", log_prompts=True)
    log.close()  # every write now fails
    for _ in range(3):
        log.log(**entry())
    assert log.write_errors == 3
    err = capsys.readouterr().err
    assert err.count("cannot write the access log") == 1  # reported once
    assert "NIGHTJAR" not in err

    class Unserialisable:
        def __str__(self):
            raise RuntimeError("boom")

    good = AccessLog(tmp_path / "b.jsonl", log_prompts=True)
    good.log(**entry(prompt=Unserialisable()))
    assert good.write_errors == 1
    good.close()


def test_control_characters_escaped(tmp_path):
    path = tmp_path / "a.jsonl"
    with AccessLog(path, log_prompts=True) as log:
        log.log(**entry(prompt="line1\nline2\x1b[31m\u202e", error="bad\nthing"))
    raw = path.read_bytes()
    assert raw.count(b"\n") == 1 and b"\x1b" not in raw and raw.isascii()
    assert json.loads(raw)["prompt"] == "line1\nline2\x1b[31m\u202e"


def test_thread_safe_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    log = AccessLog(path, log_prompts=True)

    def worker(i):
        for j in range(200):
            log.log(**entry(request_id=f"{i}-{j}", prompt="x" * 3000))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1600 and len({json.loads(line)["request_id"] for line in lines}) == 1600


# ---- output filter ---------------------------------------------------------------------------------

SECRETS = {
    "email": "alice.smith@example.com",
    "github": "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A",
    "aws": "AKIAIOSFODNN7EXAMPL3",  # security-reviewed: a fake key (AWS docs example shape) the filter must catch
    "card": "4111 1111 1111 1111",
    "openai": "sk-proj-Ab3dEf5GhIj7KlMn9OpQr1StUv",
}
FILLER = ("The quick brown fox jumps over the lazy dog while the model keeps talking about nothing "
          "in particular, adding words so that the stream is long enough to be held back. ")


def test_disabled_filter_is_identity():
    flt = OutputFilter(False)
    text = "mail " + SECRETS["email"]
    assert flt.apply(text) == (text, {})
    sf = flt.stream()
    assert sf.feed("a") == "a" and sf.feed(text) == text and sf.flush() == ""


def test_apply_redacts():
    flt = OutputFilter(True)
    text = " ".join(f"{k}: {v}." for k, v in SECRETS.items())
    out, counts = flt.apply(text)
    for secret in SECRETS.values():
        assert secret not in out
    assert counts["EMAIL"] == 1 and counts["CREDIT_CARD"] == 1 and counts["SECRET"] == 3
    assert "<EMAIL>" in out and "<CREDIT_CARD>" in out


def stream(flt, text, sizes, hold=256):
    sf = flt.stream(hold=hold)
    out, pos, i = [], 0, 0
    while pos < len(text):
        n = sizes[i % len(sizes)]
        out.append(sf.feed(text[pos:pos + n]))
        pos += n
        i += 1
    out.append(sf.flush())
    return "".join(out), sf.counts


def document(seed):
    rng = random.Random(seed)
    parts = []
    for _ in range(12):
        parts.append(FILLER[: rng.randrange(20, len(FILLER))])
        kind = rng.choice(list(SECRETS))
        parts.append(f"{kind} is {SECRETS[kind]}.\n" if rng.random() < 0.5 else f"({SECRETS[kind]}) ")
    return "".join(parts)


@pytest.mark.parametrize("seed", range(8))
def test_stream_equals_whole_text_redaction(seed):
    flt = OutputFilter(True)
    text = document(seed)
    expected, expected_counts = flt.apply(text)
    assert all(s not in expected for s in SECRETS.values())
    rng = random.Random(seed)
    for sizes in ([1], [3], [4, 1, 7], [rng.randrange(1, 20) for _ in range(50)], [len(text)]):
        got, counts = stream(flt, text, sizes)
        assert got == expected
        assert counts == expected_counts


@pytest.mark.parametrize("name", list(SECRETS))
def test_secret_split_at_every_position(name):
    """The secret straddles two deltas, at every possible split point."""
    flt = OutputFilter(True)
    secret = SECRETS[name]
    text = FILLER * 3 + f"key {secret} end. " + FILLER * 2
    expected, _ = flt.apply(text)
    start = text.index(secret)
    for k in range(1, len(secret)):
        split = start + k
        got, _ = stream(flt, text, [split, len(text)])
        assert got == expected, (name, k)
        # and arriving token by token around the secret
        sf = flt.stream()
        pieces = [sf.feed(text[:split - 3])] + [sf.feed(text[i]) for i in range(split - 3, len(text))]
        assert "".join(pieces) + sf.flush() == expected


def test_stream_holds_back_and_emits_at_whitespace():
    flt = OutputFilter(True)
    sf = flt.stream(hold=32)
    assert sf.feed("short text ") == ""  # under the hold-back window
    emitted = sf.feed("x" * 10 + " " + "word " * 10)
    assert emitted and emitted.endswith(" ") and sf.pending >= 32
    rest = sf.flush()
    assert emitted + rest == "short text " + "x" * 10 + " " + "word " * 10
    with pytest.raises(RuntimeError):
        sf.feed("more")
    assert sf.flush() == ""


def test_stream_never_emits_partial_secret():
    flt = OutputFilter(True)
    secret = SECRETS["github"]
    sf = flt.stream(hold=16)
    emitted = ""
    text = "a " * 40 + secret + " b" * 40
    for ch in text:
        emitted += sf.feed(ch)
        # no prefix of the secret longer than its fixed "ghp_" part ever goes out
        assert secret[:12] not in emitted
    emitted += sf.flush()
    assert emitted == flt.apply(text)[0] and "<SECRET>" in emitted


def test_stream_long_run_without_whitespace():
    flt = OutputFilter(True)
    # punctuation: cut there once 4 * hold characters are waiting
    sf = flt.stream(hold=16)
    text = "f(x),g(y);" * 500
    out = "".join(sf.feed(text[i:i + 7]) for i in range(0, len(text), 7))
    assert sf.pending < 100 and out
    assert out + sf.flush() == text
    # one unbroken run: held up to max_buffer, then cut anywhere
    sf = StreamFilter(flt, hold=16, max_buffer=1000)
    text = "z" * 5000
    out = "".join(sf.feed(text[i:i + 7]) for i in range(0, len(text), 7))
    assert 16 <= sf.pending <= 1000 + 7 and out
    assert out + sf.flush() == text


def jwt_with(payload_chars, signature_chars, seed=0):
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    header = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"  # {"alg":"HS256","typ":"JWT"}
    payload = "".join(rng.choice(alphabet) for _ in range(payload_chars))
    signature = "".join(rng.choice(alphabet) for _ in range(signature_chars))
    return f"{header}.{payload}.{signature}", payload, signature


def test_stream_long_secret_without_whitespace():
    """A JWT longer than the forced-cut threshold, glued to punctuation, streams like apply()."""
    flt = OutputFilter(True)
    jwt, payload, _ = jwt_with(1500, 43)
    text = ('headers={"x":"' + jwt + '","y":1};') * 3 + " tail"
    expected, counts = flt.apply(text)
    assert payload[:20] not in expected and counts["SECRET"] == 3
    sf = StreamFilter(flt, hold=16, max_buffer=4096)
    out = "".join(sf.feed(text[i:i + 5]) for i in range(0, len(text), 5)) + sf.flush()
    assert out == expected and sf.counts == counts


def test_stream_huge_secret_is_redacted_not_leaked():
    """A finding longer than max_buffer is cut, but the rest is redacted too (one placeholder)."""
    flt = OutputFilter(True)
    jwt, _, signature = jwt_with(40, 3000)  # recognisable once the second "." is seen
    text = "token: " + jwt + " done " + FILLER
    expected, _ = flt.apply(text)
    assert expected.startswith("token: <SECRET> done")
    sf = StreamFilter(flt, hold=16, max_buffer=256)
    out = "".join(sf.feed(text[i:i + 5]) for i in range(0, len(text), 5)) + sf.flush()
    assert not any(signature[i:i + 12] in out for i in range(len(signature) - 12))
    assert out == expected and sf.counts["SECRET"] == 1


def test_stream_filter_from_bool():
    text = FILLER + "mail " + SECRETS["email"] + " " + FILLER
    on = StreamFilter(True)
    assert "".join(on.feed(text[i:i + 3]) for i in range(0, len(text), 3)) + on.flush() == OutputFilter(True).apply(text)[0]
    off = StreamFilter(False)
    assert off.feed(text) == text and off.flush() == ""


def test_write_is_log(tmp_path):
    path = tmp_path / "a.jsonl"
    with AccessLog(path, log_prompts=False) as log:
        log.write(**entry(request_id=None, method=None))
        log.log(**entry())
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first["request_id"] is None and second["request_id"] == "req-1"
