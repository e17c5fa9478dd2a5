"""Corpus statistics of SAE features on T5Gemma 2, what a feature does, and search by concept.

:func:`corpus_stats` makes one streaming pass over a dataset with any set of SAEs attached
to a :class:`~sae_lens_t5gemma.model.hooked.HookedT5Gemma2`, on either stack, under the model's
convention, and keeps per feature, in memory bounded by the SAE width (never by the corpus):

- the top-k activating examples: a window of context around the position, its token ids
  and the feature's activation on every token of the window;
- a uniform reservoir sample of firing positions (with the same windows), from which
  quantile-sampled examples are drawn, as SAEDashboard's interval groups are;
- the firing count (density), the activation sum and maximum, and a histogram of positive
  activations on fixed log-spaced bins.

Only positions the SAE's stack really computes count (``model.covered_mask``), and BOS/EOS/PAD
positions are excluded as SAELens excludes them. Each stored token carries a segment code:
1 = encoder input (the prefix the encoder read), 2 = decoder continuation, 3 = both (the
``reconstruct`` convention, where both stacks read the row), 0 = neither (padding).

On-disk format (``FORMAT``), one folder:

- ``state.safetensors``: the whole state, one file, so that each save is ONE atomic commit
  (written under a random temporary name, flushed, then renamed over the old one): the
  tensors of every SAE under ``<key>/<name>``, and in its metadata ``stats`` (the JSON record
  below, ``rows_done`` included) and ``token_strings`` (id -> string for every token id stored
  in a window, so the folder is readable without the tokenizer). A kill at any moment leaves
  either the previous save or the new one, never tensors of one save beside counters of another;
- ``stats.json``: a readable copy of the ``stats`` record, written after each commit (the
  state file is the truth; :meth:`FeatureStats.load` and ``resume`` read only it).

The ``stats`` record: format tag, model and a hash of its config, dtypes, convention, dataset,
configuration, ``rows_done``, ``rows_sha256`` (a hash of the first ``rows_done`` rows as read)
and ``complete``, and per SAE its key, hook name, stack, layer, site kind, ``d_in``, ``d_sae``,
source, ``synthetic``, ``weights_sha256`` (a hash of its state dict) and ``n_tokens``
(positions counted). The tensors per SAE: ``n_tokens [1]``, ``fire_count [F]`` int64,
``act_sum [F]`` float64, ``act_max [F]``, ``hist [F, B + 2]`` int64 (underflow, B bins,
overflow) with ``hist_edges [B + 1]``; top examples ``top_val [F, k]``,
``top_row``/``top_pos``/``top_split [F, k]`` int64 (dataset row, position in the row, the
prefix_lm split ``p`` of that forward, -1 under reconstruct), ``top_tokens [F, k, W]`` int64
(-1 outside the row), ``top_acts [F, k, W]``, ``top_seg [F, k, W]`` uint8; the reservoir under
``sample_*`` with the same fields plus ``sample_key`` (its random key; -1 = empty slot). Empty
top slots have ``top_row = -1``.

The folder is saved after a chunk of rows at most once every ``save_every`` seconds (60 by
default) and never more often than keeps saving under 1/20 of the run's time (the whole state
is rewritten: about 257 MB at d_sae 16k), and at the end. An interrupted run resumes from
``rows_done`` with ``resume=True`` and gives the same result as an uninterrupted one (chunks
are fixed from the start row, and random keys are seeded per chunk). A resume is refused,
naming the file and the field, when the model, its config, a SAE's weights, the settings or
the first ``rows_done`` rows of the data differ from the saved run's, and when the saved state
is malformed or inconsistent.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_t5gemma.model import sites as sites_mod
from sae_lens_t5gemma.model.dtypes import dtype_name, sae_dtype, to_sae

if TYPE_CHECKING:
    from sae_lens import SAE

    from sae_lens_t5gemma.model.hooked import HookedT5Gemma2

FORMAT = "sae_lens_t5gemma.feature_stats/2"
STATE_FILE = "state.safetensors"
"""The one file that holds a folder's whole state (each save replaces it atomically)."""
SAVE_EVERY_S = 60.0
"""Default least interval between two saves of a run, in seconds."""
_MAX_ROWS_DONE = 2**53  # JSON-safe integers
SEGMENTS = {0: "", 1: "encoder input", 2: "decoder continuation", 3: "encoder input + decoder (reconstruct)"}
"""Segment code -> what reads the token."""


@dataclass
class StatsConfig:
    """What :func:`corpus_stats` keeps per feature, and how it reads the corpus."""

    top_k: int = 20
    """Top activating examples kept per feature."""
    n_samples: int = 40
    """Reservoir size per feature: uniformly sampled firing positions, for quantile examples."""
    left: int = 12
    """Context tokens kept before the example's position."""
    right: int = 4
    """Context tokens kept after it."""
    context_size: int = 64
    """Tokens per row (BOS included); one text per row, truncated, never packed."""
    batch_size: int = 8
    """Rows per forward pass."""
    chunk_rows: int = 64
    """Rows per chunk: rows are sorted by length inside a chunk (less padding, so the
    prefix_lm split ``n // 2`` fits each row), and the folder is saved after each chunk."""
    hist_log10_min: float = -4.0
    hist_log10_max: float = 3.0
    hist_bins: int = 70
    """Activation histogram: ``hist_bins`` log-spaced bins between 10**min and 10**max."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("top_k", "n_samples", "context_size", "batch_size", "chunk_rows", "hist_bins"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"StatsConfig.{name} must be a positive integer, got {v!r}")
        for name in ("left", "right"):
            if getattr(self, name) < 0:
                raise ValueError(f"StatsConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.context_size < 2:
            raise ValueError(
                f"StatsConfig.context_size must be at least 2 (BOS and a token), got {self.context_size}"
            )
        if not self.hist_log10_max > self.hist_log10_min:
            raise ValueError("StatsConfig.hist_log10_max must be larger than hist_log10_min")

    @property
    def window(self) -> int:
        return self.left + 1 + self.right

    def hist_edges(self) -> torch.Tensor:
        return torch.logspace(
            self.hist_log10_min, self.hist_log10_max, self.hist_bins + 1, dtype=torch.float64
        )


# ----------------------------------------------------------------------------- corpus


def iter_rows(
    dataset: str | Path, split: str = "train", text_field: str = "text"
) -> Iterator[str | list[int]]:
    """Rows of a dataset, streamed: a Hugging Face dataset name, ``.txt`` (one text per line)
    or ``.jsonl`` files (a ``text`` field, or pre-tokenised ``tokens``/``input_ids``).

    Raises:
        FileNotFoundError, ValueError: as :func:`training_plan.resolve_dataset_files` does.
    """
    from sae_lens_t5gemma.training.plan import resolve_dataset_files

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


def _row_value(row: Mapping[str, Any], text_field: str, where: str) -> str | list[int]:
    for name in (text_field, "tokens", "input_ids"):
        if name in row:
            value = row[name]
            if isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
            ):
                return value
            raise ValueError(f"{where}: field {name!r} is neither a string nor a list of token ids")
    raise ValueError(f"{where}: no {text_field!r}, 'tokens' or 'input_ids' field (has {sorted(row)[:8]})")


def tokenize_row(model: HookedT5Gemma2, row: str | list[int], context_size: int) -> list[int]:
    """One row's token ids as :func:`corpus_stats` feeds them: BOS, then the text, truncated.

    Only a prefix of a long text is tokenised (see :func:`prefix_ids`), so the work and the
    memory are bounded by ``context_size``, not by the row's length.
    """
    if isinstance(row, str):
        return [model.tokenizer.bos_token_id, *prefix_ids(model.tokenizer, row, context_size - 1)]
    return list(row[:context_size])


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


def _pad_batch(
    rows: Sequence[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return tokens.to(device), mask.to(device)


# ----------------------------------------------------------------------------- SAEs on a batch


@dataclass
class SAEInfo:
    """Where an SAE reads, as recorded in ``stats.json``."""

    key: str
    hook_name: str
    stack: str
    layer: int
    kind: str
    d_in: int
    d_sae: int
    source: str = ""
    synthetic: bool = False
    neuronpedia_id: str | None = None
    n_tokens: int = 0
    weights_sha256: str = ""
    """A hash of the SAE's state dict: a resume with other weights is refused."""

    @property
    def site_words(self) -> str:
        return sites_mod.resolve(self.hook_name).kind.description


def sae_info(model: HookedT5Gemma2, sae: SAE[Any], key: str | None = None, source: str = "",
             synthetic: bool = False) -> SAEInfo:  # fmt: skip
    """The :class:`SAEInfo` of ``sae`` on ``model`` (checks that it fits its hook)."""
    from sae_lens_t5gemma.model.steering import check_sae_fits

    name = check_sae_fits(model, sae)
    s = sites_mod.resolve(name)
    return SAEInfo(
        key=key or s.friendly,
        hook_name=name,
        stack=s.stack,
        layer=s.layer,
        kind=s.kind.friendly,
        d_in=int(sae.cfg.d_in),
        d_sae=int(sae.cfg.d_sae),
        source=source,
        synthetic=synthetic,
        neuronpedia_id=getattr(sae.cfg.metadata, "neuronpedia_id", None),
    )


def special_ids(model: HookedT5Gemma2) -> list[int]:
    """BOS/EOS/PAD and other special ids, as SAELens finds them."""
    from sae_lens_t5gemma.analysis.evaluation import special_token_ids

    return special_token_ids(model.tokenizer)


def segment_codes(model: HookedT5Gemma2, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, n]`` uint8: 1 encoder input, 2 decoder continuation, 3 both, 0 padding."""
    real = attention_mask.bool()
    enc = model.covered_mask(tokens, "encoder", attention_mask) & real
    dec = model.covered_mask(tokens, "decoder", attention_mask) & real
    return (enc.to(torch.uint8) + 2 * dec.to(torch.uint8)).cpu()


@torch.no_grad()
def feature_acts(
    model: HookedT5Gemma2,
    saes: Sequence[SAE[Any]],
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """SAE feature activations on one token batch, one forward for all SAEs.

    Returns:
        ``(acts, valid, split)``: per SAE ``[batch, n, d_sae]`` float32 (on CPU) and the
        ``[batch, n]`` bool mask of positions that count (covered by the SAE's stack, real,
        not special); ``split`` is each row's prefix_lm split ``p`` in this forward, ``[batch]``
        (None under reconstruct).
    """
    from sae_lens_t5gemma.model.steering import _sae_input, check_sae_fits

    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    names = [check_sae_fits(model, sae) for sae in saes]
    _, cache = model.run_with_cache(
        tokens, attention_mask=mask, names_filter=list(dict.fromkeys(names)), return_type=None
    )
    split = model.last_splits.cpu() if model.convention == "prefix_lm" else None
    special = torch.isin(tokens, torch.tensor(special_ids(model), device=tokens.device)) | (mask == 0)
    out, valid = [], []
    for sae, name in zip(saes, names, strict=True):
        stack = sites_mod.resolve(name).stack
        x = to_sae(sae, _sae_input(sae, cache[name]))
        f = sae.encode(x).float().cpu()
        v = (model.covered_mask(tokens, stack, mask) & ~special).cpu()
        out.append(f.masked_fill(~v[..., None], 0.0))
        valid.append(v)
    return out, valid, split


# ----------------------------------------------------------------------------- accumulator

_EXAMPLE_FIELDS = ("row", "pos", "split", "tokens", "acts", "seg")


def _state_layout(d_sae: int, cfg: StatsConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor an SAE's statistics hold."""
    F, W = d_sae, cfg.window
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "n_tokens": ((1,), torch.int64),
        "fire_count": ((F,), torch.int64),
        "act_sum": ((F,), torch.float64),
        "act_max": ((F,), torch.float32),
        "hist": ((F, cfg.hist_bins + 2), torch.int64),
        "hist_edges": ((cfg.hist_bins + 1,), torch.float64),
    }
    for bank, size in (("top", cfg.top_k), ("sample", cfg.n_samples)):
        layout[f"{bank}_val"] = ((F, size), torch.float32)
        if bank == "sample":
            layout["sample_key"] = ((F, size), torch.float32)
        for name in ("row", "pos", "split"):
            layout[f"{bank}_{name}"] = ((F, size), torch.int64)
        layout[f"{bank}_tokens"] = ((F, size, W), torch.int64)
        layout[f"{bank}_acts"] = ((F, size, W), torch.float32)
        layout[f"{bank}_seg"] = ((F, size, W), torch.uint8)
    return layout


class _Accumulator:
    """Bounded per-feature statistics of one SAE (tensors, merged batch by batch)."""

    def __init__(self, d_sae: int, cfg: StatsConfig):
        self.cfg = cfg
        self.t: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in _state_layout(d_sae, cfg).items():
            # Empty slots: no row (-1), no token (-1), and a sample key below every real one.
            bank, _, part = name.partition("_")
            empty = (
                -1 if bank in ("top", "sample") and part in ("row", "pos", "split", "tokens", "key") else 0
            )
            self.t[name] = torch.full(shape, empty, dtype=dtype)
        self.t["hist_edges"] = cfg.hist_edges()

    def update(self, acts: torch.Tensor, valid: torch.Tensor, tokens: torch.Tensor, seg: torch.Tensor,
               rows: torch.Tensor, split: torch.Tensor | int | None, gen: torch.Generator) -> None:  # fmt: skip
        cfg, t = self.cfg, self.t
        b, n, F = acts.shape
        flat = acts.reshape(b * n, F)
        firing = flat > 0
        t["n_tokens"] += int(valid.sum())
        t["fire_count"] += firing.sum(0)
        t["act_sum"] += flat.double().sum(0)
        t["act_max"] = torch.maximum(t["act_max"], flat.max(0).values)
        pos_idx, feat_idx = firing.nonzero(as_tuple=True)
        if len(pos_idx):
            logv = flat[pos_idx, feat_idx].double().log10()
            width = (cfg.hist_log10_max - cfg.hist_log10_min) / cfg.hist_bins
            bins = ((logv - cfg.hist_log10_min) / width).floor().long() + 1
            bins = bins.clamp(0, cfg.hist_bins + 1)
            counts = torch.bincount(feat_idx * (cfg.hist_bins + 2) + bins, minlength=F * (cfg.hist_bins + 2))
            t["hist"] += counts.view(F, cfg.hist_bins + 2)

        c = min(cfg.top_k, b * n)
        vals, idx = flat.topk(c, dim=0)
        self._merge("top", vals.T, vals.T, idx.T, acts, tokens, seg, rows, split)
        keys = torch.rand(b * n, F, generator=gen).masked_fill(~firing, -1.0)
        c = min(cfg.n_samples, b * n)
        skeys, sidx = keys.topk(c, dim=0)
        svals = flat.gather(0, sidx)
        self._merge("sample", skeys.T, svals.T, sidx.T, acts, tokens, seg, rows, split)

    def _merge(self, bank: str, keys: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, acts: torch.Tensor,
               tokens: torch.Tensor, seg: torch.Tensor, rows: torch.Tensor, split: torch.Tensor | int | None) -> None:  # fmt: skip
        cfg, t = self.cfg, self.t
        b, n, F = acts.shape
        r, p = idx // n, idx % n  # [F, c]
        offs = torch.arange(-cfg.left, cfg.right + 1)
        wpos = p[..., None] + offs  # [F, c, W]
        inside = (wpos >= 0) & (wpos < n)
        wpos_c = wpos.clamp(0, n - 1)
        rr = r[..., None].expand_as(wpos_c)
        real = inside & (seg[rr, wpos_c] > 0) | inside & (wpos == p[..., None])
        feat = torch.arange(F)[:, None, None].expand_as(wpos_c)
        firing = vals > 0
        new = {
            "val": vals,
            "row": torch.where(firing, rows[r], -1),
            "pos": torch.where(firing, p, -1),
            "split": torch.full_like(p, -1) if split is None else torch.as_tensor(split).expand(b)[r],
            "tokens": torch.where(real, tokens[rr, wpos_c], -1),
            "acts": torch.where(real, acts[rr, wpos_c, feat], 0.0),
            "seg": torch.where(real, seg[rr, wpos_c], 0).to(torch.uint8),
        }
        key_name = "top_val" if bank == "top" else "sample_key"
        new_keys = keys if bank == "sample" else vals
        if bank == "sample":
            new["key"] = keys
        both_keys = torch.cat([t[key_name], new_keys], dim=1)
        size = t[key_name].shape[1]
        _, keep = both_keys.topk(size, dim=1)
        for name in (*_EXAMPLE_FIELDS, "val", *(("key",) if bank == "sample" else ())):
            old = t[f"{bank}_{name}"]
            cat = torch.cat([old, new[name].to(old.dtype)], dim=1)
            index = keep.view(*keep.shape, *([1] * (cat.ndim - 2))).expand(-1, -1, *cat.shape[2:])
            t[f"{bank}_{name}"] = cat.gather(1, index)


# ----------------------------------------------------------------------------- the pass


def _save(out: Path, meta: dict[str, Any], accs: Mapping[str, _Accumulator], strings: dict[int, str]) -> None:
    """One commit: every SAE's tensors, the counters and the token strings in one file, written
    whole or not at all (:func:`outputs.atomic_write`: exclusive random temp name, no symlinks)."""
    from safetensors.torch import save

    from sae_lens_t5gemma.outputs import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{key}/{name}": v.contiguous() for key, acc in accs.items() for name, v in acc.t.items()}
    header = {
        "format": FORMAT,
        "stats": json.dumps(meta, allow_nan=False),
        "token_strings": json.dumps({str(k): v for k, v in sorted(strings.items())}),
    }
    atomic_write(out / STATE_FILE, save(tensors, metadata=header))
    # A readable copy; a kill before it leaves an older copy, never an older state.
    atomic_write(out / "stats.json", json.dumps(meta, indent=2, allow_nan=False))


def _sha256_state(sae: SAE[Any]) -> str:
    """A hash of an SAE's architecture and state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256(type(sae).__name__.encode())
    for name, t in sorted(sae.state_dict().items()):
        h.update(f"|{name}:{t.dtype}:{tuple(t.shape)}|".encode())
        t = t.detach().cpu().contiguous().reshape(-1)
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def _sha256_model_config(model: HookedT5Gemma2) -> str:
    """A hash of the model's config (where it was read from and the library version left out)."""
    cfg = model.hf_model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def _hash_row(h: Any, row: str | list[int]) -> None:
    if isinstance(row, str):
        b = row.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(b))
        h.update(b)
    else:
        b = json.dumps(list(row)).encode()
        h.update(b"t%d:" % len(b))
        h.update(b)


@torch.no_grad()
def corpus_stats(
    model: HookedT5Gemma2,
    saes: SAE[Any] | Sequence[SAE[Any]] | Mapping[str, SAE[Any]],
    dataset: str | Path | None = None,
    out: str | Path | None = None,
    *,
    texts: Iterable[str] | None = None,
    config: StatsConfig | None = None,
    max_rows: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    split: str = "train",
    sources: Mapping[str, str] | None = None,
    synthetic: bool = False,
    progress: bool = True,
    save_every: float = SAVE_EVERY_S,
) -> FeatureStats:
    """One streaming pass over a corpus: per-feature top examples, quantile samples, density, histogram.

    Args:
        model: the hooked model; its ``convention`` (and ``prefix_len``) apply.
        saes: one SAE, a list (keys are their friendly site names) or a mapping key -> SAE.
        dataset: a Hugging Face dataset name, or ``.txt``/``.jsonl`` files (see :func:`iter_rows`).
        out: the folder to save to (and resume from); None keeps everything in memory.
        texts: the corpus as texts, instead of ``dataset``.
        config: see :class:`StatsConfig`.
        max_rows: stop after this many rows in total (resumed rows included).
        resume: continue the run saved in ``out`` from its ``rows_done``.
        overwrite: replace statistics already in ``out``.
        split: the Hugging Face split.
        sources: key -> where the SAE came from (``RELEASE:ID`` or a folder), for the record.
        synthetic: the model or SAEs are synthetic stand-ins (said on every page).
        progress: show a tqdm bar.
        save_every: least seconds between two saves (each rewrites the whole state); a save
            also waits until saving has taken under 1/20 of the time since the last one.
            0 saves after every chunk. The last save, at the end, always happens.

    Raises:
        ValueError: no corpus, clashing keys, a resume whose model, SAE weights, settings or
            data differ from the saved run, or a saved state that is malformed or inconsistent
            (the message names the file and the field).
        FileExistsError: ``out`` holds statistics and neither ``resume`` nor ``overwrite`` is set.
    """
    from tqdm.auto import tqdm

    cfg = config or StatsConfig()
    if (dataset is None) == (texts is None):
        raise ValueError("Give exactly one of dataset= or texts=")
    if max_rows is not None and (not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1):
        raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
    if not (isinstance(save_every, (int, float)) and math.isfinite(save_every) and save_every >= 0):
        raise ValueError(f"save_every must be a finite number of seconds >= 0, got {save_every!r}")
    named = _name_saes(saes)
    infos = {k: sae_info(model, s, k, (sources or {}).get(k, ""), synthetic) for k, s in named.items()}
    for key, sae in named.items():
        infos[key].weights_sha256 = _sha256_state(sae)
    corpus = str(dataset) if dataset is not None else "<texts>"
    meta: dict[str, Any] = {
        "format": FORMAT,
        "model": model.cfg.model_name,
        "model_config_sha256": _sha256_model_config(model),
        "dtype": dtype_name(model.cfg.dtype),
        "sae_dtype": {k: dtype_name(sae_dtype(s)) for k, s in named.items()},
        "convention": model.convention,
        "convention_words": model.describe_convention(),
        "dataset": corpus,
        "split": split,
        "config": asdict(cfg),
        "special_token_ids": special_ids(model),
        "synthetic": synthetic,
        "rows_done": 0,
        "rows_sha256": hashlib.sha256().hexdigest(),
        "complete": False,
        "saes": [asdict(i) for i in infos.values()],
    }
    accs = {k: _Accumulator(s.cfg.d_sae, cfg) for k, s in named.items()}
    strings: dict[int, str] = {}
    out_dir = Path(out) if out is not None else None
    start, saved_rows_sha = 0, ""
    if out_dir is not None and ((out_dir / STATE_FILE).exists() or (out_dir / "stats.json").exists()):
        if resume:
            start, saved_rows_sha = _load_for_resume(out_dir, meta, accs, strings)
            if max_rows is not None and max_rows < start:
                raise ValueError(
                    f"max_rows={max_rows} is below the {start} rows already done in {out_dir / STATE_FILE}"
                )
        elif not overwrite:
            raise FileExistsError(
                f"{out_dir / STATE_FILE} exists: pass resume=True (--resume) to continue it or overwrite=True (--overwrite)"
            )
    rows_iter = iter_rows(dataset, split) if dataset is not None else iter(texts)  # type: ignore[arg-type]
    saes_list = list(named.values())
    keys = list(named)
    device = model.cfg.device
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=max_rows, initial=min(start, max_rows or start), unit="row", desc="feature stats",
               disable=not progress)  # fmt: skip
    row_index = 0
    done = start
    chunk: list[tuple[int, list[int]]] = []
    rows_hash = hashlib.sha256()  # of the rows read so far, in order

    def check_rows_before_start() -> None:
        # The rows already counted must be the ones this run reads: an edited or other
        # dataset would mix two corpora in one result.
        if rows_hash.hexdigest() != saved_rows_sha:
            raise ValueError(
                f"Cannot resume {out_dir / STATE_FILE}: its rows_sha256 (a hash of the first {start} rows) "  # type: ignore[operator]
                f"is {saved_rows_sha[:16]}..., the first {start} rows of {corpus!r} now give "
                f"{rows_hash.hexdigest()[:16]}...: the data changed since the saved run"
            )

    def run_chunk(chunk: list[tuple[int, list[int]]]) -> None:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + chunk[0][0])
        # Sorted by length: rows in a batch have similar lengths, so the prefix_lm split
        # n // 2 of the padded batch falls near the middle of each row.
        ordered = sorted(chunk, key=lambda x: (len(x[1]), x[0]))
        for i in range(0, len(ordered), cfg.batch_size):
            part = ordered[i : i + cfg.batch_size]
            tokens, mask = _pad_batch([r for _, r in part], pad_id, device)
            acts, valid, p = feature_acts(model, saes_list, tokens, mask)
            seg = segment_codes(model, tokens, mask)
            rows = torch.tensor([j for j, _ in part], dtype=torch.int64)
            tok_cpu = tokens.cpu()
            for key, a, v in zip(keys, acts, valid, strict=True):
                accs[key].update(a, v, tok_cpu, seg, rows, p, gen)
        for acc in accs.values():
            for bank in ("top", "sample"):
                for tid in acc.t[f"{bank}_tokens"].unique().tolist():
                    if tid >= 0 and tid not in strings:
                        strings[tid] = model.token_string(tid)  # image placeholders: <img>

    def record(done: int, complete: bool) -> dict[str, Any]:
        for key, info in infos.items():
            info.n_tokens = int(accs[key].t["n_tokens"])
        return {**meta, "rows_done": done, "rows_sha256": rows_hash.hexdigest(), "complete": complete,
                "saes": [asdict(i) for i in infos.values()]}  # fmt: skip

    last_save, save_cost = time.monotonic(), 0.0
    for row in rows_iter:
        if max_rows is not None and row_index >= max_rows:
            break
        if row_index == start and start > 0:
            check_rows_before_start()
        _hash_row(rows_hash, row)
        if row_index >= start:
            ids = tokenize_row(model, row, cfg.context_size)
            chunk.append((row_index, ids))
            if len(chunk) == cfg.chunk_rows:
                run_chunk(chunk)
                done = row_index + 1
                bar.update(len(chunk))
                chunk = []
                if out_dir is not None and (
                    save_every == 0 or time.monotonic() - last_save >= max(save_every, 20 * save_cost)
                ):
                    t0 = time.monotonic()
                    _save(out_dir, record(done, False), accs, strings)
                    last_save = time.monotonic()
                    save_cost = last_save - t0
        row_index += 1
    if start > 0 and row_index <= start:
        if row_index < start:
            raise ValueError(
                f"Cannot resume {out_dir / STATE_FILE}: its rows_done is {start}, but {corpus!r} now holds "  # type: ignore[operator]
                f"only {row_index} rows: the data changed since the saved run"
            )
        check_rows_before_start()
    if chunk:
        run_chunk(chunk)
        done = chunk[-1][0] + 1
        bar.update(len(chunk))
    bar.close()
    if row_index == 0 or (done == 0):
        raise ValueError(f"The corpus {corpus!r} holds no rows")
    meta = record(done, max_rows is None or row_index < max_rows)
    if out_dir is not None:
        _save(out_dir, meta, accs, strings)
    return FeatureStats(meta, {k: a.t for k, a in accs.items()}, strings, out_dir)


def _name_saes(saes: Any) -> dict[str, Any]:
    from sae_lens import SAE

    if isinstance(saes, SAE):
        saes = [saes]
    if isinstance(saes, Mapping):
        named = dict(saes)
    else:
        named = {}
        for sae in saes:
            key = sites_mod.resolve(sae.cfg.metadata.hook_name).friendly
            if key in named:
                raise ValueError(f"Two SAEs read {key}: pass a mapping key -> SAE to tell them apart")
            named[key] = sae
    if not named:
        raise ValueError("No SAEs given")
    for key in named:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"SAE key {key!r} cannot be a file name: use letters, digits, '.', '_' and '-'")
    return named


class StateError(ValueError):
    """A saved feature-statistics state that cannot be read or does not add up; the message
    names the file and the field."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not standard JSON")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_state(folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[int, str]]:
    """The record, the tensors per SAE and the token strings of ``folder/state.safetensors``,
    checked field by field.

    Raises:
        FileNotFoundError: no state file.
        StateError: (a ``ValueError``) unreadable, malformed or inconsistent state.
    """
    from safetensors import safe_open

    path = folder / STATE_FILE
    if not path.exists():
        legacy = folder / "stats.json"
        if legacy.exists():
            raise StateError(
                f"{folder}: {legacy.name} without {STATE_FILE}: statistics written by an older version "
                f"(before {FORMAT}) or a first save that never finished; rerun with --overwrite"
            )
        raise FileNotFoundError(f"{path} does not exist: not a feature statistics folder")

    def fail(what: str) -> StateError:
        return StateError(f"{path}: {what}")

    try:
        with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
            header = f.metadata() or {}
            names = list(f.keys())
            raw = {n: f.get_tensor(n) for n in names}
    except Exception as e:  # safetensors raises SafetensorError, OSError or others on a damaged file
        raise fail(f"not a readable safetensors file ({type(e).__name__}: {str(e)[:200]}); "
                   "rerun with --overwrite") from e  # fmt: skip
    if header.get("format") != FORMAT:
        raise fail(f"format is {str(header.get('format'))[:80]!r}, expected {FORMAT!r}")

    def parse(field_name: str) -> Any:
        try:
            return json.loads(header.get(field_name, ""), parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as e:
            raise fail(f"field {field_name!r} is not valid JSON ({str(e)[:120]})") from e

    meta, strings_raw = parse("stats"), parse("token_strings")
    if not isinstance(meta, dict):
        raise fail("field 'stats' is not a JSON object")
    if not isinstance(strings_raw, dict) or not all(
        isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in strings_raw.items()
    ):
        raise fail("field 'token_strings' is not an object of token id -> string")
    rows_done = meta.get("rows_done")
    if not _is_int(rows_done) or not 0 <= rows_done <= _MAX_ROWS_DONE:
        raise fail(f"stats.rows_done is {str(rows_done)[:40]}, expected an integer in 0..{_MAX_ROWS_DONE}")
    for name, kind in (("complete", bool), ("rows_sha256", str), ("model_config_sha256", str),
                       ("config", dict), ("saes", list)):  # fmt: skip
        if not isinstance(meta.get(name), kind):
            raise fail(f"stats.{name} is {str(meta.get(name))[:40]}, expected a {kind.__name__}")
    try:
        cfg = StatsConfig(**meta["config"])
    except (TypeError, ValueError) as e:
        raise fail(f"stats.config is not a valid StatsConfig ({str(e)[:160]})") from e
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for i, s in enumerate(meta["saes"]):
        where = f"stats.saes[{i}]"
        if not isinstance(s, dict) or not isinstance(s.get("key"), str) or not s["key"] or "/" in s["key"]:
            raise fail(f"{where}.key is missing or not a file-name-safe string")
        key = s["key"]
        for name in ("d_sae", "n_tokens"):
            if not _is_int(s.get(name)) or s[name] < (1 if name == "d_sae" else 0):
                raise fail(f"{where}.{name} is {str(s.get(name))[:40]}, expected a non-negative integer")
        t = {}
        for name, (shape, dtype) in _state_layout(s["d_sae"], cfg).items():
            v = raw.pop(f"{key}/{name}", None)
            if v is None:
                raise fail(f"tensor {key}/{name} is missing")
            if tuple(v.shape) != shape or v.dtype != dtype:
                raise fail(f"tensor {key}/{name} is {v.dtype} {tuple(v.shape)}, expected {dtype} {shape}")
            t[name] = v
        n_tokens = int(t["n_tokens"])
        if n_tokens != s["n_tokens"]:
            raise fail(f"tensor {key}/n_tokens is {n_tokens}, but {where}.n_tokens is {s['n_tokens']}")
        if not torch.equal(t["hist_edges"], cfg.hist_edges()):
            raise fail(f"tensor {key}/hist_edges does not match stats.config's histogram")
        fire = t["fire_count"]
        if bool((fire < 0).any()) or bool((fire > n_tokens).any()):
            raise fail(f"tensor {key}/fire_count has counts outside 0..n_tokens ({n_tokens})")
        if not torch.equal(t["hist"].sum(1), fire) or bool((t["hist"] < 0).any()):
            raise fail(f"tensor {key}/hist does not add up to fire_count")
        for bank in ("top", "sample"):
            rows = t[f"{bank}_row"]
            if bool((rows < -1).any()) or bool((rows >= rows_done).any()):
                raise fail(f"tensor {key}/{bank}_row holds rows outside -1..rows_done-1 ({rows_done - 1})")
            # A position is counted once: no (row, position) twice in one feature's top list.
            if bank == "top":
                pos = t["top_pos"]
                ident = torch.where(
                    rows >= 0, rows * (cfg.context_size + 1) + pos, -1 - torch.arange(rows.shape[1])
                )
                srt = ident.sort(1).values
                if bool((srt[:, 1:] == srt[:, :-1]).any()):
                    raise fail(
                        f"tensor {key}/top_row holds one (row, position) twice in a feature's top list"
                    )
        tensors[key] = t
    if raw:
        raise fail(f"tensor {sorted(raw)[0]} belongs to no SAE in stats.saes")
    return meta, tensors, {int(k): v for k, v in strings_raw.items()}


def _load_for_resume(out: Path, meta: dict[str, Any], accs: Mapping[str, _Accumulator],
                     strings: dict[int, str]) -> tuple[int, str]:  # fmt: skip
    """Load the saved state into ``accs``/``strings`` after checking it belongs to this run.

    Returns:
        ``(rows_done, rows_sha256)``: where to start, and the hash of the rows before it.
    """
    path = out / STATE_FILE
    saved, tensors, saved_strings = _read_state(out)
    for field_name in ("model", "model_config_sha256", "dtype", "sae_dtype", "convention_words", "dataset",
                       "split", "config"):  # fmt: skip
        if saved.get(field_name) != meta[field_name]:
            raise ValueError(
                f"Cannot resume {path}: its {field_name} is {saved.get(field_name)!r}, "
                f"this run's is {meta[field_name]!r}"
            )
    if [s["key"] for s in saved["saes"]] != [s["key"] for s in meta["saes"]]:
        raise ValueError(
            f"Cannot resume {path}: it holds SAEs {[s['key'] for s in saved['saes']]}, "
            f"this run has {[s['key'] for s in meta['saes']]}"
        )
    for i, (old, new) in enumerate(zip(saved["saes"], meta["saes"], strict=True)):
        for name in ("hook_name", "d_in", "d_sae", "weights_sha256"):
            if old.get(name) != new[name]:
                why = " (another SAE, or this one changed)" if name == "weights_sha256" else ""
                raise ValueError(
                    f"Cannot resume {path}: its saes[{i}].{name} ({new['key']}) is {old.get(name)!r}, "
                    f"this run's is {new[name]!r}{why}"
                )
    for key, acc in accs.items():
        acc.t = tensors[key]
    strings.update(saved_strings)
    return int(saved["rows_done"]), str(saved["rows_sha256"])


# ----------------------------------------------------------------------------- reading results


@dataclass
class Example:
    """One activating position with its window of context."""

    row: int
    """Row of the corpus (0-based, empty lines of .txt files skipped)."""
    position: int
    """Position in the row's token batch (the position contract's index)."""
    split: int | None
    """The prefix_lm split ``p`` of the forward that saw it (None under reconstruct)."""
    activation: float
    tokens: list[str]
    token_ids: list[int]
    acts: list[float]
    """The feature's activation on each window token (0 where not counted)."""
    segments: list[str]
    """Per token: ``encoder input``, ``decoder continuation``, both, or '' (outside the row)."""
    center: int
    """Index of the example's own position in the window."""

    @property
    def part(self) -> str:
        """Whether the position is encoder input or decoder continuation."""
        return self.segments[self.center]


class FeatureStats:
    """The result of :func:`corpus_stats`: in memory, or loaded with :meth:`load`."""

    def __init__(self, meta: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]],
                 token_strings: dict[int, str], folder: Path | None = None):  # fmt: skip
        self.meta = meta
        self.tensors = tensors
        self.token_strings = token_strings
        self.folder = folder

    @classmethod
    def load(cls, folder: str | Path) -> FeatureStats:
        """Read a folder written by :func:`corpus_stats` (its ``state.safetensors``).

        Raises:
            FileNotFoundError: no statistics in ``folder``.
            ValueError: another format, or a malformed or inconsistent state (:class:`StateError`,
                naming the file and the field).
        """
        folder = Path(folder)
        meta, tensors, strings = _read_state(folder)
        return cls(meta, tensors, strings, folder)

    @property
    def keys(self) -> list[str]:
        return [s["key"] for s in self.meta["saes"]]

    def info(self, key: str) -> SAEInfo:
        for s in self.meta["saes"]:
            if s["key"] == key:
                return SAEInfo(**s)
        raise KeyError(f"No SAE {key!r} in these statistics; they hold {self.keys}")

    def _t(self, key: str) -> dict[str, torch.Tensor]:
        if key not in self.tensors:
            raise KeyError(f"No SAE {key!r} in these statistics; they hold {self.keys}")
        return self.tensors[key]

    def _check_feature(self, key: str, feature: int) -> None:
        d_sae = self._t(key)["fire_count"].shape[0]
        if not 0 <= feature < d_sae:
            raise ValueError(f"Feature {feature} out of range: SAE {key!r} has {d_sae} features")

    def n_tokens(self, key: str) -> int:
        """Positions counted for this SAE (covered, non-special)."""
        return int(self._t(key)["n_tokens"])

    def density(self, key: str) -> torch.Tensor:
        """``[d_sae]``: the fraction of counted positions where each feature fires (> 0)."""
        t = self._t(key)
        return t["fire_count"].double() / max(int(t["n_tokens"]), 1)

    def mean_activation(self, key: str) -> torch.Tensor:
        """``[d_sae]``: mean activation over the positions where the feature fires."""
        t = self._t(key)
        return t["act_sum"] / t["fire_count"].clamp(min=1)

    def max_activation(self, key: str) -> torch.Tensor:
        return self._t(key)["act_max"]

    def histogram(self, key: str, feature: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(edges [B + 1], counts [B])`` of the feature's positive activations (log-spaced bins;
        values below the first edge are added to the first bin, above the last to the last)."""
        self._check_feature(key, feature)
        t = self._t(key)
        h = t["hist"][feature].clone()
        counts = h[1:-1]
        counts[0] += h[0]
        counts[-1] += h[-1]
        return t["hist_edges"], counts

    def _examples(self, key: str, bank: str, feature: int) -> list[Example]:
        t = self._t(key)
        left = self.meta["config"]["left"]
        rows = t[f"{bank}_row"][feature].tolist()
        out = []
        for j, row in enumerate(rows):
            if row < 0:
                continue
            ids = t[f"{bank}_tokens"][feature, j].tolist()
            keep = [i for i, tid in enumerate(ids) if tid >= 0]
            center = left - keep[0] if keep else 0
            split = int(t[f"{bank}_split"][feature, j])
            out.append(Example(
                row=int(row), position=int(t[f"{bank}_pos"][feature, j]), split=None if split < 0 else split,
                activation=float(t[f"{bank}_val"][feature, j]),
                tokens=[self.token_strings.get(ids[i], f"<{ids[i]}>") for i in keep],
                token_ids=[ids[i] for i in keep],
                acts=[float(t[f"{bank}_acts"][feature, j, i]) for i in keep],
                segments=[SEGMENTS[int(t[f"{bank}_seg"][feature, j, i])] for i in keep],
                center=center,
            ))  # fmt: skip
        return out

    def top_examples(self, key: str, feature: int) -> list[Example]:
        """The feature's top activating examples, strongest first (at most ``top_k``)."""
        self._check_feature(key, feature)
        return sorted(self._examples(key, "top", feature), key=lambda e: -e.activation)

    def quantile_examples(self, key: str, feature: int, n_groups: int = 4, per_group: int = 5
                          ) -> list[tuple[float, float, float, list[Example]]]:  # fmt: skip
        """Examples across the activation range, as SAEDashboard's interval groups.

        The reservoir is a uniform sample of the feature's firing positions, so its quantiles
        estimate the activation quantiles. Returns, strongest group first,
        ``(low, high, fraction of firing positions in the group, examples)``.
        """
        self._check_feature(key, feature)
        sample = sorted(self._examples(key, "sample", feature), key=lambda e: e.activation)
        if not sample:
            return []
        groups = []
        n = len(sample)
        for g in range(n_groups):
            part = sample[g * n // n_groups : (g + 1) * n // n_groups]
            if not part:
                continue
            step = max(1, len(part) // per_group)
            chosen = part[::step][:per_group]
            groups.append(
                (
                    part[0].activation,
                    part[-1].activation,
                    len(part) / n,
                    sorted(chosen, key=lambda e: -e.activation),
                )
            )
        return groups[::-1]


# ----------------------------------------------------------------------------- what a feature does


@dataclass
class TokenEffect:
    token: str
    token_id: int
    value: float


@dataclass
class FeatureEffect:
    """What a feature does to the output. ``kind`` is ``logit`` (decoder sites) or ``ablation`` (encoder)."""

    kind: str
    top: list[TokenEffect]
    bottom: list[TokenEffect]
    approximation: str
    mean_kl: float | None = None
    n_predictions: int = 0
    values: list[float] = field(default_factory=list)
    """All the effect values over the vocabulary, for a histogram (logit effects only)."""


def _gemma_norm_gain(norm: torch.nn.Module) -> torch.Tensor:
    # Gemma's RMSNorm multiplies by (1 + weight).
    return 1.0 + norm.weight.detach().float()


def logit_effect_vectors(model: HookedT5Gemma2, sae: SAE[Any]) -> tuple[torch.Tensor, str]:
    """``[d_sae, d_model]``: each decoder row mapped to the residual-stream direction it writes,
    times the final norm's gain, ready for ``@ W_U``; and a sentence saying what is approximated.

    Raises:
        ValueError: an encoder site, or a site with no linear path to the residual stream.
    """
    from sae_lens_t5gemma.model.steering import check_sae_fits

    name = check_sae_fits(model, sae)
    s = sites_mod.resolve(name)
    if s.stack != "decoder":
        raise ValueError(
            f"{name} is an encoder site: its effect on the output is measured by ablation, not logits"
        )
    layer = model.hf_model.get_submodule(f"{sites_mod.HF_LAYERS['decoder']}.{s.layer}")
    w = sae.W_dec.detach().float().cpu()
    kind = s.kind.friendly
    notes = []
    if kind in ("attn_z", "z_self", "z_cross"):
        w = w @ layer.self_attn.o_proj.weight.detach().float().cpu().T
        notes.append("through o_proj")
        kind = "attn_out"
    if kind == "mlp_post":
        w = w @ layer.mlp.down_proj.weight.detach().float().cpu().T
        notes.append("through down_proj")
        kind = "mlp_out"
    if kind == "attn_out":
        w = w * _gemma_norm_gain(layer.post_self_attn_layernorm).cpu()
        notes.append("post_self_attn_layernorm taken as its gain (1 + w) only, its 1/rms scale dropped")
    elif kind == "mlp_out":
        w = w * _gemma_norm_gain(layer.post_feedforward_layernorm).cpu()
        notes.append("post_feedforward_layernorm taken as its gain (1 + w) only, its 1/rms scale dropped")
    elif kind not in ("attn_out_normed", "mlp_out_normed", "resid_pre", "resid_mid", "resid_post"):
        raise ValueError(
            f"No logit effect for site kind {kind!r} ({name}): it does not write to the residual stream"
        )
    w = w * _gemma_norm_gain(model.hf_model.model.decoder.norm).cpu()
    text = (
        "Direct path only: W_dec[f] " + (", ".join(notes) + ", " if notes else "")
        + "then the final norm's gain (1 + w), then W_U. Approximated: later layers are skipped; every RMSNorm's "
        "1/rms scale (a positive number per position) is dropped; the final tanh soft-cap is not applied. "
        "Positive scales and the monotone soft-cap do not change which tokens rank top or bottom."
    )  # fmt: skip
    return w, text


@torch.no_grad()
def decoder_logit_vectors(
    model: HookedT5Gemma2, sae: SAE[Any], stack: str
) -> tuple[torch.Tensor, str] | None:
    """:func:`logit_effect_vectors` for a decoder site, or None where there are none (encoder
    sites, and sites with no linear path to the residual stream)."""
    if stack != "decoder":
        return None
    try:
        return logit_effect_vectors(model, sae)
    except ValueError:
        return None


def logit_effects(
    model: HookedT5Gemma2,
    sae: SAE[Any],
    feature: int,
    k: int = 10,
    vectors: tuple[torch.Tensor, str] | None = None,
) -> FeatureEffect:
    """Top and bottom logit effects of ``W_dec[feature]`` through the decoder's output path (decoder sites).

    See :func:`logit_effect_vectors` for what is approximated; pass its result as ``vectors``
    to reuse it across features.
    """
    if not 0 <= feature < sae.cfg.d_sae:
        raise ValueError(f"Feature {feature} out of range: the SAE has {sae.cfg.d_sae} features")
    w, text = vectors if vectors is not None else logit_effect_vectors(model, sae)
    effect = w[feature] @ model.W_U.detach().float().cpu()
    return _effect_tables("logit", effect, model, k, text, values=effect.tolist())


def _effect_tables(
    kind: str, effect: torch.Tensor, model: HookedT5Gemma2, k: int, text: str, **extra: Any
) -> FeatureEffect:
    k = min(k, effect.numel())
    top = effect.topk(k)
    bottom = (-effect).topk(k)

    def rows(vals: torch.Tensor, idx: torch.Tensor, sign: float) -> list[TokenEffect]:
        return [
            TokenEffect(model.tokenizer.decode([i]), i, sign * v)
            for v, i in zip(vals.tolist(), idx.tolist(), strict=True)
        ]

    return FeatureEffect(
        kind, rows(top.values, top.indices, 1.0), rows(bottom.values, bottom.indices, -1.0), text, **extra
    )


def rows_by_index(model: HookedT5Gemma2, dataset: str | Path | None, wanted: Iterable[int], context_size: int,
                  texts: Sequence[str] | None = None, split: str = "train") -> dict[int, list[int]]:  # fmt: skip
    """Re-read the given corpus rows (as :func:`corpus_stats` tokenised them)."""
    wanted = set(wanted)
    found: dict[int, list[int]] = {}
    source = iter_rows(dataset, split) if dataset is not None else iter(texts or [])
    for i, row in enumerate(source):
        if i in wanted:
            found[i] = tokenize_row(model, row, context_size)
            if len(found) == len(wanted):
                break
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(
            f"Rows {missing[:5]} are not in the corpus {dataset!r}: is it the one the statistics were made on?"
        )
    return found


@torch.no_grad()
def ablation_effects(model: HookedT5Gemma2, sae: SAE[Any], feature: int, examples: Sequence[Example],
                     rows: Mapping[int, list[int]], k: int = 10) -> FeatureEffect:  # fmt: skip
    """Change in the decoder's next-token distribution when ``feature`` is ablated (encoder sites).

    Each example's row is run again under the split it was seen with; the feature is set to 0
    at every position of the row (the SAE's reconstruction error is kept, see ``model.steer``).
    Over the predictions of continuation tokens (non-special targets) it reports the mean
    KL(clean || ablated), and per vocabulary token the mean of log p_clean - log p_ablated:
    positive values are tokens the feature promotes, negative ones tokens it suppresses.
    """
    from sae_lens_t5gemma.analysis.evaluation import position_masks

    if not examples:
        return FeatureEffect("ablation", [], [], "no examples: the feature never fired", None, 0)
    total = None
    kl_sum, n_pred = 0.0, 0
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    specials = special_ids(model)
    by_split: dict[int | None, list[int]] = {}
    for e in examples:
        by_split.setdefault(e.split, []).append(e.row)
    for split, row_ids in by_split.items():
        # Each example was counted under its row's split: score it under the same one.
        with model.fed(prefix_len=split if model.convention == "prefix_lm" else model.prefix_len):
            row_ids = list(dict.fromkeys(row_ids))
            tokens, mask = _pad_batch([rows[r] for r in row_ids], pad_id, model.cfg.device)
            clean = model(tokens, attention_mask=mask)
            with model.steer(sae, feature, ablate=True):
                ablated = model(tokens, attention_mask=mask)
            _, pred = position_masks(model, tokens, sae.cfg.metadata.hook_name, specials, attention_mask=mask)
            lp = clean[:, :-1].float().log_softmax(-1)[pred]
            lq = ablated[:, :-1].float().log_softmax(-1)[pred]
            if not len(lp):
                continue
            kl_sum += float((lp.exp() * (lp - lq)).sum())
            n_pred += lp.shape[0]
            diff = (lp - lq).sum(0).cpu()
            total = diff if total is None else total + diff
    text = (
        f"Feature {feature} set to 0 at every position of each top example's row (error term kept); mean over "
        f"{n_pred} continuation predictions of log p(clean) - log p(ablated). Positive: the feature promotes the token."
    )
    if total is None:
        return FeatureEffect(
            "ablation", [], [], text + " No continuation predictions were available.", None, 0
        )
    effect = total / n_pred
    return _effect_tables("ablation", effect, model, k, text, mean_kl=kl_sum / n_pred, n_predictions=n_pred)


# ----------------------------------------------------------------------------- search by concept


@dataclass
class FeatureMatch:
    """One row of :func:`find_features`."""

    feature: int
    score: float
    """``mean_with - mean_without``: the mean over texts of the feature's peak activation."""
    mean_with: float
    mean_without: float
    frac_with: float
    """Fraction of ``texts_with`` on which the feature fires anywhere."""
    frac_without: float


@torch.no_grad()
def text_peaks(model: HookedT5Gemma2, sae: SAE[Any], texts: Sequence[str], batch_size: int = 16,
               encoder_reads_whole_text: bool = False) -> torch.Tensor:  # fmt: skip
    """``[len(texts), d_sae]``: each feature's peak activation on each text (counted positions only).

    Args:
        encoder_reads_whole_text: for an encoder SAE, let the encoder read the whole text (the
            decoder does not run), rather than the prefix the convention gives it (the default,
            as every call reads a prompt).
    """
    from sae_lens_t5gemma.model.steering import check_sae_fits

    if not texts:
        raise ValueError("No texts given")
    stack = sites_mod.resolve(check_sae_fits(model, sae)).stack
    # An encoder SAE may let the encoder read the whole text: under reconstruct it reads the row.
    whole = stack == "encoder" and encoder_reads_whole_text
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    peaks = []
    with model.fed("reconstruct" if whole else None):
        for i in range(0, len(texts), batch_size):
            rows = [tokenize_row(model, t, model.cfg.n_ctx) for t in texts[i : i + batch_size]]
            tokens, mask = _pad_batch(rows, pad_id, model.cfg.device)
            (acts,), _, _ = feature_acts(model, [sae], tokens, mask)
            peaks.append(acts.amax(1))
    return torch.cat(peaks)


def find_features(model: HookedT5Gemma2, sae: SAE[Any], texts_with: Sequence[str], texts_without: Sequence[str],
                  k: int = 20, encoder_reads_whole_text: bool = False) -> list[FeatureMatch]:  # fmt: skip
    """Features that fire more on ``texts_with`` than on ``texts_without``, best first.

    The score is the mean over texts of the feature's peak activation on ``texts_with`` minus
    the same on ``texts_without``; ties are broken by how often it fires on each set.
    """
    a = text_peaks(model, sae, texts_with, encoder_reads_whole_text=encoder_reads_whole_text)
    b = text_peaks(model, sae, texts_without, encoder_reads_whole_text=encoder_reads_whole_text)
    mean_a, mean_b = a.mean(0), b.mean(0)
    frac_a, frac_b = (a > 0).float().mean(0), (b > 0).float().mean(0)
    score = mean_a - mean_b
    order = sorted(range(score.numel()), key=lambda f: (-float(score[f]), -float(frac_a[f] - frac_b[f]), f))[
        :k
    ]
    return [
        FeatureMatch(
            f, float(score[f]), float(mean_a[f]), float(mean_b[f]), float(frac_a[f]), float(frac_b[f])
        )
        for f in order
    ]


def log10_density(density: torch.Tensor) -> torch.Tensor:
    """log10 of feature densities, with never-firing features at -10 (as SAELens' sparsity logs)."""
    return torch.where(density > 0, density.clamp(min=1e-10).log10(), torch.full_like(density, -10.0))


__all__ = [
    "FORMAT", "SEGMENTS", "StatsConfig", "SAEInfo", "Example", "FeatureStats", "FeatureEffect", "TokenEffect",
    "FeatureMatch", "StateError", "STATE_FILE", "corpus_stats", "iter_rows", "prefix_ids", "tokenize_row", "feature_acts", "sae_info", "logit_effects",
    "logit_effect_vectors", "decoder_logit_vectors", "ablation_effects", "rows_by_index", "find_features", "text_peaks", "log10_density",
]  # fmt: skip
