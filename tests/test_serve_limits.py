"""`llamalab serve` against what a careless or hostile client sends: the real server.

One server without an API key (so the Host check is on), small limits so that they are
cheap to reach: 2 batch rows, 2 queue places, a 64 KiB body, a 2 s header timeout. The
SIGTERM test starts a server of its own, since it ends it.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest
from conftest import http_request

pytest.importorskip("fastapi")

from llamalab.serve.launch import ServerProcess

CTX = 512
MAX_BODY = 64 * 1024
HEADER_TIMEOUT = 2.0
LONG = {"prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(smollm2_path):
    args = ["--model", str(smollm2_path), "--ctx", str(CTX), "--max-batch", "2"]
    args += ["--max-queue", "2", "--max-body-bytes", str(MAX_BODY)]
    args += ["--header-timeout", str(HEADER_TIMEOUT)]
    with ServerProcess(args) as proc:
        yield proc


def post(
    server, path: str, body: bytes | str | dict, *, host: str | None = None
) -> tuple[int, dict, dict]:
    """One POST, with another Host header if given: status, JSON body, headers."""
    status, data, headers = http_request(
        server.port, "POST", path, body, {} if host is None else {"Host": host}
    )
    return status, json.loads(data) if data else {}, headers


def sse_events(data: bytes) -> list[str]:
    return [line[6:] for line in data.decode().split("\n") if line.startswith("data: ")]


def open_stream(server, body: dict) -> socket.socket:
    """A streamed completion sent by hand; the caller reads or drops the socket."""
    payload = json.dumps({**body, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=120)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        if b"data: [DONE]" in data:
            break
    return data


def wait_for(server, predicate, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = server.health()
        if predicate(health):
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.05)


# ---------------------------------------------------------------------------- client input
BAD_VALUES = {
    "seed 2^70": (f'{{"prompt": [6417], "seed": {2**70}}}', "seed"),
    "seed 2^70, streamed": (f'{{"prompt": [6417], "seed": {2**70}, "stream": true}}', "seed"),
    "lone surrogate in a prompt": ('{"prompt": "hi \\ud800 there"}', "prompt"),
    "lone surrogate in a chat": (
        '{"messages": [{"role": "user", "content": "\\ud800"}]}',
        "messages.0.content",
    ),
    "lone surrogate in a stop string": ('{"prompt": "hi", "stop": ["\\udfff"]}', "stop"),
    "top_p 1e-300": ('{"prompt": [6417], "top_p": 1e-300, "temperature": 1}', "top_p"),
    "repeat_penalty 1e-40": (
        '{"prompt": [6417], "repeat_penalty": 1e-40, "temperature": 1, "seed": 1}',
        "repeat_penalty",
    ),
    "temperature NaN": ('{"prompt": [6417], "temperature": NaN}', "temperature"),
    "min_p Infinity": ('{"prompt": [6417], "min_p": Infinity}', "min_p"),
    "temperature as a string": ('{"prompt": "hi", "temperature": "0.5"}', "temperature"),
    "booleans as a prompt": ('{"prompt": [true, false]}', "prompt"),
    "stream as a string": ('{"prompt": "hi", "stream": "yes"}', "stream"),
    "max_tokens as a float": ('{"prompt": "hi", "max_tokens": 2.5}', "max_tokens"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_a_bad_value_is_a_400_that_names_the_field(server, case):
    body, field = BAD_VALUES[case]
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    status, data, _ = post(server, path, body)
    assert status == 400, data
    assert data["error"]["param"].startswith(field), data
    assert field.split(".")[0] in data["error"]["message"]
    assert "Traceback" not in data["error"]["message"]


def test_the_server_answers_normally_after_bad_requests(server):
    for body, _ in BAD_VALUES.values():
        post(server, "/v1/completions", body)
    assert server.health()["status"] == "ok"
    status, data, _ = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 3})
    assert status == 200 and data["usage"]["completion_tokens"] == 3


def test_a_bad_request_does_not_disturb_running_streams(server):
    socks = [open_stream(server, {"prompt": "Count:", "max_tokens": 40}) for _ in range(2)]
    wait_for(server, lambda h: h["active_slots"] == 2)
    for case in ("repeat_penalty 1e-40", "top_p 1e-300", "seed 2^70, streamed"):
        assert post(server, "/v1/completions", BAD_VALUES[case][0])[0] == 400
    for sock in socks:
        events = sse_events(read_all(sock))
        sock.close()
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------------------- sizes
def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    # The declared length alone decides: the body is never sent.
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {25 * 1024 * 1024}\r\n\r\n".encode()
        + b'{"prompt": "'
    )
    head = b""
    while chunk := sock.recv(65536):  # the server closes the connection after its answer
        head += chunk
    sock.close()
    head = head.decode()
    assert head.startswith("HTTP/1.1 413"), head
    assert '"request_too_large"' in head


def test_a_chunked_body_over_the_limit_is_refused_at_the_limit(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"x" * 16384
    try:
        for _ in range(MAX_BODY // len(piece) + 2):  # just past the limit, no end chunk
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    except OSError:
        pass  # the server may answer and close while this is still sending
    head = sock.recv(65536).decode()
    sock.close()
    assert head.startswith("HTTP/1.1 413"), head


def test_a_long_prompt_is_refused_without_tokenizing_it_all(server):
    text = "hello " * (MAX_BODY // 6 - 100)  # under the body limit, far over the context
    t0 = time.perf_counter()
    status, data, _ = post(server, "/v1/completions", {"prompt": text, "max_tokens": 1})
    assert status == 400 and data["error"]["code"] == "context_length_exceeded", data
    assert data["error"]["param"] == "prompt"
    assert time.perf_counter() - t0 < 5.0


def test_a_valid_prompt_near_the_character_bound_is_tokenized_exactly(server, smollm2_tokenizer):
    # The longest vocabulary entry, repeated: as many characters per token as there can
    # be, so this prompt sits at the character bound and still fits the context.
    longest = max(
        range(smollm2_tokenizer.vocab_size), key=lambda i: len(smollm2_tokenizer.token_bytes(i))
    )
    text = smollm2_tokenizer.token_bytes(longest).decode() * (CTX - 12)
    expected = len(smollm2_tokenizer.encode(text, special=True))
    assert expected < CTX - 1
    status, data, _ = post(server, "/v1/completions", {"prompt": text, "max_tokens": 1})
    assert status == 200, data
    assert data["usage"]["prompt_tokens"] == expected


# ---------------------------------------------------------------------------- the queue
def test_a_full_queue_answers_503_with_retry_after(server):
    socks = [open_stream(server, LONG) for _ in range(2)]
    try:
        wait_for(server, lambda h: h["active_slots"] == 2)
        socks += [open_stream(server, LONG) for _ in range(2)]
        wait_for(server, lambda h: h["queued"] == 2)
        status, data, headers = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1})
        assert status == 503, data
        assert data["error"]["code"] == "server_busy" and data["error"]["type"] == "server_error"
        assert int(headers["retry-after"]) >= 1
    finally:
        for sock in socks:
            sock.close()
    wait_for(server, lambda h: h["active_slots"] == 0 and h["queued"] == 0, timeout=15)
    assert post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1})[0] == 200


# ---------------------------------------------------------------------------- connections
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example"])
def test_a_foreign_host_header_is_refused_without_an_api_key(server, host):
    status, data, _ = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, host=host)
    assert status == 403 and data["error"]["code"] == "invalid_host", data


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:1", "[::1]:8000"])
def test_a_loopback_host_header_is_accepted(server, host):
    status, data, _ = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, host=host)
    assert status == 200, data


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(1024):
            pass
        return True  # the server closed it
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_connection_that_sends_nothing_is_closed(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    t0 = time.perf_counter()
    assert _closed_within(sock, HEADER_TIMEOUT + 5)
    assert time.perf_counter() - t0 >= HEADER_TIMEOUT - 0.5
    sock.close()


def test_slowly_sent_headers_are_cut_off(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    t0 = time.perf_counter()
    closed = False
    try:
        for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
            sock.sendall(bytes([byte]))
            time.sleep(0.2)
            if time.perf_counter() - t0 > HEADER_TIMEOUT + 5:
                break
    except OSError:
        closed = True
    closed = closed or _closed_within(sock, 1.0)
    sock.close()
    assert closed and time.perf_counter() - t0 < HEADER_TIMEOUT + 5


# ---------------------------------------------------------------------------- shutting down
def test_sigterm_drains_then_ends_every_stream_properly(smollm2_path):
    # The long stream must outlast the grace on any machine: 3,000 tokens without prompt
    # lookup (which speeds up a story that repeats itself) take 10 s at 300 tok/s.
    args = ["--model", str(smollm2_path), "--ctx", "4096", "--max-batch", "2"]
    outlasting = {**LONG, "max_tokens": 3000, "lookup": False}
    with ServerProcess([*args, "--shutdown-grace", "3", "--log-level", "info"]) as proc:
        short = open_stream(proc, {"prompt": "Hi", "max_tokens": 8})
        long = open_stream(proc, outlasting)
        wait_for(proc, lambda h: h["active_slots"] == 2)
        results: dict[str, bytes] = {}
        readers = [
            threading.Thread(target=lambda k=k, s=s: results.__setitem__(k, read_all(s)))
            for k, s in (("short", short), ("long", long))
        ]
        for r in readers:
            r.start()
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # Draining: still listening, but new work is refused.
        status, data, headers = post(proc, "/v1/completions", {"prompt": "hi", "max_tokens": 1})
        assert status == 503 and data["error"]["code"] == "server_shutting_down"
        assert "retry-after" in headers
        for r in readers:
            r.join(30)
        proc.proc.wait(30)
        log = proc.log_text()
    short_events, long_events = sse_events(results["short"]), sse_events(results["long"])
    assert short_events[-1] == "[DONE]"
    assert json.loads(short_events[-2])["choices"][0]["finish_reason"] == "length"
    assert long_events[-1] == "[DONE]"
    assert json.loads(long_events[-2])["error"]["message"] == "the server is shutting down"
    assert "Traceback" not in log and "CancelledError" not in log, log
