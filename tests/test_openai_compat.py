"""The openai backend against scripted servers that behave like third-party ones (no model, no download).

Each quirk here was met on a real server (tests/test_llamacpp.py runs llama-cpp-python's) or is documented
for one (README "Tested OpenAI-compatible servers"): the backend must score right or refuse clearly.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tunebench.backends.openai_api import OpenAIBackend
from tunebench.config import ModelConfig


@contextmanager
def scripted(respond):
    """A loopback HTTP server answering each POST with ``respond(path, body) -> (status, json)``; yields
    (base_url, requests seen)."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, **body})
            code, out = respond(self.path, body)
            data = json.dumps(out).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen
    finally:
        httpd.shutdown()


def test_generation_sends_extra_body_and_reads_usage():
    def respond(path, body):
        assert body["repeat_penalty"] == 1.0 and body["max_tokens"] == 4
        return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "blue\n\nText: more"}}],
                     "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}

    with scripted(respond) as (url, seen):
        b = OpenAIBackend(ModelConfig(backend="openai", base_url=url, model="m", api_key_env=None,
                                      extra_body={"repeat_penalty": 1.0}))
        gen = b.generate(["Word: river\nColour:"], max_new_tokens=4, stop=["\n\nText:"])[0]
    assert (gen.text, gen.prompt_tokens, gen.completion_tokens) == ("blue", 9, 4)
    assert seen[0]["path"] == "/v1/chat/completions" and seen[0]["stop"] == ["\n\nText:"]


def test_extra_body_is_in_trial_keys_only_when_set():
    base = dict(backend="openai", base_url="http://127.0.0.1:1/v1", model="m")
    assert "extra_body" not in ModelConfig(**base).identity()
    assert ModelConfig(**base, extra_body={"repeat_penalty": 1.0}).identity()["extra_body"] == {"repeat_penalty": 1.0}
    assert "extra_body" not in ModelConfig(backend="causal", path="x").identity()
