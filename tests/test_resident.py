"""`llamalab generate` and `chat` answered by a running `llamalab serve` (a resident model).

The reference for every reply is the same command run with `--no-server`, which loads
the model in its own process: the server must give the same ids, text, finish reason,
`--json` shape and errors, and the client side must import no torch.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from llamalab.cli import main
from llamalab.serve.launch import ServerProcess, free_port

pytest.importorskip("fastapi")

# The tests' environment says "no server" (conftest); these commands ask for one.
CLIENT_ENV = {k: v for k, v in os.environ.items() if k not in ("LLAMALAB_NO_SERVER",)}
CLIENT_ENV["OMP_WAIT_POLICY"] = "PASSIVE"
HEAVY = ("torch", "numpy", "transformers", "tokenizers", "sentencepiece", "jinja2", "gguf")


@pytest.fixture(scope="module")
def server(smollm2_path):
    with ServerProcess(["--model", str(smollm2_path)]) as proc:
        yield proc


def cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None):
    """Run `llamalab ARGS` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "llamalab", *args],
        check=False,
        env=env if env is not None else CLIENT_ENV,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def in_process(capsys, *args: str) -> dict:
    """`llamalab generate --json ARGS --no-server`, run here: the reference reply."""
    capsys.readouterr()
    assert main(["generate", "--json", "--no-server", *args]) == 0
    return json.loads(capsys.readouterr().out)


CASES = {
    "plain": ["-n", "24", "--temperature", "0", "The capital of France is"],
    "chat-system": [
        "-n",
        "24",
        "--temperature",
        "0",
        "--chat",
        "--system",
        "Answer in one word.",
        "What colour is the sky?",
    ],
    "stop-string": ["-n", "60", "--temperature", "0", "--stop", ".", "Tell me about Paris."],
    "seeded-sampling": ["-n", "20", "--seed", "7", "--temperature", "0.9", "Once upon a time"],
    "penalties-bias": [
        "-n",
        "20",
        "--temperature",
        "0",
        "--repeat-penalty",
        "1.3",
        "--logit-bias",
        "7042=-100",
        "The capital of France is",
    ],
    # The reply reaches the end of a 16-token context: it must end at the same token,
    # with "length", on a server whose context is 2048.
    "context-end": ["-n", "100", "--ctx", "16", "--temperature", "0", "One, two, three,"],
    "logprobs": ["-n", "8", "--temperature", "0", "--logprobs", "3", "def fibonacci(n):"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_replies_through_the_server_equal_in_process_ones(case, server, smollm2_path, capsys):
    args = ["--model", str(smollm2_path), *CASES[case]]
    here = in_process(capsys, *args)
    # Found on its address (no --server): the model is the same file, so it is used.
    env = {**CLIENT_ENV, "LLAMALAB_SERVER": server.url}
    done = cli("generate", "--json", *args, env=env)
    assert done.returncode == 0, done.stderr
    there = json.loads(done.stdout)
    assert there.pop("server") == server.url
    assert set(there) == set(here)
    assert set(there["timing"]) == set(here["timing"])
    for key in ("prompt_ids", "ids", "text", "finish_reason"):
        assert there[key] == here[key], key
    assert there["timing"]["prompt_tokens"] == here["timing"]["prompt_tokens"]
    if "logprobs" in here:
        for a, b in zip(there["logprobs"], here["logprobs"], strict=True):
            assert (a["id"], a["token"]) == (b["id"], b["token"])
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3)
            assert [t["id"] for t in a["top_logprobs"]] == [t["id"] for t in b["top_logprobs"]]
            assert [t["token"] for t in a["top_logprobs"]] == [
                t["token"] for t in b["top_logprobs"]
            ]
    if case == "context-end":
        assert here["finish_reason"] == "length"
        assert len(here["prompt_ids"]) + len(here["ids"]) == 16 + 1


def test_streamed_text_through_the_server_equals_in_process(server, smollm2_path, capsys):
    args = ["--model", str(smollm2_path), "-n", "30", "--temperature", "0", "--chat", "Hi!"]
    capsys.readouterr()
    assert main(["generate", "--no-server", *args]) == 0
    here = capsys.readouterr().out
    done = cli("generate", "--server", server.url, *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout == here
    assert done.stderr == ""  # piped: no chatter


def test_json_schema_through_the_server(server, smollm2_path, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"city": {"type": "string"}}}')
    args = ["--model", str(smollm2_path), "-n", "30", "--temperature", "0"]
    args += ["--json-schema", str(schema), "--chat", "Name a city as JSON."]
    here = in_process(capsys, *args)
    done = cli("generate", "--json", "--server", server.url, *args)
    assert done.returncode == 0, done.stderr
    there = json.loads(done.stdout)
    assert (there["ids"], there["text"]) == (here["ids"], here["text"])
    json.loads(there["text"])  # the constraint held


def test_a_bad_grammar_is_named_as_the_file(server, smollm2_path, tmp_path):
    bad = tmp_path / "bad.gbnf"
    bad.write_text("root ::= (\n")
    done = cli(
        "generate", "--server", server.url, "--model", str(smollm2_path), "--grammar", str(bad), "x"
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"llamalab: error: {bad}: "), done.stderr
    assert "Traceback" not in done.stderr


def test_chat_through_the_server_equals_in_process(server, smollm2_path):
    args = ["chat", "--model", str(smollm2_path), "--temperature", "0", "-n", "24"]
    turns = "The secret word is banana.\nWhat is the secret word?\n/exit\n"
    here = cli(*args, "--no-server", stdin=turns, env={**CLIENT_ENV, "LLAMALAB_HISTORY": ""})
    there = cli(
        *args, "--server", server.url, stdin=turns, env={**CLIENT_ENV, "LLAMALAB_HISTORY": ""}
    )
    assert here.returncode == there.returncode == 0, (here.stderr, there.stderr)
    assert there.stdout == here.stdout
    assert f"served by {server.url}" in there.stderr


def test_a_client_imports_no_torch(server, smollm2_path):
    code = (
        "import json, sys\n"
        "from llamalab.cli import main\n"
        f"rc = main(['generate', '--server', {server.url!r}, '--model', {str(smollm2_path)!r},"
        " '-n', '4', '--temperature', '0', '--chat', 'Hi'])\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=CLIENT_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "heavy": []}


def test_a_server_with_another_model_is_not_used(server, smollm2_path, tmp_path):
    # The same file with one weight byte changed (the last byte of the last tensor) is
    # another model: found on its address, the server is passed over; named, it is an error.
    other = tmp_path / "other.gguf"
    shutil.copyfile(smollm2_path, other)
    with open(other, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0x01]))
    args = ["--model", str(other), "-n", "1", "--temperature", "0", "--json", "Hi"]
    done = cli("generate", *args, env={**CLIENT_ENV, "LLAMALAB_SERVER": server.url})
    assert done.returncode == 0, done.stderr
    assert "server" not in json.loads(done.stdout)  # ran here
    done = cli("generate", "--server", server.url, *args)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"llamalab: error: --server {server.url}: it serves ")
    assert "not the model" in lines[0]


def test_a_copy_of_the_file_is_the_same_model(server, smollm2_path, tmp_path):
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(smollm2_path, copy)
    done = cli("generate", "--server", server.url, "--model", str(copy), "-n", "2", "--json", "Hi")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["server"] == server.url


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--ctx", "4096"], "its context holds 2048 tokens, fewer than --ctx 4096"),
        (["--dtype", "float32"], "--dtype auto, not --dtype float32"),
        (["--threads", "1"], "--threads is set when the server starts"),
    ],
)
def test_settings_the_server_does_not_share_are_refused(server, smollm2_path, extra, words):
    done = cli("generate", "--server", server.url, "--model", str(smollm2_path), *extra, "Hi")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr


def test_a_dead_server_is_one_clear_error(smollm2_path):
    url = f"http://127.0.0.1:{free_port()}"
    done = cli("generate", "--server", url, "--model", str(smollm2_path), "Hi")
    assert done.returncode == 1
    assert done.stderr == f"llamalab: error: no server answers at {url} (Connection refused)\n"


def test_server_and_no_server_together_are_refused():
    done = cli("generate", "--server", "http://127.0.0.1:1", "--no-server", "Hi")
    assert done.returncode == 2
    assert "not allowed with argument" in done.stderr


class Listener:
    """A TCP port that counts the connections made to it and answers none of them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@pytest.mark.parametrize("opt_out", ["--no-server", "LLAMALAB_NO_SERVER=1", None])
def test_the_opt_out_never_probes(opt_out, tmp_path):
    listener = Listener()
    env = {**CLIENT_ENV, "LLAMALAB_SERVER": listener.url}
    args = ["generate", "--model", str(tmp_path / "missing.gguf"), "Hi"]
    if opt_out == "--no-server":
        args.insert(1, "--no-server")
    elif opt_out is not None:
        env["LLAMALAB_NO_SERVER"] = "1"
    done = cli(*args, env=env)
    assert done.returncode == 1  # the missing model, reported by the in-process load
    assert "missing.gguf" in done.stderr and "Traceback" not in done.stderr
    listener.sock.close()
    # Without an opt-out the address is probed (and, answering nothing, passed over).
    assert listener.connections == (1 if opt_out is None else 0)


QUOTE = "Copy this line exactly: the quick brown fox jumps over the lazy dog, twice over."


@pytest.mark.parametrize(
    "lookup", [["--no-lookup"], ["--lookup", "--lookup-ngram", "2", "--draft-max", "4"]]
)
def test_lookup_options_travel_to_the_server(lookup, server, smollm2_path, capsys):
    args = ["--model", str(smollm2_path), "-n", "24", "--temperature", "0", "--chat", QUOTE]
    here = in_process(capsys, "--no-lookup", *args)
    done = cli("generate", "--json", "--server", server.url, *lookup, *args)
    assert done.returncode == 0, done.stderr
    there = json.loads(done.stdout)
    assert there["ids"] == here["ids"] and there["text"] == here["text"]
    if lookup == ["--no-lookup"]:  # the server's default is lookup on
        assert there["timing"]["draft_tokens"] == 0


def test_the_request_body_carries_the_lookup_options():
    from llamalab.cli import build_parser
    from llamalab.cli.options import sampling_from_args
    from llamalab.cli.resident import request_body

    def body(*flags):
        args = build_parser().parse_args(["generate", *flags, "Hi"])
        return request_body(args, sampling_from_args(args), None)

    assert not {"lookup", "lookup_ngram", "draft_max"} & set(body())  # the server's default
    assert body("--no-lookup")["lookup"] is False
    sized = body("--lookup", "--lookup-ngram", "2", "--draft-max", "4")
    assert (sized["lookup"], sized["lookup_ngram"], sized["draft_max"]) == (True, 2, 4)
    assert body("--draft-max", "5")["draft_max"] == 5 and "lookup" not in body("--draft-max", "5")


def test_a_draft_model_is_refused_with_a_server(server, smollm2_path):
    done = cli("generate", "--server", server.url, "--model", str(smollm2_path), "--draft",
               str(smollm2_path), "Hi")  # fmt: skip
    assert done.returncode == 1
    assert "--draft is not sent to a server" in done.stderr and done.stderr.count("\n") == 1
