"""The server's app and scheduler around an engine that fails on purpose (in process).

A stand-in engine makes a row fail, a whole step raise, the scheduler thread die or
hang: things no valid request can make the real engine do, but which the server must
survive. The real server meets the real engine in test_serve.py and test_serve_limits.py.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from llamalab.generation import GenerationEvent, Request
from llamalab.serve.app import create_app
from llamalab.serve.scheduler import Scheduler

FAIL_ROW = 1  # a prompt that starts with this id fails with an "error" event
RAISE_STEP = 2  # ... makes Engine.step raise (with a message no client may see)
KILL_THREAD = 3  # ... raises something the scheduler loop does not catch: the thread dies
HANG = 4  # ... makes Engine.step block until released
SECRET = "secret internal detail"


class _Death(BaseException):
    pass


class FakeTokenizer:
    vocab_size = 10
    chat_template = None

    def token_bytes(self, token_id: int) -> bytes:
        return b"ab"

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        return [int(c) for c in text if c.isdigit()] or [0]


class FakeGeneration:
    def __init__(self, request: Request) -> None:
        self.request = request
        self.produced = 0


class FakeEngine:
    """Emits "a" per step until max_tokens; the first prompt id picks a failure."""

    max_batch = 2
    max_seq_len = 64

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.rows: list[FakeGeneration] = []
        self.release = threading.Event()

    @property
    def free_rows(self) -> int:
        return self.max_batch - len(self.rows)

    def add(self, request: Request) -> FakeGeneration:
        generation = FakeGeneration(request)
        self.rows.append(generation)
        return generation

    def cancel(self, generation: FakeGeneration) -> None:
        if generation in self.rows:
            self.rows.remove(generation)

    def step(self) -> list[tuple[FakeGeneration, GenerationEvent]]:
        time.sleep(0.01)
        events = []
        for g in list(self.rows):
            first = g.request.prompt_ids[0]
            if first == RAISE_STEP:
                raise RuntimeError(SECRET)
            if first == KILL_THREAD:
                raise _Death(SECRET)
            if first == HANG:
                self.release.wait(30)
            if first == FAIL_ROW:
                self.rows.remove(g)
                error = "internal error during sampling"
                events.append((g, GenerationEvent(None, "", finish_reason="error", error=error)))
                continue
            g.produced += 1
            done = g.produced >= g.request.max_tokens
            if done:
                self.rows.remove(g)
            events.append((g, GenerationEvent(5, "a", finish_reason="length" if done else None)))
        return events


def _app(engine: FakeEngine, **kw: float) -> TestClient:
    scheduler = Scheduler(engine, **kw)  # type: ignore[arg-type]  # a stand-in engine
    return TestClient(create_app(scheduler, model_id="fake"))


def _stream(client: TestClient, prompt: list[int], max_tokens: int = 5) -> list[str]:
    """The data lines of a streamed completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_a_failed_row_ends_its_stream_with_an_error_event_and_others_finish() -> None:
    with _app(FakeEngine()) as client:
        results: dict[str, list[str]] = {}

        def run(name: str, prompt: list[int]) -> None:
            results[name] = _stream(client, prompt, max_tokens=20)

        threads = [
            threading.Thread(target=run, args=("good", [7])),
            threading.Thread(target=run, args=("bad", [FAIL_ROW])),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        good, bad = results["good"], results["bad"]
        assert (
            good[-1] == "[DONE]" and json.loads(good[-2])["choices"][0]["finish_reason"] == "length"
        )
        assert bad[-1] == "[DONE]"
        error = json.loads(bad[-2])["error"]
        assert error["message"] == "internal error during sampling"
        assert error["type"] == "server_error"
        # Not streamed: a 500 with the engine's (client-safe) message.
        response = client.post("/v1/completions", json={"prompt": [FAIL_ROW], "max_tokens": 3})
        assert response.status_code == 500
        assert response.json()["error"]["message"] == "internal error during sampling"


def test_a_raising_step_fails_its_batch_without_leaking_details_and_the_server_goes_on() -> None:
    with _app(FakeEngine()) as client:
        lines = _stream(client, [RAISE_STEP])
        assert lines[-1] == "[DONE]"
        error = json.loads(lines[-2])["error"]
        assert SECRET not in error["message"] and "internal error" in error["message"]
        response = client.post("/v1/completions", json={"prompt": [RAISE_STEP], "max_tokens": 3})
        assert response.status_code == 503 and SECRET not in response.text
        assert client.get("/health").status_code == 200
        out = client.post("/v1/completions", json={"prompt": [7], "max_tokens": 3}).json()
        assert out["choices"][0]["text"] == "aaa"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_is_503_when_the_scheduler_thread_is_dead() -> None:
    with _app(FakeEngine()) as client:
        assert client.get("/health").json()["status"] == "ok"
        lines = _stream(client, [KILL_THREAD])  # kills the thread mid-step
        assert lines[-1] == "[DONE]" and "error" in json.loads(lines[-2])  # still an ending
        deadline = time.monotonic() + 5  # the thread ends its requests, then exits
        while client.get("/health").status_code == 200:
            assert time.monotonic() < deadline, "health never noticed the dead thread"
            time.sleep(0.05)
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "dead"
        response = client.post("/v1/completions", json={"prompt": [7], "max_tokens": 1})
        assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"


def test_health_is_503_when_the_scheduler_hangs() -> None:
    engine = FakeEngine()
    with _app(engine, stall_after=0.3) as client:
        thread = threading.Thread(
            target=client.post, args=("/v1/completions",), kwargs={"json": {"prompt": [HANG]}}
        )
        thread.start()
        deadline = time.monotonic() + 10
        while client.get("/health").status_code == 200:
            assert time.monotonic() < deadline, "health never noticed the hang"
            time.sleep(0.1)
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "stalled"
        response = client.post("/v1/completions", json={"prompt": [7], "max_tokens": 1})
        assert response.status_code == 503 and "Retry-After" in response.headers
        engine.release.set()
        thread.join(10)
        assert client.get("/health").status_code == 200


def test_the_engine_thread_runs_every_job_on_one_thread_in_order() -> None:
    from llamalab.serve.scheduler import EngineThread

    thread = EngineThread()
    try:
        idents = [thread.call(threading.get_ident) for _ in range(3)]
        assert len(set(idents)) == 1 and idents[0] != threading.get_ident()
        with pytest.raises(ZeroDivisionError):
            thread.call(lambda: 1 / 0)
        assert thread.call(lambda: "still there") == "still there"
    finally:
        thread.stop()


def test_the_scheduler_steps_on_the_thread_that_built_the_engine() -> None:
    """OpenMP keeps a worker pool per thread that starts parallel work; two pools on a
    small machine slow every torch kernel (EngineThread's docstring): the server loads
    on the engine thread and the scheduler steps there too."""
    from llamalab.serve.scheduler import EngineThread

    thread = EngineThread()
    engine = thread.call(FakeEngine)
    built_on = thread.call(threading.get_ident)
    stepped_on: set[int] = set()
    step = engine.step

    def recording_step():
        stepped_on.add(threading.get_ident())
        return step()

    engine.step = recording_step
    scheduler = Scheduler(engine, thread=thread)  # type: ignore[arg-type]  # a stand-in engine
    with TestClient(create_app(scheduler, model_id="fake")) as client:
        out = client.post("/v1/completions", json={"prompt": [7], "max_tokens": 3}).json()
        assert out["choices"][0]["text"] == "aaa"
    assert stepped_on == {built_on}
