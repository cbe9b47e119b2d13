"""Labelled synthetic documents for measuring PII/secret redaction (`bastion.data.sanitize`).

`labelled_documents(n, seed)` mixes prose, Python code, config files (YAML, .env, JSON), logs and
e-mail messages. Every planted PII value or secret is labelled with its category and exact span;
look-alikes that must survive redaction (versions, dates, UUIDs, git hashes, Luhn-invalid
numbers, private IPs, placeholders such as "changeme" or "${VAR}") are recorded separately.
Same (n, seed) -> identical documents (only `random.Random` is used).

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
    kind: str = ""


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


def lookalike(rng: random.Random) -> tuple[str, str]:
    """(kind, text) of something that resembles PII but is not."""
    r = rng.randint
    return rng.choice([
        lambda: ("version", f"{r(0, 12)}.{r(0, 30)}.{r(0, 99)}"),
        lambda: ("version", f"v{r(1, 12)}.{r(0, 9)}.{r(10000, 22631)}"),
        lambda: ("version", f"{r(1, 9)}.{r(0, 9)}.{r(0, 9)}.{r(0, 9)}.{r(0, 9)}"),
        lambda: ("date", f"{r(1990, 2030)}-{r(1, 12):02d}-{r(1, 28):02d}"),
        lambda: ("date", f"{r(1, 28):02d}/{r(1, 12):02d}/{r(1990, 2030)}"),
        lambda: ("date", f"{r(1, 28):02d}.{r(1, 12):02d}.{r(1990, 2030)}"),
        lambda: ("timestamp", f"{r(1990, 2030)}-{r(1, 12):02d}-{r(1, 28):02d}T{r(0, 23):02d}:{r(0, 59):02d}:{r(0, 59):02d}Z"),
        lambda: ("time", f"{r(0, 23):02d}:{r(0, 59):02d}:{r(0, 59):02d}"),
        lambda: ("range", f"{r(1900, 1999)}-{r(2000, 2030)}"),
        lambda: ("uuid", _uuid(rng)),
        lambda: ("sha", _rand(rng, _HEXDIGITS, rng.choice([7, 40, 64]))),
        lambda: ("luhn_invalid", card_number(rng, valid=False)),
        lambda: ("integer", _non_card_integer(rng)),
        lambda: ("epoch_ms", str(r(1_600_000_000_000, 1_800_000_000_000))),
        lambda: ("private_ip", private_ip(rng)),
        lambda: ("iban_invalid", iban(rng, valid=False)),
        lambda: ("ssn_invalid", invalid_ssn(rng)),
        lambda: ("isbn", f"978-{r(0, 9)}-{r(10, 99)}-{r(100000, 999999)}-{r(0, 9)}"),
        lambda: ("money", f"${r(1, 999)},{r(100, 999)},{r(100, 999)}.{r(10, 99)}"),
        lambda: ("mac", ":".join(f"{rng.getrandbits(8):02X}" for _ in range(6))),
        lambda: ("port", f"localhost:{r(1024, 65535)}"),
        lambda: ("phone_like", f"{r(100, 999)} {r(1000, 9999)}"),
        lambda: ("ip_version", f"version {r(1, 9)}.{r(0, 9)}.{r(0, 9)}.{r(1, 9)}"),
        lambda: ("identifier", "sk-learn-compatible-estimator"),
        lambda: ("git_remote", f"git@github.com:{rng.choice(_LAST)}/{rng.choice(_WORDS)}.git"),
        lambda: ("matmul", "x@self.proj"),
        lambda: ("base64_image", "data:image/png;base64,iVBORw0KGgo" + _rand(rng, _B64, 120) + "=="),
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
    IP: ["The request came from ", "Blocked address ", "Client IP "],
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


def report(n: int = 2000, seed: int = 0) -> str:
    """Markdown: per-category precision/recall on `n` generated documents, plus throughput."""
    from bastion.config.schema import SanitizeConfig

    red = Redactor(SanitizeConfig())
    docs = labelled_documents(n, seed)
    scores = score(red, docs)
    lines = [
        (f"Measured on {n:,} generated documents (`labelled_documents({n}, seed={seed})`, "
         f"{sum(len(d.text) for d in docs) / 1e6:.2f} MB, {sum(len(d.spans) for d in docs):,} labelled spans, "
         f"{sum(len(d.lookalikes) for d in docs):,} look-alikes)."),
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
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=0, help="print N generated documents with their labels")
    args = ap.parse_args(argv)
    if args.show:
        for d in labelled_documents(args.show, args.seed):
            print(f"=== {d.kind}\n{d.text}\n--- spans: {[(c, d.text[s:e]) for c, s, e in d.spans]}\n")
    if args.report:
        print(report(args.n, args.seed))
    if not (args.report or args.show):
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
