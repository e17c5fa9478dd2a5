"""Corpus statistics of SAE features on T5Gemma 2: one streaming pass, bounded memory, resumable.

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
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_t5gemma.analysis.activations import feature_acts, sae_info, segment_codes, special_ids
from sae_lens_t5gemma.analysis.corpus import iter_rows, pad_batch, pad_id, tokenize_row
from sae_lens_t5gemma.analysis.stats_state import (
    FORMAT,
    SAVE_EVERY_S,
    SEGMENTS,
    STATE_FILE,
    SAEInfo,
    StatsConfig,
    hash_row,
    load_for_resume,
    model_config_sha256,
    read_state,
    sae_weights_sha256,
    save_state,
    state_layout,
)
from sae_lens_t5gemma.model import sites as sites_mod
from sae_lens_t5gemma.model.dtypes import dtype_name, sae_dtype

if TYPE_CHECKING:
    from sae_lens import SAE

    from sae_lens_t5gemma.model.hooked import HookedT5Gemma2

# ----------------------------------------------------------------------------- accumulator

_EXAMPLE_FIELDS = ("row", "pos", "split", "tokens", "acts", "seg")


class _Accumulator:
    """Bounded per-feature statistics of one SAE (tensors, merged batch by batch)."""

    def __init__(self, d_sae: int, cfg: StatsConfig):
        self.cfg = cfg
        self.t: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in state_layout(d_sae, cfg).items():
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
        dataset: a Hugging Face dataset name, or ``.txt``/``.jsonl`` files (see :func:`~sae_lens_t5gemma.analysis.corpus.iter_rows`).
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
        infos[key].weights_sha256 = sae_weights_sha256(sae)
    corpus = str(dataset) if dataset is not None else "<texts>"
    meta: dict[str, Any] = {
        "format": FORMAT,
        "model": model.cfg.model_name,
        "model_config_sha256": model_config_sha256(model),
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
            start, saved_rows_sha, tensors, saved_strings = load_for_resume(out_dir, meta)
            for key, acc in accs.items():
                acc.t = tensors[key]
            strings.update(saved_strings)
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
    pad = pad_id(model.tokenizer)
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
            tokens, mask = pad_batch([r for _, r in part], pad, device)
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
        hash_row(rows_hash, row)
        if row_index >= start:
            ids = tokenize_row(model.tokenizer, row, cfg.context_size)
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
                    save_state(out_dir, record(done, False), {k: a.t for k, a in accs.items()}, strings)
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
        save_state(out_dir, meta, {k: a.t for k, a in accs.items()}, strings)
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
        meta, tensors, strings = read_state(folder)
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


def log10_density(density: torch.Tensor) -> torch.Tensor:
    """log10 of feature densities, with never-firing features at -10 (as SAELens' sparsity logs)."""
    return torch.where(density > 0, density.clamp(min=1e-10).log10(), torch.full_like(density, -10.0))
