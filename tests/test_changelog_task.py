"""scripts/changelog_task.py: changelog entries to JSON items, the split by package, the
scorer, and its greedy generation against llama.cpp's."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "changelog_task.py"

# Forms Debian policy allows that a careless parser gets wrong: an epoch and a tilde in
# the version, two distributions with two spaces between them, an urgency in capitals
# with a comment after it, another option after the urgency, an entry with no trailer
# (skipped), and free text after the last entry.
CHANGELOG = """\
foo (1:2.0~rc1-1+deb12u1) bookworm-security; urgency=HIGH (critical for the hurd)

  * Fix CVE-2023-0001.

 -- Jane Doe <jane@example.org>  Mon, 02 Jan 2023 13:06:21 +0100

foo (1.9-2) frozen  unstable; urgency=low, binary-only=yes

  * Rebuild.
    - with a nested line.

 -- Jane Doe <jane@example.org>  Sun, 1 Jan 2023 10:00:00 -0500

foo (1.9-1) unstable; urgency=medium

  * An entry whose trailer is missing.

foo (1.8-1) experimental; urgency=emergency

  * Initial release.

 -- John Roe <john@example.org>  Sat, 31 Dec 2022 16:40:30 +0100

Local variables:
mode: debian-changelog
End:
"""


@pytest.fixture(scope="module")
def task():
    spec = importlib.util.spec_from_file_location("changelog_task", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is made.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _dpkg_fields(path: Path) -> list[dict[str, str]]:
    """Each entry's fields as dpkg-parsechangelog (the reference parser) reads them."""
    if shutil.which("dpkg-parsechangelog") is None:
        pytest.skip("dpkg-parsechangelog (dpkg-dev) is not installed")
    out = subprocess.run(
        ["dpkg-parsechangelog", "-l", str(path), "--format", "rfc822", "--all"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    entries = []
    for stanza in out.split("\n\n"):
        fields = {
            key: value.strip()
            for key, _, value in (line.partition(":") for line in stanza.splitlines())
            if key[:1] not in (" ", "")
        }
        if "Source" in fields:
            entries.append(
                {
                    "package": fields["Source"],
                    "version": fields["Version"],
                    "distribution": fields["Distribution"],
                    "urgency": fields["Urgency"],
                }
            )
    return entries


def test_fields_equal_dpkg_parsechangelogs(task, tmp_path):
    path = tmp_path / "changelog"
    path.write_text(CHANGELOG)
    ours = [e.truth() for e in task.parse_entries(CHANGELOG)]
    theirs = [e for e in _dpkg_fields(path) if e["version"] != "1.9-1"]  # no trailer: skipped
    assert ours == theirs
    assert ours[0] == {
        "package": "foo",
        "version": "1:2.0~rc1-1+deb12u1",
        "distribution": "bookworm-security",
        "urgency": "high",
    }


def test_real_changelog_fields_equal_dpkg_parsechangelogs(task, tmp_path):
    real = Path("/usr/share/doc/bash/changelog.Debian.gz")
    if not real.is_file():
        pytest.skip("no /usr/share/doc/bash/changelog.Debian.gz on this machine")
    text = task.read_changelog(real)
    path = tmp_path / "changelog"
    path.write_text(text)
    ours = [e.truth() for e in task.parse_entries(text)]
    assert len(ours) > 10
    assert ours == _dpkg_fields(path)


def test_entry_text_is_the_files_from_header_to_trailer(task):
    entries = task.parse_entries(CHANGELOG)
    assert [e.version for e in entries] == ["1:2.0~rc1-1+deb12u1", "1.9-2", "1.8-1"]
    assert entries[1].text == (
        "foo (1.9-2) frozen  unstable; urgency=low, binary-only=yes\n\n"
        "  * Rebuild.\n    - with a nested line.\n\n"
        " -- Jane Doe <jane@example.org>  Sun, 1 Jan 2023 10:00:00 -0500"
    )
    assert "Local variables" not in entries[-1].text


def test_item_is_a_chat_with_compact_json_in_fixed_key_order(task):
    entry = task.parse_entries(CHANGELOG)[0]
    it = task.item(entry)
    user, assistant = it["messages"]
    assert user == {"role": "user", "content": task.INSTRUCTION + entry.text}
    assert assistant["role"] == "assistant"
    assert assistant["content"] == (
        '{"package":"foo","version":"1:2.0~rc1-1+deb12u1",'
        '"distribution":"bookworm-security","urgency":"high"}'
    )


def _entry(package: str, version: str) -> str:
    return (
        f"{package} ({version}) unstable; urgency=medium\n\n  * Change {version}.\n\n"
        " -- A B <a@b.org>  Mon, 02 Jan 2023 13:06:21 +0100\n\n"
    )


def _docs(tmp_path: Path) -> Path:
    """A documentation folder of twelve packages' gzip changelogs, two of them sharing a
    file's package names (a renamed source), one file shipped twice, one not gzip."""
    docs = tmp_path / "doc"
    for i in range(12):
        text = "".join(_entry(f"pkg{i}", f"1.{v}-1") for v in range(5))
        if i == 3:
            text += _entry("oldname", "0.9-1")  # pkg3 was once called oldname ...
        (docs / f"pkg{i}").mkdir(parents=True)
        with gzip.open(docs / f"pkg{i}" / "changelog.Debian.gz", "wt") as f:
            f.write(text)
    (docs / "oldname").mkdir()
    with gzip.open(docs / "oldname" / "changelog.Debian.gz", "wt") as f:
        f.write(_entry("oldname", "0.8-1"))  # ... and shipped its own changelog then
    (docs / "pkg0-doc").mkdir()
    shutil.copy(docs / "pkg0" / "changelog.Debian.gz", docs / "pkg0-doc")
    (docs / "broken").mkdir()
    (docs / "broken" / "changelog.Debian.gz").write_bytes(b"not gzip")
    return docs


def _paths(docs: Path) -> list[Path]:
    return sorted(docs.glob("*/changelog.Debian.gz"))


def test_split_is_by_package_and_seeded(task, tmp_path):
    docs = _docs(tmp_path)
    train, test, stats = task.build(_paths(docs), seed=3, test_fraction=0.25, test_items=100)
    train_packages = {i["package"] for i in train}
    test_packages = {i["package"] for i in test}
    assert train_packages and test_packages
    assert not train_packages & test_packages
    # pkg3 and oldname share a file: never split between the sides.
    assert {"pkg3", "oldname"} <= train_packages or {"pkg3", "oldname"} <= test_packages
    assert stats["files_skipped"] == 1  # the one that is not gzip
    assert stats["distinct_files"] == 13  # pkg0-doc's copy is read once
    # Each entry once (pkg0-doc's copy adds none): pkgN has 5, oldname 2; the test side
    # takes at most 2 of each package.
    count = {f"pkg{i}": 5 for i in range(12)} | {"oldname": 2}
    assert len(train) == sum(count[p] for p in train_packages)
    assert len(test) == sum(min(2, count[p]) for p in test_packages)
    assert set(count) == train_packages | test_packages
    again = task.build(_paths(docs), seed=3, test_fraction=0.25)
    assert (train, test) == again[:2]
    other = task.build(_paths(docs), seed=4, test_fraction=0.25)
    assert {i["package"] for i in other[1]} != test_packages


def test_caps_and_length_limit(task, tmp_path):
    docs = _docs(tmp_path)
    train, test, _stats = task.build(
        _paths(docs), seed=0, test_fraction=0.25, train_per_package=2, test_per_package=1
    )
    from collections import Counter

    assert max(Counter(i["package"] for i in train).values()) == 2
    assert max(Counter(i["package"] for i in test).values()) == 1
    _, _, short = task.build(_paths(docs), seed=0, max_chars=10)
    assert short["train_items"] == short["test_items"] == 0
    assert short["entries_too_long"] == 62


def test_build_refuses_bad_settings_and_empty_input(task, tmp_path):
    with pytest.raises(task.TaskError, match="no changelog entry"):
        task.build([])
    with pytest.raises(task.TaskError, match="--test-fraction"):
        task.build(_paths(_docs(tmp_path)), test_fraction=1.0)


def test_score_exact_match_of_the_parsed_object(task):
    truth = {"package": "foo", "version": "1.0-1", "distribution": "unstable", "urgency": "low"}
    replies = [
        '{"package":"foo","version":"1.0-1","distribution":"unstable","urgency":"low"}',
        # another key order, spacing and a code fence around it still match
        (
            '```json\n{"urgency": "low", "distribution": "unstable", "version": "1.0-1", '
            '"package": "foo"}\n```'
        ),
        '{"package":"foo","version":"1.0","distribution":"unstable","urgency":"low"}',
        '{"package":"foo","version":"1.0-1","distribution":"unstable"}',  # a key missing
        '{"package":"foo","version":"1.0-1","distribution":"unstable","urgency":"low","x":1}',
        "package: foo, version: 1.0-1",  # no JSON
        '{"package": {"name": "foo"}}',
    ]
    result = task.score(replies, [truth] * len(replies))
    assert result["exact"] == 2
    assert result["exact_match"] == pytest.approx(2 / 7)
    assert result["parsed"] == 6
    assert result["field_accuracy"]["version"] == pytest.approx(4 / 7)
    assert result["field_accuracy"]["urgency"] == pytest.approx(4 / 7)


def test_build_cli_writes_jsonl_that_finetune_reads(task, tmp_path, smollm2_tokenizer):
    from llamalab.data.instruct import load_instruct

    docs = _docs(tmp_path)
    out = tmp_path / "out"
    assert task.main(["build", "--docs", str(docs), "--out", str(out), "--test-items", "3"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    test = task.read_test(out / "test.jsonl")
    assert len(test) == stats["test_items"] == 3
    prompt, truth = test[0]
    assert [m["role"] for m in prompt] == ["user"] and set(truth) == set(task.FIELDS)
    data = load_instruct(out / "train.jsonl", smollm2_tokenizer, 256)
    assert len(data.examples) == stats["train_items"]
    # The loss covers the answer and the end of the turn, nothing of the entry.
    ex = data.examples[0]
    trained = [t for t, keep in zip(ex.tokens, ex.trained, strict=True) if keep]
    first = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert smollm2_tokenizer.decode(trained).strip() == (
        first["messages"][1]["content"] + "<|im_end|>"
    )


def test_cli_errors_are_one_line(task, tmp_path, capsys):
    assert task.main(["build", "--docs", str(tmp_path / "none"), "--out", str(tmp_path)]) == 1
    assert (
        capsys.readouterr().err
        == f"changelog_task: error: --docs {tmp_path / 'none'}: not a folder\n"
    )
    bad = tmp_path / "test.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\nnot json\n')
    assert task.main(["score", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"changelog_task: error: {bad}:1: not an item of this task")
    assert err.count("\n") == 1
    ok = tmp_path / "ok.jsonl"
    ok.write_text(
        json.dumps(task.item(task.parse_entries(CHANGELOG)[0]), ensure_ascii=False) + "\n"
    )
    assert task.main(["score", str(ok), "--lora", str(tmp_path / "missing")]) == 1
    assert "--lora" in capsys.readouterr().err
    assert task.main(["score", str(ok), "--batch-size", "0"]) == 1
    assert (
        capsys.readouterr().err == "changelog_task: error: --batch-size must be at least 1, got 0\n"
    )


def test_greedy_replies_equal_llama_cpp(task, smollm2_path, smollm2_tokenizer):
    """Batched greedy generation (two prompts of different lengths in one batch) gives
    llama.cpp's greedy tokens on the same packed file, each prompt run alone there, up to
    llama.cpp's first near-tie (its top two logits within 0.5, where rounding decides; as
    tests/test_generation.py compares them)."""
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    entries = task.parse_entries(CHANGELOG)
    prompts = [task.item(e)["messages"][:1] for e in entries[:2]]
    n = 12
    ours = task.generate_replies(str(smollm2_path), prompts, max_tokens=n, batch_size=2, threads=2)
    llm = llama_cpp.Llama(
        model_path=str(smollm2_path), n_ctx=512, verbose=False, n_threads=2, logits_all=True
    )
    compared = 0
    for prompt, reply in zip(prompts, ours, strict=True):
        ids = smollm2_tokenizer.encode_chat(prompt)
        llm.reset()
        llm.eval(ids)
        theirs = []
        for _ in range(n):
            logits = np.array(llm.scores[llm.n_tokens - 1])
            top2 = np.sort(logits)[-2:]
            if top2[1] - top2[0] < 0.5:
                break
            theirs.append(int(logits.argmax()))
            llm.eval([theirs[-1]])
        assert reply.startswith(smollm2_tokenizer.decode(theirs))
        compared += len(theirs)
    assert compared >= 10
