"""The chat page at `GET /`, driven in headless Chromium against a real `llamalab serve`.

One server (SmolLM2, an API key) and one browser serve the module. Tests that need the model
(streaming, stop, the key) use it with few tokens; tests of what the page does with a reply
(markdown, sanitising, conversations, regenerate, copy) answer the page's request themselves
with Playwright's routing, in the server's own event format, so the reply is known.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from llamalab.generation import GREEDY, Engine, Request
from llamalab.serve.launch import ServerProcess

KEY = "test-key"
CTX = 512
# Screenshots go to the test's temporary folder; set this to keep them somewhere to look at.
ARTIFACTS_ENV = "LLAMALAB_TEST_ARTIFACTS"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CHAT = "**/v1/chat/completions"


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    return path


@pytest.fixture(scope="module")
def browser():
    """Listed first by the tests, so that without a browser no server is started."""
    chromium = _chromium()
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (the browser comes from apt)"
    )
    with sync_api.sync_playwright() as p:
        # Playwright adds --headless and a fresh --user-data-dir itself.
        launched = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def server(smollm2_path):
    proc = ServerProcess(
        ["--model", str(smollm2_path), "--max-batch", "2", "--ctx", str(CTX), "--api-key", KEY]
    )
    proc.launch()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def reference(smollm2_path, server):
    """The engine alone in this process (loaded while the server starts), for greedy references."""
    from llamalab.runtime import load_runtime

    model, tokenizer = load_runtime(str(smollm2_path), "auto", progress=False)
    server.wait_ready()
    return Engine(model, tokenizer, max_batch=1, max_seq_len=CTX), tokenizer


@pytest.fixture
def open_page(browser, server):
    """``open_page(width=..., key=True, bypass_csp=False)``: the chat page in a fresh context
    (its own localStorage), with the API key entered unless ``key`` is False."""
    contexts = []
    pages: list[tuple[object, list[str]]] = []  # each page with the script errors it raised
    server.wait_ready()

    def opener(*, width: int = 1200, height: int = 800, key: bool = True, bypass_csp=False):
        context = browser.new_context(
            viewport={"width": width, "height": height},
            permissions=["clipboard-read", "clipboard-write"],
            bypass_csp=bypass_csp,
        )
        contexts.append(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        pages.append((page, errors))
        page.goto(server.url + "/")
        if key:
            page.fill("#key", KEY)
        return page

    yield opener
    for context in contexts:
        context.close()
    assert all(errors == [] for _, errors in pages), [errors for _, errors in pages]


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get(ARTIFACTS_ENV) or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def greedy(engine: Engine, prompt_ids: list[int], max_tokens: int) -> str:
    events = engine.generate(Request(prompt_ids, max_tokens=max_tokens, sampling=GREEDY))
    return "".join(e.text for e in events)


def sse(*pieces: str, finish: str = "stop", error: str | None = None) -> str:
    """A streamed chat reply in the server's format: an opening chunk, one chunk per piece,
    then the finish chunk and usage (or an error event), then [DONE]."""

    def chunk(choices: list, usage: dict | None = None) -> str:
        body = {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "test",
            "choices": choices,
            "usage": usage,
        }
        return f"data: {json.dumps(body)}\n\n"

    out = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
    out += [chunk([{"index": 0, "delta": {"content": p}}]) for p in pieces]
    if error is not None:
        out.append(f"data: {json.dumps({'error': {'message': error, 'type': 'server_error'}})}\n\n")
    else:
        out.append(chunk([{"index": 0, "delta": {}, "finish_reason": finish}]))
        usage = {"prompt_tokens": 5, "completion_tokens": len(pieces) + 1, "total_tokens": 0}
        out.append(chunk([], usage))
    return "".join(out) + "data: [DONE]\n\n"


def answer_with(page, replies: list) -> list[dict]:
    """Answer the page's chat requests in turn with ``replies`` (SSE text, or a (status, JSON
    body) pair); return the list that collects the bodies the page sent."""
    sent: list[dict] = []
    queue = list(replies)

    def handle(route):
        sent.append(route.request.post_data_json)
        reply = queue.pop(0)
        if isinstance(reply, tuple):
            route.fulfill(status=reply[0], json=reply[1])
        else:
            route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=reply)

    page.route(CHAT, handle)
    return sent


def say(page, text: str, replies_before: int) -> None:
    """Send ``text`` and wait until the reply that follows is finished."""
    page.fill("#input", text)
    page.keyboard.press("Enter")
    page.wait_for_selector(f".assistant.done >> nth={replies_before}", timeout=120_000)


def wait_for_idle(server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while server.health()["active_slots"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.health()["active_slots"] == 0


# ---------------------------------------------------------------------------- the real model
def test_streams_a_multi_turn_conversation(browser, server, reference, open_page, artifacts):
    page = open_page(width=1000, height=700)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "40")
    # Record every text the reply bubble shows, to see it grow piece by piece.
    page.evaluate(
        """() => { window.seen = [];
        new MutationObserver(() => { const r = document.querySelector('.assistant.streaming');
          if (r) window.seen.push(r.textContent); })
        .observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true}); }"""
    )
    sent: list[dict] = []
    page.on(
        "request",
        lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None,
    )
    first_message = "Hi! My name is Alice and my favourite colour is green."
    say(page, first_message, 0)
    seen = [t for t in page.evaluate("window.seen") if t]
    assert len(set(seen)) >= 3, seen  # it appeared piece by piece
    # The reply's speed, from the stream, and the usage the server sent at the end.
    meta = page.inner_text(".assistant.done .meta")
    assert re.fullmatch(r"\d+ tokens · \d+\.\d tok/s · \d+\.\d\d s to first token( · .+)?", meta), (
        meta
    )

    say(page, "What is my name?", 1)
    assert len(page.locator(".msg").all()) == 4
    engine, tokenizer = reference
    messages = [{"role": "user", "content": first_message}]
    expected = greedy(engine, tokenizer.encode_chat(messages), 40)
    # The second request carried the whole conversation, the first reply exactly as the
    # model gave it (the server's greedy answer equals the engine's): the page is multi-turn.
    messages += [
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "What is my name?"},
    ]
    assert [body["messages"] for body in sent] == [messages[:1], messages]
    assert all(
        b["stream"] is True and b["temperature"] == 0 and b["max_tokens"] == 40 for b in sent
    )
    assert all(b["stream_options"] == {"include_usage": True} for b in sent)
    page.screenshot(path=str(artifacts / "webpage_model_reply.png"), full_page=True)
    assert server.health()["active_slots"] == 0


def test_stop_ends_the_reply_and_frees_the_slot(browser, server, open_page):
    page = open_page()
    page.fill("#max-tokens", "300")
    page.fill("#input", "Write a long story about a dragon who learns to bake bread.")
    page.keyboard.press("Enter")
    assert page.is_visible("#stop") and not page.is_visible("#send")
    page.wait_for_function(
        "() => (document.querySelector('.assistant.streaming .body')?.textContent || '').length > 8",
        timeout=120_000,
    )
    assert server.health()["active_slots"] == 1
    page.click("#stop")
    page.wait_for_selector(".assistant.done", timeout=10_000)
    assert page.is_visible("#send") and not page.is_visible("#stop")
    assert page.inner_text(".assistant.done .meta").endswith("stopped")
    assert page.inner_text(".assistant.done .body").strip()  # the partial reply is kept
    wait_for_idle(server)  # the server noticed the client leave and freed the row


def test_api_key_missing_wrong_then_right(browser, server, open_page):
    page = open_page(key=False)
    page.fill("#max-tokens", "4")
    page.fill("#input", "Hello")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.error")
    assert "This server needs an API key" in page.inner_text(".msg.error")
    assert page.evaluate("document.activeElement.id") == "key"
    # On a phone the settings are folded away: the message has a button that opens them.
    page.set_viewport_size({"width": 400, "height": 800})
    page.wait_for_selector("#key", state="hidden")
    page.click(".msg.error .enter-key")
    page.wait_for_selector("#key", state="visible")
    assert page.evaluate("document.activeElement.id") == "key"
    page.set_viewport_size({"width": 1200, "height": 800})
    # Nothing was kept of the failed turn: the text is back in the box to send again.
    assert page.locator(".msg.user").count() == 0
    assert page.input_value("#input") == "Hello"

    page.fill("#key", "wrong")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.error")
    assert "refused this API key" in page.inner_text(".msg.error")

    page.fill("#key", KEY)
    page.press("#input", "Enter")
    page.wait_for_selector(".assistant.done", timeout=120_000)
    assert page.locator(".msg.error").count() == 0
    assert page.locator(".msg.user").all_inner_texts() == ["Hello"]
    # The key is kept for the next visit.
    page.reload()
    assert page.input_value("#key") == KEY


# ---------------------------------------------------------------------------- replies given here
HOSTILE = [
    "Here is **bold** and a link [click](javascript:window.__pwned=3) and [docs](https://example.org).\n\n",
    '<img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script>\n\n',
    '<iframe srcdoc="<script>parent.__pwned=4</script>"></iframe>',
    '<a href="https://example.org" onclick="window.__pwned=5">x</a> <style>body{display:none}</style>\n\n',
    "```python\nprint('<script>window.__pwned=6</script>')\n```\n",
]


def test_a_hostile_reply_renders_as_markdown_and_runs_nothing(browser, server, open_page):
    # The page's CSP would stop inline script on its own; bypass it so that only the
    # sanitiser stands between the reply and the page.
    page = open_page(bypass_csp=True)
    answer_with(page, [sse(*HOSTILE)])
    say(page, "Say something nasty", 0)
    body = page.locator(".assistant.done .body")
    page.wait_for_timeout(300)  # time for an image's onerror, had one survived
    assert page.evaluate("window.__pwned") is None
    for bad in ["script", "iframe", "style", "[onerror]", "[onclick]", "a[href^='javascript']"]:
        assert body.locator(bad).count() == 0, bad
    assert body.locator("strong").inner_text() == "bold"
    assert body.locator("pre code").inner_text().strip() == (
        "print('<script>window.__pwned=6</script>')"
    )
    link = body.locator("a[href='https://example.org/'], a[href='https://example.org']").first
    assert link.get_attribute("rel") == "noopener noreferrer nofollow"
    assert link.get_attribute("target") == "_blank"
    # What is kept and copied is the text as the model wrote it.
    page.click(".assistant.done .copy")
    assert page.evaluate("navigator.clipboard.readText()") == "".join(HOSTILE)


def test_server_errors_are_shown_as_text(browser, server, open_page):
    page = open_page(bypass_csp=True)
    hostile = '<img src=x onerror="window.__pwned=1">'
    answer_with(
        page,
        [
            (500, {"error": {"message": "broken: " + hostile, "type": "server_error"}}),
            sse("partial ", error="stream failed: " + hostile),
        ],
    )
    page.fill("#input", "one")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.error")
    assert page.inner_text(".msg.error") == "broken: " + hostile
    page.press("#input", "Enter")  # the text came back to the input box
    page.wait_for_function("document.querySelector('.msg.error')?.textContent.startsWith('stream')")
    assert page.inner_text(".msg.error") == "stream failed: " + hostile
    assert page.locator("#log img").count() == 0
    assert page.locator(".msg.assistant").count() == 0  # the failed reply is not kept
    assert page.evaluate("window.__pwned") is None


def test_system_prompt_regenerate_and_copy(browser, server, open_page):
    page = open_page()
    sent = answer_with(page, [sse("First ", "answer"), sse("Second ", "*answer*")])
    page.fill("#system", "You are a pirate.")
    say(page, "Hello", 0)
    assert sent[0]["messages"] == [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello"},
    ]
    assert page.locator(".regenerate").count() == 1
    page.click(".regenerate")
    page.wait_for_selector(".assistant.done .body em")
    # The same conversation again, without the reply it replaces.
    assert sent[1]["messages"] == sent[0]["messages"]
    assert page.locator(".msg.assistant").all_inner_texts()[0].startswith("Second answer")
    assert page.locator(".msg").count() == 2
    page.click(".assistant.done .copy")
    assert page.evaluate("navigator.clipboard.readText()") == "Second *answer*"
    assert page.inner_text(".assistant.done .copy") == "Copied"


def test_conversations_survive_reload_switch_and_delete(browser, server, open_page):
    page = open_page()
    other_tab = page.context.new_page()
    other_tab.goto(page.url)
    sent = answer_with(page, [sse("About apples."), sse("About boats."), sse("Yes.")])
    say(page, "Tell me about apples", 0)
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    say(page, "Tell me about boats", 0)
    titles = page.locator("#conversations .open")
    assert titles.all_inner_texts() == ["Tell me about boats", "Tell me about apples"]
    # A second tab sees them too, so that what it saves does not drop them.
    other_tab.wait_for_selector("#conversations .conv >> nth=1")
    other_tab.close()

    page.reload()
    assert page.locator("#conversations .open").all_inner_texts() == [
        "Tell me about boats",
        "Tell me about apples",
    ]
    assert page.locator(".msg").all_inner_texts()[0] == "Tell me about boats"
    assert page.inner_text(".assistant.done .body") == "About boats."
    assert page.inner_text("#title") == "Tell me about boats"

    page.click("#conversations .open >> text=Tell me about apples")
    assert page.locator(".msg.user").all_inner_texts() == ["Tell me about apples"]
    page.reload()  # the conversation shown last is the one restored
    assert page.inner_text(".assistant.done .body") == "About apples."

    page.locator("#conversations .conv", has_text="boats").locator(".delete").click()
    assert page.locator("#conversations .open").all_inner_texts() == ["Tell me about apples"]
    page.locator("#conversations .conv .delete").click()  # the one shown: a new chat follows
    assert page.locator(".msg").count() == 0
    page.reload()
    assert page.locator("#conversations .conv").count() == 0

    # A conversation left without its reply (the tab was closed while it streamed) can get one.
    page.evaluate(
        """() => localStorage.setItem('llamalab-chats', JSON.stringify({current: 'c1', chats: [
            {id: 'c1', title: 'Unanswered', updated: 1,
             messages: [{role: 'user', content: 'Still there?'}]}]}))"""
    )
    page.reload()
    page.click(".note .retry")
    page.wait_for_selector(".assistant.done")
    assert sent[-1]["messages"] == [{"role": "user", "content": "Still there?"}]
    assert page.locator(".note").count() == 0


SHOWCASE = [
    "Here is a **small** Python function that reverses the words of a sentence:\n\n",
    "```python\ndef reverse_words(sentence: str) -> str:\n",
    '    """Return the words of `sentence` in reverse order."""\n',
    "    return ' '.join(reversed(sentence.split()))\n```\n\n",
    "It works in three steps:\n\n1. `split()` cuts the sentence at whitespace;\n",
    "2. `reversed()` walks the words backwards;\n3. `' '.join(...)` glues them together.\n\n",
    "| input | output |\n|---|---|\n| `hello big world` | `world big hello` |\n\n",
    "> Note: runs of spaces collapse to one.",
]


def test_screenshots_wide_and_narrow(browser, server, open_page, artifacts):
    page = open_page(width=1200, height=800)
    answer_with(page, [sse("A llama is a South American camelid."), sse(*SHOWCASE)])
    page.fill("#system", "You are a concise assistant.")
    say(page, "What is a llama?", 0)
    page.click("#new-chat")
    say(page, "How do I reverse the words of a sentence in Python?", 0)
    body = page.locator(".assistant.done .body")
    assert body.locator("pre code").count() == 1 and body.locator("table").count() == 1
    page.screenshot(path=str(artifacts / "webpage_1200.png"))
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=str(artifacts / "webpage_1200_dark.png"))
    page.emulate_media(color_scheme="light")

    page.set_viewport_size({"width": 400, "height": 800})
    page.wait_for_selector("#new-chat", state="hidden")  # the sidebar folds away
    page.screenshot(path=str(artifacts / "webpage_400.png"))
    page.click("#open-sidebar")
    page.wait_for_selector("#new-chat", state="visible")
    page.wait_for_timeout(300)  # the end of the slide-in transition
    page.screenshot(path=str(artifacts / "webpage_400_menu.png"))
    # Nothing is wider than the screen: only the code block and table scroll sideways.
    assert page.evaluate("document.documentElement.scrollWidth") <= 400
    for name in (
        "webpage_1200.png",
        "webpage_1200_dark.png",
        "webpage_400.png",
        "webpage_400_menu.png",
    ):
        assert (artifacts / name).stat().st_size > 0
