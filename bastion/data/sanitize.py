"""PII and secret redaction for training text (a step of `bastion data prepare`, on by default).

A model memorises rare strings it sees in training, so an API key or a phone number left in
the corpus can come back out verbatim at inference time. `Redactor.redact` replaces every
finding with a category placeholder (`<EMAIL>`, `<SECRET>`, ...) and counts what it replaced.

Design choices:
  * Regexes only, all precompiled at import; every detector whose pattern starts with a rare
    literal ("eyJ", "AKIA", "://", "@") is skipped outright unless that literal occurs in the
    text (`str.__contains__` scans at GB/s), so typical prose/code pays for a handful of scans.
  * Patterns begin with a character or character class, never with a look-behind: CPython's
    regex engine can then skip ahead to candidate positions in C. Boundary look-behinds are
    placed *after* the first character (`\\d(?<![\\w.]\\d)` = "no word char before this digit").
  * A regex only proposes; validation decides: Luhn + issuer prefix for cards, country length +
    mod-97 for IBANs, SSA rules for SSNs, `ipaddress` for IPs, base64/JSON decoding for JWTs,
    entropy and placeholder checks for assignment secrets. Precision comes from validation.
  * Overlapping findings: the longest span wins, ties go to the more specific category
    (secrets before cards before phones ...). Replacements are applied right to left.
  * Pure and thread-safe: no mutable state after construction (except the lazily used,
    lock-protected Presidio engine when `names` is on).
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import re
import threading
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple

from bastion.config.schema import SanitizeConfig
from bastion.errors import DataError
from bastion.safeio import parse_json

EMAIL = "EMAIL"
PHONE = "PHONE"
IP = "IP"
CREDIT_CARD = "CREDIT_CARD"
IBAN = "IBAN"
NATIONAL_ID = "NATIONAL_ID"
SECRET = "SECRET"
NAME = "NAME"

CATEGORIES: tuple[str, ...] = (SECRET, CREDIT_CARD, IBAN, NATIONAL_ID, EMAIL, IP, PHONE, NAME)
# Tie-break for equally long overlapping spans: earlier in CATEGORIES = more specific.
_PRIORITY = {c: i for i, c in enumerate(CATEGORIES)}


def placeholder(category: str) -> str:
    """The text that replaces a finding of `category`, e.g. "<EMAIL>"."""
    return f"<{category}>"


class Finding(NamedTuple):
    category: str
    start: int
    end: int


_A = re.ASCII  # \d, \w, \s mean ASCII only: Unicode digits are not phone numbers

# ---- emails -----------------------------------------------------------------------------------
# Located from the "@" outwards: a pattern that starts with the local part would be retried at
# every letter of the text (and backtrack over each word), which is an order of magnitude slower.
_EMAIL_DOMAIN = re.compile(
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}([A-Za-z]{2,24}))(?![A-Za-z0-9-])", _A
)
_EMAIL_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
# The TLD must be a known one, so that Python's `x@self.proj` or `x@self.fc` (matrix products) or a
# decorator-ish `a@b.weight` is not an email: a two-letter TLD is a delegated country code
# (ISO 3166-1 plus uk, eu, ac, su), a longer one a generic TLD in common use.
_COUNTRY_TLDS = frozenset(
    """ac ad ae af ag ai al am ao aq ar as at au aw ax az ba bb bd be bf bg bh bi bj bl bm bn bo bq br bs
    bt bv bw by bz ca cc cd cf cg ch ci ck cl cm cn co cr cu cv cw cx cy cz de dj dk dm do dz ec ee eg eh
    er es et eu fi fj fk fm fo fr ga gb gd ge gf gg gh gi gl gm gn gp gq gr gs gt gu gw gy hk hm hn hr ht
    hu id ie il im in io iq ir is it je jm jo jp ke kg kh ki km kn kp kr kw ky kz la lb lc li lk lr ls lt
    lu lv ly ma mc md me mf mg mh mk ml mm mn mo mp mq mr ms mt mu mv mw mx my mz na nc ne nf ng ni nl no
    np nr nu nz om pa pe pf pg ph pk pl pm pn pr ps pt pw py qa re ro rs ru rw sa sb sc sd se sg sh si sj
    sk sl sm sn so sr ss st su sv sx sy sz tc td tf tg th tj tk tl tm tn to tr tt tv tw tz ua ug uk um us
    uy uz va vc ve vg vi vn vu wf ws ye yt za zm zw""".split()
)
_GENERIC_TLDS = frozenset(
    [
        "com", "org", "net", "edu", "gov", "mil", "int", "info", "biz", "name", "pro", "mobi", "aero",
        "coop", "museum", "app", "dev", "page", "io", "ai", "cloud", "tech", "online", "site", "xyz",
        "email", "mail", "team", "services", "solutions", "systems", "company", "global", "digital",
        "network", "website", "store", "shop", "blog", "news", "media", "host", "space", "agency",
        "academy", "works", "zone", "life", "live", "world", "today", "local", "localhost", "internal",
        "test", "example", "invalid", "corp", "lan", "home"
    ]
)
# "scheme://user:pass@host": everything between "://" and "@" is userinfo, never an email, even when
# the password contains characters that cannot start an email's local part ("~", "!").
_URL_USERINFO_BEFORE = re.compile(r"://[^\s/@]{0,512}\Z")

# ---- phones ------------------------------------------------------------------------------------
# International: "+CC ..." with 8-15 digits (E.164). Validated in Python (group shapes).
_PHONE_INTL = re.compile(r"\+(?<![\w+]\+)\(?[1-9][\d ().-]{6,22}\d(?![\d])(?![.-]\d)", _A)  # no CC starts with 0
# North American national formats: (415) 555-0132, 415-555-0132, 415.555.0132, 1-800-555-0199.
# Separators are required (a bare 10-digit integer is not a phone) and must be consistent.
_PHONE_US = re.compile(
    r"""(?:
          \((?<![\w.+(-]\()[2-9]\d{2}\)[ ]?[2-9]\d{2}[ .-]\d{4}
        | 1(?<![\w.+-]1)([ .-])[2-9]\d{2}\1[2-9]\d{2}\1\d{4}
        | [2-9](?<![\w.+-][2-9])\d{2}([.-])[2-9]\d{2}\2\d{4}
        )(?![\w])(?![ .-]\d)""",
    _A | re.VERBOSE,
)
# Neither national format may sit inside a longer run of digit groups ("3703 015054 18247" is an
# Amex-shaped number): no " digit" right after, and no all-digit group right before
# (`_after_digit_group`, checked in Python because it needs a variable-length look-behind).
# European national formats with a trunk "0": 020 7946 0958, 07700 900123, 030 12345678,
# 0171/1234567, 06 12 34 56 78, 01.23.45.67.89. Total digits checked in Python (10-12).
_PHONE_EU = re.compile(
    r"""0(?<![\w.+/-]0)(?:
          [1-9]([ .])\d{2}(?:\1\d{2}){3}
        | [1-9]\d{1,4}[ /-]\d{2,8}(?:[ -]\d{2,8}){0,2}
        )(?![\w])(?![ ./-]\d)""",
    _A | re.VERBOSE,
)

# ---- IP addresses -----------------------------------------------------------------------------
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?![\w])(?!\.\d)", _A)
# An IPv4-shaped string is a version, section or OID number, not an address, when the word right
# before it says so ("version 2.0.0.1", "AssemblyVersion(\"1.0.0.0\")", "section 8.2.4.45",
# "OID 1.3.6.1"). The word is compared whole (the last camelCase/snake_case part of the identifier
# before the number), never as a suffix: "server", "resolver", "failover" and "driver" end in
# "ver" but name hosts. `user@1.2.3.4` is an SSH/SMTP target, so "@" is no version marker.
_NUMBERING_WORDS = frozenset(
    {"v", "ver", "version", "versions", "release", "build", "rev", "revision",
     "section", "sections", "chapter", "clause", "paragraph", "oid"}
)
_NUMBERING_MARKS = ("==", "!=", ">=", "<=", "~=", "§")  # pip requirement specifiers; the section sign
_BETWEEN_WORD_AND_NUMBER = " \t\"'([:=-"  # "version: 1.2.3.4", 'version="1.2.3.4"', "release-1.2.3.4"
_LAST_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}\.?\Z", _A)  # "ver." and "v." keep their dot
_NUMBERING_LOOKBACK = 80
# IPv6 candidates: hex groups and colons, optional embedded IPv4 tail and zone id; validated by
# `ipaddress`, which rejects times (10:30:00) and MACs. Located from a ":" followed by at most 4
# hex digits and another ":" (a literal-first search, fast), then matched from the group start.
_IPV6_SEED = re.compile(r":[0-9A-Fa-f]{0,4}:", _A)
# Bounded (an IPv6 address has at most 39 hex/colon characters) so it cannot backtrack far.
_IPV6 = re.compile(r"[0-9A-Fa-f:]{2,39}(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?:%[\w.-]{1,16})?(?![\w:])(?!\.\w)", _A)
_HEX = frozenset("0123456789abcdefABCDEF")
_HEX_COLON = frozenset("0123456789abcdefABCDEF:")
# Ranges kept when keep_private_ips: they identify no one outside the local network, the
# benchmarking range (RFC 2544) is never routed, and the documentation ranges (RFC 5737, RFC 3849,
# RFC 9637) are example addresses by definition. Spelled out rather than using `is_private`, whose
# contents changed between Python patch releases.
_PRIVATE_NETS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16",
        "100.64.0.0/10", "198.18.0.0/15", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",
        "::1/128", "fc00::/7", "fe80::/10", "2001:db8::/32", "3fff::/20",
    )
)
# Never redacted: they are not host addresses (unspecified, multicast, reserved/broadcast, which
# also covers netmasks such as 255.255.255.0).
_NON_HOST_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4", "::/128", "ff00::/8")
)

# ---- credit cards -----------------------------------------------------------------------------
# Like the national phone formats, a card may not continue a run of digit groups
# (`_after_digit_group`). A trailing group is allowed: "4111 1111 1111 1111 12/25" has an expiry.
_CARD = re.compile(
    r"""\d(?<![\w.,-]\d)(?:
          \d{3}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?   # 4-4-4-4(-3)
        | \d{3}([ -])\d{6}\2\d{4,5}                    # Amex 4-6-5, Diners 4-6-4
        | \d{12,18}                                    # unseparated 13-19 digits
        )(?![\w-])(?![.,]\d)""",
    _A | re.VERBOSE,
)


# Every candidate of the digit-based detectors (cards, SSNs, IBANs, IPv4, national phone formats)
# contains a run of 7+ digits/separators. One scan for such runs, then the specific patterns run
# only in windows around them: typical text pays for one character-class scan instead of six.
_NUMERIC_RUN = re.compile(r"[\d(][\d .()/-]{5,64}\d", _A)  # bounded: no quadratic backtracking
_WINDOW_MARGIN = 40  # > longest IBAN (34) + look-around; a window must not cut a candidate


def _numeric_windows(text: str) -> list[tuple[int, int]]:
    windows: list[tuple[int, int]] = []
    n = len(text)
    for m in _NUMERIC_RUN.finditer(text):
        s, e = max(0, m.start() - _WINDOW_MARGIN), min(n, m.end() + _WINDOW_MARGIN)
        if windows and s <= windows[-1][1]:
            windows[-1] = (windows[-1][0], e)
        else:
            windows.append((s, e))
    return windows


def _ipv4(dotted: str) -> ipaddress.IPv4Address | None:
    """The address, or None when an octet is over 255. Zero-padded octets ("008.008.008.008", as
    some logs write them) are read as decimal: `ipaddress` refuses them as possibly octal."""
    octets = [int(o) for o in dotted.split(".")]
    if any(o > 255 for o in octets):
        return None
    return ipaddress.IPv4Address(bytes(octets))


def _numbering_context(text: str, start: int) -> bool:
    """True when the IPv4-shaped string at `start` follows a version/section/OID word or mark."""
    before = text[max(0, start - _NUMBERING_LOOKBACK):start].rstrip(" \t\"'([")
    if before.endswith(_NUMBERING_MARKS):
        return True
    word = _LAST_WORD.search(before.rstrip(_BETWEEN_WORD_AND_NUMBER))
    if word is None:
        return False
    parts = _CAMEL.findall(word.group().rstrip(".").replace("_", " "))
    return bool(parts) and parts[-1].lower() in _NUMBERING_WORDS


def _after_digit_group(text: str, start: int) -> bool:
    """True when text[start] continues "... 1234 " -- an all-digit group and a space -- so the
    candidate is the tail of a longer number. "mc2 2223..." (a word ending in a digit) is not."""
    i = start - 1
    if i < 1 or text[i] != " " or not text[i - 1].isdigit():
        return False
    i -= 1
    while i >= 0 and text[i].isdigit():
        i -= 1
    return i < 0 or not (text[i].isalnum() or text[i] == "_")


def card_brand_ok(digits: str) -> bool:
    """Known issuer prefix (IIN) with a length that issuer uses."""
    n = len(digits)
    p2, p3, p4, p6 = int(digits[:2]), int(digits[:3]), int(digits[:4]), int(digits[:6])
    if digits[0] == "4":  # Visa
        return n in (13, 16, 19)
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:  # Mastercard
        return n == 16
    if p2 in (34, 37):  # American Express
        return n == 15
    if p4 == 6011 or 644 <= p3 <= 649 or p2 == 65 or 622126 <= p6 <= 622925:  # Discover
        return 16 <= n <= 19
    if 3528 <= p4 <= 3589:  # JCB
        return 16 <= n <= 19
    if p2 == 36 or 300 <= p3 <= 305 or p2 in (38, 39):  # Diners Club
        return 14 <= n <= 19
    if p2 == 62:  # UnionPay
        return 16 <= n <= 19
    if p4 in (5018, 5020, 5038, 5893, 6304, 6759, 6761, 6762, 6763):  # Maestro
        return 12 <= n <= 19
    return False


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# ---- IBAN -------------------------------------------------------------------------------------
# ISO 13616 lengths per country (SWIFT IBAN registry).
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}
_IBAN = re.compile(r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z]\d{2}(?:[ ]?[A-Z0-9]){10,30}", _A)


def iban_ok(compact: str) -> bool:
    """Country length table + ISO 7064 mod-97 check (`compact`: no spaces, upper case)."""
    if IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


# ---- US SSN -----------------------------------------------------------------------------------
_SSN = re.compile(r"\d(?<![\w.-]\d)(\d{2})-(\d{2})-(\d{4})(?![\w-])(?!\.\d)", _A)


def ssn_ok(area: str, group: str, serial: str) -> bool:
    """SSA rules: area not 000, 666 or 900-999; group not 00; serial not 0000."""
    return area != "000" and area != "666" and area[0] != "9" and group != "00" and serial != "0000"


# ---- secrets: self-identifying token formats ---------------------------------------------------
# Each pattern starts with a literal, so CPython searches for it at memory speed; the left boundary
# (no token character just before) is checked in Python. `back` is how many characters of the
# token precede the match (Stripe's "sk"/"rk"/"pk" before the literal "k_live_").
_TOKEN_PATTERNS: tuple[tuple[re.Pattern[str], int], ...] = tuple(
    (re.compile(p, _A), back)
    for p, back in (
        (r"AKIA[A-Z0-9]{16}(?![A-Za-z0-9])", 0),  # AWS access key id (long-term)
        (r"ASIA[A-Z0-9]{16}(?![A-Za-z0-9])", 0),  # AWS access key id (temporary)
        (r"gh[pousr]_[A-Za-z0-9]{36,251}(?![A-Za-z0-9_])", 0),  # GitHub classic tokens
        (r"github_pat_[A-Za-z0-9_]{22,255}(?![A-Za-z0-9_])", 0),  # GitHub fine-grained
        (r"glpat-[A-Za-z0-9_-]{20,64}(?![A-Za-z0-9_-])", 0),  # GitLab personal access token
        (r"xox[baprs]-[A-Za-z0-9-]{10,250}(?![A-Za-z0-9-])", 0),  # Slack
        (r"xapp-\d-[A-Za-z0-9-]{10,250}(?![A-Za-z0-9-])", 0),  # Slack app-level
        (r"hooks\.slack\.com/services/[A-Za-z0-9]+/[A-Za-z0-9]+/[A-Za-z0-9]{16,}", 0),  # webhook
        (r"k_(?:live|test)_[A-Za-z0-9]{10,247}(?![A-Za-z0-9_])", 1),  # Stripe sk_/rk_/pk_
        (r"AIza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])", 0),  # Google API key
        (r"hf_[A-Za-z0-9]{30,64}(?![A-Za-z0-9_])", 0),  # Hugging Face access token
    )
)
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
# OpenAI / Anthropic style: sk-..., sk-proj-..., sk-ant-api03-...; the random body must mix upper,
# lower and digits, so that "sk-learn-compatible" and other prose identifiers are left alone.
_SK_KEY = re.compile(
    r"s(?<![A-Za-z0-9_-]s)k-((?:proj|svcacct|admin|ant-api\d\d|ant)-)?([A-Za-z0-9_-]{20,200})(?![A-Za-z0-9_-])", _A
)
# JWT: "eyJ" (base64 of '{"') starts the header; the whole run of base64url characters and dots
# is taken in one linear step and then split, instead of a pattern that backtracks per "eyJ".
_B64URL_DOT_RUN = re.compile(r"[A-Za-z0-9_.-]+", _A)
# PEM private keys: the whole block, BEGIN..END. Without an END line (truncated paste) the BEGIN
# line and the base64/header lines after it. Newlines may be literal "\n" (keys inside JSON).
_PEM_BEGIN = re.compile(r"-----BEGIN[A-Z0-9 ]{0,40} PRIVATE KEY(?: BLOCK)?-----", _A)
_PEM_END = re.compile(r"-----END[A-Z0-9 ]{0,40} PRIVATE KEY(?: BLOCK)?-----", _A)
# A body line ends at a newline, or at the closing quote of a string holding the key ("...\\nMIIE").
_PEM_BODY_LINE = re.compile(
    r"(?:\r?\n|\\n)[ \t]*(?:[A-Za-z0-9+/=]{1,128}|[A-Za-z-]{1,32}: [^\r\n\\]{0,128})(?=\r?\n|\\n|\Z|[\"'])", _A
)
_PEM_MAX = 65536  # a private key block is a few KB; never scan further for its END line

# scheme://user:PASSWORD@host -- only the password is replaced.
_URL_PASSWORD = re.compile(r"://[^\s/?#@:\"'<>]{0,256}:([^\s/?#@\"'<>]{1,256})@(?=[A-Za-z0-9\[])", _A)

# ---- secrets: assignment context ---------------------------------------------------------------
# Cheap trigger: a fragment of a secret-looking key name. Each hit is expanded to the whole
# identifier, whose parts are then checked (`_secret_key_strength`).
_KEY_WORDS = ("pass", "pw", "secret", "token", "key", "credential", "auth")
_KEY_TRIGGER = re.compile("|".join(_KEY_WORDS), re.IGNORECASE | _A)
_IDENT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
# After the identifier: optional closing quote, optional type annotation (`api_key: str = ...`),
# an assignment operator, then a quoted or bare value.
_ASSIGN = re.compile(
    r"""["'`]?[ \t]*
        (?::[ \t]*[A-Za-z_][\w.\[\]| ]{0,40}?[ \t]*(?==))?
        (?::=|=>|\?=|=|:)[ \t]*
        (?:(?P<q>["'`])(?P<qv>[^\n"'`]{1,1024})(?P=q)
          |(?P<bv>[^\s"'`,;&)}\]<>]{1,1024}))""",
    re.VERBOSE | _A,
)
# Command-line flags: `--password hunter2...` (whitespace instead of an operator).
_FLAG_VALUE = re.compile(r"[ \t]+(?P<bv>[^\s\"'`,;&)}\]<>-][^\s\"'`,;&)}\]<>]{0,1023})", _A)
# `Authorization: Bearer <token>` / `Basic <b64>` / `token <token>` in headers and curl commands.
_AUTH_HEADER = re.compile(
    r"(?i:authorization)[\"']?[ \t]*[:=][ \t]*[\"']?(?i:bearer|basic|token|bot)[ \t]+([A-Za-z0-9._~+/=-]{12,4096})", _A
)
_CAMEL = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", _A)
_STRONG_PARTS = frozenset({"password", "passwd", "pwd", "pass", "passphrase", "pw"})
_SECRET_PARTS = frozenset({"secret", "token", "credential", "credentials", "apikey", "bearer"})
_STRONG_SUFFIXES = ("password", "passwd", "passphrase")
_SECRET_SUFFIXES = ("secret", "token", "apikey", "privatekey", "accesskey", "secretkey", "credentials")
_KEY_QUALIFIERS = frozenset(
    {"api", "access", "secret", "private", "auth", "signing", "encryption", "master", "client",
     "app", "account", "service", "session", "shared", "sas", "license", "subscription", "deploy"}
)
ENTROPY_THRESHOLD = 3.0  # bits per character; random base62 of length 12 has ~3.4
# For password fields (a weak, repetitive password is still a password: "hunter2hunter2") and for
# values mixing upper case, lower case and digits.
WEAK_ENTROPY_THRESHOLD = 2.5
MIN_SECRET_LEN = 12
_PLACEHOLDER = re.compile(
    r"change.?me|your[_ -]|example|placeholder|dummy|redacted|sample|xxxx|\*\*\*|\.\.\.|"
    r"todo|fixme|replace|insert|<|>|\$\{|\{\{|%\(|\bnone\b|\bnull\b",
    re.IGNORECASE | _A,
)
_VAR_REF = re.compile(r"\$[A-Za-z_]\w*|\{[\w.]*\}|%\w+%|(.)\1+", _A)  # $VAR, {name}, %VAR%, "aaaa"
# Paths start with a path prefix or end in a file extension; base64 secrets also contain "/",
# but have long segments mixing upper case, lower case and digits, which path names rarely do.
_PATH = re.compile(r"(?:/|\./|\.\./|~/|[A-Za-z]:\\|\\\\)\S*|[\w.-]+(?:[/\\][\w.-]+)+\.[A-Za-z]\w{0,4}", _A)
_RANDOM_SEGMENT = re.compile(r"(?=[^/\\]*[A-Z])(?=[^/\\]*[a-z])(?=[^/\\]*\d)[^/\\]{12,}", _A)
_DOTTED_REF = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+|[A-Za-z_][A-Za-z_]*", _A)
_SLUG = re.compile(r"[a-z]+(?:[-_.][a-z]+)*", _A)


def shannon_entropy(s: str) -> float:
    """Bits per character of the string's own character distribution."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values()) if n else 0.0


def _secret_key_strength(ident: str) -> int:
    """0: not a secret-looking key name; 1: secret/token/api key...; 2: a password field."""
    parts = [p.lower() for p in _CAMEL.findall(ident.replace("-", "_").replace(".", "_"))]
    strength = 0
    for i, p in enumerate(parts):
        # Whole parts, or a secret word closing a run-together part ("REFRESHTOKEN", "dbpassword");
        # not a prefix, so "tokenizer" and "passthrough" stay ordinary names.
        if p in _STRONG_PARTS or p.endswith(_STRONG_SUFFIXES):
            return 2
        if (p in _SECRET_PARTS or p.endswith(_SECRET_SUFFIXES)
                or (p == "key" and i and parts[i - 1] in _KEY_QUALIFIERS)):
            strength = 1
    return strength


def looks_like_secret_value(value: str, strength: int, quoted: bool) -> bool:
    """Whether a value assigned to a secret-looking key is plausibly a real secret.

    Rejects placeholders ("changeme", "${VAR}", "<your-key>", "xxxx"), paths, URLs, references to
    other variables (unquoted `settings.API_KEY`), messages (whitespace) and low-entropy strings.
    """
    if len(value) < MIN_SECRET_LEN or any(c.isspace() for c in value):
        return False
    if "://" in value or _PLACEHOLDER.search(value) or _VAR_REF.fullmatch(value):
        return False
    if _PATH.fullmatch(value) and not any(_RANDOM_SEGMENT.fullmatch(seg) for seg in re.split(r"[/\\]", value)):
        return False
    if value.isdigit():
        return False
    if not quoted and ("(" in value or "[" in value or _DOTTED_REF.fullmatch(value)):
        return False  # code: a call, an index or a reference, not a literal
    if strength < 2 and _SLUG.fullmatch(value):
        return False  # "my-app-prod-secret" names a secret; a password field's slug IS one
    # Short random keys can repeat characters by chance (12 chars: ~3.0 bits); mixing upper case,
    # lower case and digits is itself a strong sign of a generated value.
    weak_ok = strength >= 2 or _mixed(value)
    return shannon_entropy(value) >= (WEAK_ENTROPY_THRESHOLD if weak_ok else ENTROPY_THRESHOLD)


def _find_all(haystack: str, needle: str) -> Iterator[int]:
    i = haystack.find(needle)
    while i >= 0:
        yield i
        i = haystack.find(needle, i + 1)


def _jwt_ok(header: str) -> bool:
    """The first segment decodes (base64url) to a JSON object with an "alg" member."""
    try:
        decoded = parse_json(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)), ValueError, "jwt")
    except (binascii.Error, ValueError):
        return False
    return isinstance(decoded, dict) and "alg" in decoded


def _jwts(text: str) -> Iterator[Finding]:
    pos = 0
    while (i := text.find("eyJ", pos)) >= 0:
        if i and text[i - 1] in _TOKEN_CHARS:
            pos = i + 3
            continue
        run = _B64URL_DOT_RUN.match(text, i)
        assert run is not None
        end = run.end()
        while end > i and text[end - 1] == ".":  # a sentence's full stop after the token
            end -= 1
        # "alg":"none" tokens end in a dot (empty signature): keep one if the run had it.
        if text[end:end + 1] == "." and text[i:end].count(".") == 1:
            end += 1
        segments = text[i:end].split(".")
        if 3 <= len(segments) <= 5 and len(segments[0]) >= 8 and segments[1] and _jwt_ok(segments[0]):
            yield Finding(SECRET, i, end)
        pos = run.end()


def _pem_blocks(text: str) -> Iterator[Finding]:
    pos = 0
    # The first END line after the current BEGIN; searched again only once passed, and never
    # again once there is none, so many BEGINs without END cost one scan, not one each.
    next_end: re.Match[str] | None = None
    no_more_end = False
    while (begin := _PEM_BEGIN.search(text, pos)) is not None:
        if not no_more_end and (next_end is None or next_end.start() < begin.end()):
            next_end = _PEM_END.search(text, begin.end())
            no_more_end = next_end is None
        nb = _PEM_BEGIN.search(text, begin.end())  # an END after the next BEGIN is not ours
        if (next_end is not None and next_end.start() - begin.end() <= _PEM_MAX
                and (nb is None or nb.start() > next_end.start())):
            end = next_end.end()
        else:
            end = begin.end()
            while (line := _PEM_BODY_LINE.match(text, end)) is not None:
                end = line.end()
            if end == begin.end():  # a BEGIN line alone ("if line.startswith(...)") holds no key
                pos = end
                continue
        yield Finding(SECRET, begin.start(), end)
        pos = end


def _mixed(s: str) -> bool:
    return any(c.isupper() for c in s) and any(c.islower() for c in s) and any(c.isdigit() for c in s)


# ---- names (optional, Presidio) ----------------------------------------------------------------
_PRESIDIO_HINT = (
    "sanitize.names is on, but person-name detection needs Microsoft Presidio, which is not "
    "installed: pip install 'bastion[presidio]' (presidio-analyzer) and a spaCy English model "
    "(python -m spacy download en_core_web_lg), or set sanitize.names: false"
)


class _NameDetector:
    """Presidio PERSON entities. Imported only when `names` is on; calls serialised by a lock
    because spaCy pipelines are not documented as thread-safe."""

    def __init__(self) -> None:
        import importlib.util

        try:
            from presidio_analyzer import AnalyzerEngine
            from presidio_analyzer.nlp_engine import NlpEngineProvider
        except ImportError as e:
            raise DataError(_PRESIDIO_HINT) from e
        # Presidio would otherwise download a missing spaCy model at run time; refuse instead.
        model = next((m for m in ("en_core_web_lg", "en_core_web_md", "en_core_web_sm", "en_core_web_trf")
                      if importlib.util.find_spec(m) is not None), None)
        if model is None:
            raise DataError(_PRESIDIO_HINT)
        nlp = NlpEngineProvider(nlp_configuration={
            "nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": model}],
        }).create_engine()
        self._engine = AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])
        self._lock = threading.Lock()

    def find(self, text: str) -> list[Finding]:
        with self._lock:
            results = self._engine.analyze(text=text, entities=["PERSON"], language="en")
        return [Finding(NAME, r.start, r.end) for r in results if r.end > r.start]


# ---- the redactor ------------------------------------------------------------------------------


class Redactor:
    """Finds and replaces PII and secrets according to a `SanitizeConfig`.

    >>> Redactor(SanitizeConfig()).redact("mail bob@example.com")
    ('mail <EMAIL>', Counter({'EMAIL': 1}))
    """

    def __init__(self, cfg: SanitizeConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else SanitizeConfig()
        self._names = _NameDetector() if (self.cfg.enabled and self.cfg.names) else None

    # -- public API --

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        """`text` with every finding replaced by its placeholder, and the counts per category."""
        findings = self.find(text)
        counts: Counter[str] = Counter()
        if not findings:
            return text, counts
        parts: list[str] = []
        pos = len(text)
        for f in reversed(findings):  # right to left: earlier offsets stay valid
            parts.append(text[f.end:pos])
            parts.append(placeholder(f.category))
            pos = f.start
            counts[f.category] += 1
        parts.append(text[:pos])
        return "".join(reversed(parts)), counts

    def find(self, text: str) -> list[Finding]:
        """Non-overlapping findings sorted by start offset."""
        cfg = self.cfg
        if not cfg.enabled or not text:
            return []
        cands: list[Finding] = []
        if cfg.secrets:
            cands.extend(self._secrets(text))
        if cfg.emails and "@" in text:
            cands.extend(self._emails(text))
        if cfg.phones and "+" in text:
            cands.extend(self._intl_phones(text))
        if cfg.credit_cards or cfg.national_ids or cfg.ibans or cfg.ip_addresses or cfg.phones:
            # Windows are disjoint, so each candidate is seen once.
            for ws, we in _numeric_windows(text):
                cands.extend(self._numeric(text, ws, we))
        if cfg.ip_addresses and ("::" in text or text.count(":") >= 7):
            cands.extend(self._ipv6s(text, cfg.keep_private_ips))
        if self._names is not None:
            cands.extend(self._names.find(text))
        return _resolve(cands)

    # -- detectors --

    def _secrets(self, text: str) -> Iterator[Finding]:
        for pattern, back in _TOKEN_PATTERNS:
            for m in pattern.finditer(text):
                start = m.start() - back
                if start < 0 or (back and text[start] not in "srp"):
                    continue
                if start == 0 or text[start - 1] not in _TOKEN_CHARS:
                    yield Finding(SECRET, start, m.end())
        if "sk-" in text:
            for m in _SK_KEY.finditer(text):
                if _mixed(m.group(2)):
                    yield Finding(SECRET, m.start(), m.end())
        if "eyJ" in text:
            yield from _jwts(text)
        if "PRIVATE KEY" in text:
            yield from _pem_blocks(text)
        if "://" in text:
            for m in _URL_PASSWORD.finditer(text):
                pw = m.group(1)
                if not (_PLACEHOLDER.search(pw) or _VAR_REF.fullmatch(pw)):
                    yield Finding(SECRET, m.start(1), m.end(1))
        yield from self._assignments(text)

    def _assignments(self, text: str) -> Iterator[Finding]:
        # Trigger words are found with str.find on a lower-cased copy (GB/s) rather than a
        # case-insensitive regex (~10 MB/s). str.lower() can change the length of a few non-ASCII
        # strings ("İ"), in which case offsets would not line up: fall back to the regex.
        low = text.lower()
        if len(low) == len(text):
            hits = sorted(i for word in _KEY_WORDS for i in _find_all(low, word))
        else:
            hits = [m.start() for m in _KEY_TRIGGER.finditer(text)]
        done = -1  # end of the last identifier examined: one identifier can hold several triggers
        n = len(text)
        for hit in hits:
            if hit < done:
                continue
            s = e = hit
            while s > 0 and text[s - 1] in _IDENT_CHARS:
                s -= 1
            while e < n and text[e] in _IDENT_CHARS:
                e += 1
            done = e
            # Cheap peek before any real work: an assignment operator (after an optional closing
            # quote and blanks), or a --flag. Most trigger hits ("key" in prose/code) stop here.
            j = e + 1 if e < n and text[e] in "\"'`" else e
            while j < n and text[j] in " \t":
                j += 1
            flag = text.startswith("--", s)
            if j >= n or (text[j] not in ":=?" and not (flag and j > e)):
                continue
            ident = text[s:e].strip(".-")
            if ident.lower().endswith("authorization"):
                a = _AUTH_HEADER.match(text, e - len("authorization"))
                if a and not _PLACEHOLDER.search(a.group(1)):
                    yield Finding(SECRET, a.start(1), a.end(1))
                continue
            strength = _secret_key_strength(ident)
            if not strength:
                continue
            a = _ASSIGN.match(text, e)
            if a is None and flag:
                a = _FLAG_VALUE.match(text, e)
            if a is None:
                continue
            group = "qv" if a.groupdict().get("qv") is not None else "bv"
            value = a.group(group)
            # Trigger words inside a value already examined are not keys of their own; skipping
            # them keeps "api_key=api_key=api_key=..." linear instead of 1 KB of work per key.
            done = a.end(group)
            if looks_like_secret_value(value, strength, quoted=group == "qv"):
                yield Finding(SECRET, a.start(group), a.end(group))

    def _emails(self, text: str) -> Iterator[Finding]:
        has_url = "://" in text  # once, not per email: a text full of emails stays linear
        for m in _EMAIL_DOMAIN.finditer(text):
            tld = m.group(2).lower()
            if tld not in (_COUNTRY_TLDS if len(tld) == 2 else _GENERIC_TLDS):
                continue
            at = m.start()
            s = at
            while s > 0 and at - s < 64 and text[s - 1] in _EMAIL_LOCAL_CHARS:
                s -= 1
            while s < at and text[s] == ".":
                s += 1
            if s == at or text[at - 1] == ".":
                continue
            # user@host inside a URL's userinfo is a login, handled by the URL-password rule.
            if has_url and _URL_USERINFO_BEFORE.search(text, max(0, at - 520), at):
                continue
            if text[s:at] == "git" and m.end() < len(text) and text[m.end()] == ":":
                continue  # git@github.com:org/repo.git is an SSH remote, not a person
            yield Finding(EMAIL, s, m.end())

    def _numeric(self, text: str, ws: int, we: int) -> list[Finding]:
        """The digit-based detectors, run on text[ws:we] (look-behinds still see before ws)."""
        cfg = self.cfg
        out: list[Finding] = []
        # IBAN-shaped strings whose checksum fails are not redacted, but the digits inside them
        # are not phones or cards either ("NL79 HVMI 0981 0885 91" holds a phone-like "0981...").
        shaped: list[tuple[int, int]] = []
        for start, end, valid in self._iban_candidates(text, ws, we):
            if valid and cfg.ibans:
                out.append(Finding(IBAN, start, end))
            elif not valid:
                shaped.append((start, end))
        if cfg.credit_cards:
            for m in _CARD.finditer(text, ws, we):
                digits = m.group().replace(" ", "").replace("-", "")
                if (13 <= len(digits) <= 19 and card_brand_ok(digits) and luhn_ok(digits)
                        and not _after_digit_group(text, m.start())):
                    out.append(Finding(CREDIT_CARD, m.start(), m.end()))
        if cfg.national_ids:
            for m in _SSN.finditer(text, ws, we):
                if ssn_ok(text[m.start():m.start() + 3], m.group(2), m.group(3)):
                    out.append(Finding(NATIONAL_ID, m.start(), m.end()))
        if cfg.ip_addresses:
            for m in _IPV4.finditer(text, ws, we):
                if _numbering_context(text, m.start()):
                    continue
                addr = _ipv4(m.group())
                if addr is not None and self._ip_redactable(addr, cfg.keep_private_ips):
                    out.append(Finding(IP, m.start(), m.end()))
        if cfg.phones:
            for m in _PHONE_US.finditer(text, ws, we):
                if not _after_digit_group(text, m.start()):
                    out.append(Finding(PHONE, m.start(), m.end()))
            for m in _PHONE_EU.finditer(text, ws, we):
                if 10 <= sum(c.isdigit() for c in m.group()) <= 12 and not _after_digit_group(text, m.start()):
                    out.append(Finding(PHONE, m.start(), m.end()))
        if shaped:
            out = [f for f in out if not any(s < f.end and f.start < e for s, e in shaped)]
        return out

    def _iban_candidates(self, text: str, ws: int, we: int) -> Iterator[tuple[int, int, bool]]:
        """(start, end, checksum ok) of every string shaped like an IBAN of a known country."""
        for m in _IBAN.finditer(text, ws, we):
            want = IBAN_LENGTHS.get(m.group()[:2])
            if want is None:
                continue
            # The candidate is greedy; cut it at the country's length, then check the boundary.
            chars, end = 0, m.start()
            for i in range(m.start(), m.end()):
                if text[i] != " ":
                    chars += 1
                    if chars == want:
                        end = i + 1
                        break
            if chars != want or (end < len(text) and text[end].isalnum()):
                continue
            yield m.start(), end, iban_ok(text[m.start():end].replace(" ", ""))

    def _intl_phones(self, text: str) -> Iterator[Finding]:
        for m in _PHONE_INTL.finditer(text):
            if _intl_phone_ok(m.group()):
                yield Finding(PHONE, m.start(), m.end())

    def _ipv6s(self, text: str, keep_private: bool) -> Iterator[Finding]:
        n = len(text)
        pos = 0
        while (seed := _IPV6_SEED.search(text, pos)) is not None:
            start = seed.start()
            while start > 0 and seed.start() - start < 4 and text[start - 1] in _HEX:
                start -= 1
            # Skip the whole hex/colon run afterwards, whatever happens: linear time overall.
            run_end = seed.end()
            while run_end < n and text[run_end] in _HEX_COLON:
                run_end += 1
            pos = run_end
            if start > 0 and (text[start - 1] in _IDENT_CHARS or text[start - 1] == ":"):
                continue
            m = _IPV6.match(text, start)
            if m is None or m.end() < run_end and text[m.end()] in _HEX_COLON:
                continue  # longer than any address
            end = m.end()
            after = text[end:end + 2]
            if after[:1].isalnum() or after[:1] == "_" or (after[:1] == "." and after[1:].isalnum()):
                continue  # part of a longer word, or a dotted name
            cand = m.group()
            groups = [g for g in cand.split("%")[0].split(":") if g]
            # Slices like x[1::2], C++/Rust scopes (a::b) and prefixes (2001::) parse as IPv6; host
            # addresses in compressed form have 3+ groups, or 2 with a full 4-digit one (fe80::1).
            if len(groups) < 2 or (len(groups) == 2 and not any(len(g) == 4 for g in groups)):
                continue
            try:
                addr = ipaddress.IPv6Address(cand)
            except ValueError:
                continue
            if self._ip_redactable(addr, keep_private):
                yield Finding(IP, m.start(), m.end())

    @staticmethod
    def _ip_redactable(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, keep_private: bool) -> bool:
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if any(addr in net for net in _NON_HOST_NETS if net.version == addr.version):
            return False
        return not (keep_private and any(addr in net for net in _PRIVATE_NETS if net.version == addr.version))


_GROUP_SPLIT = re.compile(r"[ ().-]+")


def _intl_phone_ok(cand: str) -> bool:
    """8-15 digits; no doubled separators; at most one single-digit group after the country code
    (as in +33 1 23 45 67 89) and never last, so "+1 2 3 4 5 6 7 8" or "+3523.6" is not a phone."""
    if cand.count("(") != cand.count(")") or "--" in cand or ".." in cand or "  " in cand:
        return False
    if cand.count(".") == 1 and not any(c in cand for c in " ()-"):
        return False  # "+48.858370": a signed decimal (a coordinate), not "+CC.number"
    groups = [g for g in _GROUP_SPLIT.split(cand[1:]) if g]
    digits = sum(len(g) for g in groups)
    if not 8 <= digits <= 15:
        return False
    if len(groups) > 1 and (sum(len(g) == 1 for g in groups[1:]) > 1 or len(groups[-1]) < 2):
        return False  # "+35236450.6" is a decimal, not a phone
    return len(groups) <= 7


def _resolve(cands: list[Finding]) -> list[Finding]:
    """Keep the longest (then most specific, then leftmost) of any overlapping findings.

    Candidates are split into clusters of transitively overlapping spans in one sweep; only
    inside a cluster (almost always a single span) is the greedy longest-first choice made, so
    the cost stays linear in the number of findings.
    """
    if len(cands) <= 1:
        return cands
    cands = sorted(set(cands), key=lambda f: (f.start, -f.end))
    out: list[Finding] = []
    cluster: list[Finding] = []
    cluster_end = -1
    for f in cands:
        if cluster and f.start >= cluster_end:
            out.extend(_pick(cluster))
            cluster = []
        cluster.append(f)
        cluster_end = max(cluster_end, f.end) if len(cluster) > 1 else f.end
    out.extend(_pick(cluster))
    return out


def _pick(cluster: list[Finding]) -> list[Finding]:
    if len(cluster) == 1:
        return cluster
    chosen: list[Finding] = []
    for f in sorted(cluster, key=lambda f: (f.start - f.end, _PRIORITY[f.category], f.start)):
        if all(f.end <= c.start or c.end <= f.start for c in chosen):
            chosen.append(f)
    return sorted(chosen, key=lambda f: f.start)
