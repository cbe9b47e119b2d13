"""The chat page's files as the server sends them (routes, headers, auth, the off switch),
and what the shipped files may contain: nothing from another host, no inline code, no
HTML sinks for model output. The page driven in a real browser: test_chat_browser.py."""
import fnmatch
import re
from importlib import resources
from pathlib import Path

import httpx
import pytest
from serving import API_KEY, running

from bastion.config import build_config
from bastion.errors import ConfigError
from bastion.serve import chatpage

ENV = {"BASTION_API_KEYS": API_KEY}
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WEB = Path(str(resources.files("bastion.serve") / "web"))
ROOT = Path(__file__).resolve().parents[2]

# Written out, not imported: a change to the policy has to change this test too.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; require-trusted-types-for 'script'; "
       "trusted-types 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
           "x-frame-options": "DENY", "cross-origin-opener-policy": "same-origin",
           "cross-origin-resource-policy": "same-origin", "cache-control": "no-cache"}
TYPES = {"/": "text/html; charset=utf-8", "/chat.js": "text/javascript; charset=utf-8",
         "/chat.css": "text/css; charset=utf-8", "/favicon.svg": "image/svg+xml"}


@pytest.fixture(scope="module")
def keyed_server(serve_checkpoint):
    with running(serve_checkpoint, environ=ENV) as (url, state):
        yield url, state


def test_page_files_are_served_without_a_key_with_strict_headers(keyed_server):
    url, _ = keyed_server
    assert set(chatpage.PAGE_FILES) == set(TYPES)
    for path, media_type in TYPES.items():
        r = httpx.get(url + path)  # no key: the shell holds no data
        assert r.status_code == 200, (path, r.text)
        assert r.headers["content-type"] == media_type
        assert {name: r.headers.get(name) for name in HEADERS} == HEADERS, path
        assert r.content == (WEB / chatpage.PAGE_FILES[path][0]).read_bytes()


def test_the_api_the_page_calls_still_needs_the_key(keyed_server):
    url, state = keyed_server
    assert httpx.get(url + "/v1/models").status_code == 401
    body = {"model": state.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
    assert httpx.get(url + "/v1/models", headers=AUTH).status_code == 200
    for near in ("/index.html", "/chat.js/", "//chat.js", "/web/chat.js", "/chat.JS", "/favicon.ico"):
        assert httpx.get(url + near).status_code == 401, near  # exact paths only are open


def test_head_revalidation_and_other_methods(keyed_server):
    url, _ = keyed_server
    first = httpx.get(url + "/chat.js")
    head = httpx.head(url + "/chat.js")
    assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == first.headers["etag"]
    for tags in (first.headers["etag"], f'"other", W/{first.headers["etag"]}', "*"):
        again = httpx.get(url + "/chat.js", headers={"If-None-Match": tags})
        assert again.status_code == 304 and again.content == b"", tags
        assert again.headers["content-security-policy"] == CSP
    assert httpx.get(url + "/chat.js", headers={"If-None-Match": '"other"'}).status_code == 200
    for method in ("POST", "PUT", "DELETE"):
        r = httpx.request(method, url + "/", content=b"x")
        assert r.status_code == 405 and "error" in r.json(), method


def test_page_requests_are_counted_under_their_own_route(keyed_server):
    url, _ = keyed_server
    httpx.get(url + "/chat.css")
    metrics = httpx.get(url + "/metrics", headers=AUTH).text
    assert re.search(r'bastion_requests_total\{route="/chat.css",status="200"\} [1-9]', metrics)


@pytest.mark.parametrize("keys", [True, False])
def test_chat_page_off_is_an_unknown_route(serve_checkpoint, keys):
    with running(serve_checkpoint, environ=ENV if keys else {}, serve={"chat_page": False}) as (url, _):
        for path in TYPES:
            if keys:  # like any unknown route: 401 before the key, 404 after
                assert httpx.get(url + path).status_code == 401, path
            r = httpx.get(url + path, headers=AUTH if keys else {})
            assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found", path


def test_chat_page_option_is_a_checked_bool():
    assert build_config({}).serve.chat_page is True
    assert build_config({"serve": {"chat_page": False}}).serve.chat_page is False
    with pytest.raises(Exception, match="chat_page"):
        build_config({"serve": {"chat_page": "sometimes"}})


def test_a_missing_file_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(chatpage.PAGE_FILES, "/gone.js", ("gone.js", "text/javascript"))
    with pytest.raises(ConfigError, match=r"gone\.js is missing .* serve\.chat_page: false"):
        chatpage.load_page_files()


# ---- what the shipped files contain -----------------------------------------------------------

def shipped() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(WEB.iterdir()) if p.is_file()}


def test_every_shipped_file_is_served_and_packaged():
    names = set(shipped())
    assert names == {name for name, _ in chatpage.PAGE_FILES.values()}
    # A non-editable install (a wheel) carries them: pyproject's package-data globs cover each.
    # (Read with a pattern, not tomllib: that needs Python 3.11 and the project supports 3.10.)
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = re.search(r'^\[tool\.setuptools\.package-data\]\n"bastion\.serve" = \[(.*)\]$', pyproject, re.M)
    assert section, "pyproject.toml has no [tool.setuptools.package-data] entry for bastion.serve"
    globs = re.findall(r'"([^"]+)"', section.group(1))
    for name in names:
        assert any(fnmatch.fnmatch(f"web/{name}", glob) for glob in globs), name


# The one absolute URL allowed: the SVG namespace name, an identifier that is never fetched.
SVG_NAMESPACE = 'xmlns="http://www.w3.org/2000/svg"'


@pytest.mark.parametrize("name", sorted(shipped()))
def test_no_external_url_in_a_shipped_file(name):
    text = shipped()[name].replace(SVG_NAMESPACE, "") if name.endswith(".svg") else shipped()[name]
    assert not re.search(r"(?i)\b(https?|ftp|wss?):", text), name
    # Protocol-relative (//host/...) references in HTML, CSS or a string; `// ` comments are fine.
    assert not re.search(r"""(?i)(["'(=]\s*//\w|url\(\s*["']?//)""", text), name
    assert not re.search(r"(?i)@import|@font-face|fonts\.googleapis|cdn", text), name


def test_html_loads_only_the_shipped_files_and_has_no_inline_code():
    html = shipped()["index.html"]
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", html)
    assert sorted(refs) == ["/chat.css", "/chat.js", "/favicon.svg"]
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # every script is a file
    assert not re.search(r"<style|\sstyle\s*=|\son[a-z]+\s*=|javascript:", html, re.I)


def test_script_uses_no_html_sinks_and_calls_only_this_servers_api():
    js = shipped()["chat.js"]
    code = re.sub(r"^\s*//.*$", "", js, flags=re.M)  # the header comment names the sinks it avoids
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "setTimeout(\"", "localStorage", "sessionStorage", "document.cookie"):
        assert sink not in code, sink
    assert re.findall(r"""fetch\(\s*["'`]([^"'`]*)""", code) == ["/v1/models", "/v1/chat/completions"]
