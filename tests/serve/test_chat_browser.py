"""The chat page in a real headless Chromium (Playwright) against a real `bastion serve`
process with API keys on: the key typed into the page, a message streamed into the
assistant bubble piece by piece, equal to the API's own greedy answer, the conversation
carried into the next request, an API error and a stop shown to the user, and not one
Content-Security-Policy violation or script error on the way.

Needs the `playwright` package and a Chromium binary (`make browser` installs both;
BASTION_CHROMIUM names another binary). Without them the test is skipped, saying why,
unless BASTION_REQUIRE_BROWSER=1 (CI), which turns the skip into a failure."""
import json
import os
import shutil
from collections import Counter

import httpx
import pytest
from serving import API_KEY
from test_server_process import serve_process

from bastion.serve import protocol as P

pytestmark = pytest.mark.browser

AUTH = {"Authorization": f"Bearer {API_KEY}"}
WAIT_MS = 120_000  # a loaded 2-core machine: generous, and every wait is for a condition
MAX_TOKENS = 24
# The page's stream is delivered at this rate (Chromium's network emulation), so that it
# reaches the page in many small network reads, events split mid-JSON included, whatever
# the machine's speed: the incremental rendering and the SSE reassembly are observed
# every run instead of depending on how TCP happened to batch the bytes.
BYTES_PER_SECOND = 2000

# Records what the assistant bubble showed at each DOM change (run in the page). Every
# script the test runs in the page is a function: Playwright evaluates a bare expression
# with eval(), which the page's CSP refuses (as it should).
OBSERVE = """() => {
  window.__seen = [];
  new MutationObserver(() => {
    const bubble = [...document.querySelectorAll('.msg.assistant')].pop();
    if (bubble) window.__seen.push([bubble.dataset.state, bubble.querySelector('.text').textContent]);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true,
                                                    attributes: true});
}"""
RECORD_CSP = """document.addEventListener('securitypolicyviolation', (e) => {
  (window.__violations = window.__violations || []).push(e.violatedDirective + ' ' + e.blockedURI);
});"""


def chromium_binary() -> str | None:
    named = os.environ.get("BASTION_CHROMIUM")
    if named:  # asked for by name: a wrong name is an error, never a silent fallback
        if (found := shutil.which(named)) is None:
            pytest.fail(f"BASTION_CHROMIUM={named} is not an executable file")
        return found
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package")
    binary = chromium_binary()
    if binary is None:
        missing.append("a Chromium binary (chromium on PATH, or BASTION_CHROMIUM)")
    if missing:
        reason = f"browser test needs {' and '.join(missing)}: run `make browser`"
        (pytest.fail if os.environ.get("BASTION_REQUIRE_BROWSER") == "1" else pytest.skip)(reason)
    # Chromium's sandbox cannot start as root (containers, CI); the page is our own, on loopback.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=binary, headless=True, args=args)
        yield b
        b.close()


@pytest.fixture(scope="module")
def chatty_checkpoint(tmp_path_factory):
    """A random tiny model with an untied output head: its greedy replies are varied text. (The
    session's tied model repeats the prompt's last token, the template's "\n": blank replies,
    which a conversation cannot carry as an assistant turn.)"""
    from helpers import make_base_checkpoint

    return make_base_checkpoint(tmp_path_factory.mktemp("chat-page") / "tiny", seed=1, tie_embeddings=False,
                                max_seq_len=512)


@pytest.fixture(scope="module")
def server(browser, chatty_checkpoint):
    args = ["--set", "generate.max_new_tokens_ceiling=64", "--set", "serve.rate_limit.requests_per_minute=10000"]
    with serve_process(chatty_checkpoint, *args, env={"BASTION_API_KEYS": API_KEY}) as (url, _):
        model = httpx.get(url + "/v1/models", headers=AUTH).json()["data"][0]["id"]
        yield url, model


def api_reply(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=AUTH, json=body, timeout=120)


def streamed_pieces(url: str, body: dict) -> list[str]:
    with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH, json={**body, "stream": True},
                      timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return [e["choices"][0]["delta"]["content"] for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]


def chat_body(model: str, messages: list[dict]) -> dict:
    """What the page sends with temperature 0, top_p 1 and MAX_TOKENS set in its inputs."""
    return {"model": model, "messages": messages, "stream": True, "temperature": 0, "top_p": 1,
            "max_tokens": MAX_TOKENS}


def talkative_message(url: str, model: str) -> str:
    """A message the tiny model answers greedily in several pieces, not all blank (some make
    it stop at once; a blank reply could not be sent back as the conversation's next turn)."""
    for text in ("hello", "greet kalomi", "the cats", "reverse: a b c", "tell me a story", "a", "go on"):
        pieces = streamed_pieces(url, chat_body(model, [{"role": "user", "content": text}]))
        if len(pieces) >= 4 and "".join(pieces).strip():
            return text
    pytest.skip("no message makes the tiny model answer in several pieces")


def test_chat_page_streams_a_reply_from_the_real_server(browser, server):
    url, model = server
    message = talkative_message(url, model)
    first_turn = [{"role": "user", "content": message}]
    expected = api_reply(url, {**chat_body(model, first_turn), "stream": False}).json()
    expected_text = expected["choices"][0]["message"]["content"]

    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    console_errors, script_errors, chat_requests = [], [], []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: script_errors.append(str(e)))
    page.on("request", lambda r: chat_requests.append(r) if r.url.endswith("/v1/chat/completions") else None)
    page.add_init_script(RECORD_CSP)
    page.goto(url + "/")

    # Keys are on: the page's first /v1/models call gets 401 and it asks for a key.
    page.wait_for_selector("#key-row:not([hidden])")
    assert "needs an API key" in page.text_content("#status")
    page.fill("#api-key", "bst_not-a-key")
    page.click("#use-key")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('a valid API key is required')")
    page.fill("#api-key", API_KEY)
    page.click("#use-key")
    page.wait_for_selector("#send:not([disabled])")
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == [model]

    page.fill("#temperature", "0")
    page.fill("#top-p", "1")
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.evaluate(OBSERVE)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "uploadThroughput": -1,
                                                  "downloadThroughput": BYTES_PER_SECOND})
    page.fill("#input", message)
    page.click("#send")
    final = finished_bubble(page)
    assert final == ("done", expected_text)

    # Streamed: the bubble showed growing prefixes of the reply while still streaming.
    seen = page.evaluate("window.__seen")
    partial = [text for state, text in seen if state == "streaming" and text]
    assert len(set(partial)) >= 2, seen
    assert all(expected_text.startswith(text) for text in partial) and partial == sorted(partial, key=len), seen
    sent = chat_requests[-1]
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert json.loads(sent.post_data) == chat_body(model, first_turn)

    # The conversation goes on: the next request carries both turns; the reply is the API's.
    second_turn = first_turn + [{"role": "assistant", "content": expected_text}, {"role": "user", "content": "and?"}]
    expected_second = api_reply(url, {**chat_body(model, second_turn), "stream": False}).json()
    page.fill("#input", "and?")
    page.press("#input", "Enter")
    assert finished_bubble(page) == ("done", expected_second["choices"][0]["message"]["content"])
    assert json.loads(chat_requests[-1].post_data)["messages"] == second_turn

    # A bad input is refused in the page, naming the field, and the message is kept to retry.
    requests_before = len(chat_requests)
    page.fill("#max-tokens", "0")
    page.fill("#input", message)
    page.click("#send")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('max tokens must be')")
    assert page.input_value("#input") == message and len(chat_requests) == requests_before

    # An API error reaches the user as the server worded it.
    too_many = {**chat_body(model, first_turn), "max_tokens": 100_000}
    refusal = api_reply(url, too_many)
    assert refusal.status_code == 400
    page.fill("#max-tokens", "100000")
    page.fill("#input", message)
    page.click("#send")
    assert finished_bubble(page)[0] == "error"
    assert refusal.json()["error"]["message"] in page.text_content(".msg.assistant:last-child .note")

    # Stop: the stream is aborted mid-way and what had arrived stays.
    page.click("#new-chat")
    page.fill("#max-tokens", "64")
    page.fill("#input", message)
    page.click("#send")
    page.wait_for_function("() => (document.querySelector('.msg.assistant .text') || {}).textContent")
    page.click("#stop")
    state, text = finished_bubble(page)
    assert state == "stopped" and text, (state, text)
    page.wait_for_selector("#send:not([disabled])")

    # An error event inside a stream (a 200 already sent: how the server reports a timeout or
    # an engine failure mid-way), made with the server's own builders and sent in its place.
    events = [P.chat_chunk("chatcmpl-x", model, 0, {"content": "half a "}, None),
              P.error_body("generation took longer than 1 s", "server_error", code="timeout")]
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body="".join(f"data: {json.dumps(e)}\n\n" for e in events)))
    page.fill("#input", "more")
    page.click("#send")
    assert finished_bubble(page) == ("error", "half a ")
    assert "generation took longer than 1 s" in page.text_content(".msg.assistant:last-child .note")
    page.unroute("**/v1/chat/completions")

    # The key was never stored by the browser; nothing broke the CSP or threw.
    assert page.evaluate("[sessionStorage.length, localStorage.length, document.cookie]") == [0, 0, ""]
    assert page.evaluate("window.__violations || []") == []
    assert script_errors == []
    # The only console errors: Chromium's line for each refused request the test caused on purpose.
    refused = Counter(e.removeprefix("Failed to load resource: the server responded with a status of ")[:3]
                      for e in console_errors)
    assert refused == Counter({"401": 2, "400": 1}), console_errors
    page.close()


def finished_bubble(page) -> tuple[str, str]:
    """(state, text) of the last assistant bubble once it has stopped streaming."""
    page.wait_for_selector(".msg.assistant:last-child:not([data-state='streaming'])")
    bubble = page.query_selector(".msg.assistant:last-child")
    return bubble.get_attribute("data-state"), bubble.query_selector(".text").text_content()
