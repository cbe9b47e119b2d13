"""Start a real server on loopback for HTTP tests: uvicorn in a thread, a tiny model."""
import contextlib
import socket
import threading
import time

import uvicorn

from bastion.config import build_config
from bastion.serve.app import create_app
from bastion.serve.server import build_state

API_KEY = "bst_test-key-0123456789abcdefghijklmnopqrstuvwxy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(checkpoint, *, serve=None, generate=None, environ=None, ssl=None, step_seconds=None, data=None):
    """Start the app on 127.0.0.1:<free port> in a thread; yield (base_url, state).
    `step_seconds`: every model forward takes at least this long, so a long request stays
    in flight for seconds whatever the machine's speed (slot, queue, timeout tests)."""
    import tempfile

    # The access log goes to a private temp file unless a test asks for one (stderr is noise here).
    settings = {"port": free_port(), "access_log": str(tempfile.mkdtemp() + "/access.jsonl"), **(serve or {})}
    if ssl:
        settings.update(ssl_certfile=str(ssl[0]), ssl_keyfile=str(ssl[1]))
    config = build_config({"serve": settings, "generate": {"max_new_tokens": 16, "max_new_tokens_ceiling": 64,
                                                             **(generate or {})}, "data": data or {}})
    state = build_state(checkpoint, config, environ=environ if environ is not None else {})
    if step_seconds:
        # On the embedding, which prefill and every decode_step call (decode_step is not forward).
        state.engine.model.tok_embeddings.register_forward_pre_hook(lambda module, args: time.sleep(step_seconds))
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=settings["port"],
                                           log_level="warning", lifespan="on", ssl_certfile=settings.get("ssl_certfile"),
                                           ssl_keyfile=settings.get("ssl_keyfile"), timeout_graceful_shutdown=5))
    server.install_signal_handlers = lambda: None  # not the main thread
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    scheme = "https" if ssl else "http"
    try:
        yield f"{scheme}://127.0.0.1:{settings['port']}", state
    finally:
        server.should_exit = True
        thread.join(timeout=30)
