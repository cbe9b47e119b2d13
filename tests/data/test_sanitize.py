"""PII/secret redaction: each category's positives and look-alikes, config switches, overlaps,
idempotence, the labelled synthetic set's precision/recall, and adversarial-input timing."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.config.schema import SanitizeConfig
from synthetic import pii as syn
from bastion.data.sanitize import (
    CATEGORIES,
    Finding,
    Redactor,
    iban_ok,
    luhn_ok,
    placeholder,
    shannon_entropy,
    ssn_ok,
)
from bastion.errors import DataError

RED = Redactor(SanitizeConfig())


def found(text: str, redactor: Redactor = RED) -> list[tuple[str, str]]:
    return [(f.category, text[f.start:f.end]) for f in redactor.find(text)]


# ---- positives: (text, category, exact redacted substring) -------------------------------------

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0"
    "IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq9\nq2s0dGhpcyBpcyBub3QgYSBrZXk=\n-----END RSA PRIVATE KEY-----"

POSITIVES = [
    ("write to bob.smith@example.com today", "EMAIL", "bob.smith@example.com"),
    ("mailto:alice+tag@mail.uni-heidelberg.de.", "EMAIL", "alice+tag@mail.uni-heidelberg.de"),
    ("From: Eve <eve_99@startup.dev>", "EMAIL", "eve_99@startup.dev"),
    ("call +1 (415) 555-0132 now", "PHONE", "+1 (415) 555-0132"),
    ("tel +44 20 7946 0958", "PHONE", "+44 20 7946 0958"),
    ("tel +33 1 23 45 67 89", "PHONE", "+33 1 23 45 67 89"),
    ("tel +14155550132", "PHONE", "+14155550132"),
    ("US (415) 555-0132", "PHONE", "(415) 555-0132"),
    ("US 415-555-0132.", "PHONE", "415-555-0132"),
    ("US 415.555.0132", "PHONE", "415.555.0132"),
    ("toll free 1-800-555-0199", "PHONE", "1-800-555-0199"),
    ("UK 020 7946 0958", "PHONE", "020 7946 0958"),
    ("mobile 07700 900123", "PHONE", "07700 900123"),
    ("DE 0171/1234567", "PHONE", "0171/1234567"),
    ("FR 06 12 34 56 78", "PHONE", "06 12 34 56 78"),
    ("from 8.8.8.8:53", "IP", "8.8.8.8"),
    ("net 93.184.216.34/24", "IP", "93.184.216.34"),
    ("v6 2001:4860:4860::8888.", "IP", "2001:4860:4860::8888"),
    ("v6 [2606:4700:4700::1111]:443", "IP", "2606:4700:4700::1111"),
    ("mapped ::ffff:8.8.4.4", "IP", "::ffff:8.8.4.4"),
    # Host words that end in "ver" / "build" are no version markers; user@host is an SSH target.
    ("The DNS server 8.8.8.8 stopped answering", "IP", "8.8.8.8"),
    ("Our resolver 1.1.1.1 returned SERVFAIL", "IP", "1.1.1.1"),
    ("keepalived: failover to 93.184.216.34 complete", "IP", "93.184.216.34"),
    ("Failover 93.184.216.34 took over", "IP", "93.184.216.34"),
    ("ssh root@93.184.216.34", "IP", "93.184.216.34"),
    ("driver 8.8.4.4 and observer: 8.8.8.8", "IP", "8.8.4.4"),
    ("rebuild 8.8.8.8 from scratch", "IP", "8.8.8.8"),  # markers are whole words: "build" is one
    ("client 008.008.004.004 connected", "IP", "008.008.004.004"),  # zero-padded octets, as some logs write
    ('{"private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqhkiG9w0B\\nAQEFAASCBKcwggSj"}', "SECRET",
     "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqhkiG9w0B\\nAQEFAASCBKcwggSj"),  # truncated, in a JSON string
    ("visa 4111 1111 1111 1111 exp 12/25", "CREDIT_CARD", "4111 1111 1111 1111"),
    ("visa 4111-1111-1111-1111", "CREDIT_CARD", "4111-1111-1111-1111"),
    ("mc 5555555555554444", "CREDIT_CARD", "5555555555554444"),
    ("mc2 2223003122003222", "CREDIT_CARD", "2223003122003222"),
    ("amex 3782 822463 10005", "CREDIT_CARD", "3782 822463 10005"),
    ("discover 6011111111111117", "CREDIT_CARD", "6011111111111117"),
    ("IBAN DE89 3704 0044 0532 0130 00.", "IBAN", "DE89 3704 0044 0532 0130 00"),
    ("IBAN GB82WEST12345698765432", "IBAN", "GB82WEST12345698765432"),
    ("IBAN FR1420041010050500013M02606", "IBAN", "FR1420041010050500013M02606"),
    ("ssn 078-05-1120", "NATIONAL_ID", "078-05-1120"),
    ("key AKIAIOSFODNN7EXAMPLE", "SECRET", "AKIAIOSFODNN7EXAMPLE"),
    ("temp ASIAY34FZKBOKMUTVV7A", "SECRET", "ASIAY34FZKBOKMUTVV7A"),
    ("gh ghp_16C7e42F292c6912E7710c838347Ae178B4a", "SECRET", "ghp_16C7e42F292c6912E7710c838347Ae178B4a"),
    ("pat github_pat_11ABCDEFG0123456789abc_defGHIJKLmnopqrSTUVwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZab",
     "SECRET", "github_pat_11ABCDEFG0123456789abc_defGHIJKLmnopqrSTUVwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZab"),
    ("gitlab glpat-xY9z8W7v6U5t4S3r2Q1p", "SECRET", "glpat-xY9z8W7v6U5t4S3r2Q1p"),
    ("slack xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "SECRET",
     "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"),
    ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "SECRET", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("stripe rk_live_4eC39HqLyjWDarjtT1zdp7dc", "SECRET", "rk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("stripe sk_test_4eC39HqLyjWDarjtT1zdp7dc", "SECRET", "sk_test_4eC39HqLyjWDarjtT1zdp7dc"),
    ("google AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q", "SECRET", "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q"),
    ("hub hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGhIj", "SECRET", "hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGhIj"),
    ("openai sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z", "SECRET", "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"),
    ("openai sk-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb3dEf6hIj9kLm2n", "SECRET",
     "sk-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb3dEf6hIj9kLm2n"),
    (f"jwt {JWT}.", "SECRET", JWT),
    (f"key:\n{PEM}\nthanks", "SECRET", PEM),
    ("db postgres://admin:S3cr3t-P4ss@db.example.com:5432/app", "SECRET", "S3cr3t-P4ss"),
    ("redis://:p~ss!w0rd.x@cache:6379", "SECRET", "p~ss!w0rd.x"),
    ('password = "hunter2hunter2!"', "SECRET", "hunter2hunter2!"),
    ("api_key: 9f86d081884c7d659a2feaa0c55ad015", "SECRET", "9f86d081884c7d659a2feaa0c55ad015"),
    ("SECRET_TOKEN=Zx8Kq2Lm9Pw4Rt7Vb3Nc", "SECRET", "Zx8Kq2Lm9Pw4Rt7Vb3Nc"),
    ('{"token": "aB3dE5gH7jK9mN1pQ3sT"}', "SECRET", "aB3dE5gH7jK9mN1pQ3sT"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYzQ8m2Vn4Kp", "SECRET",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzQ8m2Vn4Kp"),
    ('api_key: str = "Qm9vb3Rz4T2x8Lp5Zr7Y"', "SECRET", "Qm9vb3Rz4T2x8Lp5Zr7Y"),
    ("REFRESHTOKEN=Qm9vb3Rz4T2x8Lp5Zr7Y", "SECRET", "Qm9vb3Rz4T2x8Lp5Zr7Y"),
    ("mysql --password Xy7kLm9pQr2Tz", "SECRET", "Xy7kLm9pQr2Tz"),
    ('curl -H "Authorization: Bearer abcDEF123456ghiJKL789"', "SECRET", "abcDEF123456ghiJKL789"),
]


@pytest.mark.parametrize(("text", "category", "span"), POSITIVES, ids=[p[2][:24] for p in POSITIVES])
def test_positive(text: str, category: str, span: str) -> None:
    assert (category, span) in found(text)
    out, counts = RED.redact(text)
    assert span not in out and placeholder(category) in out
    assert counts[category] >= 1


# ---- look-alikes that must survive --------------------------------------------------------------

NEGATIVES = [
    "release 1.2.3 and v10.0.19041 and Python 3.11.7",
    "version 2.0.0.1 and build 1.2.3.4.5",
    "on 2024-01-15, 15/01/2024, 01.02.2024 at 10:30:00 or 2024-01-15T10:30:00Z",
    "Date: Mon, 15 Jan 2024 10:30:00 +0200",
    "between 1990-2000 on pages 120-135, ISBN 978-3-16-148410-0",
    "run 123e4567-e89b-12d3-a456-426614174000",
    'commit = "a94a8fe5ccb19ba61c4c0873d391e987982fbbd3"  # sha1',
    "sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "order 4111111111111112 and 1234567812345678",  # Luhn-invalid
    "count 12345678901234 epoch 1700000000000",
    "listen 10.0.0.1, 192.168.1.20, 172.16.0.5, 127.0.0.1, ::1, fe80::1 mask 255.255.255.0 any 0.0.0.0",
    "docs 192.0.2.1 and 2001:db8::1 are documentation addresses",
    "bad ssn 000-12-3456 666-12-3456 912-12-3456 123-00-4567 123-45-0000",
    "bad iban DE89 3704 0044 0532 0130 01",
    'password = "changeme"  API_KEY=${API_KEY}  api_key: "<your-api-key>"  token: xxxxxxxxxxxxxxxx',
    'SECRET_KEY = os.environ["SECRET_KEY"]\npassword_file: /etc/app/password.txt\ntoken_path = "./secrets/token.json"',
    "api_key = settings.OPENAI_API_KEY\nmax_tokens: 4096\ntokenizer = AutoTokenizer.from_pretrained(name)",
    'secret_name: "my-app-prod-secret"\npassword: "********"\nDB_PASSWORD=$DB_PASSWORD\neos_token = "<|endoftext|>"',
    "evens = values[::2]; odds = values[1::2]; std::vector<std::string>::iterator it; net 2001::/16",
    "y = x@self.proj + b  # matrix product",
    "git clone git@github.com:org/repo.git",
    "pip install sk-learn-compatible-estimator",
    "icon data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==",
    "coords +48.858370, +2.294481 and colour #a1b2c3, total $1,234,567.89",
    "mac 00:1A:2B:3C:4D:5E at 12:34:56",
    "the token: it is short; Password: see vault",
    # Version, section and OID numbers in public address space: the word or mark before them decides.
    'AssemblyVersion("1.0.0.0") __version__ = "2.0.0.1" driverVersion=4.1.2.3 ver. 5.1.0.2 release-3.2.1.0',
    "see section 8.2.4.45, § 4.1.2.3, §5.1.2.3, clause 7.1.2.3 and OID 1.3.6.1 (oid=2.5.4.3)",
    "pins numpy==1.2.3.4 lib!=2.0.0.1 pkg>=3.1.0.2 requests~=2.3.1.0",
    "benchmark net 198.18.0.1, 198.19.255.1 and documentation prefix 3fff:1::1",  # RFC 2544, RFC 9637
    'if line.startswith("-----BEGIN RSA PRIVATE KEY-----"):\n    return True',  # a BEGIN line, no key
    "y = x@self.fc + h@self.ln",  # matrix products: fc and ln are no country codes
]


@pytest.mark.parametrize("text", NEGATIVES, ids=[n[:30] for n in NEGATIVES])
def test_lookalike_untouched(text: str) -> None:
    assert found(text) == []
    assert RED.redact(text) == (text, Counter())


# ---- validators ---------------------------------------------------------------------------------


def test_validators() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89370400440532013000") and not iban_ok("DE89370400440532013001")
    assert not iban_ok("DE8937040044053201300")  # wrong length for DE
    assert ssn_ok("078", "05", "1120")
    assert not any(ssn_ok(*p) for p in [("000", "12", "3456"), ("666", "12", "3456"), ("900", "12", "3456"),
                                         ("123", "00", "3456"), ("123", "45", "0000")])
    assert shannon_entropy("aaaa") == 0.0 and shannon_entropy("abcd") == 2.0


def test_card_needs_known_issuer_prefix() -> None:
    # Luhn-valid, but 9xxx / 1xxx are no card issuer's prefix.
    digits = "900000000000000"
    for d in "0123456789":
        if luhn_ok(digits + d):
            assert found(f"id {digits + d}") == []


# ---- placeholders, counts, overlaps ------------------------------------------------------------


def test_placeholders_and_counts() -> None:
    text = "a@example.com, b@example.org, 8.8.8.8, 078-05-1120 and AKIAIOSFODNN7EXAMPLE"
    out, counts = RED.redact(text)
    assert out == "<EMAIL>, <EMAIL>, <IP>, <NATIONAL_ID> and <SECRET>"
    assert counts == Counter({"EMAIL": 2, "IP": 1, "NATIONAL_ID": 1, "SECRET": 1})
    assert [placeholder(c) for c in CATEGORIES] == [
        "<SECRET>", "<CREDIT_CARD>", "<IBAN>", "<NATIONAL_ID>", "<EMAIL>", "<IP>", "<PHONE>", "<NAME>"]


def test_url_password_only_password_replaced() -> None:
    out, counts = RED.redact("DATABASE_URL=postgres://admin:Sup3r~S3cret!@db.example.com:5432/app")
    assert out == "DATABASE_URL=postgres://admin:<SECRET>@db.example.com:5432/app"
    assert counts == Counter({"SECRET": 1})  # the host is not an email
    assert RED.redact("https://user@example.com/x")[1] == Counter()  # login without password


def test_pem_whole_block_variants() -> None:
    assert RED.redact(f"x\n{PEM}\ny") == ("x\n<SECRET>\ny", Counter({"SECRET": 1}))
    escaped = PEM.replace("\n", "\\n")  # inside a JSON string
    assert RED.redact(f'{{"key": "{escaped}"}}')[0] == '{"key": "<SECRET>"}'
    truncated = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0B\nAQEFAASCBKcwggSjAgEAAoIB\n\nmore text"
    assert RED.redact(truncated)[0] == "<SECRET>\n\nmore text"


def test_overlaps_longest_wins() -> None:
    # The JWT is also an assignment value: one finding, not two.
    assert found(f'"token": "{JWT}"') == [("SECRET", JWT)]
    # The SSN-shaped tail of a longer number is not an SSN.
    assert found("ref 12078-05-1120") == []
    # Adjacent findings are both replaced.
    assert RED.redact("8.8.8.8,a@example.com")[0] == "<IP>,<EMAIL>"


def test_spans_sorted_disjoint_and_right_to_left_replacement() -> None:
    doc = syn.labelled_documents(30, seed=5)
    for d in doc:
        fs = RED.find(d.text)
        assert fs == sorted(fs, key=lambda f: f.start)
        assert all(a.end <= b.start for a, b in pairwise(fs))
        assert all(isinstance(f, Finding) and f.category in CATEGORIES for f in fs)


# ---- configuration switches --------------------------------------------------------------------

SAMPLE = ("mail a@example.com tel +1 415-555-0132 ip 8.8.8.8 card 4111111111111111 "
          "iban DE89370400440532013000 ssn 078-05-1120 key AKIAIOSFODNN7EXAMPLE")
SWITCH = {"emails": "EMAIL", "phones": "PHONE", "ip_addresses": "IP", "credit_cards": "CREDIT_CARD",
          "ibans": "IBAN", "national_ids": "NATIONAL_ID", "secrets": "SECRET"}


def test_all_categories_on_by_default() -> None:
    assert set(RED.redact(SAMPLE)[1]) == set(SWITCH.values())


@pytest.mark.parametrize("field", sorted(SWITCH))
def test_each_category_can_be_turned_off(field: str) -> None:
    counts = Redactor(SanitizeConfig(**{field: False})).redact(SAMPLE)[1]
    assert set(counts) == set(SWITCH.values()) - {SWITCH[field]}


def test_disabled_is_identity() -> None:
    assert Redactor(SanitizeConfig(enabled=False)).redact(SAMPLE) == (SAMPLE, Counter())


def test_private_ips() -> None:
    text = "10.1.2.3 192.168.0.1 127.0.0.1 fd00::1:2:3 fe80::1 and 8.8.8.8"
    assert RED.redact(text)[1] == Counter({"IP": 1})
    strict = Redactor(SanitizeConfig(keep_private_ips=False))
    assert strict.redact(text)[1] == Counter({"IP": 6})
    # Not host addresses at all: never redacted.
    assert strict.redact("0.0.0.0 255.255.255.0 224.0.0.1")[1] == Counter()


# ---- names (Presidio) ---------------------------------------------------------------------------


def test_names_without_presidio_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "presidio_analyzer", None)  # makes the import fail
    with pytest.raises(DataError, match=r"presidio"):
        Redactor(SanitizeConfig(names=True))
    Redactor(SanitizeConfig(names=True, enabled=False))  # off: nothing to load


def test_default_path_does_not_import_presidio() -> None:
    code = ("import sys; from bastion.data.sanitize import Redactor; "
            "Redactor().redact('John Smith, a@example.com'); assert 'presidio_analyzer' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(importlib.util.find_spec("presidio_analyzer") is None, reason="presidio not installed")
def test_names_with_presidio() -> None:
    try:
        red = Redactor(SanitizeConfig(names=True))
    except DataError as e:  # presidio present but no spaCy English model
        pytest.skip(str(e))
    out, counts = red.redact("Yesterday John Smith emailed john@example.com.")
    assert "John Smith" not in out and counts["NAME"] >= 1 and counts["EMAIL"] == 1


# ---- labelled synthetic set --------------------------------------------------------------------

STRUCTURED = ("SECRET", "CREDIT_CARD", "IBAN", "NATIONAL_ID", "EMAIL")


@pytest.fixture(scope="module")
def labelled() -> list[syn.LabelledDoc]:
    # A seed the detectors were not tuned on.
    return syn.labelled_documents(600, seed=2024)


def test_generator_deterministic_and_well_formed(labelled: list[syn.LabelledDoc]) -> None:
    again = syn.labelled_documents(600, seed=2024)
    assert [d.text for d in again] == [d.text for d in labelled] and again[5].spans == labelled[5].spans
    assert [d.text for d in syn.labelled_documents(5, seed=1)] != [d.text for d in labelled[:5]]
    kinds, cats = Counter(d.kind for d in labelled), Counter(c for d in labelled for c, _, _ in d.spans)
    assert set(kinds) == {"prose", "python", "config", "logs", "email"}
    assert set(cats) == {"EMAIL", "PHONE", "IP", "CREDIT_CARD", "IBAN", "NATIONAL_ID", "SECRET"}
    for d in labelled:
        spans = sorted((s, e) for _, s, e in d.spans)
        assert all(0 <= s < e <= len(d.text) for s, e in spans)
        assert all(a[1] <= b[0] for a, b in pairwise(spans))
    # Every token format is planted.
    secrets = [d.text[s:e] for d in labelled for c, s, e in d.spans if c == "SECRET"]
    for prefix in ("AKIA", "ASIA", "ghp_", "github_pat_", "glpat-", "xox", "sk_live_", "AIza", "sk-", "eyJ", "-----BEGIN"):
        assert any(x.startswith(prefix) for x in secrets), prefix


def test_labelled_recall_and_precision(labelled: list[syn.LabelledDoc]) -> None:
    scores = syn.score(RED, labelled)
    for c in STRUCTURED:
        assert scores[c].found > 0 and scores[c].recall == 1.0, (c, scores[c])
    for c in ("PHONE", "IP"):
        assert scores[c].recall >= 0.95, (c, scores[c])
    assert scores["ALL"].precision >= 0.95, scores["ALL"]


# Minimum (precision, recall) per measured category on `labelled_cases(150, seed=2024)`, a seed
# the detectors were not tuned on. Measured: 100 % / 100 % for every category (docs/data-hygiene.md
# has the published run); one error in 150 still passes, a broken detector or context rule does not.
CASE_MINIMUMS = {c: (0.99, 0.99) for c in syn.MEASURED}


@pytest.fixture(scope="module")
def cases() -> list[syn.LabelledDoc]:
    return syn.labelled_cases(150, seed=2024)


def test_cases_cover_every_category_and_context(cases: list[syn.LabelledDoc]) -> None:
    assert [d.text for d in syn.labelled_cases(150, seed=2024)] == [d.text for d in cases]
    assert set(CASE_MINIMUMS) == set(syn.MEASURED) == {d.category for d in cases}
    shape = Counter((d.category, d.kind, bool(d.spans)) for d in cases)
    assert set(shape) == {(c, k, p) for c in syn.MEASURED for k in syn.CONTEXTS for p in (True, False)}
    for d in cases:  # exactly one planted value: a positive of its category, or one look-alike
        assert len(d.spans) + len(d.lookalikes) == 1
        assert all(c == syn.MEASURED[d.category] for c, _, _ in d.spans)


@pytest.mark.parametrize("category", sorted(CASE_MINIMUMS))
def test_case_precision_and_recall_per_category(cases: list[syn.LabelledDoc], category: str) -> None:
    s = syn.score_cases(RED, [d for d in cases if d.category == category])[category]
    min_precision, min_recall = CASE_MINIMUMS[category]
    assert s.positives == 150 and s.lookalikes == 150
    assert s.precision >= min_precision and s.recall >= min_recall, (category, s)
    assert s.lookalike_rate <= 1 - min_precision, (category, s)


@pytest.mark.slow
def test_published_case_numbers() -> None:
    # The run docs/data-hygiene.md publishes: `pii.py --report --cases 1000 --seed 1`.
    scores = syn.score_cases(RED, syn.labelled_cases(1000, seed=1))
    assert all(s.precision == 1.0 and s.recall == 1.0 and s.touched == 0 for s in scores.values()), scores


def test_labelled_lookalikes_untouched(labelled: list[syn.LabelledDoc]) -> None:
    assert sum(len(d.lookalikes) for d in labelled) > 1000
    assert syn.lookalikes_touched(RED, labelled) == []


def test_idempotent(labelled: list[syn.LabelledDoc]) -> None:
    for d in labelled[:300]:
        once, _ = RED.redact(d.text)
        assert RED.redact(once) == (once, Counter())


def test_thread_safe(labelled: list[syn.LabelledDoc]) -> None:
    texts = [d.text for d in labelled[:200]]
    serial = [RED.redact(t) for t in texts]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(RED.redact, texts)) == serial


# ---- property tests -----------------------------------------------------------------------------

# Self-identifying secrets and PII from the generator, each with the substring that must vanish.
_UNITS: list[tuple[str, str]] = []
for _d in syn.labelled_documents(150, seed=77):
    for _c, _s, _e in _d.spans:
        value = _d.text[_s:_e]
        # A unit is the value with its line as context (assignment secrets need their key).
        ls, le = _d.text.rfind("\n", 0, _s) + 1, _d.text.find("\n", _e)
        unit = _d.text[ls:le if le >= 0 else len(_d.text)]
        if len(value) >= 8 and "\n" not in value:
            _UNITS.append((unit, value))

_filler = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_filler, st.sampled_from(_UNITS)), min_size=1, max_size=5), _filler)
def test_property_planted_values_never_survive(parts: list[tuple[str, tuple[str, str]]], tail: str) -> None:
    # Units are separated from random filler by newlines, as lines of a document would be.
    text = "".join(f"{f}\n{unit}\n" for f, (unit, _) in parts) + tail
    out, counts = RED.redact(text)
    for _, (_, value) in parts:
        assert value not in out
    assert sum(counts.values()) >= 1
    assert RED.redact(out)[0] == out  # idempotent


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789 .-+()/:@abcdefxAKIAghp_=\"'\n")) | st.characters(), max_size=300))
def test_property_never_raises_and_idempotent(text: str) -> None:
    out, counts = RED.redact(text)
    assert isinstance(out, str) and all(v > 0 for v in counts.values())
    assert RED.redact(out)[0] == out


# ---- performance guards -------------------------------------------------------------------------

ADVERSARIAL = {
    "colons": ":" * 100_000, "eyJ": "eyJ" * 30_000, "pem_no_end": "-----BEGIN PRIVATE KEY-----\n" * 4_000,
    "parens": "(" * 100_000, "digit_groups": "1 " * 50_000, "at": "a@" * 50_000, "key_chain": "api_key=" * 12_000,
    "urls": "://a:" * 20_000, "emails": "a@example.com " * 7_000, "emails_url": "u@example.com http://x " * 4_000, "ipv6ish": "1:2:3:4:5:6:7:8:" * 6_000, "mixed": "ab:12 ::1 1.2.3.4 +1 (2" * 4_000,
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_input_is_linear_time(name: str) -> None:
    t0 = time.perf_counter()
    RED.redact(ADVERSARIAL[name])
    assert time.perf_counter() - t0 < 2.0  # ~100 KB each; linear code takes well under 0.2 s


def test_throughput_floor(labelled: list[syn.LabelledDoc]) -> None:
    # A loose floor that only catches a catastrophic regression (shared CI machines are noisy);
    # the measured figures are in docs/data-hygiene.md.
    code = syn.stdlib_corpora()["code"][:40]
    assert syn.throughput_mb_s(RED, code, repeat=1) > 2.0
