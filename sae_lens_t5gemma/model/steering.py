"""Feature steering and top-feature reading for ``HookedT5Gemma2``.

Steering does not splice. It adds a hook at the SAE's site that encodes the activation,
edits chosen features (scale, set, add, ablate) and adds to the activation only the change
this makes to the decoded vector, ``delta = (f' - f) @ W_dec``. The SAE's reconstruction
error is kept, so a no-op edit leaves the model exactly unchanged. Unlike the mindchain
card's ``SteeringHook`` it never replaces the activation with the reconstruction and reads
no globals. It works on encoder and decoder sites, in ``forward``/``run_with_cache`` and
during ``generate()``. ``model.steer(...)`` (:class:`~sae_lens_t5gemma.model.splicing.SAEMixin`)
calls :func:`steer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from sae_lens import SAE
from transformer_lens.hook_points import HookPoint

from sae_lens_t5gemma.model.dtypes import to_model, to_sae
from sae_lens_t5gemma.model.sae_fit import check_sae_fits, sae_input

if TYPE_CHECKING:
    from sae_lens_t5gemma.model.hooked import HookedT5Gemma2


@contextmanager
def steer(
    model: HookedT5Gemma2,
    sae: SAE[Any],
    features: int | Sequence[int],
    *,
    scale: float | None = None,
    value: float | None = None,
    add: float | None = None,
    ablate: bool = False,
) -> Iterator[SteeringReport]:
    """Context manager: edit SAE features at the SAE's hook for every run inside it.

    Exactly one of ``scale`` (multiply), ``value`` (set), ``add`` (add a constant) or
    ``ablate=True`` (set to 0). Works with ``forward``, ``run_with_cache`` and ``generate``,
    on encoder and decoder sites. Yields a :class:`SteeringReport` that records, per run,
    the change made at the site and the change that reaches the residual stream: at the
    o_proj/MLP outputs the edit still passes the block's RMSNorm, which divides by the
    activation's rms (a small edit is amplified, a large one saturates).

    Example:
        >>> with model.steer(sae, [12, 40], scale=8.0) as report:
        ...     text = model.generate("The cat sat", max_new_tokens=10)
        >>> report.summary()
    """
    edit = FeatureEdit.make(features, scale=scale, value=value, add=add, ablate=ablate)
    name = check_sae_fits(model, sae)
    if name in model.acts_to_saes:
        raise ValueError(f"An SAE is spliced in at {name}; steer with a model that has none attached there.")
    to_residual, where = _residual_path(model, name)
    report = SteeringReport(name, where)

    def hook(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # noqa: ARG001
        delta = steering_delta(sae, x, edit)
        with torch.no_grad():
            live = _flat_positions(x).abs().sum(-1) > 0  # uncovered positions are zeros
            report.site.append((_flat_positions(delta).norm(dim=-1) * live).cpu())
            reached = to_residual(x + delta) - to_residual(x)
            report.residual.append((_flat_positions(reached).norm(dim=-1) * live).cpu())
        return x + delta

    with model.hooks(fwd_hooks=[(name, hook)]):
        yield report


def _flat_positions(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(*x.shape[:2], -1)


def _residual_path(
    model: HookedT5Gemma2, hook_name: str
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The map from a site's activation to what the residual stream receives from it, named."""
    kind, layer = model.site(hook_name).kind.friendly, model.hf_layer(hook_name)
    attn_norm, mlp_norm = layer.post_self_attn_layernorm, layer.post_feedforward_layernorm
    paths: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
        "attn_out": (attn_norm, "post_self_attn_layernorm(o_proj output)"),
        "attn_z": (
            lambda v: attn_norm(layer.self_attn.o_proj(v.flatten(-2))),
            "post_self_attn_layernorm(o_proj(z))",
        ),
        "mlp_in": (
            lambda v: mlp_norm(layer.mlp(v)),
            "post_feedforward_layernorm(mlp(x)) (the MLP's response)",
        ),
        "mlp_post": (lambda v: mlp_norm(layer.mlp.down_proj(v)), "post_feedforward_layernorm(down_proj(h))"),
        "mlp_out": (mlp_norm, "post_feedforward_layernorm(MLP output)"),
    }
    for part in ("z_self", "z_cross"):
        paths[part] = (
            lambda v: attn_norm(layer.self_attn.o_proj(v.flatten(-2))),
            "post_self_attn_layernorm(o_proj(z))",
        )
    return paths.get(kind, (lambda v: v, "the residual stream itself (no norm in between)"))


@dataclass
class SteeringReport:
    """What :meth:`SAEMixin.steer` changed, one entry per run at the steered hook.

    ``site[i]`` and ``residual[i]`` are ``[batch, pos]`` norms (0 at positions the stack does
    not compute) of the change made at the site and of the change that reaches the residual
    stream through ``path``.
    """

    hook_name: str
    path: str
    site: list[torch.Tensor] = field(default_factory=list)
    residual: list[torch.Tensor] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Mean and max norms over steered positions, and their ratio (the norm's amplification)."""
        if not self.site:
            return {"hook_name": self.hook_name, "path": self.path, "runs": 0}
        site = torch.cat([t.flatten() for t in self.site])
        res = torch.cat([t.flatten() for t in self.residual])
        live = site > 0
        mean_site = float(site[live].mean()) if live.any() else 0.0
        mean_res = float(res[live].mean()) if live.any() else 0.0
        return {
            "hook_name": self.hook_name,
            "path": self.path,
            "runs": len(self.site),
            "positions": int(live.sum()),
            "site_delta_norm_mean": mean_site,
            "site_delta_norm_max": float(site.max()),
            "residual_delta_norm_mean": mean_res,
            "residual_delta_norm_max": float(res.max()),
            "residual_over_site": mean_res / mean_site if mean_site else float("nan"),
        }


@dataclass(frozen=True)
class FeatureEdit:
    """A change to some SAE features: ``f'[i] = f[i] * scale``, ``= value`` or ``= f[i] + add``."""

    features: tuple[int, ...]
    scale: float | None = None
    value: float | None = None
    add: float | None = None

    @classmethod
    def make(
        cls,
        features: int | Sequence[int],
        *,
        scale: float | None = None,
        value: float | None = None,
        add: float | None = None,
        ablate: bool = False,
    ) -> FeatureEdit:
        """Validate and build an edit; ``ablate=True`` means ``value=0``."""
        if ablate:
            if value is not None and value != 0:
                raise ValueError("ablate=True sets features to 0; do not also pass value.")
            value = 0.0
        given = [k for k, v in (("scale", scale), ("value", value), ("add", add)) if v is not None]
        if len(given) != 1:
            raise ValueError(
                f"Give exactly one of scale=, value=, add= or ablate=True (got {given or 'none'})."
            )
        feats = (int(features),) if isinstance(features, int) else tuple(int(f) for f in features)
        if not feats:
            raise ValueError("No features to steer.")
        return cls(feats, scale, value, add)

    def apply(self, acts: torch.Tensor) -> torch.Tensor:
        """The edited activations of the chosen features (``acts`` is ``[..., len(features)]``)."""
        if self.scale is not None:
            return acts * self.scale
        if self.value is not None:
            return torch.full_like(acts, self.value)
        return acts + self.add  # type: ignore[operator]


def steering_delta(sae: SAE[Any], x: torch.Tensor, edit: FeatureEdit) -> torch.Tensor:
    """The change to add to activation ``x`` for ``edit``: ``(f' - f) @ W_dec`` in ``x``'s shape.

    For SAEs with a run-time input normalisation (``constant_norm_rescale``, ``layer_norm``)
    the change is the difference of the two decodes, which includes the output rescaling.
    """
    d_sae = sae.cfg.d_sae
    bad = [f for f in edit.features if not 0 <= f < d_sae]
    if bad:
        raise ValueError(f"Feature index {bad} out of range: the SAE has {d_sae} features.")
    flat = to_sae(sae, sae_input(sae, x))
    idx = torch.tensor(edit.features, device=sae.W_dec.device)
    f = sae.encode(flat)
    if sae.cfg.normalize_activations in ("none", "expected_average_only_in", None):
        sel = f[..., idx]
        delta = (edit.apply(sel) - sel) @ sae.W_dec[idx]
    else:
        edited = f.clone()
        edited[..., idx] = edit.apply(f[..., idx])
        delta = sae.decode(edited) - sae.decode(f)
    return to_model(delta, x, f"steering at {sae.cfg.metadata.hook_name}").reshape(x.shape)


@dataclass(frozen=True)
class FeatureHit:
    """One (position, token, feature, activation) row of :func:`top_features`."""

    position: int
    token: str
    feature: int
    activation: float


@torch.no_grad()
def top_features(
    model: HookedT5Gemma2, sae: SAE[Any], text: str, k: int = 10, per_token: bool = False
) -> list[FeatureHit]:
    """The strongest SAE features on ``text`` at the SAE's hook.

    Args:
        model: the hooked model.
        sae: the SAE (its ``hook_name`` picks the site).
        text: one text, read as every call reads a prompt: under the model's convention
            (``prefix_lm``: the encoder reads the first ``p`` tokens and the decoder the rest, so
            an encoder site lists positions ``< p`` and a decoder site positions ``>= p``). For
            the encoder to read the whole text: ``with model.fed(prefix_len=len(model.to_tokens(text)[0])):``.
        k: how many rows (overall), or per position if ``per_token``.
        per_token: the top ``k`` features of every position instead of the top ``k`` overall.

    Returns:
        Rows sorted by activation (descending; per position if ``per_token``). ``position``
        indexes the text's tokens and ``token`` is the token the site has just read there.
    """
    name = check_sae_fits(model, sae)
    tokens = model.to_tokens(text)
    s = model.site(name)
    _, cache = model.run_with_cache(tokens, names_filter=[name], stop_at_layer=s.layer + 1)
    covered = cache.covered_mask(name)[0]
    x = cache[name][0]
    feats = sae.encode(to_sae(sae, sae_input(sae, x)))
    return rank_features(feats, covered, model.to_str_tokens(tokens[0]), k, per_token)


def rank_features(
    feats: torch.Tensor, positions: torch.Tensor, strs: list[str], k: int, per_token: bool
) -> list[FeatureHit]:
    """Top features of one row's ``[n, d_sae]`` activations, at the positions marked in ``positions``.

    Positions not marked are zeroed first; ``strs`` are the row's token strings.
    """
    feats = feats.reshape(feats.shape[0], -1) * positions[:, None].to(feats.device)
    rows: list[FeatureHit] = []
    if per_token:
        vals, idx = feats.topk(min(k, feats.shape[-1]), dim=-1)
        for p in positions.nonzero().flatten().tolist():
            rows += [
                FeatureHit(p, strs[p], int(i), float(v))
                for v, i in zip(vals[p].tolist(), idx[p].tolist(), strict=True)
                if v > 0
            ]
        return rows
    vals, flat_idx = feats.flatten().topk(min(k, feats.numel()))
    for v, fi in zip(vals.tolist(), flat_idx.tolist(), strict=True):
        if v <= 0:
            break
        p, f = divmod(fi, feats.shape[-1])
        rows.append(FeatureHit(p, strs[p], f, float(v)))
    return rows
