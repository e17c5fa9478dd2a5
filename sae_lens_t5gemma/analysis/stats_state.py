"""The on-disk state of feature statistics: its layout, one atomic save, a checked read, resume checks.

:func:`~sae_lens_t5gemma.analysis.feature_stats.corpus_stats` accumulates; this module holds what
it keeps (:class:`StatsConfig`, the tensor layout, :class:`SAEInfo`) and how a folder holds it
(``FORMAT``): ``state.safetensors`` is the whole state in one file, so each save is ONE atomic
commit, and ``stats.json`` a readable copy. A saved state is read field by field: anything
malformed or inconsistent is refused with a :class:`StateError` naming the file and the field,
and a resume is refused when the model, its config, an SAE's weights, the settings or the rows
already read differ from the saved run's (the fingerprints below). The full format is described
in :mod:`sae_lens_t5gemma.analysis.feature_stats`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_t5gemma.model import sites as sites_mod

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


def state_layout(d_sae: int, cfg: StatsConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
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


def save_state(
    out: Path,
    meta: dict[str, Any],
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    strings: dict[int, str],
) -> None:
    """One commit: every SAE's tensors, the counters and the token strings in one file, written
    whole or not at all (:func:`outputs.atomic_write`: exclusive random temp name, no symlinks)."""
    from safetensors.torch import save

    from sae_lens_t5gemma.outputs import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{key}/{name}": v.contiguous() for key, t in tensors.items() for name, v in t.items()}
    header = {
        "format": FORMAT,
        "stats": json.dumps(meta, allow_nan=False),
        "token_strings": json.dumps({str(k): v for k, v in sorted(strings.items())}),
    }
    atomic_write(out / STATE_FILE, save(tensors, metadata=header))
    # A readable copy; a kill before it leaves an older copy, never an older state.
    atomic_write(out / "stats.json", json.dumps(meta, indent=2, allow_nan=False))


def sae_weights_sha256(sae: SAE[Any]) -> str:
    """A hash of an SAE's architecture and state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256(type(sae).__name__.encode())
    for name, t in sorted(sae.state_dict().items()):
        h.update(f"|{name}:{t.dtype}:{tuple(t.shape)}|".encode())
        t = t.detach().cpu().contiguous().reshape(-1)
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def model_config_sha256(model: HookedT5Gemma2) -> str:
    """A hash of the model's config (where it was read from and the library version left out)."""
    cfg = model.hf_model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def hash_row(h: Any, row: str | list[int]) -> None:
    if isinstance(row, str):
        b = row.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(b))
        h.update(b)
    else:
        b = json.dumps(list(row)).encode()
        h.update(b"t%d:" % len(b))
        h.update(b)


class StateError(ValueError):
    """A saved feature-statistics state that cannot be read or does not add up; the message
    names the file and the field."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not standard JSON")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_state(folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[int, str]]:
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
        for name, (shape, dtype) in state_layout(s["d_sae"], cfg).items():
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


def load_for_resume(
    out: Path, meta: dict[str, Any]
) -> tuple[int, str, dict[str, dict[str, torch.Tensor]], dict[int, str]]:
    """The saved state of ``out``, after checking that it belongs to the run ``meta`` describes.

    Returns:
        ``(rows_done, rows_sha256, tensors, token_strings)``: where to start, the hash of the
        rows before it, the tensors per SAE key and the token strings.
    """
    path = out / STATE_FILE
    saved, tensors, saved_strings = read_state(out)
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
    return int(saved["rows_done"]), str(saved["rows_sha256"]), tensors, saved_strings
