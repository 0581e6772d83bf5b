"""`llamalab chat` driven through a pseudo-terminal, as a person would use it."""

import os
import sys

import pytest

pexpect = pytest.importorskip("pexpect")


def spawn_chat(model, *args: str):
    """Start `llamalab chat` on a pseudo-terminal and wait for its first prompt."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "llamalab.cli", "chat", "--model", str(model), *args],
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
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
