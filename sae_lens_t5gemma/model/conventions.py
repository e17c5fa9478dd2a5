"""How a token batch is fed to T5Gemma 2: the conventions, the split, tokens, the position contract.

Input conventions (``model.convention``), for a token batch ``[batch, n]``:

- ``prefix_lm`` (default): the row is split at ``p`` (``model.prefix_len``, default ``n // 2``).
  The encoder reads ``tokens[:, :p]``; the decoder reads its BOS, then ``tokens[:, p:]``; loss
  and logits score only the continuation. This is the task T5Gemma 2 was adapted for (UL2:
  the decoder writes text the encoder did not see).
- ``reconstruct``: the encoder reads the row and the decoder reads the same row as is, so
  decoder position ``t`` predicts token ``t + 1`` with token ``t + 1`` already in the encoder: a
  copy task the model was never trained on, kept as an explicit opt-in.
- Explicit ``decoder_input_ids=`` / ``labels=`` (real source/target pairs) bypass both.

Position contract (both conventions, as HookedTransformer's): hooked activations are
``[batch, n, ...]``; decoder position ``t`` holds the state after reading token ``t`` of the
batch, so SAELens' token-id masks, its ``mask[:, :-1]`` trim and ``seqpos_slice`` apply as
they are. Under ``prefix_lm`` the decoder state that has read only its BOS sits at ``p - 1``;
positions a stack does not compute hold zeros (encoder ``>= p``, decoder ``< p - 1``), and
:meth:`ConventionMixin.covered_mask` says which positions are real. Logits are ``[batch, n,
d_vocab]`` (position ``t`` predicts token ``t + 1``; zeros where nothing is predicted) and
``loss_per_token=True`` gives ``[batch, n - 1]``.

Rows of different lengths (an attention mask) are split each at its own length: a stack's
positions then land per row (:class:`_Span` with ``rows``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Self

import torch
import torch.nn.functional as F

from sae_lens_t5gemma.model import sites as sites_mod

Convention = Literal["prefix_lm", "reconstruct"]
CONVENTIONS: dict[str, str] = {
    "prefix_lm": "encoder reads tokens[:, :p]; decoder reads [BOS] + tokens[:, p:]; "
    "loss and KL on the continuation tokens[:, p:] (p = prefix_len, default n // 2)",
    "reconstruct": "encoder reads the row; decoder reads the same row; position t predicts token t+1, "
    "which the encoder has already read (a copy task)",
}
"""Each convention, described as it is recorded in SAE metadata and report rows."""
DEFAULT_CONVENTION: Convention = "prefix_lm"
_KEEP: Any = object()  # "leave as it is" for HookedT5Gemma2.fed


@dataclass(frozen=True)
class _Span:
    """Where one stack's positions sit in the ``[batch, n]`` token batch.

    ``rows`` (per-row splits, rows of different lengths): ``(offsets, lengths)``, each ``[batch]``;
    a stack's position ``j`` of row ``b`` lands at ``offsets[b] + j`` when ``j < lengths[b]``.
    """

    offset: int
    n: int
    rows: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class _Feed:
    """One forward's inputs under a convention, and where each stack's positions land."""

    tokens: torch.Tensor
    enc_ids: torch.Tensor
    enc_mask: torch.Tensor | None
    dec_ids: torch.Tensor | None
    labels: torch.Tensor | None
    """Targets aligned with ``dec_ids`` (transformers' layout: no further shift), -100 = none."""
    spans: dict[str, _Span] | None
    """Per stack; None for explicit decoder inputs (activations keep transformers' shapes)."""
    dec_mask: torch.Tensor | None = None
    """The decoder's attention mask (rows of different lengths), or None."""


def mask_on_batch(mask: torch.Tensor, span: _Span) -> torch.Tensor:
    """A ``[batch, m]`` bool mask over a stack's positions, laid out on the batch's ``n``
    positions (per row when rows are split each at its own length); True elsewhere."""
    if span.rows is not None:
        rows, pos, keep = _row_positions(span, mask.shape[1])
        full = torch.ones((mask.shape[0], span.n), dtype=torch.bool, device=mask.device)
        full[rows[keep], pos[keep]] = mask.to(torch.bool)[keep]
        return full
    if span.offset or mask.shape[1] != span.n:
        full = torch.ones((mask.shape[0], span.n), dtype=torch.bool, device=mask.device)
        full[:, span.offset : span.offset + mask.shape[1]] = mask
        return full
    return mask


def _row_positions(span: _Span, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a per-row span and a stack tensor of ``m`` positions: (row ids, batch positions,
    which of the ``[batch, m]`` stack positions belong to the row)."""
    offsets, lengths = span.rows  # type: ignore[misc]
    j = torch.arange(m, device=offsets.device)
    pos = offsets[:, None] + j
    keep = (j < lengths[:, None]) & (pos < span.n)
    rows = torch.arange(len(offsets), device=offsets.device)[:, None].expand_as(pos)
    return rows, pos, keep


def _pad(x: torch.Tensor, dim: int, span: _Span) -> torch.Tensor:
    if span.rows is not None:
        xm = x.movedim(dim, 1)
        rows, pos, keep = _row_positions(span, xm.shape[1])
        full = xm.new_zeros((xm.shape[0], span.n, *xm.shape[2:]))
        full[rows[keep], pos[keep]] = xm[keep]
        return full.movedim(1, dim)
    if span.offset == 0 and x.shape[dim] == span.n:
        return x
    shape = list(x.shape)
    shape[dim] = span.n
    full = x.new_zeros(shape)
    full.narrow(dim, span.offset, x.shape[dim]).copy_(x)
    return full


def _take(full: torch.Tensor, dim: int, span: _Span, m: int) -> torch.Tensor:
    """The inverse of :func:`_pad`: a stack's ``m`` positions out of the batch's ``n``
    (positions outside a row's own part come back as zeros)."""
    if span.rows is None:
        return full.narrow(dim, span.offset, m)
    fm = full.movedim(dim, 1)
    rows, pos, keep = _row_positions(span, m)
    out = fm.new_zeros((fm.shape[0], m, *fm.shape[2:]))
    out[keep] = fm[rows[keep], pos[keep]]
    return out.movedim(1, dim)


def _last_true(mask: torch.Tensor) -> int:
    """The largest position index where a ``[batch, n]`` mask is True in any row (-1 if none)."""
    cols = mask.any(dim=0).nonzero()
    return int(cols.max()) if cols.numel() else -1


def _tokenizer_prepends_bos(tokenizer: Any) -> bool:
    if tokenizer is None or tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


class ConventionMixin:
    """The conventions, splits, tokenising and the forward's inputs and outputs of ``HookedT5Gemma2``.

    The host provides ``cfg`` (``device``, ``n_ctx``, ``default_prepend_bos``), ``tokenizer``,
    ``hf_model`` and ``image_token_id``, and calls :meth:`_init_conventions` once.
    """

    cfg: Any
    tokenizer: Any
    hf_model: Any
    image_token_id: int | None

    def _init_conventions(self, convention: Convention, prefix_len: int | Literal["random"] | None) -> None:
        self.convention = convention
        self.prefix_len = prefix_len
        self.last_prefix_len: int | None = None
        """The split the last forward used under ``prefix_lm`` (None otherwise, or per-row splits)."""
        self.last_splits: torch.Tensor | None = None
        """Each row's split in the last forward under ``prefix_lm`` (None otherwise)."""
        self._held_draw: int | None = None
        self._split_rng = torch.Generator().manual_seed(0)
        self._last_width = 0

    @property
    def convention(self) -> Convention:
        """How a token batch is fed: ``"prefix_lm"`` or ``"reconstruct"`` (see :data:`CONVENTIONS`)."""
        return self._convention

    @convention.setter
    def convention(self, value: str) -> None:
        if value not in CONVENTIONS:
            raise ValueError(f"Unknown convention {value!r}: expected one of {sorted(CONVENTIONS)}")
        self._convention: Convention = value  # type: ignore[assignment]

    @property
    def prefix_len(self) -> int | Literal["random"] | None:
        """The ``prefix_lm`` split: an int, None (``n // 2``) or ``"random"``."""
        return self._prefix_len

    @prefix_len.setter
    def prefix_len(self, value: int | str | None) -> None:
        ok = value is None or value == "random" or (isinstance(value, int) and not isinstance(value, bool))
        if not ok or (isinstance(value, int) and value < 1):
            raise ValueError(f"prefix_len must be a positive int, None (n // 2) or 'random', not {value!r}")
        self._prefix_len = value

    def split_point(self, n: int) -> int:
        """The ``prefix_lm`` split ``p`` for rows of ``n`` tokens (a fixed prefix_len, or ``n // 2``).

        Raises:
            ValueError: ``prefix_len`` is larger than ``n``, or ``"random"`` (no fixed split).
        """
        if self.prefix_len == "random":
            raise ValueError("prefix_len='random' has no fixed split point; see model.last_splits")
        p = max(1, n // 2) if self.prefix_len is None else self.prefix_len
        if p > n:
            raise ValueError(f"prefix_len={p} is longer than the token batch ({n} positions)")
        return p

    @staticmethod
    def row_lengths(tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch]``: each row's length (the mask's ones; rows start at position 0).

        Raises:
            ValueError: a mask row is not ones followed by zeros (left padding or holes): the
                position contract and the per-row split read a row from position 0.
        """
        tokens = tokens if tokens.ndim == 2 else tokens.unsqueeze(0)
        if attention_mask is None:
            return torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=tokens.device)
        mask = (attention_mask if attention_mask.ndim == 2 else attention_mask.unsqueeze(0)).to(
            tokens.device
        ) != 0
        lengths = mask.sum(1)
        pos = torch.arange(mask.shape[1], device=mask.device)
        bad = ((pos[None] < lengths[:, None]) != mask).any(1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(
                f"attention_mask row {row} is not right-padded (ones, then zeros): rows must start at "
                "position 0 (to_tokens pads on the right whatever the tokenizer says)"
            )
        return lengths

    def splits(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, first: int = 1
    ) -> torch.Tensor:
        """``[batch]``: the ``prefix_lm`` split of each row, at the row's own length.

        ``prefix_len=None``: ``max(1, L // 2)``; an int: that int for every row; ``"random"``: the
        held draw (:meth:`held_split`) or a fresh one, one per batch, scaled to each row's length.
        """
        tokens = tokens if tokens.ndim == 2 else tokens.unsqueeze(0)
        lengths = self.row_lengths(tokens, attention_mask)
        n = tokens.shape[1]
        if self.prefix_len == "random":
            longest = int(lengths.max()) if len(lengths) else n
            r = self._held_draw if self._held_draw is not None else self._random_split(longest, first)
            if longest <= first + 1:
                return torch.full_like(lengths, r)
            # The same draw in every row, scaled from the longest row to each row's own length.
            scaled = first + (r - first) * (lengths - first).clamp(min=1) // (longest - first)
            return scaled.clamp(min=first)
        if self.prefix_len is None:
            return (lengths // 2).clamp(min=1)
        return torch.full_like(lengths, self.split_point(n))

    def covered_mask(
        self, tokens: torch.Tensor, stack: str, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[batch, n]`` bool: the positions whose state ``stack`` computes from a token of the batch.

        Under ``prefix_lm``: encoder ``t < p``; decoder ``t >= p`` (the BOS-only state at ``p - 1``
        is left out: it has read no token of the batch), with ``p`` each row's split
        (:meth:`splits`; pass the forward's ``attention_mask`` for padded rows). Under
        ``reconstruct``: every position. A ``"random"`` split is the held one
        (:meth:`held_split`), else the last forward's.
        """
        if stack not in sites_mod.STACKS:
            raise ValueError(f"Unknown stack {stack!r}: expected one of {sites_mod.STACKS}")
        tokens = tokens if tokens.ndim == 2 else tokens.unsqueeze(0)
        mask = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        if self.convention == "reconstruct":
            return mask
        if self.prefix_len == "random" and self._held_draw is None:
            p = self.last_splits
            if p is None or len(p) != tokens.shape[0]:
                raise ValueError(
                    "prefix_len='random': covered_mask reads the split of the forward it describes; hold "
                    "one for the batch with `with model.held_split(tokens): ...` (or run the forward first)"
                )
        else:
            p = self.splits(tokens, attention_mask)
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        p = p.to(tokens.device)[:, None]
        return mask & ((pos < p) if stack == "encoder" else (pos >= p))

    def image_token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[batch, n]`` bool: the positions of image placeholder tokens (``image_token_id``).

        The encoder reads each image's ``mm_tokens_per_image`` soft tokens (the projector's
        output, ``hook_mm_proj_out``) at these positions, in order, so an encoder activation
        ``cache[hook][mask]`` is an image token's. Text positions are
        ``covered_mask(tokens, "encoder") & ~image_token_mask(tokens)`` (and the attention mask).
        Only the encoder reads images: under ``prefix_lm`` they must sit before the split (the
        forward refuses otherwise); the decoder never sees them (under ``reconstruct`` it reads
        the placeholder ids as plain tokens).

        Raises:
            ValueError: the model has no vision tower.
        """
        if self.image_token_id is None:
            raise ValueError("This model has no vision tower, so no image tokens.")
        tokens = tokens if tokens.ndim == 2 else tokens.unsqueeze(0)
        return tokens == self.image_token_id

    def _check_images(self, tokens: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        """The image-token mask of ``tokens`` after checking it against ``pixel_values``."""
        if self.image_token_id is None:
            if pixel_values is not None:
                raise ValueError("pixel_values given, but this model has no vision tower.")
            return None
        image = self.image_token_mask(tokens)
        n_tokens = int(image.sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(
                    f"The tokens hold {n_tokens} image placeholder tokens (image_token_id="
                    f"{self.image_token_id}) but no pixel_values were given: pass the processor's "
                    "pixel_values=, or remove the placeholders."
                )
            return None
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be [n_images, channels, height, width] as the processor makes "
                f"them, not shape {tuple(pixel_values.shape)}"
            )
        per_image = self.hf_model.config.encoder.mm_tokens_per_image
        if n_tokens != pixel_values.shape[0] * per_image:
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} images, which need "
                f"{pixel_values.shape[0] * per_image} image placeholder tokens ({per_image} each, "
                f"image_token_id={self.image_token_id}); the tokens hold {n_tokens}. Build the row "
                "with the model's processor."
            )
        return image

    @contextmanager
    def fed(self, convention: str | None = None, prefix_len: Any = _KEEP) -> Iterator[Self]:
        """Run a block under another convention and/or ``prefix_len``; the model's own come back after.

        Example:
            >>> with model.fed(prefix_len=tokens.shape[1]):  # the encoder reads the whole row
            ...     _, cache = model.run_with_cache(tokens, names_filter=[hook])
        """
        before = self.convention, self.prefix_len
        try:
            if convention is not None:
                self.convention = convention
            if prefix_len is not _KEEP:
                self.prefix_len = prefix_len
            yield self
        finally:
            self.convention, self.prefix_len = before

    @contextmanager
    def held_split(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> Iterator[torch.Tensor | None]:
        """Under ``prefix_len="random"``: draw one split for ``tokens`` and hold it for every forward
        inside (clean, spliced, ablated; :meth:`covered_mask` reads it too). Yields each row's
        split (:meth:`splits`), or None when the split is not random (nothing to hold)."""
        if self.convention != "prefix_lm" or self.prefix_len != "random":
            yield None
            return
        lengths = self.row_lengths(tokens, attention_mask)
        before = self._held_draw
        self._held_draw = self._random_split(int(lengths.max()))
        try:
            yield self.splits(tokens, attention_mask)
        finally:
            self._held_draw = before

    def _random_split(self, n: int, first: int = 1) -> int:
        """A ``prefix_len="random"`` split in ``[first, n - 1]`` from the model's own generator."""
        if n < 2:
            raise ValueError("prefix_len='random' needs rows of at least 2 tokens")
        if n - first < 1:
            raise ValueError(
                f"prefix_len='random' needs a split in [{first}, {n - 1}] (after the last image "
                f"token and before the row's end); rows of {n} tokens leave none"
            )
        return int(torch.randint(first, n, (1,), generator=self._split_rng))

    def describe_convention(self) -> str:
        """One line for metadata and report rows: the convention, its split and what it means."""
        if self.convention == "reconstruct":
            return f"reconstruct: {CONVENTIONS['reconstruct']}"
        split = {None: "n // 2", "random": "random per batch"}.get(self.prefix_len, str(self.prefix_len))  # type: ignore[arg-type]
        return f"prefix_lm (p = {split}): {CONVENTIONS['prefix_lm']}"

    def to_tokens(
        self,
        input: str | Sequence[str],
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> torch.Tensor:
        """Tokenise text to ``[batch, pos]`` ids (padded with pad id 0 on the right by default).

        Args:
            input: a string or a list of strings.
            prepend_bos: put ``<bos>`` first (default ``cfg.default_prepend_bos``, True, as Gemma does).
            padding_side: side to pad a list of texts of unequal length (default right, whatever
                ``tokenizer.padding_side`` says).
            move_to_device: move the ids to ``cfg.device``.
            truncate: cut to ``cfg.n_ctx`` tokens.
        """
        return self._tokenize(input, prepend_bos, padding_side, move_to_device, truncate)[0]

    def _tokenize(
        self,
        input: str | Sequence[str],
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("HookedT5Gemma2 has no tokenizer: pass token ids, or build it with one.")
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        texts = [input] if isinstance(input, str) else list(input)
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if prepend_bos:
            ids = [[self.tokenizer.bos_token_id, *x] for x in ids]
        if truncate:
            ids = [x[: self.cfg.n_ctx] for x in ids]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Right, whatever the tokenizer's own padding_side (transformers 5's GemmaTokenizer says
        # "left"): rows then start at position 0, as the position contract and the split assume.
        side = padding_side or "right"
        tokens = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            sl = slice(width - len(x), width) if side == "left" else slice(0, len(x))
            tokens[i, sl] = torch.tensor(x, dtype=torch.long)
            mask[i, sl] = 1
        if move_to_device:
            tokens, mask = tokens.to(self.cfg.device), mask.to(self.cfg.device)
        return tokens, mask

    def to_string(self, tokens: torch.Tensor | Sequence[int]) -> str | list[str]:
        """Decode ids to text (a list for a batch)."""
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return [self.tokenizer.decode(t) for t in tokens.tolist()]
        return self.tokenizer.decode(tokens.tolist())

    def to_str_tokens(self, input: str | torch.Tensor, prepend_bos: bool | None = None) -> list[str]:
        """One string per token of a text or a 1-D id tensor (image placeholders show as ``<img>``)."""
        ids = self.to_tokens(input, prepend_bos=prepend_bos)[0] if isinstance(input, str) else input
        return [self.token_string(i) for i in torch.as_tensor(ids).reshape(-1).tolist()]

    def token_string(self, token_id: int) -> str:
        """The text of one token; an image placeholder is ``sites.IMAGE_TOKEN_LABEL`` (``<img>``)."""
        if token_id == self.image_token_id:
            return sites_mod.IMAGE_TOKEN_LABEL
        return self.tokenizer.decode([token_id])

    def _prepare_inputs(
        self,
        input: str | Sequence[str] | torch.Tensor,
        prepend_bos: bool | None,
        padding_side: Literal["left", "right"] | None,
        attention_mask: torch.Tensor | None,
        decoder_input_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        pixel_values: torch.Tensor | None = None,
    ) -> _Feed:
        if isinstance(input, torch.Tensor):
            tokens = (input if input.ndim == 2 else input.unsqueeze(0)).to(self.cfg.device)
        else:
            tokens, text_mask = self._tokenize(input, prepend_bos, padding_side)
            if attention_mask is None and not bool(text_mask.all()):
                attention_mask = text_mask
        if attention_mask is not None:
            attention_mask = attention_mask.to(tokens.device)
            if attention_mask.shape != tokens.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, the tokens {tuple(tokens.shape)}"
                )
        self.last_prefix_len, self.last_splits = None, None
        image = self._check_images(tokens, pixel_values)
        if decoder_input_ids is not None or labels is not None:
            # Real source/target pairs: transformers' own semantics, no position contract.
            if decoder_input_ids is None:
                decoder_input_ids = self.hf_model.prepare_decoder_input_ids_from_labels(
                    labels.to(tokens.device)
                )
            return _Feed(tokens, tokens, attention_mask, decoder_input_ids.to(tokens.device), labels, None)

        n = tokens.shape[1]
        targets = tokens if attention_mask is None else tokens.masked_fill(attention_mask == 0, -100)
        if image is not None:
            targets = targets.masked_fill(image, -100)  # a placeholder is no text to predict
        no_target = torch.full_like(tokens[:, :1], -100)
        if self.convention == "reconstruct":
            spans = {"encoder": _Span(0, n), "decoder": _Span(0, n)}
            dec_labels = torch.cat([targets[:, 1:], no_target], dim=1)
            dec_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
            return _Feed(tokens, tokens, attention_mask, tokens, dec_labels, spans, dec_mask)
        # The encoder alone reads images: a random split falls after the last image token.
        first = 1 if image is None else max(1, _last_true(image) + 1)
        splits = self.splits(tokens, attention_mask, first)
        if image is not None and bool((splits < first).any()):
            p = int(splits.min())
            raise ValueError(
                f"An image placeholder token sits at position {first - 1}, at or after the prefix_lm "
                f"split p={p}: only the encoder (tokens[:, :p]) reads images, the decoder cannot. "
                f"Put the images before the split: model.prefix_len >= {first} (e.g. "
                f"`with model.fed(prefix_len={first}): ...`)."
            )
        self.last_splits, self._last_width = splits, n
        bos = torch.full_like(tokens[:, :1], self.hf_model.config.decoder.bos_token_id)
        if bool((splits == splits[0]).all()):
            p = int(splits[0])
            self.last_prefix_len = p
            spans = {"encoder": _Span(0, n), "decoder": _Span(p - 1, n)}
            enc_mask = None if attention_mask is None else attention_mask[:, :p]
            dec_ids = torch.cat([bos, tokens[:, p:]], dim=1)
            dec_labels = torch.cat([targets[:, p:], no_target], dim=1)
            dec_mask = None
            if attention_mask is not None and not bool(attention_mask.all()):
                dec_mask = torch.cat([torch.ones_like(bos), attention_mask[:, p:]], dim=1)
            return _Feed(tokens, tokens[:, :p], enc_mask, dec_ids, dec_labels, spans, dec_mask)
        # Rows of different lengths, each split at its own p: the encoder reads tokens[b, :p_b],
        # the decoder [BOS] + tokens[b, p_b:L_b] (left-aligned, padded on the right).
        self.last_prefix_len = None
        lengths = self.row_lengths(tokens, attention_mask)
        width = int(splits.max())
        enc_mask = (torch.arange(width, device=tokens.device) < splits[:, None]).long()
        if attention_mask is not None:
            enc_mask = enc_mask * (attention_mask[:, :width] != 0)
        cont = (lengths - splits).clamp(min=0)
        k = torch.arange(max(int(cont.max()), 1), device=tokens.device)
        idx = (splits[:, None] + k).clamp(max=n - 1)
        valid = k < cont[:, None]
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer is not None and self.tokenizer.pad_token_id is not None
            else 0
        )
        dec_ids = torch.cat([bos, tokens.gather(1, idx).masked_fill(~valid, pad)], dim=1)
        dec_mask = torch.cat([torch.ones_like(bos), valid.long()], dim=1)
        dec_labels = torch.cat([targets.gather(1, idx).masked_fill(~valid, -100), no_target], dim=1)
        spans = {
            "encoder": _Span(0, n, (torch.zeros_like(splits), splits)),
            "decoder": _Span(0, n, (splits - 1, cont + 1)),
        }
        return _Feed(tokens, tokens[:, :width], enc_mask, dec_ids, dec_labels, spans, dec_mask)

    def _outputs(self, logits: torch.Tensor, feed: _Feed, return_type: str, loss_per_token: bool) -> Any:
        span = None if feed.spans is None else feed.spans["decoder"]
        out_logits = logits if span is None else _pad(logits, 1, span)
        if return_type == "logits":
            return out_logits
        if feed.labels is None:
            raise ValueError("A loss needs labels: pass labels= with decoder_input_ids= (or neither).")
        labels = feed.labels.to(logits.device)
        if not bool((labels != -100).any()):
            raise ValueError(
                "Nothing to predict: every target is masked or the prefix covers the whole row "
                f"(prefix_len={self.prefix_len!r}, n={feed.tokens.shape[1]})."
            )
        if loss_per_token:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="none",
            ).view(labels.shape)
            if span is not None:
                loss = _pad(loss, 1, span)[:, :-1]
        else:
            # transformers' own loss (ForMaskedLM: no further shift) so the numbers match it exactly.
            loss = self.hf_model.loss_function(logits, labels, self.hf_model.vocab_size)
        return loss if return_type == "loss" else (out_logits, loss)

    def _last_covered(self) -> tuple[dict[str, torch.Tensor], str]:
        """Per stack, the ``[batch, n]`` positions the last ``prefix_lm`` forward computed, and its split
        in words; empty outside ``prefix_lm``."""
        if self.convention != "prefix_lm" or self.last_splits is None:
            return {}, ""
        p = self.last_splits
        split = f"p = {int(p[0])}" if bool((p == p[0]).all()) else f"p = {p.tolist()} per row"
        pos = torch.arange(self._last_width, device=p.device)[None, :]
        return {"encoder": pos < p[:, None], "decoder": pos >= p[:, None]}, split
