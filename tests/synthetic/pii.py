"""Labelled synthetic documents for measuring PII/secret redaction (`bastion.data.sanitize`).

`labelled_documents(n, seed)` mixes prose, Python code, config files (YAML, .env, JSON), logs and
e-mail messages. Every planted PII value or secret is labelled with its category and exact span;
look-alikes that must survive redaction (versions, dates, UUIDs, git hashes, Luhn-invalid
numbers, private IPs, placeholders such as "changeme" or "${VAR}") are recorded separately.
`labelled_cases(per_category, seed)` measures each detector on its own: for every measured
category (SECRET split into API tokens, JWTs, PEM keys, URL passwords and assigned secrets; IP
into IPv4 and IPv6) as many positive as look-alike cases, each a short prose, code, config, log
or JSON document holding one value after the words real text puts there.
Same arguments -> identical documents (only `random.Random` is used).

Span conventions match what `Redactor.find` reports: an assignment secret is its value only
(inside the quotes), a URL password is the password only, a PEM block is BEGIN..END inclusive,
an IP address excludes any port or /prefix.

`python tests/synthetic/pii.py --report` prints the per-category precision/recall table and
the throughput figures used in docs/data-hygiene.md. Generated data is not real data: the
numbers say the detectors work on the formats planted here, not what they miss in the wild.
"""
from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import random
import string
import sys
import sysconfig
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bastion.data.sanitize import (
    CATEGORIES,
    CREDIT_CARD,
    EMAIL,
    IBAN,
    IBAN_LENGTHS,
    IP,
    NATIONAL_ID,
    PHONE,
    SECRET,
    Finding,
    Redactor,
    luhn_ok,
)

Span = tuple[str, int, int]


@dataclass
class LabelledDoc:
    text: str
    spans: list[Span] = field(default_factory=list)  # (category, start, end) of planted PII
    lookalikes: list[Span] = field(default_factory=list)  # (kind, start, end): must stay intact
    kind: str = ""  # the document's kind (prose, python, ...) or a case's context
    category: str = ""  # a case's measured category (`labelled_cases`); "" for mixed documents


class _Builder:
    def __init__(self, rng: random.Random, kind: str) -> None:
        self.rng = rng
        self.kind = kind
        self.parts: list[str] = []
        self.pos = 0
        self.spans: list[Span] = []
        self.lookalikes: list[Span] = []

    def t(self, s: str) -> None:
        self.parts.append(s)
        self.pos += len(s)

    def pii(self, category: str, s: str) -> None:
        self.spans.append((category, self.pos, self.pos + len(s)))
        self.t(s)

    def keep(self, kind: str, s: str) -> None:
        self.lookalikes.append((kind, self.pos, self.pos + len(s)))
        self.t(s)

    def build(self) -> LabelledDoc:
        return LabelledDoc("".join(self.parts), self.spans, self.lookalikes, self.kind)


# ---- value generators -------------------------------------------------------------------------

_FIRST = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory",
    "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "yvonne"
]
_LAST = [
    "smith", "jones", "garcia", "miller", "davis", "lopez", "wilson", "anderson", "thomas", "taylor",
    "moore", "jackson", "martin", "lee", "thompson", "white", "harris", "clark", "lewis", "young"
]
_DOMAINS = [
    "example.com", "example.org", "gmail.com", "outlook.com", "corp.example.co.uk",
    "mail.uni-heidelberg.de", "acme.io", "company.fr", "protonmail.ch", "startup.dev"
]
_WORDS = [
    "the", "model", "training", "data", "pipeline", "server", "request", "user", "account", "team",
    "release", "meeting", "report", "budget", "invoice", "customer", "support", "ticket", "deploy",
    "service", "cluster", "config", "update", "review", "draft", "schedule", "project", "quarter",
    "result", "metric", "batch", "token", "vocabulary", "checkpoint", "evaluation"
]
_ALNUM = string.ascii_letters + string.digits
_UPPER_DIGITS = string.ascii_uppercase + string.digits
_HEXDIGITS = "0123456789abcdef"
_B64 = string.ascii_letters + string.digits + "+/"
_B64URL = string.ascii_letters + string.digits + "-_"


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _mixed_alnum(rng: random.Random, n: int) -> str:
    """Random base62 that contains upper, lower and a digit (as real generated keys do)."""
    while True:
        s = _rand(rng, _ALNUM, n)
        if any(c.isupper() for c in s) and any(c.islower() for c in s) and any(c.isdigit() for c in s):
            return s


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128)))


def _words(rng: random.Random, k: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(k))


def email(rng: random.Random) -> str:
    f, l = rng.choice(_FIRST), rng.choice(_LAST)
    local = rng.choice([f"{f}.{l}", f"{f[0]}{l}", f"{f}_{l}{rng.randint(1, 99)}", f"{f}+news", f"{l}.{f}"])
    return f"{local}@{rng.choice(_DOMAINS)}"


def _d(rng: random.Random, n: int) -> str:
    return _rand(rng, string.digits, n)


def phone(rng: random.Random) -> str:
    area, exch = f"{rng.randint(2, 9)}{_d(rng, 2)}", f"{rng.randint(2, 9)}{_d(rng, 2)}"
    line = _d(rng, 4)
    fr = [_d(rng, 2) for _ in range(4)]
    return rng.choice([
        f"+1 ({area}) {exch}-{line}",
        f"+1 {area}-{exch}-{line}",
        f"+1{area}{exch}{line}",
        f"+44 20 {rng.randint(7, 8)}{_d(rng, 3)} {_d(rng, 4)}",
        f"+44 7{_d(rng, 3)} {_d(rng, 6)}",
        f"+49 30 {_d(rng, 8)}",
        f"+49 171 {_d(rng, 7)}",
        f"+33 {rng.randint(1, 9)} {' '.join(fr)}",
        f"+91 9{_d(rng, 4)} {_d(rng, 5)}",
        f"+61 2 {_d(rng, 4)} {_d(rng, 4)}",
        f"({area}) {exch}-{line}",
        f"{area}-{exch}-{line}",
        f"{area}.{exch}.{line}",
        f"1-800-{exch}-{line}",
        f"020 7{_d(rng, 3)} {_d(rng, 4)}",
        f"07700 {_d(rng, 6)}",
        f"030 {_d(rng, 8)}",
        f"0171/{_d(rng, 7)}",
        f"0{rng.randint(1, 9)} {' '.join(fr)}",
        f"0{rng.randint(1, 9)}.{'.'.join(fr)}",
    ])


_NOT_PUBLIC = tuple(ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "100.64.0.0/10"))


def public_ipv4(rng: random.Random) -> str:
    while True:
        a = ipaddress.IPv4Address(rng.getrandbits(32))
        if a.is_global and not a.is_multicast and not any(a in n for n in _NOT_PUBLIC):
            return str(a)


def public_ipv6(rng: random.Random) -> str:
    prefix = rng.choice([0x2001_4860, 0x2a00_1450, 0x2606_4700, 0x2a03_2880, 0x2400_cb00])
    a = ipaddress.IPv6Address((prefix << 96) | rng.getrandbits(96))
    # Compressed addresses with a single non-zero group are too short to be believable addresses
    # (the detector requires 3+ groups or a 4-digit group); random ones always pass.
    return a.compressed if rng.random() < 0.7 else a.exploded


def private_ip(rng: random.Random) -> str:
    return rng.choice([
        f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        "127.0.0.1", "0.0.0.0", "255.255.255.0", "::1", f"fe80::{rng.randint(1, 0xffff):x}",
    ])


_CARD_BRANDS = [  # (prefix, length)
    ("4", 16), ("4", 13), ("51", 16), ("55", 16), ("2221", 16), ("2720", 16), ("34", 15), ("37", 15),
    ("6011", 16), ("65", 16), ("3530", 16), ("36", 14), ("62", 16),
]


def _luhn_complete(partial: str) -> str:
    for d in "0123456789":
        if luhn_ok(partial + d):
            return partial + d
    raise AssertionError("unreachable")


def card_number(rng: random.Random, valid: bool = True) -> str:
    prefix, n = rng.choice(_CARD_BRANDS)
    digits = _luhn_complete(prefix + _d(rng, n - len(prefix) - 1))
    if not valid:  # change the check digit: Luhn now fails
        digits = digits[:-1] + str((int(digits[-1]) + rng.randint(1, 9)) % 10)
    style = rng.choice(["plain", "space", "dash"])
    if style == "plain":
        return digits
    sep = " " if style == "space" else "-"
    if n == 15:
        return sep.join([digits[:4], digits[4:10], digits[10:]])
    if n == 14:
        return sep.join([digits[:4], digits[4:10], digits[10:]])
    if n == 16:
        return sep.join(digits[i:i + 4] for i in range(0, 16, 4))
    return digits  # 13 digits: not grouped


_IBAN_BBAN: dict[str, Callable[[random.Random], str]] = {
    "DE": lambda r: _d(r, 18),
    "GB": lambda r: _rand(r, string.ascii_uppercase, 4) + _d(r, 14),
    "FR": lambda r: _d(r, 10) + _rand(r, _UPPER_DIGITS, 11) + _d(r, 2),
    "ES": lambda r: _d(r, 20),
    "IT": lambda r: _rand(r, string.ascii_uppercase, 1) + _d(r, 10) + _rand(r, _UPPER_DIGITS, 12),
    "NL": lambda r: _rand(r, string.ascii_uppercase, 4) + _d(r, 10),
    "BE": lambda r: _d(r, 12),
    "CH": lambda r: _d(r, 5) + _rand(r, _UPPER_DIGITS, 12),
    "AT": lambda r: _d(r, 16),
    "PL": lambda r: _d(r, 24),
    "NO": lambda r: _d(r, 11),
}


def iban(rng: random.Random, valid: bool = True) -> str:
    cc = rng.choice(sorted(_IBAN_BBAN))
    bban = _IBAN_BBAN[cc](rng)
    assert len(bban) + 4 == IBAN_LENGTHS[cc]
    check = 98 - int("".join(str(int(c, 36)) for c in bban + cc + "00")) % 97
    if not valid:
        check = (check % 97) + 1 if check != 97 else 2  # any other check digits fail mod-97
    compact = f"{cc}{check:02d}{bban}"
    if rng.random() < 0.5:
        return compact
    return " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))


def ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def invalid_ssn(rng: random.Random) -> str:
    return rng.choice([
        f"000-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}",
        f"666-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}",
        f"9{_d(rng, 2)}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}",
        f"{rng.randint(1, 665):03d}-00-{rng.randint(1, 9999):04d}",
        f"{rng.randint(1, 665):03d}-{rng.randint(1, 99):02d}-0000",
    ])


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(rng: random.Random) -> str:
    header = {"alg": rng.choice(["HS256", "RS256", "ES256"]), "typ": "JWT"}
    if rng.random() < 0.3:
        header["kid"] = _rand(rng, _ALNUM, 8)
    payload = {"sub": _d(rng, 10), "name": f"{rng.choice(_FIRST).title()} {rng.choice(_LAST).title()}",
               "iat": rng.randint(1_600_000_000, 1_800_000_000)}
    sig = _rand(rng, _B64URL, rng.choice([43, 86]))
    return f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(payload).encode())}.{sig}"


def pem_block(rng: random.Random, newline: str = "\n") -> str:
    kind = rng.choice(["RSA ", "EC ", "OPENSSH ", "", "ENCRYPTED ", "DSA "])
    lines = [_rand(rng, _B64, 64) for _ in range(rng.randint(4, 20))]
    lines.append(_rand(rng, _B64, rng.randint(8, 60)) + "==")
    return newline.join([f"-----BEGIN {kind}PRIVATE KEY-----", *lines, f"-----END {kind}PRIVATE KEY-----"])


def token(rng: random.Random) -> str:
    """A self-identifying secret in one of the supported formats."""
    r = rng.random
    return rng.choice([
        lambda: "AKIA" + _rand(rng, _UPPER_DIGITS, 16),
        lambda: "ASIA" + _rand(rng, _UPPER_DIGITS, 16),
        lambda: rng.choice(["ghp_", "gho_", "ghu_", "ghs_", "ghr_"]) + _mixed_alnum(rng, 36),
        lambda: "github_pat_" + _mixed_alnum(rng, 22) + "_" + _mixed_alnum(rng, 59),
        lambda: "glpat-" + _mixed_alnum(rng, 20),
        lambda: f"xox{rng.choice('baprs')}-{_d(rng, 12)}-{_d(rng, 13)}-{_mixed_alnum(rng, 24)}",
        lambda: rng.choice(["sk_live_", "rk_live_", "pk_live_", "sk_test_"]) + _mixed_alnum(rng, 24),
        lambda: "AIza" + _rand(rng, _ALNUM + "-_", 35),
        lambda: "sk-" + _mixed_alnum(rng, 48),
        lambda: "sk-proj-" + _mixed_alnum(rng, 64) if r() < 0.5 else "sk-ant-api03-" + _mixed_alnum(rng, 80),
        lambda: jwt(rng),
    ])()


def secret_value(rng: random.Random, quoted: bool) -> str:
    """A high-entropy value as assigned to password/api_key/... (no quotes or separators)."""
    choices = [
        lambda: _mixed_alnum(rng, rng.randint(16, 40)),
        lambda: _rand(rng, _HEXDIGITS, rng.choice([32, 40, 64])),
        lambda: _rand(rng, _B64, 40),  # AWS secret access key shape
        lambda: _mixed_alnum(rng, 12),
    ]
    if quoted:  # symbols that need quoting in YAML/.env
        choices.append(lambda: "".join(rng.choice(_ALNUM + "!#$%^*-_=+?") for _ in range(rng.randint(12, 24))))
    while True:
        v = rng.choice(choices)()
        if not v.isdigit() and "$" not in v[:2]:
            return v


_SECRET_KEYS = [
    "password", "DB_PASSWORD", "db_pass", "api_key", "apiKey", "API_KEY", "SECRET_TOKEN", "secret_key",
    "client_secret", "auth_token", "access_token", "aws_secret_access_key", "token", "private_key",
    "STRIPE_SECRET", "signing_key", "passphrase", "refreshToken",
]


def url_with_password(rng: random.Random, b: _Builder) -> None:
    scheme = rng.choice(["postgres", "postgresql", "mysql", "redis", "amqp", "mongodb+srv", "https", "ftp"])
    user = rng.choice(["admin", "app", "deploy", "svc_ingest", rng.choice(_FIRST)])
    host = rng.choice(["db.internal", "cache.prod.example.net", "10.0.3.7", "mq.example.com", "db"])
    port = rng.choice(["", ":5432", ":6379", ":3306"])
    b.t(f"{scheme}://{user}:")
    b.pii(SECRET, _rand(rng, _ALNUM + "-_.~!", rng.randint(8, 24)).strip(".") or "p4ssw0rd9")
    b.t(f"@{host}{port}/{rng.choice(['app', 'prod', '0', 'jobs'])}")


# ---- look-alikes (must not be redacted) --------------------------------------------------------


def is_card_shaped(digits: str) -> bool:
    """Passes every check a card number can be given (length, issuer prefix, Luhn)."""
    from bastion.data.sanitize import card_brand_ok

    return 13 <= len(digits) <= 19 and card_brand_ok(digits) and luhn_ok(digits)


def _non_card_integer(rng: random.Random) -> str:
    # A random integer that passes the card checks IS card-shaped; no validator can tell it from
    # a card. Such collisions are measured separately (`card_collision_rate`), not planted here.
    while True:
        s = str(rng.randint(10**11, 10**15))
        if not is_card_shaped(s):
            return s


def card_collision_rate(n: int = 100_000, seed: int = 0) -> float:
    """Share of uniformly random 12-16 digit integers that the card detector would redact."""
    rng = random.Random(seed)
    return sum(is_card_shaped(str(rng.randint(10**11, 10**16 - 1))) for _ in range(n)) / n


# Look-alike values several categories share; each draws from the generator in a fixed order.
_SHARED_LOOKALIKES: dict[str, Callable[[random.Random], str]] = {
    "iso_date": lambda g: f"{g.randint(1990, 2030)}-{g.randint(1, 12):02d}-{g.randint(1, 28):02d}",
    "slash_date": lambda g: f"{g.randint(1, 28):02d}/{g.randint(1, 12):02d}/{g.randint(1990, 2030)}",
    "dotted_date": lambda g: f"{g.randint(1, 28):02d}.{g.randint(1, 12):02d}.{g.randint(1990, 2030)}",
    "isbn": lambda g: f"978-{g.randint(0, 9)}-{g.randint(10, 99)}-{g.randint(100000, 999999)}-{g.randint(0, 9)}",
    "money": lambda g: f"${g.randint(1, 999)},{g.randint(100, 999)},{g.randint(100, 999)}.{g.randint(10, 99)}",
    "epoch_ms": lambda g: str(g.randint(1_600_000_000_000, 1_800_000_000_000)),
    "base64_image": lambda g: "data:image/png;base64,iVBORw0KGgo" + _rand(g, _B64, 120) + "==",
}


def lookalike(rng: random.Random) -> tuple[str, str]:
    """(kind, text) of something that resembles PII but is not."""
    r = rng.randint
    return rng.choice([
        lambda: ("version", f"{r(0, 12)}.{r(0, 30)}.{r(0, 99)}"),
        lambda: ("version", f"v{r(1, 12)}.{r(0, 9)}.{r(10000, 22631)}"),
        lambda: ("version", f"{r(1, 9)}.{r(0, 9)}.{r(0, 9)}.{r(0, 9)}.{r(0, 9)}"),
        lambda: ("date", _SHARED_LOOKALIKES["iso_date"](rng)),
        lambda: ("date", _SHARED_LOOKALIKES["slash_date"](rng)),
        lambda: ("date", _SHARED_LOOKALIKES["dotted_date"](rng)),
        lambda: ("timestamp", f"{r(1990, 2030)}-{r(1, 12):02d}-{r(1, 28):02d}T{r(0, 23):02d}:{r(0, 59):02d}:{r(0, 59):02d}Z"),
        lambda: ("time", f"{r(0, 23):02d}:{r(0, 59):02d}:{r(0, 59):02d}"),
        lambda: ("range", f"{r(1900, 1999)}-{r(2000, 2030)}"),
        lambda: ("uuid", _uuid(rng)),
        lambda: ("sha", _rand(rng, _HEXDIGITS, rng.choice([7, 40, 64]))),
        lambda: ("luhn_invalid", card_number(rng, valid=False)),
        lambda: ("integer", _non_card_integer(rng)),
        lambda: ("epoch_ms", _SHARED_LOOKALIKES["epoch_ms"](rng)),
        lambda: ("private_ip", private_ip(rng)),
        lambda: ("iban_invalid", iban(rng, valid=False)),
        lambda: ("ssn_invalid", invalid_ssn(rng)),
        lambda: ("isbn", _SHARED_LOOKALIKES["isbn"](rng)),
        lambda: ("money", _SHARED_LOOKALIKES["money"](rng)),
        lambda: ("mac", ":".join(f"{rng.getrandbits(8):02X}" for _ in range(6))),
        lambda: ("port", f"localhost:{r(1024, 65535)}"),
        lambda: ("phone_like", f"{r(100, 999)} {r(1000, 9999)}"),
        lambda: ("ip_version", f"version {r(1, 9)}.{r(0, 9)}.{r(0, 9)}.{r(1, 9)}"),
        lambda: ("identifier", "sk-learn-compatible-estimator"),
        lambda: ("git_remote", f"git@github.com:{rng.choice(_LAST)}/{rng.choice(_WORDS)}.git"),
        lambda: ("matmul", "x@self.proj"),
        lambda: ("base64_image", _SHARED_LOOKALIKES["base64_image"](rng)),
        lambda: ("hex_color", f"#{rng.getrandbits(24):06x}"),
        lambda: ("decimal", f"+{r(1, 99)}.{r(100000, 999999)}"),
        lambda: ("semver_range", f">={r(1, 9)}.{r(0, 9)}.{r(0, 9)},<{r(10, 20)}"),
        lambda: ("cpp_scope", "std::vector<std::string>::iterator"),
        lambda: ("slice", f"a[{r(1, 9)}::{r(2, 9)}]"),
        lambda: ("ipv6_prefix", "2001:db8::/32"),
        lambda: ("netmask", "255.255.255.0"),
    ])()


_PLACEHOLDER_ASSIGNMENTS = [
    'password = "changeme"', 'API_KEY=${API_KEY}', 'api_key: "<your-api-key>"', "token: xxxxxxxxxxxxxxxx",
    'SECRET_KEY = os.environ["SECRET_KEY"]', "password_file: /etc/app/password.txt",
    'token_path = "./secrets/token.json"', '"token": "YOUR_TOKEN_HERE"', "DB_PASSWORD=$DB_PASSWORD",
    'client_secret = "{{ client_secret }}"', "api_key = settings.OPENAI_API_KEY", "max_tokens: 4096",
    "tokenizer = AutoTokenizer.from_pretrained(name)", 'secret_name: "my-app-prod-secret"',
    'password: "********"', "aws_secret_access_key = <SECRET>", "auth_token = get_token(session)",
    'eos_token = "<|endoftext|>"', "key = hashlib.sha256(data).hexdigest()", 'password = ""',
]


# ---- document templates ------------------------------------------------------------------------


def _plant(rng: random.Random, b: _Builder, category: str) -> None:
    gen = {
        EMAIL: email, PHONE: phone, CREDIT_CARD: card_number, IBAN: iban, NATIONAL_ID: ssn,
        IP: lambda r: public_ipv4(r) if r.random() < 0.7 else public_ipv6(r),
    }
    if category == SECRET:
        b.pii(SECRET, token(rng))
    else:
        b.pii(category, gen[category](rng))


_PROSE_LEADS = {
    EMAIL: ["Please write to ", "Contact ", "cc: ", "Questions go to "],
    PHONE: ["Call me at ", "Phone: ", "You can reach the desk on ", "Tel. "],
    CREDIT_CARD: ["The card on file is ", "Charged card ", "Card number: "],
    IBAN: ["Transfer the deposit to IBAN ", "Bank account: ", "IBAN: "],
    NATIONAL_ID: ["SSN: ", "Her social security number is ", "Employee SSN "],
    IP: ["The request came from ", "Blocked address ", "Client IP ", "The DNS server is ", "Failover to ", "ssh root@"],
    SECRET: ["I accidentally pasted my key ", "The token is ", "Use this one: "],
}
_PLANTABLE = (EMAIL, PHONE, CREDIT_CARD, IBAN, NATIONAL_ID, IP, SECRET)


def _prose(rng: random.Random, b: _Builder) -> None:
    for _ in range(rng.randint(3, 8)):
        roll = rng.random()
        b.t(_words(rng, rng.randint(4, 12)).capitalize() + ". ")
        if roll < 0.55:
            cat = rng.choice(_PLANTABLE)
            b.t(rng.choice(_PROSE_LEADS[cat]))
            _plant(rng, b, cat)
            b.t(rng.choice([". ", " today. ", ", thanks. ", " (see above). "]))
        elif roll < 0.85:
            kind, s = lookalike(rng)
            b.t(rng.choice(["Reference ", "As of ", "See ", "Value "]))
            b.keep(kind, s)
            b.t(". ")
        if rng.random() < 0.2:
            b.t("\n\n")


def _python(rng: random.Random, b: _Builder) -> None:
    b.t(f'"""{_words(rng, 5).capitalize()}."""\nimport os\nimport hashlib\n\n')
    for _ in range(rng.randint(3, 8)):
        roll = rng.random()
        name = rng.choice(_SECRET_KEYS).lower()
        if roll < 0.3:
            q = rng.choice(['"', "'"])
            b.t(f"{name.upper() if rng.random() < 0.5 else name} = {q}")
            b.pii(SECRET, secret_value(rng, quoted=True))
            b.t(f"{q}\n")
        elif roll < 0.45:
            b.t(f'{rng.choice(["GITHUB_TOKEN", "headers", "client", "KEY"])}_value = "')
            b.pii(SECRET, token(rng))
            b.t('"\n')
        elif roll < 0.55:
            b.t('DATABASE_URL = "')
            url_with_password(rng, b)
            b.t('"\n')
        elif roll < 0.65:
            b.t(f"{rng.choice(_PLACEHOLDER_ASSIGNMENTS)}\n")
        elif roll < 0.75:
            b.t('COMMIT = "')
            b.keep("sha", _rand(rng, _HEXDIGITS, 40))
            b.t(f'"  # {_words(rng, 3)}\nRUN_ID = "')
            b.keep("uuid", _uuid(rng))
            b.t('"\n')
        elif roll < 0.85:
            b.t("evens = values[::2]\nodds = values[1::2]\nstd::vector<int> v;  # from the C++ port\n")
            b.t('__version__ = "')
            b.keep("version", f"{rng.randint(0, 3)}.{rng.randint(0, 40)}.{rng.randint(0, 9)}")
            b.t('"\n')
        else:
            b.t(f'def {rng.choice(_WORDS)}_{rng.choice(_WORDS)}(x):\n    """Contact ')
            _plant(rng, b, rng.choice([EMAIL, PHONE]))
            b.t(' for questions."""\n    return x @ self.weight + 1\n\n')


def _config(rng: random.Random, b: _Builder) -> None:
    style = rng.choice(["yaml", "env", "json"])
    entries: list[Callable[[], None]] = []

    def secret_entry() -> None:
        key = rng.choice(_SECRET_KEYS)
        if style == "yaml":
            quoted = rng.random() < 0.5
            b.t(f"  {key.lower()}: " + ('"' if quoted else ""))
            b.pii(SECRET, secret_value(rng, quoted=quoted))
            b.t('"\n' if quoted else "\n")
        elif style == "env":
            b.t(f"{key.upper()}=")
            b.pii(SECRET, secret_value(rng, quoted=False))
            b.t("\n")
        else:
            b.t(f'  "{key}": "')
            b.pii(SECRET, secret_value(rng, quoted=True))
            b.t('",\n')

    def value_entry(name: str, fn: Callable[[], None]) -> None:
        if style == "yaml":
            b.t(f"  {name}: ")
            fn()
            b.t("\n")
        elif style == "env":
            b.t(f"{name.upper()}=")
            fn()
            b.t("\n")
        else:
            b.t(f'  "{name}": "')
            fn()
            b.t('",\n')

    entries += [secret_entry] * 4
    entries.append(lambda: value_entry("admin_email", lambda: _plant(rng, b, EMAIL)))
    entries.append(lambda: value_entry("database_url", lambda: url_with_password(rng, b)))
    entries.append(lambda: value_entry("api_token", lambda: b.pii(SECRET, token(rng))))
    entries.append(lambda: value_entry("bind_address", lambda: b.keep("private_ip", private_ip(rng))))
    entries.append(lambda: value_entry("public_ip", lambda: _plant(rng, b, IP)))
    def version() -> str:
        return f"{rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}"

    def created() -> str:
        return f"20{rng.randint(10, 30)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T0{rng.randint(0, 9)}:30:00Z"

    entries.append(lambda: value_entry("version", lambda: b.keep("version", version())))
    entries.append(lambda: value_entry("build_sha", lambda: b.keep("sha", _rand(rng, _HEXDIGITS, 40))))
    entries.append(lambda: value_entry("instance_id", lambda: b.keep("uuid", _uuid(rng))))
    entries.append(lambda: value_entry("created", lambda: b.keep("timestamp", created())))

    def placeholder_entry() -> None:
        s = rng.choice(_PLACEHOLDER_ASSIGNMENTS)
        b.t(("  " if style != "env" else "") + s + ("\n" if style != "json" else ",\n"))

    entries += [placeholder_entry] * 3
    b.t("{\n" if style == "json" else ("config:\n" if style == "yaml" else ""))
    for _ in range(rng.randint(4, 10)):
        rng.choice(entries)()
    if rng.random() < 0.15:
        b.t('  "tls_key": "' if style == "json" else "  tls_key: |\n    ")
        b.pii(SECRET, pem_block(rng, newline="\\n" if style == "json" else "\n    "))
        b.t('",\n' if style == "json" else "\n")
    b.t('  "end": true\n}\n' if style == "json" else "")


def _logs(rng: random.Random, b: _Builder) -> None:
    for _ in range(rng.randint(4, 12)):
        r = rng.randint
        b.t(f"2024-0{r(1, 9)}-{r(10, 28)} {r(10, 23)}:{r(10, 59)}:{r(10, 59)},{r(100, 999)} ")
        b.t(rng.choice(["INFO ", "WARN ", "ERROR ", "DEBUG "]))
        roll = rng.random()
        if roll < 0.35:
            b.t("request from ")
            _plant(rng, b, IP)
            status = rng.choice([200, 301, 404, 500])
            b.t(f' "GET /api/v{r(1, 3)}/{rng.choice(_WORDS)} HTTP/1.1" {status} {r(100, 99999)}\n')
        elif roll < 0.45:
            addr = private_ip(rng)
            b.t("upstream " + ("[" if ":" in addr else ""))  # IPv6 with a port takes brackets
            b.keep("private_ip", addr)
            b.t(("]" if ":" in addr else "") + f":{rng.randint(1024, 9999)} healthy in {rng.randint(1, 999)}ms\n")
        elif roll < 0.55:
            b.t("login ok user=")
            _plant(rng, b, EMAIL)
            b.t(" session=")
            b.keep("uuid", _uuid(rng))
            b.t("\n")
        elif roll < 0.65:
            b.t('curl -H "Authorization: Bearer ')
            b.pii(SECRET, token(rng) if rng.random() < 0.5 else _mixed_alnum(rng, 32))
            b.t(f'" https://api.example.com/v1/{rng.choice(_WORDS)}\n')
        elif roll < 0.72:
            b.t("connecting to ")
            url_with_password(rng, b)
            b.t("\n")
        elif roll < 0.8:
            b.t("payment declined for card ")
            _plant(rng, b, CREDIT_CARD)
            b.t(f" order {rng.randint(10**5, 10**7)}\n")
        else:
            kind, s = lookalike(rng)
            b.t(f"worker {rng.choice(_WORDS)} value=")
            b.keep(kind, s)
            b.t(f" build {rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}\n")


def _email_message(rng: random.Random, b: _Builder) -> None:
    b.t("From: ")
    b.t(f"{rng.choice(_FIRST).title()} {rng.choice(_LAST).title()} <")
    b.pii(EMAIL, email(rng))
    b.t(">\nTo: ")
    b.pii(EMAIL, email(rng))
    b.t(f"\nDate: Mon, {rng.randint(1, 28)} Jan 2024 {rng.randint(10, 23)}:{rng.randint(10, 59)}:00 +0{rng.randint(1, 9)}00\n")
    b.t(f"Subject: {_words(rng, 4)}\n\nHi,\n\n")
    _prose(rng, b)
    b.t("\n\nBest,\n--\n")
    b.t("Mobile: ")
    _plant(rng, b, PHONE)
    b.t("\n")
    if rng.random() < 0.3:
        b.t("Bank details: ")
        _plant(rng, b, IBAN)
        b.t("\n")
    if rng.random() < 0.2:
        b.t("Here is the deploy key, keep it safe:\n")
        b.pii(SECRET, pem_block(rng))
        b.t("\n")


_KINDS: dict[str, Callable[[random.Random, _Builder], None]] = {
    "prose": _prose, "python": _python, "config": _config, "logs": _logs, "email": _email_message,
}


def labelled_documents(n: int, seed: int) -> list[LabelledDoc]:
    """`n` labelled documents, deterministic in (n, seed)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        kind = rng.choice(sorted(_KINDS))
        b = _Builder(rng, kind)
        _KINDS[kind](rng, b)
        docs.append(b.build())
    return docs


# ---- per-category cases ------------------------------------------------------------------------
# The mixed documents above measure the detectors side by side in dense text. The cases below
# measure each detector on its own: a case is a short document (prose, code, config, log or JSON)
# holding exactly one planted value, either a positive of its category or a hard look-alike of it,
# after the words real text puts there ("DNS server", "failover to", "ssh root@", "version").
# SECRET is five detectors and IP two, so they are measured apart: the measured category maps to
# the Redactor category that must cover the value.

MEASURED: dict[str, str] = {
    "EMAIL": EMAIL, "PHONE": PHONE, "IPV4": IP, "IPV6": IP, "CREDIT_CARD": CREDIT_CARD, "IBAN": IBAN,
    "SSN": NATIONAL_ID, "API_TOKEN": SECRET, "JWT": SECRET, "PEM_KEY": SECRET, "URL_PASSWORD": SECRET,
    "ASSIGNED_SECRET": SECRET,
}
CONTEXTS = ("prose", "code", "config", "log", "json")
_ENDS = [". ", " today.", ", thanks.", " (see above).", ".\n"]
_LEVELS = ["INFO", "WARN", "ERROR", "DEBUG"]

Lookalike = tuple[str, str]  # (kind, text)


def _log_prefix(rng: random.Random) -> str:
    r = rng.randint
    return f"2024-0{r(1, 9)}-{r(10, 28)} {r(10, 23)}:{r(10, 59)}:{r(10, 59)},{r(100, 999)} {rng.choice(_LEVELS)} "


def _templates(rng: random.Random, context: str, leads: Sequence[str], keys: Sequence[str]) -> list[str]:
    """Generic templates ("{}" marks the value) built from a category's lead phrases and key names."""
    lead, key = rng.choice(leads), rng.choice(keys)
    return {
        "prose": [f"{lead}{{}}{rng.choice(_ENDS)}"],
        "code": [f'{key} = "{{}}"\n', f'{key.upper()} = "{{}}"\n', f'log.info("{lead}{{}}")\n'],
        "config": [f"{key}: {{}}\n", f"{key.upper()}={{}}\n", f'{key} = "{{}}"\n'],
        "log": [f"{_log_prefix(rng)}{lead[0].lower()}{lead[1:]}{{}}\n"],
        "json": [f'{{"{key}": "{{}}"}}\n',
                 f'{{"event": "{rng.choice(_WORDS)}", "{key}": "{{}}", "n": {rng.randint(1, 99)}}}\n'],
    }[context]


@dataclass(frozen=True)
class _ValueSpec:
    """A category whose value sits in a sentence, an assignment or a log line."""
    positive: Callable[[random.Random], str]
    lookalike: Callable[[random.Random], Lookalike]
    leads: Sequence[str]
    keys: Sequence[str]
    extra: dict[str, Sequence[str]] = field(default_factory=dict)  # context -> raw templates


def _value_case(spec: _ValueSpec, category: str) -> Callable[[random.Random, _Builder, str, bool], None]:
    def case(rng: random.Random, b: _Builder, context: str, positive: bool) -> None:
        tpl = rng.choice([*_templates(rng, context, spec.leads, spec.keys), *spec.extra.get(context, ())])
        pre, post = tpl.split("{}")
        b.t(pre)
        if positive:
            b.pii(MEASURED[category], spec.positive(rng))
        else:
            b.keep(*spec.lookalike(rng))
        b.t(post)
    return case


def _ip_version_word(rng: random.Random) -> str:
    return rng.choice(["version ", "Version: ", "v", "v ", "ver. ", "release ", "build ", "rev ", "firmware version ",
                       "driverVersion=", 'AssemblyVersion("', "__version__ = '", "section ", "Section ", "§ ",
                       "§", "chapter ", "clause ", "OID ", "oid=", "numpy==", "pkg>=", "requests~=", "lib!="])


def _public_octets(rng: random.Random) -> str:
    # Small numbers, as versions and section numbers have, and all in public address space
    # (1-9 as the first octet), so only the word before them tells them from an address.
    return f"{rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 30)}.{rng.randint(0, 300) % 256}"


def _special_ipv4(rng: random.Random) -> Lookalike:
    r = rng.randint
    return rng.choice([
        lambda: ("private_ip", private_ip(rng) if rng.random() < 0.8 else f"172.{r(16, 31)}.{r(0, 255)}.{r(1, 254)}"),
        lambda: ("documentation_ip", f"{rng.choice(['192.0.2', '198.51.100', '203.0.113'])}.{r(1, 254)}"),
        lambda: ("benchmark_ip", f"198.{r(18, 19)}.{r(0, 255)}.{r(1, 254)}"),
        lambda: ("shared_ip", f"100.{r(64, 127)}.{r(0, 255)}.{r(1, 254)}"),
        lambda: ("loopback", f"127.{r(0, 255)}.{r(0, 255)}.{r(1, 254)}"),
        lambda: ("link_local", f"169.254.{r(0, 255)}.{r(1, 254)}"),
        lambda: ("netmask", rng.choice(["255.255.255.0", "255.255.0.0", "255.255.252.0", "255.255.255.255"])),
        lambda: ("unspecified", "0.0.0.0"),
        lambda: ("multicast", f"{r(224, 239)}.{r(0, 255)}.{r(0, 255)}.{r(1, 254)}"),
    ])()


def _ipv4_lookalike(rng: random.Random) -> Lookalike:
    r = rng.randint
    return rng.choice([
        lambda: ("version_context", _ip_version_word(rng) + _public_octets(rng)),
        lambda: ("version_context", _ip_version_word(rng) + _public_octets(rng)),
        lambda: ("version_context", _ip_version_word(rng) + _public_octets(rng)),
        lambda: _special_ipv4(rng),
        lambda: ("dotted_5", f"{r(1, 9)}.{r(0, 9)}.{r(0, 9)}.{r(0, 9)}.{r(0, 9)}"),
        lambda: ("oid_long", f"1.3.6.1.4.1.{r(1, 60000)}.{r(1, 9)}"),
        lambda: ("octet_over_255", f"{r(256, 999)}.{r(0, 255)}.{r(0, 255)}.{r(1, 254)}"),
        lambda: ("dotted_date", _SHARED_LOOKALIKES["dotted_date"](rng)),
        lambda: ("three_part", f"{r(1, 99)}.{r(0, 99)}.{r(0, 99)}"),
    ])() if rng.random() < 0.9 else _special_ipv4(rng)


def _ipv6_lookalike(rng: random.Random) -> Lookalike:
    r, h = rng.randint, lambda: f"{rng.getrandbits(16):x}"
    return rng.choice([
        lambda: ("private_ip", f"fd{rng.getrandbits(8):02x}:{h()}:{h()}::{h()}"),
        lambda: ("link_local", f"fe80::{h()}:{h()}" + rng.choice(["", "%eth0", "%en0"])),
        lambda: ("loopback", "::1"),
        lambda: ("mapped_private", f"::ffff:192.168.{r(0, 255)}.{r(1, 254)}"),
        lambda: ("documentation_ip", f"2001:db8:{h()}::{h()}"),
        lambda: ("documentation_ip", f"3fff:{rng.getrandbits(12):x}::{h()}"),
        lambda: ("multicast", rng.choice(["ff02::1", "ff02::2", "ff05::1:3"])),
        lambda: ("unspecified", "::"),
        lambda: ("prefix", rng.choice(["2001::/16", "2001:db8::/32", "2a00::/12", "fc00::/7"])),
        lambda: ("mac", ":".join(f"{rng.getrandbits(8):02x}" for _ in range(6))),
        lambda: ("fingerprint", ":".join(f"{rng.getrandbits(8):02x}" for _ in range(16))),
        lambda: ("time", f"{r(0, 23):02d}:{r(0, 59):02d}:{r(0, 59):02d}" + rng.choice(["", ".123"])),
        lambda: ("timestamp", f"2024-0{r(1, 9)}-1{r(0, 9)}T{r(10, 23)}:{r(10, 59)}:{r(10, 59)}Z"),
        lambda: ("cpp_scope", rng.choice(["std::vector<int>::iterator", "std::io::Result", "Foo::Bar::baz", "a::b"])),
        lambda: ("slice", f"x[{r(1, 9)}::{r(2, 9)}]"),
        lambda: ("ratio", f"{r(1, 21)}:{r(1, 9)}"),
    ])()


def _ipv4_value(rng: random.Random) -> str:
    v = public_ipv4(rng)
    return ".".join(f"{int(o):03d}" for o in v.split(".")) if rng.random() < 0.05 else v  # as some logs pad


def _ipv6_value(rng: random.Random) -> str:
    v = public_ipv6(rng)
    if rng.random() < 0.15:
        return f"::ffff:{public_ipv4(rng)}"  # IPv4-mapped
    return v.upper() if rng.random() < 0.1 else v


_IP_LEADS = [
    "The DNS server ", "The DNS server is ", "Our resolver ", "Secondary resolver is ", "We failed over to ",
    "Failover ", "Failover target: ", "The server at ", "Please ssh root@", "Log in with ssh deploy@",
    "Connection refused by ", "nameserver ", "Blocked address ", "Client IP ", "The request came from ",
    "upstream server ", "Peer ", "gateway ", "The backup server is at ", "Primary DNS: ", "Origin server ",
    "Mail server ", "NTP server ", "Driver host ", "Observer node ", "scp backup.tar admin@",
]
_IP_KEYS = ["dns_server", "resolver", "failover_ip", "server", "host", "upstream", "peer_address", "remote_addr",
            "client_ip", "public_ip", "gateway", "ssh_host", "nameserver", "failover_peer", "origin"]
_IPV4_EXTRA = {
    "code": ['sock.connect(("{}", 53))\n', 'resolver.nameservers = ["{}"]\n', 'subprocess.run(["ssh", "root@{}"])\n',
             'requests.get("http://{}/health")\n', 'ALLOWED_HOSTS = ["{}"]\n'],
    "config": ["nameserver {}\n", "server {} iburst\n", "Host bastion\n    HostName {}\n    User root\n",
               "upstream backend {\n    server {}:8080;\n}\n", "listen {}:443 ssl;\n", "[Peer]\nEndpoint = {}:51820\n"],
    "log": ["sshd[2211]: Accepted publickey for root from {} port 52113 ssh2\n", "named[88]: resolver {} timed out\n",
            "keepalived: failover to {} complete\n", '{} - - [10/Oct/2024:13:55:36 +0000] "GET / HTTP/1.1" 200 512\n',
            "postfix/smtp: connect to mail server {}:25: Connection timed out\n", "ssh deploy@{}: Permission denied\n"],
    "json": ['{"event": "failover", "new_primary": "{}"}\n', '{"remote_addr": "{}", "status": 200}\n',
             '{"dns": ["{}", "fallback"]}\n'],
}
_IPV6_EXTRA = {
    "code": ['sock.connect(("{}", 53, 0, 0))\n', 'requests.get("http://[{}]:8080/health")\n',
             'subprocess.run(["ssh", "root@{}"])\n'],
    "config": ["nameserver {}\n", "listen [{}]:443 ssl;\n", "server {} iburst\n", "[Peer]\nEndpoint = [{}]:51820\n"],
    "log": ["sshd[2211]: Accepted publickey for root from {} port 52113 ssh2\n",
            "keepalived: failover to {} complete\n",
            '{} - - [10/Oct/2024:13:55:36 +0000] "GET / HTTP/1.1" 200 512\n', "connect to [{}]:25: timed out\n"],
    "json": ['{"event": "failover", "new_primary": "{}"}\n', '{"remote_addr": "{}", "status": 200}\n'],
}


def _email_value(rng: random.Random) -> str:
    v = email(rng)
    local, domain = v.split("@")
    short = f"{rng.choice(['acme', 'ops', 'mail'])}.{rng.choice(['io', 'ai', 'app', 'de', 'jp', 'net'])}"
    return rng.choice([v, v, v, f"{local.title()}@{domain.upper()}", f"{local}{rng.randint(1, 999)}@{domain}",
                       f"{local}@{short}"])


def _email_lookalike(rng: random.Random) -> Lookalike:
    w = rng.choice(_WORDS)
    return rng.choice([
        ("matmul", f"x@self.{rng.choice(['proj', 'w_q', 'weight', 'fc'])}"), ("matmul", f"h @ self.{w}.weight"),
        ("decorator", rng.choice(["@app.route", "@property", "@pytest.fixture", "@dataclass(frozen=True)"])),
        ("npm_scope", rng.choice(["@types/node", "@angular/core", "@babel/preset-env"])),
        ("npm_version", f"{w}@{rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}"),
        ("handle", f"@{rng.choice(_FIRST)}_{rng.choice(_LAST)}"),
        ("git_remote", f"git@github.com:{rng.choice(_LAST)}/{w}.git"),
        ("no_tld", f"{rng.choice(['admin', 'root', 'postgres'])}@{rng.choice(['localhost', 'build-host', 'db'])}"),
        ("css", "@media screen and (max-width: 600px)"),
        ("docker_digest", f"{w}@sha256:{_rand(rng, _HEXDIGITS, 64)}"),
    ])


_EMAIL_SPEC = _ValueSpec(
    _email_value, _email_lookalike,
    ["Please write to ", "Contact ", "cc: ", "Questions go to ", "Reply-To: ", "Sent by ", "mailto:"],
    ["admin_email", "contact", "reply_to", "owner", "email", "notify"],
    {"code": ['send_mail(to="{}")\n', 'AUTHORS = ["{}"]\n'], "log": ["postfix/qmgr: from=<{}>, size=2048\n"],
     "prose": ["From: Alice Smith <{}>\n"]},
)


def _phone_value(rng: random.Random) -> str:
    area, exch, line = f"{rng.randint(2, 9)}{_d(rng, 2)}", f"{rng.randint(2, 9)}{_d(rng, 2)}", _d(rng, 4)
    return rng.choice([phone(rng), phone(rng), phone(rng), f"+1-{area}-{exch}-{line}", f"+1.{area}.{exch}.{line}",
                       f"({area}){exch}-{line}", f"+44 (0)20 7{_d(rng, 3)} {_d(rng, 4)}", f"+49 (0)30 {_d(rng, 8)}"])


def _phone_lookalike(rng: random.Random) -> Lookalike:
    r = rng.randint
    return rng.choice([
        lambda: ("date", _SHARED_LOOKALIKES["iso_date"](rng)),
        lambda: ("date", _SHARED_LOOKALIKES["slash_date"](rng)),
        lambda: ("isbn", _SHARED_LOOKALIKES["isbn"](rng)),
        lambda: ("money", _SHARED_LOOKALIKES["money"](rng)),
        lambda: ("coordinate", f"+{r(1, 89)}.{r(100000, 999999)}, -{r(1, 179)}.{r(1000, 9999)}"),
        lambda: ("integer", str(r(10**9, 10**13))),
        lambda: ("zip4", f"{r(10000, 99999)}-{r(1000, 9999)}"),
        lambda: ("invalid_nanp", f"1{r(10, 99)}-{r(200, 999)}-{r(1000, 9999)}"),  # no area code starts with 1
        lambda: ("spaced_digits", " ".join(str(r(0, 9)) for _ in range(8))),
        lambda: ("epoch_ms", _SHARED_LOOKALIKES["epoch_ms"](rng)),
        lambda: ("range", f"pages {r(100, 499)}-{r(500, 999)}"),
        lambda: ("utc_offset", f"+0{r(1, 9)}:{rng.choice(['00', '30'])}"),
        lambda: ("version", f"v{r(1, 12)}.{r(0, 9)}.{r(10000, 22631)}"),
        lambda: ("thousands", f"{r(1, 999)}.{r(100, 999)}.{r(100, 999)}"),
        lambda: ("phone_like", f"{r(100, 999)} {r(1000, 9999)}"),
        lambda: ("no_country", f"+0 {r(100, 999)} {r(100, 999)} {r(100, 999)}"),
    ])()


_PHONE_SPEC = _ValueSpec(
    _phone_value, _phone_lookalike,
    ["Call me at ", "Phone: ", "You can reach the desk on ", "Tel. ", "Mobile: ", "Fax ", "Text "],
    ["phone", "mobile", "fax", "contact_number", "tel"],
    {"log": ["sms sent to {} status=ok\n"], "code": ['twilio.send(to="{}")\n']},
)

_MORE_CARD_BRANDS = [("644", 16), ("622126", 16), ("3589", 16), ("300", 14), ("305", 14), ("4", 19), ("6011", 19)]


def _card_value(rng: random.Random) -> str:
    if rng.random() < 0.8:
        return card_number(rng)
    prefix, n = rng.choice(_MORE_CARD_BRANDS)
    return _luhn_complete(prefix + _d(rng, n - len(prefix) - 1))


def _card_lookalike(rng: random.Random) -> Lookalike:
    def luhn(prefix: str, n: int) -> str:
        return _luhn_complete(prefix + _d(rng, n - len(prefix) - 1))

    return rng.choice([
        lambda: ("luhn_invalid", card_number(rng, valid=False)),
        lambda: ("unknown_issuer", luhn(rng.choice(["9", "1", "7", "8", "0"]), 16)),
        lambda: ("wrong_length", rng.choice([luhn("4", 15), luhn("34", 16), luhn("51", 15), luhn("37", 14)])),
        lambda: ("imei", luhn(rng.choice(["35", "86", "01"]), 15)),
        lambda: ("integer", _non_card_integer(rng)),
        lambda: ("epoch_ms", _SHARED_LOOKALIKES["epoch_ms"](rng)),
        lambda: ("tracking", f"1Z{_rand(rng, _UPPER_DIGITS, 6)}{_d(rng, 10)}"),
        lambda: ("isbn", _SHARED_LOOKALIKES["isbn"](rng)),
        lambda: ("routing", _d(rng, 9)),
    ])()


_CARD_SPEC = _ValueSpec(
    _card_value, _card_lookalike,
    ["The card on file is ", "Charged card ", "Card number: ", "Pay with ", "cc# "],
    ["card_number", "cc", "pan", "payment_card"],
    {"log": ["payment declined for card {} order 4411\n"]},
)


def _iban_any_country(rng: random.Random) -> str:
    cc = rng.choice(sorted(IBAN_LENGTHS))
    bban = _d(rng, IBAN_LENGTHS[cc] - 4)
    check = 98 - int("".join(str(int(c, 36)) for c in bban + cc + "00")) % 97
    return f"{cc}{check:02d}{bban}"


def _iban_value(rng: random.Random) -> str:
    return iban(rng) if rng.random() < 0.7 else _iban_any_country(rng)


def _iban_lookalike(rng: random.Random) -> Lookalike:
    return rng.choice([
        lambda: ("iban_invalid", iban(rng, valid=False)),
        lambda: ("wrong_length", iban(rng).replace(" ", "")[:-1]),
        lambda: ("unknown_country", rng.choice(["XX", "ZZ", "UU"]) + _d(rng, 20)),
        lambda: ("bic", rng.choice(["DEUTDEFF500", "COBADEFFXXX", "BNPAFRPPXXX", "NWBKGB2L"])),
        lambda: ("vat_id", rng.choice(["DE", "FR", "GB", "NL"]) + _d(rng, 9)),
        lambda: ("isin", rng.choice(["US", "DE", "GB"]) + _d(rng, 10)),
    ])()


_IBAN_SPEC = _ValueSpec(
    _iban_value, _iban_lookalike,
    ["Transfer the deposit to IBAN ", "Bank account: ", "IBAN: ", "Please pay into "],
    ["iban", "account", "bank_account", "payout_iban"],
)


def _ssn_lookalike(rng: random.Random) -> Lookalike:
    r = rng.randint
    return rng.choice([
        lambda: ("ssn_invalid", invalid_ssn(rng)),
        lambda: ("ssn_invalid", invalid_ssn(rng)),
        lambda: ("longer_number", f"{r(1, 9)}{ssn(rng)}"),
        # A trailing digit, but no leading "0": "082-34-44995" is also a European phone number.
        lambda: ("longer_number", f"{r(1, 8)}{ssn(rng)[1:]}{r(0, 9)}"),
        lambda: ("part_number", f"{ssn(rng)}-{rng.choice('ABCX')}"),
        lambda: ("date", _SHARED_LOOKALIKES["iso_date"](rng)),
        lambda: ("isbn10", f"0-{r(100, 999)}-{r(10000, 99999)}-{r(0, 9)}"),
        lambda: ("nine_digits", _d(rng, 9)),
    ])()


_SSN_SPEC = _ValueSpec(
    ssn, _ssn_lookalike,
    ["SSN: ", "Her social security number is ", "Employee SSN ", "SSN# "],
    ["ssn", "social_security_number", "tax_id"],
)

# Keys that are no secret-looking names, so the token detectors (not the assignment rule) decide.
_NEUTRAL_KEYS = ["value", "header", "note", "pasted", "old_value", "cookie", "session", "jwt"]


def _api_token_value(rng: random.Random) -> str:
    while (v := token(rng)).startswith("eyJ"):  # JWTs are measured on their own
        pass
    return v


def _api_token_lookalike(rng: random.Random) -> Lookalike:
    return rng.choice([
        lambda: ("identifier", rng.choice(["sk-learn-compatible-estimator", "sk-this-is-not-a-real-key",
                                           "ASIA_PACIFIC_REGION_ID", "github_pat", "xoxb", "sk_live_mode"])),
        lambda: ("too_short", rng.choice(["ghp_", "AKIA", "glpat-", "AIza"]) + _mixed_alnum(rng, 10)),
        lambda: ("lower_case", "akia" + _rand(rng, string.ascii_lowercase + string.digits, 16)),
        lambda: ("uuid", _uuid(rng)),
        lambda: ("sha", _rand(rng, _HEXDIGITS, rng.choice([7, 40, 64]))),
        lambda: ("base64_image", _SHARED_LOOKALIKES["base64_image"](rng)),
    ])()


_API_TOKEN_SPEC = _ValueSpec(
    _api_token_value, _api_token_lookalike,
    ["I accidentally pasted my key ", "The token is ", "Use this one: ", "Rotate ", "Leaked credential "],
    _NEUTRAL_KEYS,
    {"config": ["export VALUE={}\n"], "log": ["auth failed for {}\n"]},
)


def _jwt_value(rng: random.Random) -> str:
    if rng.random() < 0.1:  # unsigned: "alg": "none" and an empty signature
        header, payload = _b64url(b'{"alg":"none"}'), _b64url(json.dumps({"sub": _d(rng, 8)}).encode())
        return f"{header}.{payload}."
    return jwt(rng)


def _jwt_lookalike(rng: random.Random) -> Lookalike:
    blob = _b64url(json.dumps({"page": rng.randint(2, 99), "offset": rng.randint(0, 9999)}).encode())
    return rng.choice([
        ("cursor", blob),  # a pagination cursor: base64 JSON, one segment
        ("no_alg", f"{blob}.{blob}.{_rand(rng, _B64URL, 43)}"),  # three segments, no "alg" in the header
        ("data_url", f"data:application/json;base64,{blob}"),
        ("prose", "tokens that start with eyJ"),
        ("not_json", f"eyJ{_rand(rng, _B64URL, 30)}.{_rand(rng, _B64URL, 40)}.{_rand(rng, _B64URL, 43)}"),
    ])


_JWT_SPEC = _ValueSpec(
    _jwt_value, _jwt_lookalike, ["The JWT is ", "Decoded this one: ", "The browser sent "], _NEUTRAL_KEYS,
    {"log": ['"GET /callback?state=ok#jwt={} HTTP/1.1" 302\n']},
)


def _pem_case(rng: random.Random, b: _Builder, context: str, positive: bool) -> None:
    escaped = context == "json" or (context == "code" and rng.random() < 0.5)  # literal "\n" in a string
    nl = "\\n" if escaped else ("\n    " if context == "config" else "\n")
    pre, post = {
        "prose": ("Here is the deploy key, keep it safe:\n", "\nThanks."),
        "code": ('KEY = "' if escaped else 'KEY = """', '"\n' if escaped else '"""\n'),
        "config": ("tls_key: |\n    ", "\n"),
        "log": (f"{_log_prefix(rng)}loaded key:\n", "\n"),
        "json": ('{"private_key": "', '"}\n'),
    }[context]
    b.t(pre)
    if positive:
        block = pem_block(rng, newline=nl)
        if rng.random() < 0.15:  # truncated paste: no END line
            block = block[:block.rfind(nl)]
        b.pii(SECRET, block)
    else:
        b.keep(*_pem_lookalike(rng, nl))
    b.t(post)


def _pem_lookalike(rng: random.Random, nl: str) -> Lookalike:
    body = nl.join(_rand(rng, _B64, 64) for _ in range(rng.randint(2, 6)))
    kind = rng.choice(["PUBLIC KEY", "RSA PUBLIC KEY", "CERTIFICATE", "CERTIFICATE REQUEST", "PGP PUBLIC KEY BLOCK",
                       "PGP SIGNATURE", "X509 CRL"])
    return rng.choice([
        ("public_block", f"-----BEGIN {kind}-----{nl}{body}{nl}-----END {kind}-----"),
        ("ssh_public_key", f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{_rand(rng, _B64, 43)} {rng.choice(_FIRST)}@laptop"),
        ("header_in_code", f'if line.startswith("-----BEGIN {rng.choice(["RSA ", "EC ", ""])}PRIVATE KEY-----"):'),
    ])


def _url_case(rng: random.Random, b: _Builder, context: str, positive: bool) -> None:
    pre, post = rng.choice({
        "prose": [("Connect with ", " and run the migration. "), ("The DSN is ", ".\n")],
        "code": [('DATABASE_URL = "', '"\n'), ('engine = create_engine("', '")\n')],
        "config": [("database_url: ", "\n"), ("DATABASE_URL=", "\n"), ('broker_url = "', '"\n')],
        "log": [(f"{_log_prefix(rng)}connecting to ", "\n")],
        "json": [('{"dsn": "', '"}\n')],
    }[context])
    b.t(pre)
    if positive:
        url_with_password(rng, b)
    else:
        b.keep(*_url_lookalike(rng))
    b.t(post)


def _url_lookalike(rng: random.Random) -> Lookalike:
    scheme = rng.choice(["postgres", "mysql", "redis", "amqp", "https", "mongodb+srv"])
    user, host = rng.choice(["admin", "app", "deploy"]), rng.choice(["db.internal", "mq.example.com", "cache"])
    placeholder = rng.choice(["${DB_PASSWORD}", "<password>", "changeme", "****", "{password}", "$PGPASS",
                              "%(password)s", "YOUR_PASSWORD", "xxxxxxxx"])
    return rng.choice([
        ("no_password", f"{scheme}://{user}@{host}:5432/app"),
        ("placeholder_password", f"{scheme}://{user}:{placeholder}@{host}/app"),
        ("port_only", f"{scheme}://{host}:{rng.randint(1024, 65535)}/{rng.choice(_WORDS)}"),
        ("ssh_url", f"ssh://git@{host}:22/{rng.choice(_WORDS)}.git"),
    ])


def _assignment_case(rng: random.Random, b: _Builder, context: str, positive: bool) -> None:
    key = rng.choice(_SECRET_KEYS)
    shapes = {
        "prose": ["Set `{K}={v}` in your shell", "the old config had {k}: {v} in it", "use --password {v} there"],
        "code": ['{k} = "{v}"', "{K} = '{v}'", 'config.{k} = "{v}"', '{k}: str = "{v}"', "{k} => '{v}'",
                 'const {k} = "{v}";'],
        "config": ["{k}: {v}", '{k}: "{v}"', "{K}={v}", "export {K}={v}", '{k} = "{v}"', "  - {K}={v}"],
        "log": ['curl -H "Authorization: Bearer {v}" https://api.example.com', "mysql -u root --password {v} app",
                "run with --password={v}"],
        "json": ['{{"{k}": "{v}"}}', '{{"user": "svc", "{k}": "{v}"}}'],
    }[context]
    shape = rng.choice(shapes)
    if positive:
        quoted = "\"{v}\"" in shape or "'{v}'" in shape
        pre, post = shape.format(k=key, K=key.upper(), v="\0").split("\0")
        b.t(("" if context != "log" else _log_prefix(rng)) + pre)
        b.pii(SECRET, secret_value(rng, quoted=quoted))
        b.t(post + "\n")
    else:
        b.keep(*_assignment_lookalike(rng))
        b.t("\n")


def _assignment_lookalike(rng: random.Random) -> Lookalike:
    hexes = lambda n: _rand(rng, _HEXDIGITS, n)  # noqa: E731
    return rng.choice([
        lambda: ("placeholder", rng.choice(_PLACEHOLDER_ASSIGNMENTS)),
        lambda: ("placeholder", rng.choice(_PLACEHOLDER_ASSIGNMENTS)),
        lambda: ("not_a_secret_key", rng.choice([
            f'commit_sha = "{hexes(40)}"', f"checksum: {hexes(64)}", f'request_id = "{_uuid(rng)}"',
            f'etag: "{hexes(32)}"', f'build_id = "{_mixed_alnum(rng, 20)}"', f"trace_id={hexes(32)}"])),
        lambda: ("secret_key_plain_value", rng.choice([
            'token_type: "Bearer"', f"token_count = {rng.randint(10**9, 10**12)}", "password_min_length: 12",
            'auth_method: "oauth2-client-credentials"', 'secret_name: "prod-db-credentials"',
            'api_key_header: "X-Api-Key"', "key_size = 4096", 'tokenizer_name: "gpt2-medium"',
            'password_hash_algorithm = "argon2id"', 'api_key = os.getenv("API_KEY", "")'])),
    ])()


_CASE_WRITERS: dict[str, Callable[[random.Random, _Builder, str, bool], None]] = {
    "EMAIL": _value_case(_EMAIL_SPEC, "EMAIL"),
    "PHONE": _value_case(_PHONE_SPEC, "PHONE"),
    "IPV4": _value_case(_ValueSpec(_ipv4_value, _ipv4_lookalike, _IP_LEADS, _IP_KEYS, _IPV4_EXTRA), "IPV4"),
    "IPV6": _value_case(_ValueSpec(_ipv6_value, _ipv6_lookalike, _IP_LEADS, _IP_KEYS, _IPV6_EXTRA), "IPV6"),
    "CREDIT_CARD": _value_case(_CARD_SPEC, "CREDIT_CARD"),
    "IBAN": _value_case(_IBAN_SPEC, "IBAN"),
    "SSN": _value_case(_SSN_SPEC, "SSN"),
    "API_TOKEN": _value_case(_API_TOKEN_SPEC, "API_TOKEN"),
    "JWT": _value_case(_JWT_SPEC, "JWT"),
    "PEM_KEY": _pem_case,
    "URL_PASSWORD": _url_case,
    "ASSIGNED_SECRET": _assignment_case,
}


# Formats docs/data-hygiene.md lists as not detected ("Limits"). Measured for recall only, so the
# limits carry numbers too; `labelled_cases` does not include them and no test pins them.
_NEW_GTLDS = ["consulting", "berlin", "law", "studio"]
# name -> (category, generator of (text before, value, text after))
_GAPS: dict[str, tuple[str, Callable[[random.Random], tuple[str, str, str]]]] = {
    "SSN without dashes": (NATIONAL_ID, lambda r: ("SSN: ", ssn(r).replace("-", r.choice(["", " "])), "\n")),
    "US phone, spaces only": (
        PHONE, lambda r: ("Call me at ", f"{r.randint(2, 9)}{_d(r, 2)} {r.randint(2, 9)}{_d(r, 2)} {_d(r, 4)}", ".")),
    "Spanish mobile (612 345 678)": (PHONE, lambda r: ("Móvil: ", f"6{_d(r, 2)} {_d(r, 3)} {_d(r, 3)}", "\n")),
    "email, newer generic TLD": (
        EMAIL, lambda r: ("Contact ", f"{r.choice(_FIRST)}@{r.choice(_LAST)}.{r.choice(_NEW_GTLDS)}", ".")),
    "password in a sentence": (SECRET, lambda r: ("my password is ", _mixed_alnum(r, 14), " so log in\n")),
    "secret under an unusual key": (SECRET, lambda r: ('bob_login = "', _mixed_alnum(r, 20), '"\n')),
}


def gap_recall(redactor: Redactor, n: int, seed: int) -> dict[str, float]:
    """Share of `n` generated values of each documented gap that redaction covers anyway."""
    rng = random.Random(seed)
    out = {}
    for name, (category, gen) in _GAPS.items():
        hits = 0
        for _ in range(n):
            pre, value, post = gen(rng)
            hits += _covered(len(pre), len(pre) + len(value), redactor.find(pre + value + post), category)
        out[name] = hits / n
    return out


def labelled_cases(per_category: int, seed: int) -> list[LabelledDoc]:
    """For every measured category, `per_category` positive and `per_category` look-alike cases,
    cycling through the five contexts; deterministic in (per_category, seed)."""
    rng = random.Random(seed)
    docs = []
    for category, write in _CASE_WRITERS.items():
        for i in range(2 * per_category):
            context = CONTEXTS[i % len(CONTEXTS)]
            b = _Builder(rng, context)
            if context == "prose":
                b.t(_words(rng, rng.randint(3, 9)).capitalize() + ". ")
            write(rng, b, context, i % 2 == 0)
            doc = b.build()
            doc.category = category
            docs.append(doc)
    return docs


# ---- scoring -----------------------------------------------------------------------------------


@dataclass
class CategoryScore:
    tp: int = 0  # findings overlapping a labelled span of the same category
    fp: int = 0  # findings overlapping none
    found: int = 0  # labelled spans fully covered by findings of their category
    missed: int = 0  # labelled spans not fully covered

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.found / (self.found + self.missed) if self.found + self.missed else 1.0


def _covered(start: int, end: int, findings: Sequence[Finding], category: str | None) -> bool:
    pos = start
    for f in sorted(findings, key=lambda f: f.start):
        if (category is None or f.category == category) and f.start <= pos < f.end:
            pos = f.end
            if pos >= end:
                return True
    return pos >= end


def score(redactor: Redactor, docs: Sequence[LabelledDoc]) -> dict[str, CategoryScore]:
    """Per-category precision/recall of `redactor` on labelled documents (key "ALL": overall)."""
    scores: dict[str, CategoryScore] = {c: CategoryScore() for c in (*CATEGORIES, "ALL")}
    for doc in docs:
        findings = redactor.find(doc.text)
        for f in findings:
            hit = any(c == f.category and s < f.end and f.start < e for c, s, e in doc.spans)
            for key in (f.category, "ALL"):
                if hit:
                    scores[key].tp += 1
                else:
                    scores[key].fp += 1
        for c, s, e in doc.spans:
            ok = _covered(s, e, findings, c)
            for key in (c, "ALL"):
                if ok:
                    scores[key].found += 1
                else:
                    scores[key].missed += 1
    return scores


@dataclass
class CaseScore:
    positives: int = 0  # positive cases
    found: int = 0  # positive cases whose value findings of its Redactor category cover completely
    lookalikes: int = 0  # look-alike cases
    touched: int = 0  # look-alike cases of which some finding redacts a part
    tp: int = 0  # findings on a positive value, of its category
    fp: int = 0  # every other finding in the category's cases (look-alike, context, wrong category)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.found / self.positives if self.positives else 1.0

    @property
    def lookalike_rate(self) -> float:
        return self.touched / self.lookalikes if self.lookalikes else 0.0


def score_cases(redactor: Redactor, cases: Sequence[LabelledDoc]) -> dict[str, CaseScore]:
    """Per measured category (`MEASURED`, plus "ALL"): precision, recall and look-alikes redacted.

    Each case holds one planted value, so every finding in it is attributed to the case's category:
    precision is "of what was redacted in this category's cases, how much was the planted value"."""
    scores = {c: CaseScore() for c in (*MEASURED, "ALL")}
    for case in cases:
        findings = redactor.find(case.text)
        for key in (case.category, "ALL"):
            s = scores[key]
            for f in findings:
                if any(c == f.category and st < f.end and f.start < e for c, st, e in case.spans):
                    s.tp += 1
                else:
                    s.fp += 1
            for c, st, e in case.spans:
                s.positives += 1
                s.found += _covered(st, e, findings, c)
            for _, st, e in case.lookalikes:
                s.lookalikes += 1
                s.touched += any(f.start < e and st < f.end for f in findings)
    return scores


def lookalikes_touched(redactor: Redactor, docs: Sequence[LabelledDoc]) -> list[tuple[str, str]]:
    """(kind, text) of every look-alike that some finding overlaps (should be empty)."""
    out = []
    for doc in docs:
        findings = redactor.find(doc.text)
        for kind, s, e in doc.lookalikes:
            if any(f.start < e and s < f.end for f in findings):
                out.append((kind, doc.text[s:e]))
    return out


def throughput_mb_s(redactor: Redactor, texts: Sequence[str], repeat: int = 3) -> float:
    """Best-of-`repeat` UTF-8 megabytes per second of `redactor.redact` over `texts`, one core."""
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for t in texts:
            redactor.redact(t)
        best = min(best, time.perf_counter() - t0)
    return nbytes / 1e6 / best


def stdlib_corpora() -> dict[str, list[str]]:
    """Real text available on every Python install: the standard library's top-level modules
    (code) and pydoc's topic help, which is English documentation (prose)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(lib.glob("*.py"))]
    try:
        from pydoc_data.topics import topics  # a plain stdlib import; some distributions strip it
    except ImportError:
        topics = {}
    return {"code": code, "prose": list(topics.values())}


def _cases_report(red: Redactor, per_category: int, seed: int) -> list[str]:
    cases = labelled_cases(per_category, seed)
    scores = score_cases(red, cases)
    lines = [
        (f"Per category: `labelled_cases({per_category}, seed={seed})`, {len(cases):,} cases "
         f"({sum(len(c.text) for c in cases) / 1e6:.2f} MB), each one value in one of {len(CONTEXTS)} contexts "
         f"({', '.join(CONTEXTS)})."),
        "",
        ("| category | redacted as | positives | found | recall | look-alikes | look-alikes redacted | findings "
         "| false positives | precision |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, s in scores.items():
        lines.append(f"| {c} | {MEASURED.get(c, '')} | {s.positives:,} | {s.found:,} | {s.recall:.2%} | "
                     f"{s.lookalikes:,} | {s.touched:,} | {s.tp + s.fp:,} | {s.fp:,} | {s.precision:.2%} |")
    gaps = gap_recall(red, per_category, seed)
    lines += ["", "Documented gaps (recall only):", "", "| format | recall |", "|---|---:|"]
    lines += [f"| {name} | {r:.2%} |" for name, r in gaps.items()]
    return lines


def _documents_report(red: Redactor, docs: Sequence[LabelledDoc], n: int, seed: int) -> list[str]:
    scores = score(red, docs)
    lines = [
        (f"Mixed documents: `labelled_documents({n}, seed={seed})`, "
         f"{sum(len(d.text) for d in docs) / 1e6:.2f} MB, {sum(len(d.spans) for d in docs):,} labelled spans, "
         f"{sum(len(d.lookalikes) for d in docs):,} look-alikes."),
        "",
        "| category | labelled | found | missed | findings | false positives | precision | recall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in (*CATEGORIES, "ALL"):
        s = scores[c]
        if c == "NAME" and not (s.found + s.missed + s.tp + s.fp):
            continue
        lines.append(f"| {c} | {s.found + s.missed:,} | {s.found:,} | {s.missed:,} | {s.tp + s.fp:,} | "
                     f"{s.fp:,} | {s.precision:.2%} | {s.recall:.2%} |")
    touched = lookalikes_touched(red, docs)
    kinds = Counter(k for k, _ in touched)
    lines += ["", f"Look-alikes redacted: {len(touched)} of {sum(len(d.lookalikes) for d in docs):,}"
              + (f" ({dict(kinds)})" if kinds else "") + "."]
    return lines


def report(n: int = 2000, seed: int = 0, per_category: int = 1000) -> str:
    """Markdown: per-category precision/recall on labelled cases, the documented gaps, precision/recall
    on `n` mixed documents, findings on real text and throughput."""
    from bastion.config.schema import SanitizeConfig

    red = Redactor(SanitizeConfig())
    docs = labelled_documents(n, seed)
    lines = [*_cases_report(red, per_category, seed), "", *_documents_report(red, docs, n, seed)]
    rate = card_collision_rate()
    lines += ["", f"Random 12-16 digit integers redacted as cards (Luhn + issuer prefix pass by chance): {rate:.2%}."]
    real = {f"stdlib {k}": v for k, v in stdlib_corpora().items() if v}
    lines += ["", "Findings on real text (Python's standard library, no planted PII):", "",
              "| corpus | MB | findings by category |", "|---|---:|---|"]
    for name, texts in real.items():
        found = Counter(f.category for t in texts for f in red.find(t))
        mb = sum(len(t.encode()) for t in texts) / 1e6
        lines.append(f"| {name} | {mb:.1f} | {', '.join(f'{k} {v}' for k, v in found.most_common()) or 'none'} |")
    lines += ["", "| corpus | MB | MB/s (one core, best of 3) |", "|---|---:|---:|"]
    for name, texts in {"generated (PII-dense)": [d.text for d in docs], **real}.items():
        mb = sum(len(t.encode()) for t in texts) / 1e6
        lines.append(f"| {name} | {mb:.1f} | {throughput_mb_s(red, texts):.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tests/synthetic/pii.py", description=__doc__.split("\n")[0])
    ap.add_argument("--report", action="store_true", help="print precision/recall and throughput (markdown)")
    ap.add_argument("--n", type=int, default=2000, help="mixed documents")
    ap.add_argument("--cases", type=int, default=1000, help="positive and look-alike cases per category")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=0, help="print N generated documents with their labels")
    args = ap.parse_args(argv)
    if args.show:
        for d in labelled_documents(args.show, args.seed):
            print(f"=== {d.kind}\n{d.text}\n--- spans: {[(c, d.text[s:e]) for c, s, e in d.spans]}\n")
    if args.report:
        print(report(args.n, args.seed, args.cases))
    if not (args.report or args.show):
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
