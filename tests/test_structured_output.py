"""Constrained decoding: what a grammar allows, sampled JSON that validates, and the CLI.

The token sets are checked against a brute-force reading of the vocabulary, and the
sampled JSON against the `jsonschema` package, not against llguidance itself.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace

import jsonschema
import pytest
import torch
from conftest import run_cli

from llamalab.errors import LlamalabError
from llamalab.generation import Engine, Grammar, Request, SamplingParams
from llamalab.generation.grammar import (
    MAX_GRAMMAR_BYTES,
    GrammarCompiler,
    GrammarTimeout,
    check_grammar,
)
from llamalab.runtime import load_runtime

# Three shapes that small models get wrong without a constraint.
SCHEMAS = {
    "nested objects": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 16},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 16},
                    "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L"]},
            "ok": {"type": "boolean"},
        },
        "required": ["colour", "size", "ok"],
        "additionalProperties": False,
    },
    "bounded arrays": {
        "type": "object",
        "properties": {
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 100},
                "minItems": 2,
                "maxItems": 4,
            },
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 8},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["scores", "tags"],
        "additionalProperties": False,
    },
}
HOT = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


@pytest.fixture(scope="module")
def runtime(smollm2_path):
    return load_runtime(str(smollm2_path))


@pytest.fixture(scope="module")
def engine(runtime):
    model, tokenizer = runtime
    return Engine(model, tokenizer, max_batch=4, max_seq_len=384)


def _prompt(engine, text: str = "Reply with a JSON object.") -> list[int]:
    return engine.tokenizer.encode_chat([{"role": "user", "content": text}])


def _allowed(engine, grammar: Grammar) -> set[int]:
    constraint = engine.grammars.constraint(grammar)
    masked = constraint.mask(torch.zeros(engine.vocab_size))
    return set(torch.nonzero(torch.isfinite(masked)).flatten().tolist())


def test_the_first_mask_is_every_token_that_starts_an_allowed_text(engine):
    tok = engine.tokenizer
    words = [b"yes", b"no", b"maybe"]
    grammar = Grammar("grammar", 'root ::= "yes" | "no" | "maybe"')
    # By brute force: the tokens whose bytes are a non-empty prefix of an allowed word.
    expected = {
        i
        for i in range(engine.vocab_size)
        if not tok.is_special(i)
        and tok.token_bytes(i)
        and any(w.startswith(tok.token_bytes(i)) for w in words)
    }
    assert len(expected) >= 5  # "y", "ye", "yes", "n", "no", "m", ...
    assert _allowed(engine, grammar) == expected


def test_stop_tokens_are_allowed_only_where_the_text_is_complete(engine):
    tok = engine.tokenizer
    constraint = engine.grammars.constraint(Grammar("grammar", 'root ::= "ab" | "abab"'))
    for piece in tok.encode("ab", add_bos=False):
        constraint.advance(piece)
    masked = constraint.mask(torch.zeros(engine.vocab_size))
    allowed = set(torch.nonzero(torch.isfinite(masked)).flatten().tolist())
    assert set(tok.stop_ids) <= allowed  # "ab" is whole: it may end here
    assert any(tok.token_bytes(i) == b"a" for i in allowed)  # or go on to "abab"
    with pytest.raises(LlamalabError, match="does not fit"):
        constraint.advance(tok.encode("z", add_bos=False)[0])


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_sampled_json_is_valid_for_its_schema(engine, name):
    schema = SCHEMAS[name]
    grammar = Grammar.json_schema(schema)
    prompt = _prompt(engine)
    requests = [
        Request(prompt, max_tokens=160, sampling=replace(HOT, seed=i), grammar=grammar)
        for i in range(4)
    ]
    for seq in engine.generate_batch(requests):
        assert seq.finish_reason == "stop", seq.text
        jsonschema.validate(json.loads(seq.text), schema)


def test_a_regex_and_a_lark_grammar(engine):
    prompt = _prompt(engine, "Give me a date.")
    month_date = Grammar("regex", r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]")
    date = Request(prompt, max_tokens=20, sampling=HOT, grammar=month_date)
    lark = Grammar("grammar", 'start: "Answer: " ("A" | "B" | "C")')
    choice = Request(prompt, max_tokens=20, sampling=HOT, grammar=lark)
    got = engine.generate_batch([date, choice])
    assert re.fullmatch(r"20\d\d-(0[1-9]|1[0-2])-[0-2]\d", got[0].text), got[0].text
    assert got[1].text in ("Answer: A", "Answer: B", "Answer: C")
    assert got[0].finish_reason == got[1].finish_reason == "stop"


def test_greedy_and_logprobs_under_a_grammar(engine):
    tok = engine.tokenizer
    prompt = _prompt(engine, "Is water wet?")
    grammar = Grammar("grammar", 'root ::= "yes" | "no"')
    request = Request(prompt, max_tokens=8, sampling=SamplingParams(temperature=0), logprobs=2,
                      grammar=grammar)  # fmt: skip
    events = list(engine.generate(request))
    text = "".join(e.text for e in events)
    assert text in ("yes", "no")
    # Greedy under the grammar is the best allowed first token, by the model's own logits.
    model_logits = engine.model(torch.tensor([prompt]))[0, -1, : engine.vocab_size].float()
    allowed = sorted(_allowed(engine, grammar))
    best = allowed[int(torch.argmax(model_logits[allowed]))]
    assert events[0].token_id == best
    # Logprobs stay the model's: the grammar shaped the choice, not the reported numbers.
    expected = float(torch.log_softmax(model_logits, -1)[best])
    # (The engine's cached pass and this whole-sequence pass differ by the packed
    # kernels' rounding: up to ~0.01 with the int4 kernel's bfloat16, 0.06 measured with
    # the vnni kernel's int8 activations on a token at -5.9. Renormalised over the
    # allowed tokens the logprob would be near 0, far outside this tolerance.)
    assert events[0].logprob == pytest.approx(expected, abs=0.25)
    assert tok.decode([events[0].token_id]) in ("y", "ye", "yes", "n", "no")


def test_a_grammar_ends_the_reply_even_with_ignore_eos(engine):
    request = Request(_prompt(engine), max_tokens=30, sampling=HOT, ignore_eos=True,
                      grammar=Grammar("grammar", 'root ::= "ok"'))  # fmt: skip
    (seq,) = engine.generate_batch([request])
    assert (seq.text, seq.finish_reason) == ("ok", "stop")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Grammar.json_schema('{"type": 5}'), "invalid JSON schema"),
        (lambda: Grammar.json_schema("{not json"), "not valid JSON"),
        (lambda: Grammar.json_schema("[1, 2]"), "must be an object"),
        (lambda: Grammar.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
        (lambda: Grammar("grammar", "root ::= ("), "invalid grammar"),
        (lambda: Grammar("grammar", "   "), "empty"),
        (lambda: Grammar("regex", "(a"), "invalid regular expression"),
        (lambda: Grammar("grammar", "a" * (MAX_GRAMMAR_BYTES + 1)), "limit"),
        (lambda: Grammar("xml", "<a/>"), "unknown grammar kind"),
    ],
)
def test_bad_grammars_are_one_clear_error(make, message):
    with pytest.raises(LlamalabError, match=message):
        check_grammar(make())


def test_deep_schemas_are_refused_before_compiling():
    schema: dict = {"type": "object"}
    for _ in range(100):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(LlamalabError, match="nests deeper"):
        Grammar.json_schema(schema)


def test_compiled_grammars_are_cached(runtime):
    _, tokenizer = runtime
    compiler = GrammarCompiler(tokenizer, tokenizer.stop_ids, tokenizer.vocab_size)
    grammar = Grammar.json_schema(SCHEMAS["enums"])
    assert compiler.compile(grammar) is compiler.compile(Grammar.json_schema(SCHEMAS["enums"]))


def test_cli_json_schema_and_grammar(smollm2_path, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS["enums"]))
    out = run_cli(
        "generate", "-m", str(smollm2_path), "--chat", "Pick a colour.", "--json-schema",
        str(schema), "--temperature", "1.0", "--seed", "3", "-n", "60", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    jsonschema.validate(json.loads(reply["text"]), SCHEMAS["enums"])
    grammar = tmp_path / "yn.gbnf"
    grammar.write_text('root ::= ("yes" | "no") "."\n')
    out = run_cli(
        "generate", "-m", str(smollm2_path), "--chat", "Is the sky blue?",
        "--grammar", str(grammar), "-n", "10",
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() in ("yes.", "no."), out


@pytest.mark.parametrize(
    ("content", "flag", "message"),
    [
        ('{"type": 3}', "--json-schema", "invalid JSON schema"),
        ("{", "--json-schema", "not valid JSON"),
        ("root ::= (", "--grammar", "invalid grammar"),
        (b"\xff\xfe", "--grammar", "not valid UTF-8"),
    ],
)
def test_cli_bad_grammar_files_fail_before_loading(tmp_path, content, flag, message):
    path = tmp_path / "g"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    # A model path that does not exist: the grammar must be refused first.
    out = run_cli("generate", "-m", str(tmp_path / "missing.gguf"), "hi", flag, str(path))
    assert out.returncode == 1
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_byte_order_mark_opening_a_schema_file_is_dropped(tmp_path):
    path = tmp_path / "schema.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(SCHEMAS["enums"]).encode())
    assert Grammar.from_file(path, "json_schema") == Grammar.json_schema(SCHEMAS["enums"])


def chained_rules(n: int) -> str:
    """A GBNF grammar of ``n`` rules, each one "a" and the next: well under the size limit,
    but llguidance's GBNF reader takes time quadratic in the chain (over 25 minutes for
    20,000 rules)."""
    rules = "".join(f'r{i} ::= "a" r{i + 1}\n' for i in range(n - 1))
    return f'root ::= r0\n{rules}r{n - 1} ::= "a"\n'


def test_a_grammar_that_compiles_for_minutes_is_stopped_at_the_deadline(runtime):
    _, tokenizer = runtime
    compiler = GrammarCompiler(tokenizer, tokenizer.stop_ids, tokenizer.vocab_size, timeout=2)
    try:
        compiler.start()
        grammar = Grammar("grammar", chained_rules(20_000))
        assert len(grammar.text) < MAX_GRAMMAR_BYTES
        t0 = time.perf_counter()
        with pytest.raises(GrammarTimeout, match="took longer than 2 s"):
            compiler.compile(grammar)
        assert time.perf_counter() - t0 < 8
        # The compiler works on: the next grammar compiles, in a new process.
        assert compiler.compile(Grammar("grammar", 'root ::= "yes"'))
        assert compiler.pending == 0
    finally:
        compiler.close()


def test_a_cached_grammar_does_not_wait_behind_a_slow_compile(runtime):
    _, tokenizer = runtime
    compiler = GrammarCompiler(tokenizer, tokenizer.stop_ids, tokenizer.vocab_size, timeout=3)
    try:
        compiler.compile(Grammar.any_json_object())
        slow = compiler.submit(Grammar("grammar", chained_rules(20_000)))
        t0 = time.perf_counter()
        assert compiler.compile(Grammar.any_json_object())
        assert time.perf_counter() - t0 < 0.5
        with pytest.raises(GrammarTimeout):
            slow.result()
    finally:
        compiler.close()


def test_check_grammar_is_bounded_too():
    t0 = time.perf_counter()
    with pytest.raises(GrammarTimeout, match="grammar"):
        check_grammar(Grammar("grammar", chained_rules(20_000)), timeout=1)
    assert time.perf_counter() - t0 < 6


@pytest.mark.parametrize(
    "grammar",
    [
        Grammar.json_schema({"$ref": "#"}),  # refers to itself, and only to itself
        Grammar("grammar", 'root ::= "a"{1000000}'),  # a million forced bytes
    ],
    ids=["recursive schema", "million repetitions"],
)
def test_grammars_that_fail_on_their_first_token_are_refused_when_compiled(engine, grammar):
    # Before, both compiled and then failed in the middle of generation with llguidance's
    # internal names ("NoExtensionBias", "Too many items (limit 50000; ff_tokens)").
    with pytest.raises(LlamalabError) as caught:
        engine.grammars.compile(grammar)
    message = str(caught.value)
    assert message.startswith(("the JSON schema ", "the grammar ")), message
    for internal in ("NoExtensionBias", "ff_tokens", "non-verbose", "limit 50000"):
        assert internal not in message


def test_a_valid_long_repetition_still_compiles(engine):
    grammar = Grammar("grammar", 'root ::= "ab"{300}')
    constraint = engine.grammars.constraint(grammar)
    masked = constraint.mask(torch.zeros(engine.vocab_size))
    assert torch.isfinite(masked).any()
