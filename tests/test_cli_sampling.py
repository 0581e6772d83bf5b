"""Sampling options on the command line reach the sampler."""

from __future__ import annotations

import json

from conftest import run_cli


def greedy(*extra: str) -> list[int]:
    result = run_cli(
        "generate", "The capital of France is", "-n", "6", "--temperature", "0", "--json", *extra
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["ids"]


def test_logit_bias_and_penalties_change_greedy_text(smollm2_path):
    plain = greedy("-m", str(smollm2_path))
    banned = greedy("-m", str(smollm2_path), "--logit-bias", f"{plain[0]}=-100")
    assert banned[0] != plain[0]
    forced = greedy("-m", str(smollm2_path), "--logit-bias", "504+100")  # llama.cpp's spelling
    assert forced == [504] * 6
    # a strong frequency penalty forbids the repeat that forcing caused
    assert len(set(greedy("-m", str(smollm2_path), "--logit-bias", "504+5",
                          "--frequency-penalty", "2"))) > 1  # fmt: skip


def test_bad_logit_bias_is_one_clear_error():
    result = run_cli("generate", "x", "--logit-bias", "99999999=5")
    assert result.returncode == 1 and "logit_bias" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("generate", "x", "--logit-bias", "abc")
    assert result.returncode == 2 and "--logit-bias" in result.stderr
