"""`tunebench serve` under hostile input and load: invalid text, a failing job among others, fairness between
callers, one Authorization header, tokenising off the event loop, slow clients, and a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from tunebench.serve import Limits, create_app, trial_engine
from tunebench.serve.batcher import Busy, MicroBatcher
from tunebench.serve.engine import Decode, Engine, Job, Result
from tunebench.serve.guards import BodyLimit
from tunebench.serve.server import server_config

from tests.serving import AUTH, KEY, client_for, error_of, trial_id


class FakeLM(Engine):
    """A plain-LM engine without a model: answers echo their prompt; ``count`` and ``run`` can be replaced."""

    id, kind = "fake", "lm"

    def __init__(self, count=None, run=None):
        self.count, self.run = count or (lambda t: len(t.split())), run

    def count_tokens(self, text):
        return self.count(text)

    def describe(self):
        return {"kind": "lm"}

    def chat_prompt(self, messages):
        return messages[-1]["content"]

    def _run(self, job, inputs, stream=None):
        if self.run is not None:
            self.run(inputs)
        return [Result(f"echo {x}", 1, 1) for x in inputs]


def raw_post(c, path: str, body: str, headers=None):
    """A body as written (JSON's \\udXXX escapes decode to lone surrogates, which ``json=`` cannot send)."""
    return c.post(path, content=body.encode(), headers={**AUTH, "content-type": "application/json", **(headers or {})})


def test_lone_surrogates_anywhere_are_refused_naming_the_field(stores):
    cases = [("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udc80 hi"}]}', "messages[0].content"),
             ("/v1/chat/completions", ('{"messages": [{"role": "system", "content": "ok"}, {"role": "user", "content": '
                                       '[{"type": "text", "text": "fine"}, {"type": "text", "text": "x\\ud800"}]}]}'),
              "messages[1].content[1].text"),
             ("/v1/completions", '{"prompt": "\\udc80"}', "prompt"),
             ("/v1/completions", '{"prompt": ["fine", "\\udfff"]}', "prompt[1]"),
             ("/v1/completions", '{"prompt": "fine", "stop": ["ok", "\\ud83d"]}', "stop[1]"),
             ("/v1/completions", '{"prompt": "fine", "model": "\\udc80"}', "model"),
             ("/v1/completions", '{"prompt": "fine", "user": "\\udc80"}', "user"),  # an extra field: checked too
             ("/v1/classify", '{"input": "\\udc80 hello"}', "input"),
             ("/v1/classify", '{"input": ["a", "b", {"text": "\\udc80"}]}', "input[2].text"),
             ("/v1/classify", '{"input": {"text": ["ok", {"deep": "\\udc80"}]}}', "input.text[1].deep"),
             ("/v1/classify", '{"input": {"t\\udc80xt": "ok"}}', "input")]  # a key
    with client_for(stores, "enc") as c:
        for path, body, param in cases:
            r = raw_post(c, path, body)
            assert r.status_code == 400, (body, r.text)
            err = error_of(r)
            assert err["code"] == "invalid_text" and err["param"] == param, (body, err)
            assert err["type"] == "invalid_request_error" and param in err["message"] and "surrogate" in err["message"]
        # a surrogate pair is a character like any other, and NUL characters break nothing: both are served
        for body in ('{"input": "good \\ud83d\\ude00"}', '{"input": "good\\u0000 movie"}'):
            assert raw_post(c, "/v1/classify", body).status_code == 200
        deep = '{"input": {"text": ' + "[" * 40 + "]" * 40 + "}}"
        r = raw_post(c, "/v1/classify", deep)
        assert r.status_code == 400 and error_of(r)["code"] == "too_deep"
        # half a million list items: refused before validation (whose half a million errors took the loop seconds)
        r = raw_post(c, "/v1/classify", '{"input": [' + "1," * 500_000 + "1]}")
        assert r.status_code == 400 and error_of(r)["code"] == "too_many_values" and error_of(r)["param"] == "input"


def test_surrogates_never_reach_a_plain_lm(stores):
    full = trial_id(stores, "llm", "full")
    with client_for(stores, "llm", trial=full, raw=True) as c:
        for body, param in (('{"messages": [{"role": "user", "content": "\\udc80"}]}', "messages[0].content"),
                            ('{"prompt": "hi", "stop": "\\udc80"}', "stop"),
                            ('{"prompt": ["hi", "\\udc80"], "echo": true, "logprobs": 1, "max_tokens": 0}', "prompt[1]")):
            r = raw_post(c, "/v1/chat/completions" if "messages" in body else "/v1/completions", body)
            assert r.status_code == 400 and error_of(r)["param"] == param, r.text
        r = raw_post(c, "/v1/completions", '{"prompt": "hi", "seed": 99999999999999999999999}')
        assert r.status_code == 422 and error_of(r)["param"] == "seed", r.text  # was a 500 (torch's seed overflowed)


def test_plain_lm_edge_cases_found_by_the_fuzzer_are_4xx_or_answered(stores):
    """Each of these was a 500: the model (or generate) failed on a request the server let through."""
    full = trial_id(stores, "llm", "full")
    with client_for(stores, "llm", trial=full, raw=True) as c:
        chat = {"messages": [{"role": "user", "content": "red"}]}
        for path, body, param in (("/v1/completions", {"prompt": "", "max_tokens": 2}, "prompt"),  # no token at all
                                  ("/v1/completions", {"prompt": ["red", ""], "max_tokens": 2}, "prompt[1]"),
                                  ("/v1/completions", {"prompt": "red", "max_tokens": 0}, "max_tokens"),
                                  ("/v1/chat/completions", {**chat, "max_completion_tokens": 0}, "max_completion_tokens"),
                                  ("/v1/chat/completions", {**chat, "max_tokens": 0}, "max_tokens")):
            r = c.post(path, headers=AUTH, json=body)
            assert r.status_code == 400 and error_of(r)["param"] == param, (body, r.text)
        # a vanishing temperature samples greedily (dividing the logits by it overflowed into NaN probabilities)
        tiny = c.post("/v1/chat/completions", headers=AUTH, json={**chat, "temperature": 4.5e-182, "max_tokens": 2})
        greedy = c.post("/v1/chat/completions", headers=AUTH, json={**chat, "temperature": 0, "max_tokens": 2})
        assert tiny.status_code == 200, tiny.text
        assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]
        # scoring (echo + logprobs + max_tokens 0) still takes an empty prompt
        r = c.post("/v1/completions", headers=AUTH, json={"prompt": "", "echo": True, "logprobs": 1, "max_tokens": 0})
        assert r.status_code == 200, r.text


def test_a_failing_batch_is_rerun_job_by_job_so_only_the_bad_job_fails():
    batches: list[list[str]] = []

    def run(jobs):  # the whole batch fails when any input is poisoned
        batches.append([x for j in jobs for x in j.inputs])
        if any(x == "poison" for j in jobs for x in j.inputs):
            raise RuntimeError("poisoned batch")
        return [[Result(x, 1, 0) for x in j.inputs] for j in jobs]

    async def main():
        batcher = MicroBatcher(run, max_batch=8, window_ms=10_000)  # the batch runs when all 8 wait
        batcher.start()
        words = ["a", "b", "poison", "c", "d", "e", "f", "g"]
        pending = [asyncio.ensure_future(batcher.submit(Job("classify", [w]))) for w in words]
        results = await asyncio.gather(*pending, return_exceptions=True)
        await batcher.close()
        return words, results

    words, results = asyncio.run(main())
    assert len(batches[0]) == 8  # they ran together first
    assert isinstance(results[2], RuntimeError)
    assert [r[0].text for i, r in enumerate(results) if i != 2] == [w for w in words if w != "poison"]

    # the engine isolates a failing group the same way (one model call per group, then one per job)
    calls: list[int] = []

    def poisoned(inputs):
        calls.append(len(inputs))
        if "poison" in inputs:
            raise ValueError("bad input")

    out = FakeLM(run=poisoned).run_batch([Job("complete", [w], Decode()) for w in ("a", "poison", "b")])
    assert calls == [3, 1, 1, 1]
    assert [o[0].text for o in (out[0], out[2])] == ["echo a", "echo b"] and isinstance(out[1], ValueError)


def test_one_bad_request_among_concurrent_ones_fails_alone(stores):
    engine = trial_engine(stores, "enc", None, best=True)
    real, calls = engine.predictor.run, []

    def run(records):
        calls.append(len(records))
        if any("POISON" in r["input"] for r in records):
            raise RuntimeError("the model cannot take this input")
        return real(records)

    engine.predictor.run = run
    texts = ["great movie", "awful plot", "POISON", "lovely film"]
    with TestClient(create_app(engine, api_keys={KEY}, max_batch=4, window_ms=60_000)) as c, \
            ThreadPoolExecutor(4) as pool:  # the batch runs when all 4 wait
        replies = list(pool.map(lambda t: c.post("/v1/classify", headers=AUTH, json={"input": t}), texts))
    assert calls[0] == 4 and sorted(calls[1:]) == [1, 1, 1, 1]
    assert [r.status_code for r in replies] == [200, 200, 500, 200]
    assert error_of(replies[2])["type"] == "server_error" and "Traceback" not in replies[2].text


def test_batches_are_fair_between_callers_and_bounded_in_tokens():
    batches: list[list[tuple[str, int]]] = []

    def run(jobs):
        batches.append([j.inputs[0] for j in jobs])
        return [[Result(str(x), 1, 0) for x in j.inputs] for j in jobs]

    async def flood(batcher, jobs):
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(Job("classify", [(who, i)], tokens=t), caller=who))
                   for who, i, t in jobs]
        await asyncio.gather(*pending)
        await batcher.close()

    # caller A sends 20 requests back to back, then B one: B's is in the first or second batch, not the sixth
    asyncio.run(flood(MicroBatcher(run, max_batch=4, window_ms=0),
                      [("A", i, 10) for i in range(20)] + [("B", 0, 10)]))
    assert any(("B", 0) in b for b in batches[:2]), batches
    assert all(len(b) <= 4 for b in batches) and sum(len(b) for b in batches) == 21
    assert [i for b in batches for who, i in b if who == "A"] == list(range(20))  # each caller's own order kept

    # a token budget: 60-token jobs run two by two under 150 tokens; a job over the budget runs alone
    batches.clear()
    asyncio.run(flood(MicroBatcher(run, max_batch=32, max_batch_tokens=150, window_ms=0),
                      [("A", 0, 60), ("A", 1, 60), ("A", 2, 500), ("A", 3, 60), ("A", 4, 60)]))
    assert [len(b) for b in batches] == [2, 1, 2]

    # a full queue (in all, or for one caller) is a clean 503-style Busy
    async def full():
        batcher = MicroBatcher(run, max_batch=8, window_ms=10_000, max_queue=3, max_queue_per_caller=2)
        batcher.start()
        held = [asyncio.ensure_future(batcher.submit(Job("classify", [("A", i)]), caller="A")) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Busy, match="of your requests"):
            await batcher.submit(Job("classify", [("A", 9)]), caller="A")
        held.append(asyncio.ensure_future(batcher.submit(Job("classify", [("B", 0)]), caller="B")))
        await asyncio.sleep(0)
        with pytest.raises(Busy, match="requests are waiting"):
            await batcher.submit(Job("classify", [("C", 0)]), caller="C")
        await batcher.close()  # queued work still finishes
        return await asyncio.gather(*held)

    assert len(asyncio.run(full())) == 3


def test_exactly_one_authorization_header():
    with TestClient(create_app(FakeLM(), api_keys={KEY})) as c:
        body = {"prompt": "hi"}
        for headers in ([("Authorization", "Bearer wrong-key-wrong-key"), ("Authorization", f"Bearer {KEY}")],
                        [("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {KEY}")],
                        [("Authorization", f"Bearer {KEY}"), ("authorization", "Bearer wrong-key-wrong-key")]):
            r = c.post("/v1/completions", headers=headers, json=body)
            assert r.status_code == 401 and error_of(r)["message"] == "give exactly one Authorization header"
        assert c.post("/v1/completions", headers=[("Authorization", f"Bearer {KEY}")], json=body).status_code == 200


def _on_a_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def test_token_counting_runs_off_the_event_loop():
    entered, release, seen = threading.Event(), threading.Event(), {}

    def count(text):
        if text == "block":
            seen["on_loop"] = _on_a_loop()
            entered.set()
            release.wait(30)
            seen["done"] = True
        seen.setdefault("counted", []).append(len(text))
        return 1

    limits = Limits(max_input_tokens=4)
    with TestClient(create_app(FakeLM(count), api_keys=None, limits=limits, window_ms=0)) as c:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(c.post, "/v1/completions", json={"prompt": "block", "max_tokens": 1})
            assert entered.wait(30)
            health = c.get("/health")  # the loop answers while a count is in progress
            assert health.status_code == 200 and "done" not in seen
            release.set()
            assert pending.result().status_code == 200
        assert seen["on_loop"] is False
        # an input too long to be within the bound, whatever the tokenizer, is refused without being counted
        r = c.post("/v1/completions", json={"prompt": "x" * (4 * 32 + 1)})
        assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
        assert 4 * 32 + 1 not in seen["counted"]


def test_a_body_that_drips_in_is_timed_out():
    sent = []

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def main():
        parts = [{"type": "http.request", "body": b'{"input": ', "more_body": True}]

        async def receive():
            if parts:
                return parts.pop()
            await asyncio.Event().wait()  # the rest never comes

        async def send(message):
            sent.append(message)

        await BodyLimit(app, limit=1000, timeout=0.05)({"type": "http", "headers": []}, receive, send)

    asyncio.run(main())
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout" and len(sent) == 2


def test_slow_clients_are_timed_out_without_delaying_others(stores):
    """The served stack (uvicorn with the CLI's settings): 20 connections dripping a body and one dripping its
    headers hold nothing up; the first get a 408, the last is closed."""
    limits = Limits(body_timeout_s=3, header_timeout_s=3)
    app_ = create_app(trial_engine(stores, "enc", None, best=True), api_keys={KEY}, limits=limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app_, host="127.0.0.1", port=port, limits=limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            _wait_until_up(http)
            head = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"input\": ").encode()
            drips = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(20)]
            for d in drips:
                d.sendall(head)
            slow_head = socket.create_connection(("127.0.0.1", port), timeout=60)
            slow_head.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")
            for _ in range(3):
                assert http.post("/v1/classify", headers=AUTH, json={"input": "great movie"}).status_code == 200
            for d in drips:
                assert _read_all(d).startswith(b"HTTP/1.1 408"), "a dripped body is answered 408"
            assert _read_all(slow_head) == b""  # closed without an answer
    finally:
        server.should_exit = True
        thread.join(60)


def _wait_until_up(http, proc=None) -> None:
    for _ in range(1200):
        try:
            if http.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        threading.Event().wait(0.1)
    raise AssertionError("the server did not come up")


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out


def test_sigterm_drains_requests_in_flight(stores, tmp_path):
    """The real CLI: 16 requests held in a batch window and 4 keep-alive clients, then SIGTERM. Every request is
    answered (200, or a clean 503), responses say Connection: close, and the process exits cleanly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TUNEBENCH_API_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunebench", "serve", "enc", "--store", str(stores), "--best",
                             "--port", str(port), "--batch-window-ms", "3000", "--max-batch", "64"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            _wait_until_up(http, proc)
        replies, loops = asyncio.run(_drain_clients(port, proc))
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert all(isinstance(r, httpx.Response) for r in replies), replies  # no reset, no disconnect
    assert [r.status_code for r in replies] == [200] * 16
    assert all(r.headers.get("connection") == "close" for r in replies)
    for statuses in loops:  # keep-alive clients: answered until told to close
        assert statuses and all(s in (200, 503) for s in statuses), loops
    assert b"Traceback" not in proc.stderr.read()


async def _drain_clients(port: int, proc):
    base = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()

    async def keep_alive_client():
        statuses = []
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=60,
                                     limits=httpx.Limits(max_connections=1)) as c:
            while True:
                r = await c.get("/v1/models")  # an exception here fails the test
                statuses.append(r.status_code)
                if r.headers.get("connection") == "close" or stop.is_set() and len(statuses) > 10_000:
                    return statuses
                await asyncio.sleep(0.005)

    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=60) as c:
        loops = [asyncio.ensure_future(keep_alive_client()) for _ in range(4)]
        held = [asyncio.ensure_future(c.post("/v1/classify", json={"input": f"great movie {i}"})) for i in range(16)]
        async with httpx.AsyncClient(base_url=base, timeout=60) as probe:
            for _ in range(600):  # until the 16 wait in the batcher (its window is 3 s)
                if (await probe.get("/health")).json()["queue"] >= 16 or all(h.done() for h in held):
                    break
                await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stop.set()
        replies = await asyncio.gather(*held, return_exceptions=True)
        return replies, await asyncio.gather(*loops)
