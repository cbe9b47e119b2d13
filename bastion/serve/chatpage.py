"""The chat page (`serve.chat_page`, on by default): a web chat at `/`, from static files
shipped in the package (bastion/serve/web: HTML, CSS, vanilla JavaScript, an icon).

Auth: the files are served without a key. They are the same bytes on every server and
hold no data (no model name, no key, no configuration); a browser cannot send a bearer
token when it navigates to `/`, so a keyed shell would make the page unusable exactly when
keys are on. Everything the page shows comes from /v1/models and /v1/chat/completions,
which the page calls with the key the user types, through the same Guard as any client.

Every response carries a Content-Security-Policy that allows only this origin's own script,
style, image and fetch, with no inline code, no eval, no plugins, no framing, no <base> and
no form submission, and that makes Chromium refuse strings in HTML-parsing sinks
(Trusted Types with no policy: the page never uses innerHTML).
"""
from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import Response

from bastion.errors import ConfigError

# URL path -> (file in bastion/serve/web, Content-Type). Exact paths only: no directory is
# exposed, so nothing else in the package can be reached through them.
PAGE_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/chat.css": ("chat.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",  # anything not listed below: refused
    "script-src 'self'",  # /chat.js only: no inline scripts, no eval
    "style-src 'self'",  # /chat.css only: no inline styles
    "img-src 'self'",  # the icon
    "connect-src 'self'",  # fetch to this server's /v1 routes only: output cannot be sent elsewhere
    "base-uri 'none'",
    "form-action 'none'",  # the message form is handled by script, never submitted as a navigation
    "frame-ancestors 'none'",  # no clickjacking through a frame on another site
    "require-trusted-types-for 'script'",  # Chromium: innerHTML & co. refuse strings ...
    "trusted-types 'none'",  # ... and no policy may be created to get around that
])

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # Revalidate every time (a cheap 304 while the ETag matches): an upgraded server's page
    # is used at once, never a stale copy that talks to a changed API.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class PageFile:
    body: bytes
    media_type: str
    etag: str


def load_page_files() -> dict[str, PageFile]:
    """The page's files, read once from the installed package; ConfigError naming the
    missing file when the installation lacks one (a build that left out package data)."""
    folder = resources.files("bastion.serve") / "web"
    files = {}
    for path, (name, media_type) in PAGE_FILES.items():
        try:
            body = (folder / name).read_bytes()
        except OSError:
            raise ConfigError(f"serve.chat_page: {name} is missing from this installation of bastion (bastion/serve/"
                              "web); reinstall bastion, or set serve.chat_page: false") from None
        files[path] = PageFile(body, media_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"')
    return files


def add_chat_page(app: FastAPI) -> None:
    """Routes GET / HEAD for each of PAGE_FILES (anything else on those paths: 405)."""
    for path, page in load_page_files().items():
        app.add_api_route(path, _responder(page), methods=["GET", "HEAD"], include_in_schema=False)


def _responder(page: PageFile) -> Callable[[Request], Awaitable[Response]]:
    headers = {**SECURITY_HEADERS, "ETag": page.etag}

    async def serve_file(request: Request) -> Response:
        tags = _etags(request.headers.get("if-none-match"))
        if page.etag in tags or "*" in tags:
            return Response(status_code=304, headers=headers)
        return Response(page.body, media_type=page.media_type, headers=headers)

    return serve_file


def _etags(header: str | None) -> set[str]:
    """The entity tags of an If-None-Match header (weak ones compare as strong, RFC 9110)."""
    if not header:
        return set()
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}
