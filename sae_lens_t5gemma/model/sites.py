"""The one table of T5Gemma 2 hook sites and their three spellings.

Every site of the text path has:

- a TransformerLens ``TransformerBridge`` hook name (``encoder_blocks.5.attn.hook_out``),
  the canonical name used everywhere in this package and in SAE configs;
- the transformers module path of today's layout (``model.encoder.text_model.layers.5
  .self_attn.o_proj``) and whether the site is that module's input or output;
- the older module path that the mindchain card's code uses (``model.encoder.layers.5
  .self_attn.o_proj``);
- a short friendly name for command lines (``encoder.5.attn_out``).

Everything else (hook registration, aliases, CLI parsing, SAE metadata) is derived from
``SITE_KINDS`` below, so a site is described in exactly one place.

The encoder's SigLIP vision tower has its own table, ``VISION_SITE_KINDS`` (per SigLIP layer:
``vision_blocks.N.hook_resid_pre/attn_out/mlp_out/resid_post``; once: ``hook_vision_out`` and
the multimodal projector's ``hook_mm_proj_out``). Vision activations are per image, not per
token, so they stay out of ``all_sites`` and the text position contract.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Literal

Stack = Literal["encoder", "decoder"]
STACKS: tuple[Stack, ...] = ("encoder", "decoder")


@dataclass(frozen=True)
class SiteKind:
    """One kind of site inside a transformer layer."""

    friendly: str
    """Short name used on command lines, e.g. ``attn_out``."""
    encoder_hook: str | None
    """Bridge hook suffix under ``encoder_blocks.N`` (None: the encoder has no such site)."""
    decoder_hook: str | None
    """Bridge hook suffix under ``decoder_blocks.N`` (None: the decoder has no such site)."""
    hf_submodule: str
    """Module path below the layer ('' for the layer itself)."""
    hf_io: Literal["input", "output", "internal"]
    """The module's first input, its output, or a tensor computed inside it (attention internals)."""
    description: str
    route: str
    """How ``HookedT5Gemma2`` reaches it: ``out`` (forward hook), ``in`` (pre-hook), ``heads``
    (pre-hook, viewed as heads), ``layer_in``, ``resid_mid``, or ``attention`` (inside the softmax)."""

    def hook(self, stack: str) -> str | None:
        return self.encoder_hook if stack == "encoder" else self.decoder_hook


# The decoder's attention is T5Gemma 2's *merged* attention: one softmax over the decoder's
# own keys (causal) followed by the encoder's keys, with shared q/k/v/o projections. Every
# ``decoder_blocks.N.self_attn.*`` site therefore mixes self- and cross-attention; the
# ``z_self``/``z_cross`` sites split ``hook_z`` at the encoder keys (z = z_self + z_cross).
MERGED_ATTENTION_NOTE = (
    "decoder self_attn is merged self+cross attention: one softmax over decoder keys and encoder keys"
)

# Rows in the order a layer computes them (``HookedT5Gemma2`` stops after the deepest one).
# fmt: off
SITE_KINDS: tuple[SiteKind, ...] = (
    SiteKind("resid_pre",  "hook_resid_pre", "hook_resid_pre",   "",                          "input",  "residual stream entering the layer", "layer_in"),
    SiteKind("pattern",    "attn.hook_pattern", "self_attn.hook_pattern", "self_attn",        "internal", "attention probabilities over the stack's own keys [b, head, q, k]; decoder: the self part of the merged softmax", "attention"),
    SiteKind("cross_pattern", None,          "self_attn.hook_cross_pattern", "self_attn",     "internal", "decoder attention probabilities over the encoder keys [b, head, q, k_enc] (cross part of the merged softmax)", "attention"),
    SiteKind("z_self",     None,             "self_attn.hook_z_self", "self_attn",            "internal", "decoder heads' output from decoder keys only [b, pos, n_heads, d_head]; z = z_self + z_cross", "attention"),
    SiteKind("z_cross",    None,             "self_attn.hook_z_cross", "self_attn",           "internal", "decoder heads' output from encoder keys only [b, pos, n_heads, d_head]; z = z_self + z_cross", "attention"),
    SiteKind("attn_z",     "attn.hook_z",    "self_attn.hook_z", "self_attn.o_proj",          "input",  "o_proj input: concatenated head outputs (n_heads*head_dim)", "heads"),
    SiteKind("attn_out",   "attn.hook_out",  "self_attn.hook_out", "self_attn.o_proj",        "output", "o_proj output, before post_self_attn_layernorm (mindchain SAE site)", "out"),
    SiteKind("attn_out_normed", "hook_attn_out_normed", "hook_attn_out_normed", "post_self_attn_layernorm", "output", "post_self_attn_layernorm output: what the attention block adds to the residual stream", "out"),
    SiteKind("resid_mid",  "hook_resid_mid", "hook_resid_mid",   "pre_feedforward_layernorm", "input",  "residual stream after the attention block", "resid_mid"),
    SiteKind("mlp_in",     "mlp.hook_in",    "mlp.hook_in",      "mlp",                       "input",  "MLP input: resid_mid after pre_feedforward_layernorm", "in"),
    SiteKind("mlp_post",   "mlp.hook_post",  "mlp.hook_post",    "mlp.down_proj",             "input",  "MLP hidden activation act(gate) * up, d_mlp wide (down_proj input)", "in"),
    SiteKind("mlp_out",    "mlp.hook_out",   "mlp.hook_out",     "mlp",                       "output", "MLP output, before post_feedforward_layernorm", "out"),
    SiteKind("mlp_out_normed", "hook_mlp_out_normed", "hook_mlp_out_normed", "post_feedforward_layernorm", "output", "post_feedforward_layernorm output: what the MLP block adds to the residual stream (Gemma Scope 2's mlp_out site)", "out"),
    SiteKind("resid_post", "hook_resid_post", "hook_resid_post", "",                          "output", "residual stream leaving the layer", "out"),
)
# fmt: on
KINDS_BY_FRIENDLY = {k.friendly: k for k in SITE_KINDS}

# Extra bridge spellings of the same activation (TransformerBridge exposes these too).
# Not here: the bridge's ``hook_attn_out``/``hook_mlp_out`` are the outputs of the post-norms
# (checked against TransformerLens 3.9), easily confused with the o_proj/MLP outputs;
# ``resolve`` refuses them and names both candidates.
BRIDGE_ALIASES: dict[str, dict[str, str]] = {
    "encoder": {"attn.o.hook_out": "attn_out", "attn.o.hook_in": "attn_z"},
    "decoder": {"self_attn.o.hook_out": "attn_out", "self_attn.o.hook_in": "attn_z"},
}
_POST_NORM_RE = re.compile(r"^(encoder|decoder)_blocks\.(\d+)\.hook_(attn|mlp)_out$")

HF_LAYERS = {"encoder": "model.encoder.text_model.layers", "decoder": "model.decoder.layers"}
HF_LAYERS_LEGACY = {"encoder": "model.encoder.layers", "decoder": "model.decoder.layers"}
BRIDGE_BLOCKS = {"encoder": "encoder_blocks", "decoder": "decoder_blocks"}


@dataclass(frozen=True)
class Site:
    """A hook site: one kind of activation at one layer of one stack."""

    stack: Stack
    layer: int
    kind: SiteKind

    @property
    def hook_name(self) -> str:
        """TransformerBridge hook name, the canonical name."""
        suffix = self.kind.hook(self.stack)
        return f"{BRIDGE_BLOCKS[self.stack]}.{self.layer}.{suffix}"

    def _hf(self, layers: dict[str, str]) -> str:
        path = f"{layers[self.stack]}.{self.layer}"
        return f"{path}.{self.kind.hf_submodule}" if self.kind.hf_submodule else path

    @property
    def hf_module(self) -> str:
        """transformers module path in today's layout (transformers >= 5)."""
        return self._hf(HF_LAYERS)

    @property
    def hf_module_legacy(self) -> str:
        """Module path in the older layout used by the mindchain card's code."""
        return self._hf(HF_LAYERS_LEGACY)

    @property
    def friendly(self) -> str:
        return f"{self.stack}.{self.layer}.{self.kind.friendly}"


def site(stack: str, layer: int, kind: str = "attn_out") -> Site:
    """Build a site from its parts, e.g. ``site("encoder", 5, "attn_out")``."""
    if stack not in STACKS:
        raise ValueError(f"Unknown stack {stack!r}: expected one of {STACKS}")
    if kind not in KINDS_BY_FRIENDLY:
        raise ValueError(f"Unknown site kind {kind!r}: expected one of {sorted(KINDS_BY_FRIENDLY)}")
    if KINDS_BY_FRIENDLY[kind].hook(stack) is None:
        raise ValueError(
            f"The {stack} has no {kind!r} site (it exists on the decoder's merged attention only)"
        )
    return Site(stack, int(layer), KINDS_BY_FRIENDLY[kind])  # type: ignore[arg-type]


def all_sites(n_layers: int, kinds: tuple[str, ...] | None = None) -> list[Site]:
    """Every site of a model with ``n_layers`` layers per stack, encoder first."""
    kinds = kinds or tuple(KINDS_BY_FRIENDLY)
    return [
        site(s, n, k) for s in STACKS for n in range(n_layers) for k in kinds if KINDS_BY_FRIENDLY[k].hook(s)
    ]


def _lookup_table(n_layers: int) -> dict[str, Site]:
    table: dict[str, Site] = {}
    for s in all_sites(n_layers):
        table[s.hook_name] = s
        table[s.friendly] = s
        io = s.kind.hf_io
        if io == "internal":
            continue
        for path in {s.hf_module, s.hf_module_legacy}:
            # A bare module path means its output; ".input"/".output" say which explicitly.
            table[f"{path}.{io}"] = s
            if io == "output" or s.kind.friendly == "attn_z":
                table.setdefault(path if io == "output" else f"{path}.input", s)
        for alias, kind in BRIDGE_ALIASES[s.stack].items():
            if kind == s.kind.friendly:
                table[f"{BRIDGE_BLOCKS[s.stack]}.{s.layer}.{alias}"] = s
    return table


_LAYER_RE = re.compile(r"(?:_blocks|layers|^encoder|^decoder)\.(\d+)(?:\.|$)")
# A hook name with the other stack's attention part (``decoder_blocks.5.attn.hook_out``).
_STACK_PART_RE = re.compile(r"^(encoder|decoder)_blocks\.(\d+)\.(attn|self_attn)\.(.+)$")
_ATTENTION_PART = {"encoder": "attn", "decoder": "self_attn"}


def resolve(name: str, n_layers: int | None = None) -> Site:
    """Resolve any spelling of a site (bridge name, alias, HF path, friendly name).

    Args:
        name: e.g. ``encoder_blocks.5.attn.hook_out``, ``model.decoder.layers.3.self_attn.o_proj``,
            ``model.encoder.layers.0.self_attn.o_proj`` (legacy) or ``encoder.5.attn_out``.
        n_layers: layers per stack; if given, layer indices beyond it are an error.

    Raises:
        ValueError: the name matches no site; the message lists the closest valid names.
    """
    m = _LAYER_RE.search(name)
    layer = int(m.group(1)) if m else 0
    table = _lookup_table(max(layer + 1, n_layers or 0))
    found = table.get(name)
    if found is not None and (n_layers is None or found.layer < n_layers):
        return found
    post_norm = _POST_NORM_RE.match(name)
    if post_norm:
        stack, n, part = post_norm.groups()
        sub = ("attn" if stack == "encoder" else "self_attn") if part == "attn" else "mlp"
        module = "o_proj" if part == "attn" else "MLP"
        raise ValueError(
            f"{name!r} is ambiguous: in TransformerBridge it is the output of the RMSNorm after the {module}. "
            f"Say which you mean: that post-norm output is '{stack}_blocks.{n}.hook_{part}_out_normed'; the "
            f"{module} output itself (before that norm) is '{stack}_blocks.{n}.{sub}.hook_out'."
        )
    valid = _lookup_table(n_layers) if n_layers is not None else table
    where = f" (the model has {n_layers} layers per stack)" if n_layers is not None else ""
    stack_part = _STACK_PART_RE.match(name)
    if stack_part:
        stack, n, _, rest = stack_part.groups()
        right = f"{stack}_blocks.{n}.{_ATTENTION_PART[stack]}.{rest}"
        if right in valid:
            raise ValueError(
                f"Unknown T5Gemma 2 hook name {name!r}{where}: the {stack}'s attention is "
                f"'{_ATTENTION_PART[stack]}' in hook names (TransformerBridge's: encoder_blocks.N.attn, "
                f"decoder_blocks.N.self_attn). Did you mean {right!r}?"
            )
    close = difflib.get_close_matches(name, list(valid), n=5, cutoff=0.6)
    hint = f" Close matches: {close}." if close else ""
    raise ValueError(f"Unknown T5Gemma 2 hook name {name!r}{where}.{hint}")


def expand(pattern: str, n_layers: int) -> list[Site]:
    """Expand a friendly pattern with wildcards (``decoder.*.attn_out``) into sites.

    Exact names of any spelling are accepted too. An empty expansion is an error.
    """
    if not any(c in pattern for c in "*?["):
        return [resolve(pattern, n_layers)]
    sites = [s for s in all_sites(n_layers) if fnmatch.fnmatchcase(s.friendly, pattern)]
    if not sites:
        sites = [s for s in all_sites(n_layers) if fnmatch.fnmatchcase(s.hook_name, pattern)]
    if not sites:
        examples = [s.friendly for s in all_sites(1)][:6]
        raise ValueError(
            f"Hook pattern {pattern!r} matches no site of a {n_layers}-layer T5Gemma 2. "
            f"Friendly names look like {examples} with layer numbers or '*'."
        )
    return sites


def merged_attention_line(hooks: list[str]) -> list[str]:
    """The note ``list`` prints under a release with decoder attention sites."""
    if any(h.startswith("decoder_blocks.") and ".self_attn." in h for h in hooks):
        return [f"  note: {MERGED_ATTENTION_NOTE} (split: hook_z_self / hook_z_cross)"]
    return []


# ------------------------------------------------------------------------ widths


def _stack_text_config(model: Any, stack: str) -> Any:
    config = model.hf_model.config
    return config.encoder.text_config if stack == "encoder" else config.decoder


def site_width(model: Any, hook_name: str) -> int:
    """How wide the activation at ``hook_name`` is on ``model``: the one rule for an SAE's ``d_in``.

    Args:
        model: a ``HookedT5Gemma2`` (any spelling of a text site; head count, head size and MLP
            width of the site's own stack), or a TransformerLens model with one stack of
            ``blocks.N.<suffix>`` hooks (:data:`TL_SUFFIXES`).
        hook_name: the hook.

    Raises:
        ValueError: an unknown hook, or attention probabilities (they have no width an SAE reads).
    """
    if hasattr(model, "canonical_name"):  # HookedT5Gemma2
        s = resolve(model.canonical_name(hook_name))
        stack, key = s.stack, s.kind.friendly
        if s.kind.route == "attention" and key not in _HEAD_KINDS:
            raise ValueError(f"{hook_name} holds attention probabilities, not an activation an SAE reads.")
        text = _stack_text_config(model, stack)
        n_heads, d_head, d_mlp = text.num_attention_heads, text.head_dim, text.intermediate_size
    else:
        key = tl_site_key(hook_name)
        n_heads, d_head, d_mlp = model.cfg.n_heads, model.cfg.d_head, model.cfg.d_mlp
    if key in _HEAD_KINDS:
        return n_heads * d_head
    if key == "mlp_post":
        return d_mlp
    return model.cfg.d_model


_HEAD_KINDS = ("attn_z", "z_self", "z_cross")


# ------------------------------------------------------- Gemma 3 / TransformerLens names
#
# Gemma 3 under TransformerLens (HookedTransformer, one stack of ``blocks.N``), as Gemma Scope 2's
# SAEs name their sites: the hook suffix -> site key, and the T5Gemma 2 site reading the same
# activation (for the comparison's transfer rows). Gemma 3 normalises each sublayer's output
# before adding it to the residual stream, and TransformerLens' hook_attn_out/hook_mlp_out sit
# after that norm: they are T5Gemma 2's post-norm sites (``*_normed``), not its o_proj / MLP outputs.

TL_SUFFIXES: dict[str, str] = {
    "hook_resid_pre": "resid_pre",
    "attn.hook_z": "attn_z",
    "hook_attn_out": "attn_out",
    "hook_resid_mid": "resid_mid",
    "hook_mlp_out": "mlp_out",
    "hook_resid_post": "resid_post",
}
"""TransformerLens hook suffix (under ``blocks.N``) -> site key (before the post-norm rule)."""
TRANSFER_KINDS: dict[str, str] = {
    "resid_pre": "resid_pre",
    "attn_z": "attn_z",
    "resid_mid": "resid_mid",
    "resid_post": "resid_post",
    "attn_out_normed": "attn_out_normed",
    "mlp_out_normed": "mlp_out_normed",
}
"""Gemma 3 site key -> the T5Gemma 2 site kind reading the same activation."""
ENCODER_ONLY_KINDS = ("attn_z", "attn_out_normed")
"""Transfer onto the encoder only: the decoder's self_attn merges self- and cross-attention, so its
z and attention output are not Gemma 3's self-attention."""
GEMMA_SCOPE_HOOKS: dict[str, str] = {
    "attn_out": "attn.hook_z",
    "resid_post": "hook_resid_post",
    "mlp_out": "hook_mlp_out",
}
"""Gemma Scope 2 site (release folder) -> the TransformerLens hook suffix its SAEs read (SAELens'
``gemma_3`` loader)."""


def tl_site_key(hook_name: str) -> str:
    """The site key of a per-layer TransformerLens hook (``blocks.5.attn.hook_z`` -> ``attn_z``).

    Raises:
        ValueError: not ``blocks.<layer>.<suffix>`` with a suffix of :data:`TL_SUFFIXES`.
    """
    parts = hook_name.split(".")
    suffix = ".".join(parts[2:])
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit() or suffix not in TL_SUFFIXES:
        raise ValueError(
            f"Hook {hook_name!r} is not a per-layer TransformerLens site this package knows: "
            f"expected blocks.<layer>.<one of {sorted(TL_SUFFIXES)}>."
        )
    return TL_SUFFIXES[suffix]


def transfer_hook(gemma3_hook: str, stack: str = "encoder") -> str | None:
    """The T5Gemma 2 hook reading the same activation as a Gemma 3 (TransformerLens) hook.

    ``blocks.5.attn.hook_z`` -> ``encoder_blocks.5.attn.hook_z``; ``blocks.5.hook_mlp_out``
    (after post_feedforward_layernorm, as Gemma Scope 2's mlp_out SAEs read it) ->
    ``encoder_blocks.5.hook_mlp_out_normed``. With ``stack="decoder"``, the decoder's hook, or
    None for attention sites (the decoder's self_attn merges self- and cross-attention).
    None where T5Gemma 2 has no such site.
    """
    parts = gemma3_hook.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return None
    key = TL_SUFFIXES.get(".".join(parts[2:]))
    if key in ("attn_out", "mlp_out"):  # Gemma 3 has sandwich norms: these hooks are post-norm
        key += "_normed"
    kind = TRANSFER_KINDS.get(key or "")
    if kind is None or (stack == "decoder" and kind in ENCODER_ONLY_KINDS):
        return None
    return site(stack, int(parts[1]), kind).hook_name


# ------------------------------------------------------------------------ vision tower
#
# T5Gemma 2's encoder carries a SigLIP vision tower. Each image runs through it as its own
# sequence of patches; the multimodal projector pools the patches to ``mm_tokens_per_image``
# soft tokens (256 on the real models) and maps them to the text width; those replace the
# image placeholder tokens (``config.image_token_id``) in the encoder's input. Vision sites
# therefore do NOT follow the text position contract: their activations are per image,
# ``[n_images, n_patches, d_vision]`` (SigLIP layers; the processor flattens the images of the
# whole batch, so ``n_images`` is the batch's total) and ``[n_images, mm_tokens_per_image,
# d_model]`` (projector). On the real models n_patches = (896 / 14)^2 = 4096, d_vision = 1152.
# The image tokens' own encoder activations sit in the text sites at the positions
# ``HookedT5Gemma2.image_token_mask`` marks.
# transformers 5.23 builds the tower as a SiglipVisionModel without the ``vision_model`` level
# that older releases (and the checkpoints' own weight names) have; both spellings resolve.
HF_VISION = "model.encoder.vision_tower"
HF_VISION_LEGACY = "model.encoder.vision_tower.vision_model"
HF_MM_PROJECTOR = "model.encoder.multi_modal_projector"
VISION_BLOCKS = "vision_blocks"
IMAGE_TOKEN_LABEL = "<img>"
"""How token lists, feature tables and dashboards show an image placeholder position."""


@dataclass(frozen=True)
class VisionSiteKind:
    """One kind of vision-tower site (per SigLIP layer, or once for the tower)."""

    friendly: str
    hook: str
    """Hook suffix: under ``vision_blocks.N`` for per-layer kinds, else the whole name."""
    per_layer: bool
    hf_submodule: str
    """Module path below the SigLIP layer (per-layer kinds), or the full module path where
    ``{tower}`` stands for the vision tower's path."""
    hf_io: Literal["input", "output"]
    description: str
    tl_alias: str
    """TransformerLens' spelling in its Gemma 3 multimodal adapter (``{n}``: the layer)."""


# Rows in the order the tower computes them.
# fmt: off
VISION_SITE_KINDS: tuple[VisionSiteKind, ...] = (
    VisionSiteKind("resid_pre",  "hook_resid_pre",  True,  "",                  "input",  "SigLIP residual entering the layer [n_images, n_patches, d_vision]", "vision_encoder.encoder_layers.{n}.hook_resid_pre"),
    VisionSiteKind("attn_out",   "hook_attn_out",   True,  "self_attn.out_proj", "output", "SigLIP attention output (out_proj; added to the residual as is, SigLIP has no post-norm) [n_images, n_patches, d_vision]", "vision_encoder.encoder_layers.{n}.hook_attn_out"),
    VisionSiteKind("mlp_out",    "hook_mlp_out",    True,  "mlp",               "output", "SigLIP MLP output (added to the residual as is) [n_images, n_patches, d_vision]", "vision_encoder.encoder_layers.{n}.hook_mlp_out"),
    VisionSiteKind("resid_post", "hook_resid_post", True,  "",                  "output", "SigLIP residual leaving the layer [n_images, n_patches, d_vision]", "vision_encoder.encoder_layers.{n}.hook_resid_post"),
    VisionSiteKind("vision_out", "hook_vision_out", False, "{tower}.post_layernorm", "output", "the tower's output after its post_layernorm, what the projector reads [n_images, n_patches, d_vision]", "vision_encoder.hook_vision_out"),
    VisionSiteKind("mm_proj_out", "hook_mm_proj_out", False, HF_MM_PROJECTOR,      "output", "multimodal projector output: the image's soft tokens that replace its placeholders [n_images, mm_tokens_per_image, d_model]", "vision_projector.hook_out"),
)
# fmt: on


@dataclass(frozen=True)
class VisionSite:
    """A vision-tower hook site: a per-layer kind at one SigLIP layer, or a tower-wide kind."""

    kind: VisionSiteKind
    layer: int | None = None

    @property
    def hook_name(self) -> str:
        """The canonical name, e.g. ``vision_blocks.3.hook_resid_post`` or ``hook_mm_proj_out``."""
        return f"{VISION_BLOCKS}.{self.layer}.{self.kind.hook}" if self.kind.per_layer else self.kind.hook

    def _hf(self, tower: str) -> str:
        if not self.kind.per_layer:
            return self.kind.hf_submodule.format(tower=tower)
        path = f"{tower}.encoder.layers.{self.layer}"
        return f"{path}.{self.kind.hf_submodule}" if self.kind.hf_submodule else path

    @property
    def hf_module(self) -> str:
        """transformers module path in today's layout (transformers 5.23)."""
        return self._hf(HF_VISION)

    @property
    def hf_module_legacy(self) -> str:
        """The path with the tower's ``vision_model`` level (older transformers, checkpoint names)."""
        return self._hf(HF_VISION_LEGACY)

    @property
    def friendly(self) -> str:
        return (
            f"vision.{self.layer}.{self.kind.friendly}"
            if self.kind.per_layer
            else f"vision.{self.kind.friendly}"
        )

    @property
    def tl_alias(self) -> str:
        return self.kind.tl_alias.format(n=self.layer)

    @property
    def order(self) -> tuple[int, int]:
        """Where the tower computes it: layers first, then the tower's output, then the projector."""
        index = VISION_SITE_KINDS.index(self.kind)
        return (self.layer, index) if self.layer is not None else (10**6, index)


def vision_sites(n_layers: int) -> list[VisionSite]:
    """Every vision site of a tower with ``n_layers`` SigLIP layers, in computation order."""
    per_layer = [VisionSite(k, n) for n in range(n_layers) for k in VISION_SITE_KINDS if k.per_layer]
    return per_layer + [VisionSite(k) for k in VISION_SITE_KINDS if not k.per_layer]


def _vision_table(n_layers: int) -> dict[str, VisionSite]:
    table: dict[str, VisionSite] = {}
    for s in vision_sites(n_layers):
        table[s.hook_name] = s
        table[s.friendly] = s
        table[s.tl_alias] = s
        for path in (s.hf_module, s.hf_module_legacy):
            table[f"{path}.{s.kind.hf_io}"] = s
            if s.kind.hf_io == "output":
                table.setdefault(path, s)
    return table


def resolve_vision(name: str, n_layers: int | None = None) -> VisionSite | None:
    """The vision site any spelling names (canonical, friendly, TransformerLens, HF path), or None.

    None means the name does not look like a vision site at all (let :func:`resolve` try).

    Raises:
        ValueError: a vision-looking name that matches no site, or a layer past ``n_layers``.
    """
    tower_wide = {k.hook for k in VISION_SITE_KINDS if not k.per_layer}
    if not (name.startswith((VISION_BLOCKS, "vision", HF_VISION, HF_MM_PROJECTOR)) or name in tower_wide):
        return None
    m = re.search(r"(?:_blocks|layers)\.(\d+)(?:\.|$)|^vision\.(\d+)\.", name)
    layer = int(m.group(1) or m.group(2)) if m else 0
    found = _vision_table(max(layer + 1, n_layers or 0)).get(name)
    if found is not None and (n_layers is None or found.layer is None or found.layer < n_layers):
        return found
    valid = _vision_table(n_layers if n_layers is not None else layer + 1)
    close = difflib.get_close_matches(name, list(valid), n=5, cutoff=0.6)
    where = f" (the vision tower has {n_layers} layers)" if n_layers is not None else ""
    hint = (
        f" Close matches: {close}."
        if close
        else f" Vision sites look like {[s.hook_name for s in vision_sites(1)]}."
    )
    raise ValueError(f"Unknown T5Gemma 2 vision hook name {name!r}{where}.{hint}")
