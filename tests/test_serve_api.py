"""`llamalab serve`'s API beyond generation: refused parameters, the tokenizer routes, the
request log and the Prometheus metrics.

One real server with an API key (so the key's reach over the new routes is tested too)
and ``--log-level info`` (so its request log can be read back).
"""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
from conftest import http_request

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families

from llamalab.serve.launch import ServerProcess

CTX = 256
KEY = "test-key"


@pytest.fixture(scope="module")
def server(smollm2_path):
    args = ["--model", str(smollm2_path), "--ctx", str(CTX), "--max-batch", "2"]
    args += ["--api-key", KEY, "--log-level", "info"]
    # Choices sampled in one batch are held to the same choices alone: without the VNNI
    # kernel, whose int8 activations can turn a last-bit difference between those paths
    # into another token (as in test_serve.py).
    proc = ServerProcess(args)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAMALAB_VNNI", "0")
        proc.launch()
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def call(
    server, method: str, path: str, body: dict | None = None, *, key: str | None = KEY
) -> tuple[int, dict | str]:
    """One request with the API key unless ``key`` is None: status and the JSON (or text) body."""
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    status, data, got = http_request(server.port, method, path, body, headers)
    is_json = got.get("content-type", "").startswith("application/json")
    return status, json.loads(data) if is_json else data.decode()


def post(server, path: str, body: dict, **kw: object) -> tuple[int, dict]:
    status, data = call(server, "POST", path, body, **kw)  # type: ignore[arg-type]
    assert isinstance(data, dict), data
    return status, data


CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "Once upon a time", "max_tokens": 2}


# ---------------------------------------------------------------------------- refused fields
REFUSED = {
    "tools": ("/v1/chat/completions", [{"type": "function", "function": {"name": "f"}}]),
    "tool_choice": ("/v1/chat/completions", "auto"),
    "functions": ("/v1/chat/completions", [{"name": "f"}]),
    "function_call": ("/v1/chat/completions", "auto"),
    "echo": ("/v1/completions", True),
    "best_of": ("/v1/completions", 3),
    "suffix": ("/v1/completions", " the end"),
    "audio": ("/v1/chat/completions", {"voice": "alloy", "format": "wav"}),
    "modalities": ("/v1/chat/completions", ["text", "audio"]),
    "prediction": ("/v1/chat/completions", {"type": "content", "content": "x"}),
}


@pytest.mark.parametrize("field", list(REFUSED))
def test_unimplemented_parameters_get_a_400_naming_them(server, field):
    path, value = REFUSED[field]
    base = CHAT if path == "/v1/chat/completions" else COMPLETION
    status, body = post(server, path, {**base, field: value})
    assert status == 400, body
    assert body["error"]["param"] == field
    assert body["error"]["message"].startswith(f"{field}:")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", []),
        ("tool_choice", "none"),
        ("response_format", {"type": "text"}),
        ("logit_bias", {}),
        ("presence_penalty", 0),
        ("frequency_penalty", 0.0),
        ("modalities", ["text"]),
        ("n", 1),
        ("grammar", None),
        ("a_field_from_the_future", {"anything": True}),  # unknown fields stay ignored
    ],
)
def test_defaults_and_unknown_fields_are_accepted(server, field, value):
    status, body = post(server, "/v1/chat/completions", {**CHAT, field: value})
    assert status == 200, body


def test_a_boolean_is_not_a_default_value(server):
    # `false == 0` in Python; the check must not let a boolean pass for best_of's 1.
    status, body = post(server, "/v1/completions", {**COMPLETION, "best_of": True})
    assert status == 400 and body["error"]["param"] == "best_of"


# ---------------------------------------------------------------------------- penalties, bias
@pytest.mark.parametrize(
    "extra",
    [
        {"presence_penalty": 2.0, "frequency_penalty": -2.0},
        {"presence_penalty": -0.5, "frequency_penalty": 1.5, "temperature": 1.0, "seed": 3},
        {"logit_bias": {"6417": -100, "28": 100.0}},
    ],
)
def test_penalties_and_biases_are_accepted(server, extra):
    status, body = post(server, "/v1/chat/completions", {**CHAT, **extra})
    assert status == 200, body


def test_logit_bias_steers_generation(server, smollm2_tokenizer):
    body = {**COMPLETION, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    status, reply = post(server, "/v1/completions", {**body, "logit_bias": {"6417": 100}})
    assert status == 200, reply
    assert reply["choices"][0]["text"] == smollm2_tokenizer.decode([6417] * 3)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"presence_penalty": "1"}, "presence_penalty"),
        ({"logit_bias": {"6417": 101}}, "logit_bias.6417"),
        ({"logit_bias": {"hello": 1}}, "logit_bias"),
        ({"logit_bias": {"-5": 1}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"logit_bias": {"1000000": 1}}, "logit_bias"),
        ({"logit_bias": [[6417, 1]]}, "logit_bias"),
        ({"logit_bias": {"7": 1, "007": 2}}, "logit_bias"),
    ],
)
def test_penalties_and_biases_out_of_range_get_a_400(server, extra, param):
    for path, base in [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]:
        status, body = post(server, path, {**base, **extra})
        assert status == 400, body
        assert body["error"]["param"] == param


# ---------------------------------------------------------------------------- tokenizer routes
TEXTS = ["Hello, world!", "  spaces\tand\nnewlines ", "héllo 日本語 🙂", "<|im_start|>user", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_matches_the_tokenizer(server, smollm2_tokenizer, text):
    status, body = post(server, "/tokenize", {"content": text})
    assert status == 200, body
    assert body == {"tokens": smollm2_tokenizer.encode(text, add_bos=False, special=True)}


def test_tokenize_add_special_adds_what_a_prompt_gets(server, smollm2_tokenizer):
    status, body = post(server, "/tokenize", {"content": "Hi there", "add_special": True})
    assert status == 200
    expected = smollm2_tokenizer.encode(
        "Hi there",
        add_bos=smollm2_tokenizer.add_bos_default,
        add_eos=smollm2_tokenizer.add_eos_default,
    )
    assert body["tokens"] == expected


def test_tokenize_with_pieces(server, smollm2_tokenizer):
    text = "Hello, world!"
    status, body = post(server, "/tokenize", {"content": text, "with_pieces": True})
    assert status == 200
    ids = smollm2_tokenizer.encode(text, add_bos=False)
    assert [t["id"] for t in body["tokens"]] == ids
    assert [t["piece"] for t in body["tokens"]] == [
        smollm2_tokenizer.token_bytes(i).decode() for i in ids
    ]
    assert "".join(t["piece"] for t in body["tokens"]) == text


@pytest.mark.parametrize("text", TEXTS)
def test_detokenize_round_trips(server, smollm2_tokenizer, text):
    ids = smollm2_tokenizer.encode(text, add_bos=False)
    status, body = post(server, "/detokenize", {"tokens": ids})
    assert status == 200, body
    assert body == {"content": smollm2_tokenizer.decode(ids)}
    assert body["content"] == text


@pytest.mark.parametrize("bad", [-1, 10**9])
def test_detokenize_refuses_ids_outside_the_vocabulary(server, bad):
    status, body = post(server, "/detokenize", {"tokens": [1, bad]})
    assert status == 400
    assert body["error"]["param"] == "tokens" and str(bad) in body["error"]["message"]


def test_tokenize_refuses_text_longer_than_a_prompt_may_be(server, smollm2_tokenizer):
    longest = max(
        len(smollm2_tokenizer.token_bytes(i)) for i in range(smollm2_tokenizer.vocab_size)
    )
    status, body = post(server, "/tokenize", {"content": "a" * (CTX * longest + 1)})
    assert status == 400
    assert body["error"]["param"] == "content"
    assert body["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "body",
    [{"content": 5}, {"content": "x", "add_special": "yes"}, {"tokens": "1 2"}, {}],
)
def test_tokenizer_routes_check_types(server, body):
    path = "/detokenize" if "tokens" in body else "/tokenize"
    status, reply = post(server, path, body)
    assert status == 400 and reply["error"]["code"] == "invalid_value"


def test_the_key_guards_the_tokenizer_routes(server):
    for path, body in [("/tokenize", {"content": "hi"}), ("/detokenize", {"tokens": [1]})]:
        assert post(server, path, body, key=None)[0] == 401
        assert post(server, path, body, key="wrong")[0] == 401
    assert call(server, "GET", "/health", key=None)[0] == 200
    assert call(server, "GET", "/metrics", key=None)[0] == 200


# ---------------------------------------------------------------------------- request log
LOG_LINE = re.compile(
    r"request (?P<id>\S+) (?P<endpoint>\S+) prompt_tokens=(?P<prompt>\d+) "
    r"completion_tokens=(?P<completion>\d+) ttft_ms=(?P<ttft>[\d.]+|-) "
    r"tokens_per_s=(?P<speed>[\d.]+|-) finish=(?P<finish>\w+)"
)


def log_line(server, request_id: str) -> re.Match[str]:
    # The line is written before the answer is sent, but the log is a file another
    # process writes: give its buffer a moment.
    deadline = time.monotonic() + 10
    while True:
        for m in LOG_LINE.finditer(server.log_text()):
            if m["id"] == request_id:
                return m
        assert time.monotonic() < deadline, server.log_text()[-2000:]
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("path", "base"), [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]
)
def test_one_log_line_per_request(server, path, base):
    body = {**base, "max_tokens": 5, "ignore_eos": True}
    status, reply = post(server, path, body)
    assert status == 200
    m = log_line(server, reply["id"])
    assert m["endpoint"] == path
    assert int(m["prompt"]) == reply["usage"]["prompt_tokens"]
    assert int(m["completion"]) == reply["usage"]["completion_tokens"] == 5
    assert m["finish"] == "length"
    assert float(m["ttft"]) > 0 and float(m["speed"]) > 0
    assert server.log_text().count(reply["id"]) == 1


def test_a_streamed_request_is_logged_too(server):
    payload = {**COMPLETION, "max_tokens": 3, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    _, raw, _ = http_request(server.port, "POST", "/v1/completions", payload, headers)
    data = raw.decode()
    first = json.loads(data.split("data: ", 2)[1].split("\n", 1)[0])
    m = log_line(server, first["id"])
    assert m["completion"] == "3" and m["finish"] == "length"


# ---------------------------------------------------------------------------- metrics
def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = call(server, "GET", "/metrics", key=None)
    assert status == 200 and isinstance(text, str)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_requests_and_tokens(server):
    requests = (
        "llamalab_requests_total",
        (("endpoint", "/v1/chat/completions"), ("status", "200")),
    )
    before = scrape(server)
    usages = []
    for prompt in ("Hi", "Tell me a joke"):
        status, reply = post(
            server,
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": prompt}]},
        )
        assert status == 200
        usages.append(reply["usage"])
    after = scrape(server)

    def grew(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert grew(*requests) == 2
    assert grew("llamalab_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert grew("llamalab_completion_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert grew("llamalab_time_to_first_token_seconds_count") == 2
    assert grew("llamalab_request_duration_seconds_count") == 2
    assert after[("llamalab_queue_depth", ())] == 0
    assert after[("llamalab_running_requests", ())] == 0


def test_metrics_count_refusals_by_status(server):
    key = ("llamalab_requests_total", (("endpoint", "/tokenize"), ("status", "401")))
    before = scrape(server).get(key, 0.0)
    post(server, "/tokenize", {"content": "hi"}, key=None)
    assert scrape(server)[key] == before + 1


def test_each_app_has_its_own_registry():
    # Two apps in one process (as in-process tests make) must not clash over names.
    from llamalab.serve.metrics import Metrics

    class Idle:
        queued = 0
        active_slots = 0

    first, second = Metrics(Idle()), Metrics(Idle())  # type: ignore[arg-type]
    first.prompt_tokens.inc(3)
    assert first.registry.get_sample_value("llamalab_prompt_tokens_total") == 3
    assert second.registry.get_sample_value("llamalab_prompt_tokens_total") == 0


# ---------------------------------------------------------------------------- n, structured output
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
SAMPLED = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}


def _sse(server, path: str, body: dict) -> list[dict]:
    status, data, _ = http_request(
        server.port, "POST", path, {**body, "stream": True}, {"Authorization": f"Bearer {KEY}"}
    )
    assert status == 200, data
    lines = [line[6:] for line in data.decode().splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_n_choices_each_sampled_on_its_own(server):
    body = {**COMPLETION, "max_tokens": 6, "ignore_eos": True, "n": 3, "seed": 7, **SAMPLED}
    status, reply = post(server, "/v1/completions", body)
    assert status == 200, reply
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in reply["choices"]]
    assert len(set(texts)) > 1  # different draws, not one answer three times
    assert reply["usage"]["completion_tokens"] == 18
    assert (
        reply["usage"]["prompt_tokens"]
        == post(server, "/v1/completions", COMPLETION)[1]["usage"]["prompt_tokens"]
    )  # the prompt is counted once
    # The same seed gives the same choices; choice 0 is the answer n=1 gives with that seed.
    assert [c["text"] for c in post(server, "/v1/completions", body)[1]["choices"]] == texts
    single = post(server, "/v1/completions", {**body, "n": 1})[1]
    assert single["choices"][0]["text"] == texts[0]
    # Greedy choices are all the one most likely text, as OpenAI's are.
    greedy = post(server, "/v1/completions", {**body, "temperature": 0})[1]
    assert len({c["text"] for c in greedy["choices"]}) == 1


def test_n_choices_streamed(server):
    body = {**CHAT, "max_tokens": 4, "ignore_eos": True, "n": 2, "seed": 3, **SAMPLED}
    body["stream_options"] = {"include_usage": True}
    chunks = _sse(server, "/v1/chat/completions", body)
    text = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        text[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    whole = post(server, "/v1/chat/completions", {**body, "stream": False})[1]
    assert [c["message"]["content"] for c in whole["choices"]] == [text[0], text[1]]


def test_too_many_choices_are_refused(server):
    status, body = post(server, "/v1/completions", {**COMPLETION, "n": 17})
    assert status == 400 and body["error"]["param"] == "n"


def test_json_schema_response_format(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    body = {
        "messages": [{"role": "user", "content": "Describe a person."}],
        "response_format": fmt,
        "max_tokens": 60,
        "n": 2,
        "seed": 1,
        **SAMPLED,
    }
    status, reply = post(server, "/v1/chat/completions", body)
    assert status == 200, reply
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "stop"
        person = json.loads(choice["message"]["content"])
        jsonschema.validate(person, PERSON)
    # Streamed, the pieces add up to valid JSON as well.
    chunks = _sse(server, "/v1/chat/completions", {**body, "n": 1})
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_and_grammar(server):
    chat = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 40}
    status, reply = post(
        server, "/v1/chat/completions", {**chat, "response_format": {"type": "json_object"}}
    )
    assert status == 200, reply
    content = reply["choices"][0]["message"]["content"]
    if reply["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut at max_tokens: still the start of an object
        assert content.startswith("{")
    # llama.cpp's spelling: a schema inside json_object.
    spelled = {"type": "json_object", "schema": {"type": "array", "maxItems": 0}}
    status, reply = post(server, "/v1/chat/completions", {**chat, "response_format": spelled})
    assert status == 200 and reply["choices"][0]["message"]["content"] == "[]", reply
    # llama.cpp's grammar field, on the completions route too.
    grammar = 'root ::= ("yes" | "no") "!"'
    status, reply = post(
        server, "/v1/completions", {**COMPLETION, "max_tokens": 10, "grammar": grammar}
    )
    assert status == 200 and reply["choices"][0]["text"] in ("yes!", "no!"), reply


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "json_schema"}},  # no schema
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
        {"response_format": {"type": "xml"}},
        {"response_format": {"type": "json_object", "schema": {"pattern": "(unclosed"}}},
        {"grammar": "root ::= ("},
        {"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}},
    ],
)
def test_bad_constraints_are_400s_naming_the_field(server, extra):
    status, body = post(server, "/v1/chat/completions", {**CHAT, **extra})
    assert status == 400, body
    error = body["error"]
    param = error["param"] or ""
    assert param.split(".")[0] in ("response_format", "grammar", ""), error
    assert "Traceback" not in error["message"]
    # The server still answers after each one.
    assert post(server, "/v1/chat/completions", CHAT)[0] == 200


def test_hostile_schemas_are_refused_quickly(server):
    deep: dict = {"type": "object"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"a": deep}}
    huge = {"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(60_000)}}
    for schema in (deep, huge, {"type": "string", "pattern": "(a|aa){1,100000}b"}):
        t0 = time.perf_counter()
        status, body = post(
            server,
            "/v1/chat/completions",
            {**CHAT, "response_format": {"type": "json_object", "schema": schema}},
        )
        assert time.perf_counter() - t0 < 10
        assert status in (200, 400), body
        assert status == 200 or body["error"]["param"] == "response_format.schema"
    assert post(server, "/v1/chat/completions", CHAT)[0] == 200
