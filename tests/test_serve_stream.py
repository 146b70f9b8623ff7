"""Token streaming in `tunebench serve`: text reaches a streamed request while its micro-batch generates, in pieces
that add up to the non-streamed answer (stop strings never leak, characters are never split), the official
`openai` client reads it from a real server, and failures or a client leaving end a stream without harming the
worker."""

from __future__ import annotations

import copy
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from tests.conftest import deadline
from tests.serving import AUTH, KEY, client_for, error_of, served
from tunebench.backends.streaming import RowStreamer, cleans_spaces
from tunebench.serve import create_app
from tunebench.serve.engine import Decode, Engine, Job, LMEngine, RequestError, Result

PROMPTS = ["the river is", "a red apple", "hello world"]


def collect(pieces: dict):
    """A job sink that keeps each input's pieces (and always wants more)."""
    def sink(i: int, text: str) -> bool:
        assert text, "a sink never receives empty text"
        pieces.setdefault(i, []).append(text)
        return True
    return sink


def test_row_streamer_passes_whole_characters_and_nothing_from_a_stop_string(tiny_llama):
    tok = tiny_llama.tokenizer
    text = "naïve café 🙂 riv red river 🙂🙂 gold"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split()) + 4  # multi-byte characters span several byte tokens

    def stream(stop):
        pieces: list[str] = []
        streamer = RowStreamer(tok, [lambda t: pieces.append(t) is None], stop, tok.eos_token_id,
                               lambda toks: tiny_llama._completion(toks, stop)[0])
        streamer.put(torch.tensor([[5, 6]]))  # the prompt, as generate() passes it first
        for t in ids:
            streamer.put(torch.tensor([t]))
        streamer.end()
        final = tiny_llama._completion(ids, stop)[0]
        streamer.close(0, final)
        return pieces, final

    pieces, final = stream([])
    assert final == text and "".join(pieces) == text and len(pieces) > 5
    assert not any("\ufffd" in p for p in pieces)  # a character's bytes are passed on together
    for stop in (["river"], ["🙂🙂", "red river"], ["gold"], ["nowhere"]):
        pieces, final = stream(stop)
        assert "".join(pieces) == final == min((text[: text.find(s)] for s in stop if s in text), key=len,
                                               default=text)
    # "riv" could begin "river": it is held back until the next character shows that it does not
    pieces, _ = stream(["river"])
    sent = ""
    for p in pieces:
        sent += p
        assert not sent.endswith("riv") and "river" not in sent


def test_row_streamer_waits_for_the_next_word_where_decoding_cleans_up_spaces(tiny_llama):
    """A tokenizer that cleans up spaces turns "do n" into "don't" once "'t" comes: text from the last space on
    waits. (Transformers ignores the cleanup for BPE unless forced, and then the streamer does not wait.)"""
    tok = copy.deepcopy(tiny_llama.tokenizer)
    tok.clean_up_tokenization_spaces = True
    assert not cleans_spaces(tok)
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    assert cleans_spaces(tok)
    ids = tok("I do n't know , really .", add_special_tokens=False)["input_ids"]
    pieces: list[str] = []
    streamer = RowStreamer(tok, [lambda t: pieces.append(t) is None], [], tok.eos_token_id, tok.decode)
    streamer.put(torch.tensor([[5]]))
    for t in ids:
        streamer.put(torch.tensor([t]))
    streamer.close(0, tok.decode(ids))
    assert "".join(pieces) == "I don't know, really." and len(pieces) > 2


def test_streamed_text_arrives_while_the_batch_generates_and_equals_the_plain_answer(tiny_llama):
    engine = LMEngine(tiny_llama, None, "tiny")
    decode = Decode(max_tokens=16, temperature=0.0)
    plain = engine.run_batch([Job("complete", [p], decode) for p in PROMPTS])
    forwards = []
    hook = tiny_llama.model.register_forward_hook(lambda *a: forwards.append(1))
    pieces: dict[int, list[str]] = {}
    arrivals: list[int] = []  # how many forward passes had run when each piece arrived

    def sink(k):
        def send(i, text):
            arrivals.append(len(forwards))
            pieces.setdefault(k, []).append(text)
            return True
        return send

    calls = []
    generate = tiny_llama.generate

    def counted(*a, **kw):
        calls.append(len(a[0]))
        return generate(*a, **kw)

    try:
        tiny_llama.generate = counted
        jobs = [Job("complete", [PROMPTS[0]], decode, sink=sink(0)), Job("complete", [PROMPTS[1]], decode),
                Job("complete", [PROMPTS[2]], decode, sink=sink(2))]
        streamed = engine.run_batch(jobs)
    finally:
        del tiny_llama.generate
        hook.remove()
    assert calls == [3]  # streamed jobs share the model call with the others
    assert [r[0].text for r in streamed] == [r[0].text for r in plain]  # greedy: the same text, streamed or not
    assert [r[0].completion_tokens for r in streamed] == [r[0].completion_tokens for r in plain]
    for k in (0, 2):  # each streamed request gets its own text, in several pieces
        assert "".join(pieces[k]) == plain[k][0].text and len(pieces[k]) > 1
    assert 1 not in pieces
    assert arrivals[0] < len(forwards) and len(set(arrivals)) > 2  # text came out while generation ran


def test_stop_strings_never_leak_into_a_stream(tiny_llama):
    engine = LMEngine(tiny_llama, None, "tiny")
    text = engine.run_batch([Job("complete", [PROMPTS[0]], Decode(max_tokens=24, temperature=0.0))])[0][0].text
    # a stop string in the middle, and one whose first character comes earlier (held back, then released)
    stop = (text[8:11], text[3] + "\x01never")
    decode = Decode(max_tokens=24, temperature=0.0, stop=stop)
    plain = engine.run_batch([Job("complete", [PROMPTS[0]], decode)])[0][0]
    pieces: dict[int, list[str]] = {}
    streamed = engine.run_batch([Job("complete", [PROMPTS[0]], decode, sink=collect(pieces))])[0][0]
    assert plain.text == text[:8] == streamed.text
    assert "".join(pieces[0]) == plain.text and stop[0] not in "".join(pieces[0])


def test_a_reader_that_leaves_ends_its_row_and_the_others_go_on(tiny_llama):
    prompts = [tiny_llama.format_prompt(p) for p in PROMPTS[:2]]
    plain = tiny_llama.generate(prompts, max_new_tokens=24, batch_size=2)
    got = []
    cut = tiny_llama.generate(prompts, max_new_tokens=24, batch_size=2, stream={0: lambda t: got.append(t) and False})
    assert len(got) == 1 and cut[0].completion_tokens < plain[0].completion_tokens  # stopped after its first text
    assert cut[1] == plain[1]


def test_generative_trials_stream_their_answer_and_classifiers_send_the_label(stores):
    with client_for(stores, "gen") as c:
        engine = c.app.state.engine
        pieces: dict[int, list[str]] = {}
        res = engine.run_batch([Job("complete", [engine.record("river", "prompt")], sink=collect(pieces))])[0][0]
        plain = engine.run_batch([Job("complete", [engine.record("river", "prompt")])])[0][0]
        assert res.text == plain.text and res.text
        assert "".join(pieces[0]) == res.text  # all of it came through the sink (stripped, as served)
        body = {"messages": [{"role": "user", "content": "river"}], "stream": True}
        r = c.post("/v1/chat/completions", headers=AUTH, json=body)
        assert _content(r.text) == res.text
    with client_for(stores, "enc") as c:
        r = c.post("/v1/chat/completions", headers=AUTH, json=body)
        label = c.post("/v1/classify", headers=AUTH, json={"input": "river"}).json()["data"][0]["label"]
        chunks = [ch for ch in _chunks(r.text) if ch["choices"] and ch["choices"][0]["delta"].get("content")]
        assert [ch["choices"][0]["delta"]["content"] for ch in chunks] == [label]  # one chunk: the label


def _chunks(sse: str) -> list[dict]:
    events = [ln[len("data: "):] for ln in sse.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _content(sse: str) -> str:
    return "".join(ch["choices"][0]["delta"].get("content", "") for ch in _chunks(sse) if ch["choices"])


def test_the_openai_client_reads_token_streams_from_a_real_server(tiny_llama):
    app_ = create_app(LMEngine(tiny_llama, None, "tiny"), api_keys={KEY})
    with deadline(300), served(app_) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        messages = [{"role": "user", "content": "the river"}]
        whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        content = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
        assert len(content) > 1 and "".join(content) == whole.choices[0].message.content
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.model_dump() == whole.usage.model_dump()

        text = client.completions.create(model="tiny", prompt="a red apple", max_tokens=24, temperature=0)
        text = text.choices[0].text
        stop = [text[6:9]]
        cut = client.completions.create(model="tiny", prompt="a red apple", max_tokens=24, temperature=0, stop=stop)
        pieces = [ch.choices[0].text for ch in client.completions.create(
            model="tiny", prompt="a red apple", max_tokens=24, temperature=0, stop=stop, stream=True)]
        assert "".join(pieces) == cut.choices[0].text == text[:6]


def test_two_streamed_requests_share_a_micro_batch_and_each_gets_its_own_text(tiny_llama):
    app_ = create_app(LMEngine(tiny_llama, None, "tiny"), api_keys={KEY}, max_batch=2, window_ms=60_000)
    batcher = app_.state.batcher

    def ask(prompt: str, stream: bool) -> str:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        kw = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0}
        if not stream:
            return client.completions.create(**kw).choices[0].text
        return "".join(ch.choices[0].text for ch in client.completions.create(**kw, stream=True))

    with deadline(300), served(app_) as url, ThreadPoolExecutor(2) as pool:
        # a window of a minute: each pair runs as soon as both requests wait, as one batch
        streamed = list(pool.map(ask, PROMPTS[:2], [True, True]))
        assert (batcher.batches, batcher.inputs) == (1, 2)
        plain = list(pool.map(ask, PROMPTS[:2], [False, False]))
        assert (batcher.batches, batcher.inputs) == (2, 4)
    assert streamed == plain and streamed[0] != streamed[1]


class Scripted(Engine):
    """A plain-LM engine without a model that streams ``pieces`` and then does ``then`` (raise, or keep streaming
    until its reader leaves)."""

    id, kind = "scripted", "lm"

    def __init__(self, pieces=(), then=None):
        self.pieces, self.then = list(pieces), then
        self.stopped = threading.Event()
        self.sends = 0

    def count_tokens(self, text):
        return len(text.split())

    def describe(self):
        return {"kind": "lm"}

    def chat_prompt(self, messages):
        return messages[-1]["content"]

    def _run(self, job, inputs, stream=None):
        send = (stream or {}).get(0, lambda t: True)
        for p in self.pieces:
            send(p)
        if isinstance(self.then, Exception):
            raise self.then
        if self.then == "forever":  # until the reader leaves (bounded, so that a bug fails instead of hanging)
            for self.sends in range(1, 100_000):
                if not send("tick "):
                    self.stopped.set()
                    break
                threading.Event().wait(0.002)
        return [Result("".join(self.pieces) + "end", 1, 3)]


def test_a_failure_mid_stream_ends_it_with_an_error_event_and_before_it_keeps_its_status():
    body = {"prompt": "hi", "stream": True}
    with TestClient(create_app(Scripted(["Hello", " world"], RuntimeError("boom")), api_keys={KEY})) as c:
        r = c.post("/v1/completions", headers=AUTH, json=body)
        assert r.status_code == 200
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" and '"error"' in events[-2] and "boom" not in r.text  # no internals
        assert json.loads(events[-2])["error"]["type"] == "server_error"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2]) == "Hello world"
    with TestClient(create_app(Scripted([], RuntimeError("boom")), api_keys={KEY})) as c:
        r = c.post("/v1/completions", headers=AUTH, json=body)
        assert r.status_code == 500 and error_of(r)["type"] == "server_error"
    with TestClient(create_app(Scripted([], RequestError("no such thing", "prompt")), api_keys={KEY})) as c:
        r = c.post("/v1/chat/completions", headers=AUTH, json={"messages": [{"role": "user", "content": "x"}],
                                                                 "stream": True})
        assert r.status_code == 400 and error_of(r)["param"] == "prompt"
    with TestClient(create_app(Scripted(["Hello"]), api_keys={KEY})) as c:  # the rest of the answer at the end
        r = c.post("/v1/completions", headers=AUTH, json=body)
        assert "".join(ch["choices"][0]["text"] for ch in _chunks(r.text)) == "Helloend"


def test_the_openai_client_raises_on_an_error_event():
    app_ = create_app(Scripted(["Hello"], RuntimeError("boom")), api_keys={KEY})
    with deadline(120), served(app_) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        stream = client.completions.create(model="scripted", prompt="hi", stream=True)
        with pytest.raises(openai.APIError, match="failed"):
            for _ in stream:
                pass


def test_a_client_leaving_mid_stream_stops_its_generation_and_the_server_goes_on():
    """The engine streams until its reader leaves: the client's first chunk arrives while the job still runs, and
    leaving ends the job (the sink says so), after which the server answers as before."""
    engine = Scripted(["first "], "forever")
    app_ = create_app(engine, api_keys={KEY})
    with deadline(120), served(app_) as url:
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json={"prompt": "hi", "stream": True}) as r:
                first = next(r.iter_lines())
                assert first.startswith("data: ") and "first" in first
            assert engine.stopped.wait(60), "generation went on after the client left"
            engine.then = None
            r = http.post("/v1/completions", json={"prompt": "hi"})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == "first end"
