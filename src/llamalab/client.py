"""Talk to a running ``llamalab serve`` from a command, without torch.

``llamalab generate`` and ``llamalab chat`` hand their work to a resident server when one
holds the same model (see ``llamalab.cli.resident`` for when). This module is the client
side of that: a model file's fingerprint, the probe of ``/health``, and the streamed
``/llamalab/generate`` call. It imports only the standard library and
``llamalab.errors``, so a command that answers through a server starts in tens of
milliseconds: nothing here may import torch, numpy or the model code, even indirectly.

The server computes the same fingerprint of the file it loaded and reports it in
``/health`` (field ``llamalab``), so that a client can tell "the same model" from
"a model of the same name".
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import http.client

# http.client (with the email and ssl packages it pulls in) and hashlib are imported
# only once a server answers: a command that runs the model itself pays for a socket.

from llamalab.errors import LlamalabError

DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_ENV = "LLAMALAB_SERVER"
NO_SERVER_ENV = "LLAMALAB_NO_SERVER"
API_KEY_ENV = "LLAMALAB_API_KEY"
# A server on this machine accepts a connection in well under a millisecond; nothing
# listening is refused at once. The bound only matters for an address that drops packets.
PROBE_CONNECT_S = 0.1
# /health answers from the event loop, which stays free while the engine thread computes.
PROBE_READ_S = 2.0
# Between two events of a generation: a long prompt's prefill on a slow machine.
STREAM_READ_S = 600.0
MAX_EVENT_BYTES = 16 << 20  # one SSE line; a reply's final event carries all its ids

# The fingerprint reads the file's head, where GGUF keeps its metadata, tokenizer and
# tensor table (1.7 MB for SmolLM2, about 8 MB for a 128K vocabulary), and blocks spread
# over the rest, where two fine-tunes of one architecture differ. Hashing 9 MiB from the
# page cache takes about 10 ms; the fingerprint is only computed once a server answers.
FINGERPRINT_VERSION = "llamalab-fp1"
HEAD_BYTES = 8 << 20
SAMPLES = 64
SAMPLE_BYTES = 16 << 10
# A Hugging Face or Meta folder: the files that make up the model.
MODEL_FOLDER_SUFFIXES = (".json", ".safetensors", ".bin", ".pth", ".model", ".txt", ".tiktoken")


# ---------------------------------------------------------------------------- identity
def _file_digest(path: Path, digest: Any) -> None:
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise LlamalabError(f"{path}: not a regular file")
        size = st.st_size
        digest.update(size.to_bytes(8, "little"))
        digest.update(f.read(min(size, HEAD_BYTES)))
        rest = size - HEAD_BYTES
        if rest > 0:
            # Evenly spaced blocks over the rest, the last one ending at the file's end.
            for i in range(SAMPLES):
                offset = HEAD_BYTES + (rest - SAMPLE_BYTES) * i // max(1, SAMPLES - 1)
                f.seek(max(HEAD_BYTES, offset))
                digest.update(f.read(SAMPLE_BYTES))


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """A content fingerprint of a model file or folder: ``"sha256:<hex>"``.

    Reads at most about 9 MiB per file (its head, where a GGUF file's header, tokenizer
    and tensor table lie, and 64 blocks spread over its tensor data), so it costs
    milliseconds and needs no torch. The file's path and times do not enter: a copy of a
    file has the fingerprint of the original. Raises :class:`LlamalabError` when the
    model cannot be read.
    """
    import hashlib

    path = Path(path)
    digest = hashlib.sha256(FINGERPRINT_VERSION.encode())
    try:
        if path.is_dir():
            files = sorted(
                p
                for p in path.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix in MODEL_FOLDER_SUFFIXES
            )
            for file in files:
                digest.update(file.name.encode("utf-8", "surrogateescape") + b"\0")
                _file_digest(file, digest)
        else:
            _file_digest(path, digest)
    except OSError as exc:
        raise LlamalabError(f"{path}: cannot read the model: {exc.strerror or exc}") from None
    return "sha256:" + digest.hexdigest()


def model_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a server reports about its model file: resolved path, size, mtime, fingerprint."""
    resolved = Path(path).resolve()
    try:
        st = resolved.stat()
    except OSError as exc:
        raise LlamalabError(f"{path}: cannot read the model: {exc.strerror or exc}") from None
    return {
        "model_path": str(resolved),
        "model_size": st.st_size,
        "model_mtime_ns": st.st_mtime_ns,
        "model_fingerprint": model_fingerprint(resolved),
    }


def same_model(identity: Mapping[str, Any], path: str | os.PathLike[str]) -> bool:
    """Whether a server's reported identity names the model at ``path``, as it is now.

    The fingerprints must agree; and when both name the same file, it must not have been
    changed (size, mtime) since the server loaded it, which also catches an edit the
    fingerprint's sampling could miss.
    """
    resolved = Path(path).resolve()
    if identity.get("model_fingerprint") != model_fingerprint(resolved):
        return False
    if identity.get("model_path") == str(resolved):
        st = resolved.stat()  # read just now by model_fingerprint
        return (identity.get("model_size"), identity.get("model_mtime_ns")) == (
            st.st_size,
            st.st_mtime_ns,
        )
    return True


# ---------------------------------------------------------------------------- HTTP
class ServerUnreachable(LlamalabError):
    """Nothing answered at the server's address, or not as a llamalab server does."""


@dataclass(frozen=True)
class Address:
    """A server's base URL, split for http.client."""

    url: str
    host: str
    port: int
    base: str  # the path prefix, "" for a server at the root

    @classmethod
    def parse(cls, url: str) -> Address:
        """``http://HOST:PORT[/prefix]``; anything else is one clear error."""
        import urllib.parse

        text = url.strip()
        if "://" not in text:
            text = "http://" + text
        try:
            parts = urllib.parse.urlsplit(text)
            port = parts.port or 80
        except ValueError as exc:
            raise LlamalabError(f"--server {url!r}: not a URL: {exc}") from None
        if parts.scheme != "http":
            raise LlamalabError(
                f"--server {url!r}: only http:// is supported (a server on this machine)"
            )
        if not parts.hostname:
            raise LlamalabError(f"--server {url!r}: no host name")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise LlamalabError(f"--server {url!r}: give only http://HOST:PORT")
        host = parts.hostname
        shown_host = f"[{host}]" if ":" in host else host
        base = parts.path.rstrip("/")
        return cls(f"http://{shown_host}:{port}{base}", host, port, base)


def _headers() -> dict[str, str]:
    headers = {"Accept": "application/json, text/event-stream"}
    key = os.environ.get(API_KEY_ENV)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def _connect(address: Address, connect_timeout: float) -> http.client.HTTPConnection:
    try:
        sock = socket.create_connection((address.host, address.port), timeout=connect_timeout)
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError | socket.timeout) else exc.strerror
        raise ServerUnreachable(f"no server answers at {address.url} ({reason or exc})") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    import http.client

    conn = http.client.HTTPConnection(address.host, address.port, timeout=connect_timeout)
    conn.sock = sock  # connected already: http.client uses it as it is
    return conn


def _error_message(status: int, data: bytes) -> str:
    """The message of OpenAI's error body, or the status when there is none."""
    try:
        body = json.loads(data)
        message = body["error"]["message"]
        if isinstance(message, str) and message:
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return f"HTTP {status}"


def probe(url: str, *, connect_timeout: float = PROBE_CONNECT_S) -> dict[str, Any]:
    """The ``/health`` report of the llamalab server at ``url``.

    Raises :class:`ServerUnreachable` when nothing answers, or something that is not a
    llamalab server that reports its model; the message says which.
    """
    address = Address.parse(url)
    conn = _connect(address, connect_timeout)
    import http.client

    try:
        conn.sock.settimeout(PROBE_READ_S)
        conn.request("GET", address.base + "/health", headers=_headers())
        response = conn.getresponse()
        data = response.read(1 << 20)
    except (OSError, http.client.HTTPException) as exc:
        raise ServerUnreachable(f"the server at {address.url} did not answer /health ({exc})")
    finally:
        conn.close()
    try:
        report = json.loads(data)
    except ValueError:
        report = None
    if not isinstance(report, dict) or not isinstance(report.get("llamalab"), dict):
        raise ServerUnreachable(
            f"{address.url} is not a llamalab server that reports its model "
            f"(/health answered {response.status} without a 'llamalab' field)"
        )
    if response.status != 200 or report.get("status") != "ok":
        raise ServerUnreachable(
            f"the llamalab server at {address.url} cannot generate now "
            f"(status {report.get('status')!r})"
        )
    return report


@dataclass
class Server:
    """A llamalab server that holds the model a command asked for."""

    url: str
    info: dict[str, Any]  # the ``llamalab`` field of its /health report

    @property
    def address(self) -> Address:
        return Address.parse(self.url)

    def _post(self, path: str, body: Mapping[str, Any]) -> http.client.HTTPConnection:
        """Send a JSON body; return the open connection with its response read up to the body."""
        import http.client

        address = self.address
        conn = _connect(address, 1.0)
        conn.sock.settimeout(STREAM_READ_S)
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {**_headers(), "Content-Type": "application/json"}
        try:
            conn.request("POST", address.base + path, body=payload, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise LlamalabError(f"the server at {self.url} did not answer: {exc}") from None
        if response.status != 200:
            message = _error_message(response.status, response.read(1 << 20))
            conn.close()
            if response.status in (400, 404, 413):
                # The request itself was refused, as the engine would refuse it: its words.
                raise LlamalabError(message)
            raise LlamalabError(f"the server at {self.url}: {message}")
        conn._llamalab_response = response  # type: ignore[attr-defined]
        return conn

    def tokenize_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The prompt ids of a conversation, rendered in the model's chat template."""
        conn = self._post("/llamalab/tokenize", {"messages": list(messages)})
        try:
            data = conn._llamalab_response.read(MAX_EVENT_BYTES)  # type: ignore[attr-defined]
        finally:
            conn.close()
        return list(json.loads(data)["ids"])

    def generate(self, body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """POST ``/llamalab/generate`` now; return its events, read as they come.

        The first event carries ``prompt_ids``; then one event per token (``token_id``,
        ``text``, ``finish_reason`` ...); the last one ``done: true`` with the reply's
        ids, text, finish reason and the engine's timing. Closing the iterator closes
        the connection, which cancels the generation on the server. A request the
        server refuses raises :class:`LlamalabError` here, before any event.
        """
        return self._events(self._post("/llamalab/generate", body))

    def _events(self, conn: http.client.HTTPConnection) -> Iterator[dict[str, Any]]:
        import http.client

        response = conn._llamalab_response  # type: ignore[attr-defined]
        try:
            while True:
                try:
                    line = response.readline(MAX_EVENT_BYTES + 1)
                except (OSError, http.client.HTTPException) as exc:
                    raise LlamalabError(f"the server at {self.url} stopped answering: {exc}")
                if not line:
                    raise LlamalabError(f"the server at {self.url} ended the reply early")
                if len(line) > MAX_EVENT_BYTES:
                    raise LlamalabError(f"the server at {self.url} sent an event too large")
                if not line.startswith(b"data: "):
                    continue  # the blank line between events
                data = line[6:].strip()
                if data == b"[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise LlamalabError(_error_message(200, data))
                yield event
        finally:
            conn.close()
