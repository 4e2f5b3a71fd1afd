"""The bundled public-domain corpus (Project Gutenberg Shakespeare, see data/corpus/README.md).

`read_corpus` concatenates the texts in sorted file order; `builtin_splits` cuts the result into
train/validation/test by contiguous chunks. Both are pure functions of the files and the params,
so every stage that asks for a split gets the same string.
"""

from __future__ import annotations

from pathlib import Path

from romer.core.errors import UserError

SPLITS = ("train", "validation", "test")


def read_corpus(corpus_dir, max_chars=None) -> str:
    """All `*.txt` files of `corpus_dir`, in sorted name order, joined by a blank line.

    `max_chars` keeps only the first that many characters (tests use a small slice).
    """
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise UserError(f"builtin corpus directory not found: {corpus_dir} "
                        "(params key 'builtin.corpus_dir'; see scripts/extract_corpus.py)")
    files = sorted(p for p in corpus_dir.glob("*.txt") if p.is_file())
    if not files:
        raise UserError(f"builtin corpus directory has no *.txt files: {corpus_dir} "
                        "(params key 'builtin.corpus_dir'; see scripts/extract_corpus.py)")
    parts, n = [], 0
    for p in files:
        text = p.read_text(encoding="utf-8").replace("\r\n", "\n").strip("\n")
        if text:
            parts.append(text)
            n += len(text) + 2
        if max_chars is not None and n >= max_chars:
            break
    text = "\n\n".join(parts) + "\n"
    if max_chars is not None:
        text = text[:max_chars]
    if not text.strip():
        raise UserError(f"builtin corpus is empty: {corpus_dir} (params key 'builtin.corpus_dir')")
    return text


def _snap(text: str, pos: int) -> int:
    """Move a cut position forward to just after the next newline (so no line is cut in two)."""
    if pos <= 0:
        return 0
    if pos >= len(text):
        return len(text)
    nl = text.find("\n", pos)
    return len(text) if nl < 0 else nl + 1


def split_text(text: str, val_frac: float, test_frac: float, chunks: int = 1) -> dict:
    """Cut `text` into `chunks` equal contiguous pieces; in each piece the first part goes to
    train, then `val_frac` of it to validation, then `test_frac` to test. Cuts fall on line ends.

    With chunks > 1 the held-out text comes from several places in the corpus (several plays), not
    only from the alphabetically last ones. Each split is its pieces joined in corpus order.
    """
    out = {k: [] for k in SPLITS}
    n = len(text)
    bounds = [_snap(text, round(i * n / chunks)) for i in range(chunks)] + [n]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        size = b - a
        t_end = max(a, _snap(text, a + round(size * (1 - val_frac - test_frac))))
        v_end = max(t_end, _snap(text, a + round(size * (1 - test_frac))))
        t_end, v_end = min(t_end, b), min(v_end, b)
        out["train"].append(text[a:t_end])
        out["validation"].append(text[t_end:v_end])
        out["test"].append(text[v_end:b])
    return {k: "".join(v) for k, v in out.items()}


def builtin_splits(cfg) -> dict:
    """{"train", "validation", "test"} strings of the bundled corpus for a BuiltinParams `cfg`."""
    text = read_corpus(cfg.corpus_dir, cfg.max_chars)
    splits = split_text(text, cfg.val_frac, cfg.test_frac, cfg.split_chunks)
    for k, v in splits.items():
        if not v.strip():
            raise UserError(f"builtin corpus {cfg.corpus_dir}: the '{k}' split is empty "
                            f"({len(text)} characters; raise builtin.max_chars or the split fractions)")
    return splits
