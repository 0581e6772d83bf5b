#!/usr/bin/env python3
"""Build the Debian pretraining mixture (docs/data.md) from Debian packages, reproducibly.

    python scripts/debian_mixture.py --out data/debian-text            # everything
    python scripts/debian_mixture.py --out /tmp/t --packages dict-devil  # one package

Each package is fetched with ``apt-get download`` (no dependency chain, nothing
installed) and unpacked with ``dpkg-deb -x``; its text is written under
``OUT/text/GROUP/PACKAGE/``. The groups stand for the paper's Table 1 sources:

    web        CommonCrawl, C4    kernel and Python docs, man pages, Debian's handbooks
    books      Books              SWORD bible commentaries and texts, KJV, Bierce
    reference  Wikipedia          GCIDE (Webster 1913), FOLDOC, Jargon File, WordNet glosses
    arxiv      ArXiv              LaTeX sources of TeX Live's documentation
    code       GitHub             Go 1.19's sources (no tests), this Python's standard library
    qa         StackExchange      perlfaq, Python's FAQ, Debian's FAQ

Reproducibility: ``OUT/lock.json`` records each package's version and the sha256 of its
.deb. When the lock exists (or ``--lock FILE`` names one) those exact versions are
downloaded and their hashes checked; a mirror that has replaced a version (security
updates do) is an error, and ``--update-lock`` accepts the new one. ``OUT/manifest.json``
lists every text file with its size and sha256.

Then tokenize, e.g.:

    llamalab tokenizer train --input data/debian-text/text --vocab-size 8000 --output data/tok
    llamalab data prepare --tokenizer data/tok --out data/debian \\
        web=data/debian-text/text/web books=data/debian-text/text/books ...

(the script prints the exact command at the end).
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import html
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

from llamalab.files import file_sha256

# (group, package, [(pattern inside the unpacked package, converter)]). Patterns are
# fnmatch patterns on the path relative to the package root ("*" crosses "/").
PACKAGES: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("books", "sword-comm-tdavid", [("usr/share/sword/modules/*.[bc]zs", "sword")]),
    ("books", "sword-text-web", [("usr/share/sword/modules/*.[bc]zs", "sword")]),
    ("books", "sword-comm-mhcc", [("usr/share/sword/modules/*.[bc]zs", "sword")]),
    ("books", "sword-comm-scofield", [("usr/share/sword/modules/*.[bc]zs", "sword")]),
    ("books", "bible-kjv-text", [("", "bible")]),
    ("books", "dict-devil", [("usr/share/dictd/*.dict.dz", "gzip")]),
    ("reference", "dict-gcide", [("usr/share/dictd/*.dict.dz", "gzip")]),
    ("reference", "dict-foldoc", [("usr/share/dictd/*.dict.dz", "gzip")]),
    ("reference", "jargon-text", [("usr/share/doc/jargon-text/jargon.txt.gz", "gzip")]),
    ("reference", "wordnet-base", [("usr/share/wordnet/data.*", "wordnet")]),
    ("web", "linux-doc-6.1", [("usr/share/doc/linux-doc-6.1/*.rst.gz", "gzip")]),
    ("web", "python3.11-doc", [("usr/share/doc/python3.11/html/_sources/*.rst.txt", "pydoc")]),
    ("web", "manpages", [("usr/share/man/man*", "man")]),
    ("web", "manpages-dev", [("usr/share/man/man*", "man")]),
    ("web", "debian-handbook", [("usr/share/doc/debian-handbook/html/en-US/*.html", "html")]),
    ("web", "debian-reference-en", [("usr/share/debian-reference/*.en.html", "html")]),
    ("arxiv", "texlive-publishers-doc", [("*.tex", "text"), ("*.tex.gz", "gzip")]),
    ("arxiv", "texlive-science-doc", [("*.tex", "text"), ("*.tex.gz", "gzip")]),
    ("code", "golang-1.19-src", [("usr/share/go-1.19/src/*.go", "go")]),
    ("qa", "perl-doc", [("usr/share/perl/*/pod/perlfaq[1-9].pod", "text")]),
    ("qa", "python3.11-doc", [("usr/share/doc/python3.11/html/_sources/faq/*.rst.txt", "text")]),
    ("qa", "debian-faq", [("usr/share/doc/debian/FAQ/debian-faq.en.txt.gz", "gzip")]),
]
GROUPS = ("web", "books", "reference", "arxiv", "code", "qa")
# Measured on bookworm: every source is at most 6% non-ASCII bytes; more means a
# compressed or binary file was read as text.
MAX_NON_ASCII = 0.06
MAX_FILE_BYTES = 64 << 20  # a single text file larger than this is not what we want


class BuildError(Exception):
    """A problem the user must fix (printed as one line)."""


# ------------------------------------------------------------------ converters
class _HTMLText(HTMLParser):
    BLOCK: ClassVar[frozenset[str]] = frozenset(
        ["p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd"]
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head"):
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(data: str) -> str:
    parser = _HTMLText()
    parser.feed(data)
    text = "".join(parser.parts)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def read_bounded(path: Path, opener=open) -> bytes:
    with opener(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise BuildError(f"{path}: more than {MAX_FILE_BYTES} bytes of text; refusing")
    return data


def sword_module_text(bzs: Path) -> str:
    """A SWORD zText/zCom testament: every zlib block of the .bzz, markup removed.

    ``X.bzs`` (``X.czs`` for a commentary) holds one 12-byte record per block (offset, compressed size, size; little
    endian u32), pointing into ``X.bzz`` (``X.czz``). Verses sit in the blocks in canonical order.
    """
    bzz = bzs.with_suffix(bzs.suffix[:-1] + "z")  # .bzs -> .bzz (zText), .czs -> .czz (zCom)
    index = bzs.read_bytes()
    blob = bzz.read_bytes()
    out = []
    for i in range(0, len(index) - len(index) % 12, 12):
        offset = int.from_bytes(index[i : i + 4], "little")
        size = int.from_bytes(index[i + 4 : i + 8], "little")
        if size == 0 or offset + size > len(blob):
            continue
        try:
            raw = zlib.decompress(blob[offset : offset + size])
        except zlib.error as exc:
            raise BuildError(f"{bzz}: block {i // 12} is not zlib data: {exc}") from None
        out.append(raw.decode("utf-8", "replace"))
    text = "".join(out)
    text = re.sub(r"<(?:lb|br|p|/p|div|/div|l)\b[^>]*>", "\n", text)
    text = html.unescape(re.sub(r"<[^>]*>", "", text))
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\n\s*\n+", "\n\n", text)


def man_to_text(path: Path) -> str:
    """Render a man page with man-db (``man -l``), or strip the troff if there is none.

    Rendered as ASCII: in UTF-8, tbl's tables come out as box-drawing characters (3 bytes
    each), which made manpages-dev 7.6% non-ASCII.
    """
    if shutil.which("man"):
        env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0", "MANPAGER": "cat"}
        proc = subprocess.run(  # noqa: PLW1510 - the return code is checked
            ["man", "-l", "-E", "ascii", str(path)],
            capture_output=True,
            env=env,
            timeout=60,
        )
        if proc.returncode == 0 and proc.stdout:
            return re.sub(r".\x08", "", proc.stdout.decode("utf-8", "replace"))
    raw = read_bounded(path, gzip.open if path.suffix == ".gz" else open)
    lines = []
    for line in raw.decode("utf-8", "replace").splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            line = re.sub(r"^\.\w+\s*", "", line)
        lines.append(re.sub(r"\\f[BIRP]|\\\(\w\w|\\[-e&]", "", line))
    return "\n".join(lines) + "\n"


def wordnet_glosses(path: Path) -> str:
    """WordNet data.* files: the gloss after ``|`` on each synset line."""
    out = []
    for line in read_bounded(path).decode("utf-8", "replace").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue  # the licence header lines start with two spaces
        words = line.split(" ")
        lemmas = [w.replace("_", " ") for w in words[4 : 4 + 2 * int(words[3], 16) : 2]]
        out.append(f"{', '.join(lemmas)}: {line.split('|', 1)[1].strip()}")
    return "\n".join(out) + "\n"


def bible_text(package_root: Path) -> str:
    """The King James text through the `bible` program of package bible-kjv."""
    if not shutil.which("bible"):
        if os.geteuid() != 0:
            raise BuildError("bible-kjv-text needs the `bible` program: apt-get install bible-kjv")
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "bible-kjv"],
            check=True,
            capture_output=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    proc = subprocess.run(
        ["bible", "-f", "Gen1:1-Rev22:21"],
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=600,
    )
    if proc.returncode != 0 or not proc.stdout:
        raise BuildError(f"bible failed: {proc.stderr.decode(errors='replace').strip()}")
    # Each line is "Ge1:1 In the beginning ...": keep the verse, drop its reference.
    text = proc.stdout.decode("utf-8", "replace")
    return re.sub(r"(?m)^\w+?\d+:\d+ ", "", text)


def convert(path: Path, kind: str) -> str | None:
    """The text of one file (``None``: the file is left out)."""
    if kind == "gzip":
        return read_bounded(path, gzip.open).decode("utf-8", "replace")
    if kind in ("text", "pydoc"):
        return read_bounded(path).decode("utf-8", "replace")
    if kind == "go":
        return read_bounded(path).decode("utf-8", "replace")
    if kind == "html":
        return html_to_text(read_bounded(path).decode("utf-8", "replace"))
    if kind == "man":
        return man_to_text(path)
    if kind == "sword":
        return sword_module_text(path)
    if kind == "wordnet":
        return wordnet_glosses(path)
    raise AssertionError(kind)


def wanted(rel: str, pattern: str, kind: str) -> bool:
    if not fnmatch.fnmatchcase(rel, pattern) and not (
        pattern.startswith("*") and fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], pattern)
    ):
        return False
    if "/translations/" in rel:  # the kernel docs' Chinese, Japanese ... versions
        return False
    if kind == "go":
        return not rel.endswith("_test.go") and "/testdata/" not in rel
    if kind == "pydoc":
        return "/_sources/faq/" not in rel  # the FAQ belongs to the qa group
    if kind == "man":
        return rel.endswith(".gz") or re.search(r"\.\d\w*$", rel) is not None
    return True


# ------------------------------------------------------------------ packages
def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True, check=True
    ).stdout.strip()


def download(package: str, version: str | None, debs: Path) -> Path:
    """``apt-get download`` one package (a given version) into ``debs``; return the .deb."""
    debs.mkdir(parents=True, exist_ok=True)
    before = set(debs.glob("*.deb"))
    spec = f"{package}={version}" if version else package
    proc = subprocess.run(
        ["apt-get", "download", "-q", spec], check=False, cwd=debs, capture_output=True, text=True
    )
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()
        raise BuildError(f"apt-get download {spec} failed: {msg[-1] if msg else proc.returncode}")
    new = sorted(set(debs.glob("*.deb")) - before)
    if new:
        return new[0]
    # Downloaded before: find it by name and version.
    for deb in sorted(debs.glob(f"{package}_*.deb")):
        if version is None or deb_field(deb, "Version") == version:
            return deb
    raise BuildError(f"apt-get download {spec} left no .deb in {debs}")


def build(args: argparse.Namespace) -> int:
    out = Path(args.out)
    text_root = out / "text"
    lock_path = Path(args.lock) if args.lock else out / "lock.json"
    lock = json.loads(lock_path.read_text()) if lock_path.is_file() else {}
    locked = lock.get("packages", {})
    selected = [
        p
        for p in PACKAGES
        if (not args.packages or p[1] in args.packages) and (not args.groups or p[0] in args.groups)
    ]
    if args.packages:
        unknown = set(args.packages) - {p[1] for p in PACKAGES} - {"python-stdlib"}
        if unknown:
            raise BuildError(f"unknown packages {', '.join(sorted(unknown))}")
    if text_root.exists() and any(text_root.iterdir()) and not (out / "manifest.json").is_file():
        raise BuildError(f"{out}: holds text that this script did not write; choose a new --out")
    # A rerun for some packages keeps the others' records (their text stays in place).
    old = out / "manifest.json"
    manifest: dict = json.loads(old.read_text()) if old.is_file() else {"packages": {}}
    new_lock = {"distribution": _distribution(), "packages": dict(locked)}
    # Saved after every package: an interrupted build keeps what it finished, and a
    # rerun recognises the folder as its own.
    _save(out, lock_path, new_lock, manifest)
    for group, package, rules in selected:
        entry = locked.get(package)
        deb = download(
            package, None if args.update_lock or not entry else entry["version"], out / "debs"
        )
        digest, version = file_sha256(deb), deb_field(deb, "Version")
        if entry and not args.update_lock and digest != entry["sha256"]:
            raise BuildError(
                f"{package} {version}: sha256 {digest} differs from the lock's {entry['sha256']}; "
                "the mirror replaced it (use --update-lock to accept)"
            )
        new_lock["packages"][package] = {"version": version, "sha256": digest, "deb": deb.name}
        root = out / "unpacked" / package
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        proc = subprocess.run(
            ["dpkg-deb", "-x", str(deb), str(root)], check=False, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise BuildError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()}")
        dest = text_root / group / package
        shutil.rmtree(dest, ignore_errors=True)
        files = _convert_package(root, rules, dest, group, package)
        if not args.keep_unpacked:
            shutil.rmtree(root)
        if not files:
            raise BuildError(f"{package}: no files matched {[r[0] for r in rules]}")
        _record(manifest, group, package, version, digest, files, dest, args.max_non_ascii)
        _save(out, lock_path, new_lock, manifest)
        print(f"{group:<10} {package:<24} {version:<24} {_size(files)}", file=sys.stderr)
    if (not args.packages and (not args.groups or "code" in args.groups)) or (
        args.packages and "python-stdlib" in args.packages
    ):
        files = _python_stdlib(text_root / "code" / "python-stdlib")
        _record(
            manifest, "code", "python-stdlib", sys.version.split()[0], "", files,
            text_root / "code" / "python-stdlib", args.max_non_ascii,
        )  # fmt: skip
    if (out / "unpacked").is_dir() and not any((out / "unpacked").iterdir()):
        (out / "unpacked").rmdir()
    _save(out, lock_path, new_lock, manifest)
    groups = sorted({g for g, *_ in selected} | set(manifest["groups"]))
    sources = " ".join(f"{g}={text_root / g}" for g in groups)
    print(
        f"\n{out}: {sum(v['bytes'] for v in manifest['groups'].values()):,} bytes of text.\n"
        f"Next:\n  llamalab tokenizer train --input {text_root} --vocab-size 8000 "
        f"--output {out}/tokenizer\n"
        f"  llamalab data prepare --tokenizer {out}/tokenizer --out DATA_DIR {sources}",
        file=sys.stderr,
    )
    return 0


def _save(out: Path, lock_path: Path, lock: dict, manifest: dict) -> None:
    """Write the lock and the manifest (with per-group totals), each replaced atomically."""
    manifest["groups"] = {}
    for package, info in sorted(manifest["packages"].items()):
        g = manifest["groups"].setdefault(info["group"], {"bytes": 0, "packages": []})
        g["bytes"] += info["bytes"]
        g["packages"].append(info.get("package", package))
    for path, data in ((lock_path, lock), (out / "manifest.json", manifest)):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def _foreign(text: str) -> bool:
    """Whether a file is mostly in a non-Latin script (TeX Live's documentation has Russian,
    Chinese and Japanese guides beside the English ones): such files are left out, so that
    the mixture stays English as the paper's sources mostly are."""
    sample = text[:20_000]
    return sum(1 for ch in sample if ord(ch) > 0x24F) > 0.1 * len(sample)


def _convert_package(root: Path, rules, dest: Path, group: str, package: str) -> list[Path]:
    if rules[0][1] == "bible":
        dest.mkdir(parents=True)
        f = dest / "kjv.txt"
        f.write_text(bible_text(root), encoding="utf-8")
        return [f]
    written = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        for pattern, kind in rules:
            if wanted(rel, pattern, kind):
                text = convert(path, kind)
                if text and text.strip() and not _foreign(text):
                    name = re.sub(r"\.(gz|dz)$", "", rel).replace("/", "__") + ".txt"
                    target = dest / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(text, encoding="utf-8")
                    written.append(target)
                break
    return written


def _python_stdlib(dest: Path) -> list[Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    written = []
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/", "test/")) or "/test" in rel:
            continue
        target = dest / (rel.replace("/", "__") + ".txt")
        target.write_bytes(path.read_bytes())
        written.append(target)
    return written


def _record(manifest, group, package, version, digest, files, dest, max_non_ascii) -> None:
    total = non_ascii = 0
    entries = []
    for f in files:
        data = f.read_bytes()
        total += len(data)
        non_ascii += sum(1 for b in data if b >= 0x80)
        entries.append(
            {"path": str(f.relative_to(dest)), "bytes": len(data), "sha256": file_sha256(f)}
        )
    fraction = non_ascii / max(1, total)
    if fraction > max_non_ascii:
        raise BuildError(
            f"{package}: {fraction:.1%} of its text bytes are not ASCII (limit {max_non_ascii:.0%}): "
            "a compressed or binary file was probably read as text"
        )
    manifest["packages"][f"{group}/{package}"] = {  # python3.11-doc feeds two groups
        "group": group,
        "package": package,
        "version": version,
        "deb_sha256": digest,
        "bytes": total,
        "non_ascii": round(fraction, 4),
        "files": entries,
    }


def _size(files: list[Path]) -> str:
    return f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB in {len(files)} files"


def _distribution() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", required=True, help="output folder (text/, debs/, lock.json, manifest.json)"
    )
    p.add_argument("--lock", help="lock file to follow and update (default: OUT/lock.json)")
    p.add_argument("--update-lock", action="store_true", help="take the mirror's current versions")
    p.add_argument("--packages", nargs="+", help="only these packages ('python-stdlib' too)")
    p.add_argument("--groups", nargs="+", choices=GROUPS, help="only these groups")
    p.add_argument("--keep-unpacked", action="store_true", help="keep OUT/unpacked/")
    p.add_argument("--max-non-ascii", type=float, default=MAX_NON_ASCII)
    args = p.parse_args(argv)
    try:
        return build(args)
    except BuildError as exc:
        print(f"debian_mixture: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
