"""Fuzzing `tunebench serve`: arbitrary and near-valid request bodies and headers against served toy trials (a
classifier, a generation trial, and a tuned causal LM served raw). Whatever is sent, the answer is never a 5xx;
an error is JSON in OpenAI's shape and leaks no traceback or filesystem path.

Budget: ``TUNEBENCH_FUZZ_EXAMPLES`` examples per test (default 200: the whole file in well under a minute),
derandomised (a fixed seed: the same examples every run, as CI needs). For a long local run that draws new
examples: ``TUNEBENCH_FUZZ_EXAMPLES=5000 TUNEBENCH_FUZZ_RANDOM=1 pytest tests/test_fuzz_serve.py -rP`` (each test
prints how many examples it ran and how many were answered; the JUnit XML records them as properties).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serving import KEY, trial_id
from tunebench.serve import Limits, create_app, trial_engine

EXAMPLES = int(os.environ.get("TUNEBENCH_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("TUNEBENCH_FUZZ_RANDOM"),
                database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/classify"]


@pytest.fixture(scope="module")
def clients(stores):
    """Served toy trials, each behind a TestClient (a 500 comes back as a response, not an exception)."""
    limits = Limits(max_tokens=4)  # short generations; the other bounds as served by default
    engines = {"enc": trial_engine(stores, "enc", None, best=True),
               "gen": trial_engine(stores, "gen", None, best=True),
               "lm": trial_engine(stores, "llm", trial_id(stores, "llm", "full"), best=False, raw=True)}
    opened = {k: TestClient(create_app(e, api_keys={KEY}, limits=limits, window_ms=0), raise_server_exceptions=False)
              for k, e in engines.items()}
    for c in opened.values():
        c.__enter__()
    yield opened
    for c in opened.values():
        c.__exit__(None, None, None)


# ---- strategies -----------------------------------------------------------------------------------------------
LONG = ["word " * 30_000, "x" * 200_000, "\x00" * 5000, "\U0001f600" * 20_000, "é" * 120_000, " " * 150_000,
        "\ud800" * 10, "a\udc80" * 5000]
surrogate = st.characters(categories=["Cs"])
any_char = st.characters(codec=None, exclude_categories=())  # every code point: surrogates, NUL, controls
plain_text = st.one_of(st.text(max_size=30), st.sampled_from(["great movie", "awful plot", "red", "the sky", ""]))
hostile_text = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=any_char, max_size=30),
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=10), surrogate, st.text(max_size=10)),
    st.sampled_from(["", "inf", "-inf", "nan", "NaN", "1e400", "-0", "null", "true", "{}", "[]", "\x00", "\ufeff",
                     "\u202e", "🙂" * 3, "{text}", "%s%n", "../../etc/passwd", "a\x00b"]),
    st.sampled_from(LONG),
)
big_int = st.one_of(st.integers(-(10**30), 10**30), st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**300, -1, 0]))
scalar = st.one_of(st.none(), st.booleans(), big_int, st.floats(allow_nan=True, allow_infinity=True), hostile_text)
json_value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                            st.dictionaries(hostile_text, inner, max_size=5)),
                          max_leaves=20)


def merged(fixed, optional):
    return st.builds(lambda a, b: {**a, **b}, fixed, optional)


def request_bodies(hostile: bool) -> dict:
    """Bodies of the right structure for each route: with plausible values, or (``hostile``) with hostile text
    (lone surrogates, NUL, very long strings), huge numbers, and now and then any JSON value in a field."""
    text = hostile_text if hostile else plain_text

    def field(plausible):
        return st.one_of(*[plausible] * 6, json_value) if hostile else plausible

    def maybe(**fields):
        return st.fixed_dictionaries({}, optional={k: field(v) for k, v in fields.items()})

    num = st.one_of(st.integers(-1, 8), big_int) if hostile else st.integers(0, 6)
    decoding = {"model": st.one_of(text, st.sampled_from(["gpt-4o", ""])) if hostile else st.nothing(),
                "max_tokens": num, "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "n": st.just(1),
                "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
                "stop": st.one_of(text, st.lists(text, max_size=6)), "seed": big_int, "user": text,
                "metadata": json_value if hostile else st.dictionaries(plain_text, plain_text, max_size=2)}
    part = st.fixed_dictionaries({"type": field(st.just("text")), "text": field(text)})
    roles = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
    message = st.fixed_dictionaries({"role": field(roles if hostile else st.sampled_from(["user", "user", "system"]))},
                                    optional={"content": field(st.one_of(text, st.lists(part, max_size=3), st.none())),
                                              "name": text})
    record = st.dictionaries(st.one_of(st.just("text"), text), field(text), max_size=3)
    many = 70 if hostile else 6
    return {
        "chat": merged(st.fixed_dictionaries({"messages": field(st.lists(message, min_size=int(not hostile),
                                                                         max_size=4))}),
                       maybe(**decoding, max_completion_tokens=num, logprobs=st.booleans())),
        "completions": merged(st.fixed_dictionaries({"prompt": field(st.one_of(text, st.lists(text, max_size=many)))}),
                              maybe(**decoding, echo=st.booleans(), logprobs=num)),
        "classify": merged(st.fixed_dictionaries({"input": field(st.one_of(
            text, record, st.lists(st.one_of(text, record), max_size=many)))}), maybe(model=text, user=text)),
    }


PLAUSIBLE, HOSTILE = request_bodies(False), request_bodies(True)
chat_body = st.one_of(PLAUSIBLE["chat"], HOSTILE["chat"])
completion_body = st.one_of(PLAUSIBLE["completions"], HOSTILE["completions"])
classify_body = st.one_of(PLAUSIBLE["classify"], HOSTILE["classify"])

header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
header_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20).filter(
    lambda n: n not in ("content-length", "transfer-encoding", "host"))
auth_header = st.sampled_from([f"Bearer {KEY}", f"bearer {KEY}", f"Bearer  {KEY} ", "Bearer", "Bearer ", KEY,
                               "Basic dXNlcjpwYXNz", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", ""])
content_type = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain",
                                "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                "application/vnd.api+json", "application/json; charset=latin-1", "", "*/*"])


@st.composite
def headers(draw, odds: int = 10):
    """Request headers: the right key and JSON's content type, one time in ``odds`` (each) something else."""
    out = [("authorization", f"Bearer {KEY}")]
    if draw(st.integers(1, odds)) == 1:  # a wrong, missing or second Authorization header
        out += [("authorization", v) for v in draw(st.lists(auth_header, max_size=2))]
        if draw(st.booleans()):
            out = out[1:]
    odd_type = draw(st.integers(1, odds)) == 1
    out.append(("content-type", draw(content_type) if odd_type else "application/json"))
    out += draw(st.lists(st.tuples(header_name, header_text), max_size=3))
    return out


def encode(body) -> bytes:
    """JSON as a client could write it: \\u escapes for everything (lone surrogates too), NaN and Infinity."""
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


@st.composite
def mangled(draw, body):
    """A body's bytes, sometimes damaged: cut short, with bytes that are not UTF-8, a BOM, or nothing at all."""
    raw = encode(body)
    how = draw(st.sampled_from(["as is"] * 12 + ["cut", "bad utf-8", "bom", "empty", "junk"]))
    if how == "cut":
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    if how == "bad utf-8":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])) + raw[at:]
    if how == "bom":
        return b"\xef\xbb\xbf" + raw
    if how == "empty":
        return b""
    if how == "junk":
        return draw(st.binary(max_size=200))
    return raw


# ---- the property -----------------------------------------------------------------------------------------------
LEAKS = ["Traceback", 'File "', "site-packages", "/work/", "/tmp/", str(Path.home()) + "/", str(Path.cwd()) + "/"]


def check(r) -> None:
    assert r.status_code < 500, f"{r.status_code}: {r.text[:1000]}"
    assert "Traceback" not in r.text
    if r.status_code >= 400:
        for leak in LEAKS:
            assert leak not in r.text, f"{leak!r} in {r.text[:1000]}"
        body = r.json()
        assert set(body) == {"error"}, body
        err = body["error"]
        assert {"message", "type", "param", "code"} <= set(err) and isinstance(err["message"], str) and err["message"]
        assert err["type"] in ("invalid_request_error", "authentication_error", "server_error"), err
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" and all(isinstance(json.loads(e), dict) for e in events[:-1])
    else:
        assert isinstance(r.json(), dict)


def fuzz(record_property, name: str, seen: list, test, *, some_answered: bool = True) -> None:
    """Run a Hypothesis test and record how many examples it ran (``fuzz_examples`` in the JUnit XML), and how
    many of them were answered (2xx): a fuzzer whose every example is refused tests only the refusals."""
    test()
    ok = sum(200 <= s < 300 for s, _ in seen)
    record_property("fuzz_examples", len(seen))
    record_property("fuzz_answered", ok)
    common = Counter(seen).most_common(4)
    print(f"fuzz {name}: {len(seen)} examples, {ok} answered; most common: {common}")  # shown with -s or -rP
    assert seen and (ok or not some_answered)


def post(seen: list[int], c, path, raw: bytes, hdrs) -> None:
    r = c.post(path, content=raw, headers=hdrs)
    check(r)
    seen.append(outcome(r))


def outcome(r) -> tuple[int, str]:
    return r.status_code, (r.json()["error"]["code"] or "") if r.status_code >= 400 and r.content else ""


def test_fuzz_any_json_to_any_route(clients, record_property):
    seen: list[tuple[int, str]] = []  # each example's status, and its error's code

    @FUZZ
    @given(name=st.sampled_from(sorted(clients)), path=st.sampled_from(ROUTES), body=json_value, data=st.data())
    def run(name, path, body, data):
        post(seen, clients[name], path, data.draw(mangled(body)), data.draw(headers()))

    fuzz(record_property, "any JSON", seen, run, some_answered=False)


@pytest.mark.parametrize("what, path, body_strategy, names", [
    ("chat completions", "/v1/chat/completions", chat_body, None),
    ("completions", "/v1/completions", completion_body, None),
    ("classify", "/v1/classify", classify_body, ["enc", "enc", "lm"]),  # mostly the classifier; the LM refuses
], ids=["chat", "completions", "classify"])
def test_fuzz_route(clients, record_property, what, path, body_strategy, names):
    """Near-valid bodies for one route: the right structure with hostile values, mangled now and then."""
    seen: list[tuple[int, str]] = []  # each example's status, and its error's code

    @FUZZ
    @given(name=st.sampled_from(names or sorted(clients)), body=body_strategy, data=st.data())
    def run(name, body, data):
        post(seen, clients[name], path, data.draw(mangled(body)), data.draw(headers()))

    fuzz(record_property, what, seen, run)


def test_fuzz_headers_methods_and_paths(clients, record_property):
    paths = st.one_of(st.sampled_from(ROUTES + ["/v1/models", "/health", "/", "/v1", "/docs", "/v1/classify/"]),
                      st.text(alphabet="abcdefghijklmnopqrstuvwxyz/._-%0123456789", max_size=30).map(lambda p: "/" + p))

    seen: list[tuple[int, str]] = []  # each example's status, and its error's code

    @FUZZ
    @given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]), path=paths,
           hdrs=headers(odds=2), body=st.one_of(st.just({"input": "great movie", "prompt": "hi"}), json_value))
    def run(method, path, hdrs, body):
        r = clients["enc"].request(method, path, content=encode(body) if method != "GET" else None, headers=hdrs)
        if method == "HEAD":  # an answer without a body
            assert r.status_code < 500
            seen.append((r.status_code, ""))
        else:
            check(r)
            seen.append(outcome(r))

    fuzz(record_property, "headers, methods and paths", seen, run, some_answered=False)
