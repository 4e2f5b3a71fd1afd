"""Token windows for calibration and evaluation.

Dataset names: `builtin-train`, `builtin-validation`, `builtin-test` (splits of the bundled corpus),
a local UTF-8 text file, or `wikitext2` (WikiText-2 raw test split through `datasets`; needs the hub).
"""

from __future__ import annotations

from pathlib import Path

import torch

from romer.core.errors import UserError

BUILTIN = {"builtin-train": "train", "builtin-validation": "validation", "builtin-test": "test"}


def load_text(name: str, builtin_cfg=None, key="eval.dataset") -> str:
    if name in BUILTIN:
        from romer.data.corpus import builtin_splits

        return builtin_splits(builtin_cfg)[BUILTIN[name]]
    p = Path(name)
    if p.is_dir():
        raise UserError(f"params key '{key}': {p} is a directory; expected a UTF-8 text file (or a builtin split)")
    if p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"params key '{key}': {p} is not UTF-8 text ({e})") from None
        if not text.strip():
            raise UserError(f"params key '{key}': text file {p} is empty")
        return text
    if name in ("wikitext2", "wikitext-2"):
        return _wikitext2(key)
    if p.suffix or "/" in name:
        raise UserError(f"params key '{key}': file not found: {name}")
    raise UserError(
        f"params key '{key}': unknown dataset {name!r}; expected builtin-train, builtin-validation, "
        f"builtin-test, wikitext2, or a path to a local text file"
    )


def _wikitext2(key):
    try:
        from datasets import load_dataset

        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as e:
        raise UserError(
            f"params key '{key}': cannot load wikitext2 through `datasets` ({type(e).__name__}); the Hugging "
            f"Face hub is unreachable from this machine. Save the WikiText-2 test split as a text file and set "
            f"{key} to its path."
        ) from None
    return "\n\n".join(ds["text"])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, in chunks of lines (fast tokenizers handle a list at once)."""
    lines = text.split("\n")
    step = 2000
    ids = []
    for i in range(0, len(lines), step):
        chunk = "\n".join(lines[i:i + step]) + ("\n" if i + step < len(lines) else "")
        ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(ids: torch.Tensor, seq_len: int, max_tokens=None, key="eval") -> torch.Tensor:
    """Non-overlapping windows [N, seq_len] over the token stream (the ragged tail is dropped)."""
    if max_tokens is not None:
        if max_tokens < seq_len:
            raise UserError(f"params key '{key}.max_tokens': {max_tokens} is fewer than one window of "
                            f"{key}.seq_len={seq_len}")
        ids = ids[:max_tokens]
    n = ids.numel() // seq_len
    if n < 1:
        raise UserError(
            f"params key '{key}.dataset': the text has only {ids.numel()} tokens, fewer than one window of "
            f"{key}.seq_len={seq_len}"
        )
    return ids[: n * seq_len].view(n, seq_len)


def calib_windows(ids: torch.Tensor, n_seqs: int, seq_len: int, key="calib", allow_overlap=False) -> torch.Tensor:
    """n_seqs windows of seq_len spread evenly over the token stream (deterministic); they overlap (repeat
    tokens) only when the text is shorter than n_seqs x seq_len and allow_overlap says so."""
    if ids.numel() < seq_len:
        raise UserError(f"params key '{key}.dataset': only {ids.numel()} tokens, fewer than {key}.seq_len={seq_len}")
    if n_seqs * seq_len > ids.numel() and not allow_overlap:
        raise UserError(f"params key '{key}.n_seqs': {n_seqs} windows of {key}.seq_len={seq_len} need "
                        f"{n_seqs * seq_len} tokens, the text has {ids.numel()}: the windows would overlap. Lower "
                        f"{key}.n_seqs or {key}.seq_len, use a longer text, or set {key}.allow_overlap: true")
    starts = torch.linspace(0, ids.numel() - seq_len, n_seqs).long()
    return torch.stack([ids[s: s + seq_len] for s in starts])
