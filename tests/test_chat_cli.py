"""`llamalab chat` driven through a pseudo-terminal, as a person would use it."""

import json
import os
import sys

import pytest

pexpect = pytest.importorskip("pexpect")


def spawn_chat(model, *args: str, history: str = ""):
    """Start `llamalab chat` on a pseudo-terminal and wait for its first prompt."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "llamalab", "chat", "--model", str(model), *args],
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "LLAMALAB_HISTORY": history},
        encoding="utf-8",
        timeout=180,
    )
    child.expect_exact("> ")
    return child


def test_two_turns_and_the_second_sees_the_first(smollm2_path):
    child = spawn_chat(smollm2_path, "--temperature", "0", "--max-tokens", "40")
    child.sendline("The secret word is banana.")
    child.expect_exact("> ")
    assert child.before.strip()  # a reply appeared
    child.sendline("What is the secret word?")
    child.expect_exact("> ")
    assert "banana" in child.before.lower(), child.before
    # Without the first turn the same question cannot know the word: the answer above
    # came from the conversation, not from the question.
    child.sendline("/reset")
    child.expect_exact("(conversation reset)")
    child.expect_exact("> ")
    child.sendline("What is the secret word?")
    child.expect_exact("> ")
    assert "banana" not in child.before.lower(), child.before
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_interrupts_a_reply_without_leaving(smollm2_path):
    child = spawn_chat(smollm2_path, "--max-tokens", "2000", "--seed", "1")
    child.sendline("Write a very long story about a dragon.")
    child.expect_exact("dragon.")  # the terminal's echo of the line
    child.expect(r"\w+ \w+ \w+")  # the reply has started streaming
    child.sendintr()
    child.expect_exact("[interrupted]")
    child.expect_exact("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_commands_system_and_save(smollm2_path, tmp_path):
    history = tmp_path / "history"
    child = spawn_chat(
        smollm2_path, "--temperature", "0", "--max-tokens", "8", history=str(history)
    )
    child.sendline("/help")
    child.expect_exact("/save FILE")
    child.expect_exact("> ")
    child.sendline("/system You are a pirate.")
    child.expect_exact("(system message set)")
    child.expect_exact("> ")
    child.sendline("Hello there")
    child.expect(r"\[\d+ tokens, [\d.]+ tok/s")  # per-reply statistics
    child.expect_exact("> ")
    saved = tmp_path / "chat.json"
    child.sendline(f"/save {saved}")
    child.expect_exact("(saved 3 messages")
    child.expect_exact("> ")
    child.sendline(f"/save {saved}")  # a second save must not overwrite the first
    child.expect_exact("already exists")
    child.expect_exact("> ")
    child.sendline("/nonsense")
    child.expect_exact("unknown command /nonsense")
    child.expect_exact("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "You are a pirate."
    assert messages[1]["content"] == "Hello there"
    assert messages[2]["content"]
    # readline kept the lines typed, for the next session's arrow keys
    assert "Hello there" in history.read_text()


def test_a_full_context_drops_the_oldest_turns_and_keeps_going(smollm2_path):
    child = spawn_chat(
        smollm2_path, "--temperature", "0", "--max-tokens", "24", "--ctx", "160",
        "--system", "Be brief.",
    )  # fmt: skip
    dropped = False
    for i in range(6):
        child.sendline(f"Tell me one fact about the number {i + 1}.")
        index = child.expect_exact(["(the context is full: dropped", "llamalab: error", "> "])
        assert index != 1, child.before
        if index == 0:
            dropped = True
            child.expect_exact("> ")
    assert dropped, "six turns of up to 24 tokens never filled a 160-token context"
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_reply_cut_off_by_max_tokens_is_marked(smollm2_path):
    child = spawn_chat(smollm2_path, "--temperature", "0", "--max-tokens", "3")
    child.sendline("Write a long poem about the sea.")
    child.expect_exact("[cut off at 3 tokens")
    child.expect_exact("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
