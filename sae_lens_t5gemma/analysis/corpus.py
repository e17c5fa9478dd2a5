"""Corpus -> rows -> right-padded token batches: the one place texts are read, tokenised and padded.

Every command that reads a corpus goes through here: ``dashboard`` and feature statistics
(:func:`iter_rows`, :func:`tokenize_row`), ``compare`` (:func:`document_batches`,
:func:`token_batches`), ``diagnose`` and ``find-features`` (:func:`read_texts`,
:func:`tokenize_row`, :func:`pad_batch`).

- **Rows.** A row is a text or a list of token ids. A text becomes ``[BOS] + ids``, cut to the
  context; only a prefix of a long text is tokenised (:func:`prefix_ids`), so the work and the
  memory are bounded by the context, not by the row.
- **Padding.** Always on the right, whatever the tokenizer's own ``padding_side`` (transformers
  5's ``GemmaTokenizer`` says "left"): a row then starts at position 0, as the position contract
  and the prefix_lm split assume. PAD is the tokenizer's pad id (0 if it has none).
- **Errors.** One line naming the file (and line) where the input is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

Row = str | list[int]
"""One corpus row: a text, or pre-tokenised ids (used as given, cut to the context)."""


# ----------------------------------------------------------------------------- reading


def read_texts(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, one text each (``--dataset`` of compare and diagnose, ``--with``, ``--without``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not UTF-8 text, or no non-empty line (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Texts file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"Texts file {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"Texts file {path} has no non-empty line.")
    return texts


def iter_rows(dataset: str | Path, split: str = "train", text_field: str = "text") -> Iterator[Row]:
    """Rows of a dataset, streamed: a Hugging Face dataset name, ``.txt`` (one text per line)
    or ``.jsonl`` files (a ``text`` field, or pre-tokenised ``tokens``/``input_ids``).

    Raises:
        FileNotFoundError, ValueError: as :func:`training.data.resolve_dataset_files` does.
    """
    from sae_lens_t5gemma.training.data import resolve_dataset_files

    files = resolve_dataset_files(dataset)
    if not files:
        from datasets import load_dataset

        try:
            ds = load_dataset(str(dataset), split=split, streaming=True)
        except Exception as e:  # datasets raises many types for unknown/offline datasets
            raise ValueError(
                f"Cannot load the Hugging Face dataset {str(dataset)!r} (split {split!r}): {type(e).__name__}: {e}. "
                "For local data pass .txt or .jsonl files."
            ) from e
        for n, row in enumerate(ds):
            yield _row_value(row, text_field, f"dataset {dataset!r} row {n}")
        return
    for f in files:
        with f.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                if f.suffix == ".txt":
                    yield line.rstrip("\n")
                else:
                    yield _row_value(json.loads(line), text_field, f"{f} line {n}")


def _row_value(row: Mapping[str, Any], text_field: str, where: str) -> Row:
    for name in (text_field, "tokens", "input_ids"):
        if name in row:
            value = row[name]
            if isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
            ):
                return value
            raise ValueError(f"{where}: field {name!r} is neither a string nor a list of token ids")
    raise ValueError(f"{where}: no {text_field!r}, 'tokens' or 'input_ids' field (has {sorted(row)[:8]})")


# ----------------------------------------------------------------------------- tokenising

_CHARS_PER_TOKEN = 8
"""First guess of characters per token for :func:`prefix_ids` (it doubles the prefix while unsure)."""


def prefix_ids(tokenizer: Any, text: str, n: int) -> list[int]:
    """The first ``n`` ids of ``tokenizer(text)`` (no special tokens), tokenising only a prefix.

    A cut can change the last tokens of a prefix (a word split in two) but not tokens far
    before it, so a prefix is trusted once it gives more than ``n`` ids and agrees on the
    first ``n`` with a prefix twice as long; otherwise the prefix doubles, up to the whole text.
    """
    if n <= 0:
        return []
    size = max(64, n * _CHARS_PER_TOKEN)
    before: list[int] | None = None
    while size < len(text):
        ids = tokenizer(text[:size], add_special_tokens=False)["input_ids"]
        if len(ids) > n:
            if before is not None and before[:n] == ids[:n]:
                return ids[:n]
            before = ids
        size *= 2
    return tokenizer(text, add_special_tokens=False)["input_ids"][:n]


def tokenize_row(tokenizer: Any, row: Row, context_size: int) -> list[int]:
    """One row's token ids: ``[BOS] + ids`` of a text, cut to ``context_size``; ids as given, cut.

    Only a prefix of a long text is tokenised (:func:`prefix_ids`).
    """
    if isinstance(row, str):
        return [tokenizer.bos_token_id, *prefix_ids(tokenizer, row, context_size - 1)]
    return list(row[:context_size])


def pad_id(tokenizer: Any) -> int:
    """The id padding is written with: the tokenizer's pad id, or 0 where it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_batch(
    rows: Sequence[Sequence[int]],
    pad: int,
    device: torch.device | str | None = None,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, attention_mask)`` ``[len(rows), width]``: each row from position 0, PAD after it.

    ``width`` defaults to the longest row's length.
    """
    width = max(len(r) for r in rows) if width is None else width
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    if device is not None:
        tokens, mask = tokens.to(device), mask.to(device)
    return tokens, mask


def text_batches(
    tokenizer: Any, texts: Iterable[Row], context_size: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One document per row, all rows padded to the longest (at most ``context_size``), cut into
    ``(tokens, attention_mask)`` batches of ``batch_size`` rows."""
    tokens, mask = pad_batch([tokenize_row(tokenizer, t, context_size) for t in texts], pad_id(tokenizer))
    return list(zip(tokens.split(batch_size), mask.split(batch_size), strict=True))


# ----------------------------------------------------------------------------- compare's rows


def token_batches(tokenizer: Any, texts: Sequence[str], context_size: int) -> torch.Tensor:
    """``[n_seq, context_size]`` token ids: the texts packed, as SAELens' store does (``--concat-sequences``).

    Each text is tokenised without special tokens; sequences start with BOS and texts are
    separated by BOS (SAELens' defaults). Trailing tokens that do not fill a sequence are dropped.
    A row then holds several documents: T5Gemma 2's bidirectional encoder sees *later* ones too,
    which a causal Gemma 3 never does; :func:`document_batches` is the default for that reason.
    """
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    bos = tokenizer.bos_token_id
    streams = (
        torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long) for t in texts
    )
    seqs = list(
        concat_and_batch_sequences(
            streams, context_size, begin_batch_token_id=bos, sequence_separator_token_id=bos
        )
    )
    if not seqs:
        raise ValueError(
            f"The texts give fewer than context_size={context_size} tokens: nothing to evaluate on."
        )
    return torch.stack(seqs)


def document_batches(
    tokenizer: Any, texts: Sequence[str], context_size: int, min_tokens: int
) -> tuple[torch.Tensor, dict[str, int]]:
    """One document per row: ``[BOS] + ids[: context_size - 1]``, right-padded with PAD.

    No row holds two documents, so no position can attend to another document (the
    bidirectional encoder included). Padding sits at the end of a row: causal models and the
    decoder never read it before a real token, it is a special token (left out of every metric
    and target), and documents with fewer than ``min_tokens`` tokens (BOS included) are dropped
    so that, under ``prefix_lm``, the encoder's prefix holds no padding.

    Returns:
        ``(tokens, counts)``: counts of ``documents``, ``kept``, ``too_short`` and ``truncated``.

    Raises:
        ValueError: no document is long enough (the message gives the lengths).
    """
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("document_batches needs a tokenizer with a pad token (PAD is masked as special).")
    rows, lengths, truncated = [], [], 0
    for text in texts:
        # One token past the context tells a truncated document from one that fits exactly.
        ids = tokenize_row(tokenizer, text, context_size + 1)
        lengths.append(len(ids))
        if len(ids) < min_tokens:
            continue
        truncated += len(ids) > context_size
        rows.append(ids[:context_size])
    if not rows:
        raise ValueError(
            f"No document has at least {min_tokens} tokens (BOS included; needed for a prefix of "
            f"{min_tokens - 1} real tokens and a continuation); lengths are {min(lengths)}-{max(lengths)}. "
            "Give a smaller context size, longer texts, or pack documents (pack=True / --concat-sequences)."
        )
    counts = {"documents": len(lengths), "kept": len(rows), "too_short": len(lengths) - len(rows),
              "truncated": truncated}  # fmt: skip
    return pad_batch(rows, pad, width=context_size)[0], counts


__all__ = [
    "Row", "read_texts", "iter_rows", "prefix_ids", "tokenize_row", "pad_id", "pad_batch", "text_batches",
    "token_batches", "document_batches",
]  # fmt: skip
