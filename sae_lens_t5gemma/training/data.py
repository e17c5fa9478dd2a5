"""The training data: local files found and checked line by line, documents checked with the
model's tokenizer, and the dataset loaded with ``datasets``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_lens_t5gemma.training.config import TrainConfig

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

    from sae_lens_t5gemma.training.plan import TrainingPlan

_LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json"}


def resolve_dataset_files(dataset: str | Sequence[str] | Path) -> tuple[Path, ...]:
    """Local dataset files named by ``dataset``; an empty tuple means a Hugging Face dataset name.

    Raises:
        FileNotFoundError: a path that looks local (a file suffix or a path separator) is missing.
        ValueError: an unsupported suffix, an empty folder, a mix of text and JSON files, a line
            that is not UTF-8, or a JSONL line that is not an object with a ``text``/``tokens``/
            ``input_ids`` field.
    """
    items = [dataset] if isinstance(dataset, (str, Path)) else list(dataset)
    if not items:
        raise ValueError("No dataset given")
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix in _LOCAL_SUFFIXES and q.is_file())
            if not found:
                raise ValueError(f"Dataset folder {str(p)!r} holds no .txt or .jsonl files")
            files.extend(found)
        elif p.is_file():
            if p.suffix not in _LOCAL_SUFFIXES:
                raise ValueError(
                    f"Dataset file {str(p)!r}: unsupported suffix {p.suffix!r} (use .txt or .jsonl)"
                )
            files.append(p)
        elif (
            isinstance(item, str)
            and len(items) == 1
            and p.suffix not in _LOCAL_SUFFIXES
            and not item.startswith((".", "/", "~"))
        ):
            return ()  # a Hugging Face dataset name
        else:
            raise FileNotFoundError(f"Dataset file {str(p)!r} does not exist")
    kinds = {_LOCAL_SUFFIXES[f.suffix] for f in files}
    if len(kinds) > 1:
        raise ValueError(f"Dataset mixes text and JSON files ({[str(f) for f in files]}); pass one kind")
    column: list[str] = []
    for f in files:
        _check_local_file(f, column)
    return tuple(f.resolve() for f in files)


# The field SAELens' ActivationsStore reads, by preference, decided by the dataset's first row.
_COLUMNS = ("tokens", "input_ids", "text")


def _check_field(path: Path, n: int, name: str, value: Any) -> None:
    if name == "text":
        if not isinstance(value, str):
            raise ValueError(
                f"Dataset file {str(path)!r} line {n}: 'text' must be a string, got {value!r:.80}"
            )
        return
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        raise ValueError(
            f"Dataset file {str(path)!r} line {n}: {name!r} must be a list of token ids (whole numbers >= 0), "
            f"got {json.dumps(value)[:80]}"
        )


def _check_local_file(path: Path, column: list[str] | None = None) -> None:
    """Every line: UTF-8, and for ``.jsonl`` a JSON object whose fields have the right types and
    that holds the field SAELens reads (chosen by the dataset's first row, kept in ``column``),
    so that a bad line fails here, before the model loads, not hours into a run."""
    kind = _LOCAL_SUFFIXES[path.suffix]
    column = [] if column is None else column
    seen = False
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"Dataset file {str(path)!r} line {n} is not UTF-8 text ({e.reason} at byte {e.start})"
                ) from e
            if not line.strip():
                continue
            seen = True
            if kind == "text":
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"Dataset file {str(path)!r} line {n} is not valid JSON: {e}") from e
            if not isinstance(record, dict) or not {"text", "tokens", "input_ids"} & set(record):
                raise ValueError(
                    f"Dataset file {str(path)!r} line {n}: expected a JSON object with a 'text' field "
                    f"(or 'tokens'/'input_ids'), got {line.strip()[:80]!r}"
                )
            for name in _COLUMNS:
                if name in record:
                    _check_field(path, n, name, record[name])
            if not column:
                column.append(next(c for c in _COLUMNS if c in record))
            elif column[0] not in record:
                raise ValueError(
                    f"Dataset file {str(path)!r} line {n}: no {column[0]!r} field, which the dataset's first row "
                    "has and SAELens reads from every row"
                )
    if not seen:
        raise ValueError(f"Dataset file {str(path)!r} is empty")


def _check_documents(cfg: TrainConfig, files: Sequence[Path], max_docs: int = 2000) -> None:
    """Read the first documents with the model's tokenizer, before the model loads.

    - With exclude_special_tokens, some token must be other than bos/eos/pad (SAELens' special
      ids): a dataset of special tokens only leaves SAELens waiting forever for an activation.
    - Pretokenized rows (``tokens``/``input_ids``) must hold ``context_size`` tokens (SAELens
      cuts each row to the context and does not pack them).
    - With one text per row, SAELens skips texts shorter than a row; some must reach it.
    """
    from sae_lens.util import get_special_token_ids
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except (OSError, ValueError):
        return  # no tokenizer to count with here; SAELens reports a too-small dataset itself
    special = set(get_special_token_ids(tokenizer)) if cfg.exclude_special_tokens else set()
    seen = usable = 0
    fills_a_row = False
    for f in files:
        with f.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                record = json.loads(line) if f.suffix == ".jsonl" else {"text": line.rstrip("\n")}
                column = next(c for c in _COLUMNS if c in record)
                if column == "text":
                    ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
                    fills_a_row = fills_a_row or len(ids) + 1 >= cfg.context_size  # SAELens prepends BOS
                else:
                    ids = record[column]
                    if len(ids) < cfg.context_size:
                        raise ValueError(
                            f"Dataset file {str(f)!r} line {n}: {len(ids)} token ids, fewer than context_size="
                            f"{cfg.context_size} (SAELens cuts pretokenized rows to the context, never packs them)"
                        )
                    ids = ids[: cfg.context_size]
                    fills_a_row = True
                usable += sum(1 for t in ids if t not in special)
                seen += 1
                if seen >= max_docs:
                    break
        if seen >= max_docs:
            break
    names = [str(f) for f in files]
    if not usable:
        raise ValueError(
            f"Dataset {names}: the first {seen} documents hold only special tokens (ids {sorted(special)}: "
            "bos/eos/pad...), which exclude_special_tokens drops, so there is nothing to train on"
        )
    if cfg.disable_concat_sequences and not fills_a_row:
        raise ValueError(
            f"Dataset {names}: none of the first {seen} documents reaches context_size="
            f"{cfg.context_size} tokens, and rows hold one document each (disable_concat_sequences), so "
            "SAELens would skip them all. Pass --concat-sequences (disable_concat_sequences=False) or a smaller --context-size."
        )


# ---------------------------------------------------------------------------- dataset


def load_training_dataset(plan_or_cfg: TrainingPlan | TrainConfig) -> Dataset | IterableDataset:
    """Load the run's dataset with ``datasets`` (local files via the text/json builders).

    Raises:
        ValueError: a Hugging Face dataset that cannot be loaded (unknown, offline, no split).
    """
    from datasets import load_dataset

    # A plan has already found its files; a bare config finds them here.
    cfg = plan_or_cfg if isinstance(plan_or_cfg, TrainConfig) else plan_or_cfg.config
    files = (
        resolve_dataset_files(cfg.dataset)
        if isinstance(plan_or_cfg, TrainConfig)
        else plan_or_cfg.dataset_files
    )
    if files:
        builder = _LOCAL_SUFFIXES[files[0].suffix]
        # Streaming reads the files lazily and writes no arrow cache.
        ds = load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
        if builder == "text":
            ds = ds.filter(lambda row: bool(row["text"].strip()))
        return ds
    name = str(cfg.dataset)
    try:
        return load_dataset(name, split=cfg.dataset_split, streaming=cfg.streaming)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError...)
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " The hub is offline (HF_HUB_OFFLINE set)." if offline else ""
        raise ValueError(
            f"Cannot load the Hugging Face dataset {name!r} (split {cfg.dataset_split!r}): "
            f"{type(e).__name__}: {e}.{hint} For local data pass .txt or .jsonl files."
        ) from e


def write_text_dataset(texts: Sequence[str], path: str | Path) -> Path:
    """Write texts as a JSONL dataset (one ``{"text": ...}`` per line); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    return path
