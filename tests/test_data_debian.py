"""scripts/debian_mixture.py: its text converters, on synthetic files (no apt, no network)."""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "debian_mixture.py"


@pytest.fixture(scope="module")
def mixture():
    spec = importlib.util.spec_from_file_location("debian_mixture", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sword_blocks_are_read_in_order_and_markup_removed(mixture, tmp_path):
    blocks = [b"<w>In</w> the <i>beginning</i>&amp; God", b"<lb/>created the heaven."]
    index, blob = b"", b""
    for raw in blocks:
        packed = zlib.compress(raw)
        index += len(blob).to_bytes(4, "little") + len(packed).to_bytes(4, "little")
        index += len(raw).to_bytes(4, "little")
        blob += packed
    (tmp_path / "ot.bzs").write_bytes(index)
    (tmp_path / "ot.bzz").write_bytes(blob)
    text = mixture.sword_module_text(tmp_path / "ot.bzs")
    assert text == "In the beginning& God\ncreated the heaven."


def test_wordnet_glosses(mixture, tmp_path):
    data = tmp_path / "data.noun"
    data.write_text(
        "  1 This software and database is being provided\n"
        "00001740 03 n 02 entity 0 thing 0 001 ~ 00001930 n 0000 | that which is perceived\n"
    )
    assert mixture.wordnet_glosses(data) == "entity, thing: that which is perceived\n"


def test_html_to_text_drops_scripts_and_keeps_paragraphs(mixture):
    page = "<html><head><title>t</title></head><body><p>One &amp; two</p>"
    page += "<script>x()</script><p>Three</p></body></html>"
    assert mixture.html_to_text(page) == "One & two\n\nThree\n"


def test_package_file_selection(mixture):
    assert mixture.wanted("usr/share/go-1.19/src/fmt/print.go", "usr/share/go-1.19/src/*.go", "go")
    assert not mixture.wanted(
        "usr/share/go-1.19/src/fmt/x_test.go", "usr/share/go-1.19/src/*.go", "go"
    )
    assert not mixture.wanted(
        "usr/share/go-1.19/src/a/testdata/b.go", "usr/share/go-1.19/src/*.go", "go"
    )
    faq = "usr/share/doc/python3.11/html/_sources/faq/general.rst.txt"
    assert not mixture.wanted(faq, "usr/share/doc/python3.11/html/_sources/*.rst.txt", "pydoc")
    assert mixture.wanted("a/b/paper.tex.gz", "*.tex.gz", "gzip")
    groups = {g for g, _, _ in mixture.PACKAGES}
    assert groups == set(mixture.GROUPS)


def test_non_ascii_check_catches_binary_read_as_text(mixture, tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(mixture.BuildError, match="not ASCII"):
        mixture._record({"packages": {}}, "books", "p", "1", "", [f], tmp_path, 0.06)
