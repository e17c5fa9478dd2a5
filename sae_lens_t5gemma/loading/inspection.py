"""Spec -> SAE, and facts about one SAE: its config, tensor shapes and weight statistics.

:func:`load_sae_spec` is the one way every command turns an SAE spec into a loaded SAE:
``RELEASE:SAE_ID`` (through ``SAE.from_pretrained``), a SAELens folder (checked by
:func:`~.saelens_folder.check_cfg_json` and :func:`~.saelens_folder.read_saelens_folder`,
so NaN/Inf weights are refused) or a mindchain ``.pt`` file. ``sae-lens-t5gemma inspect``
reports the rest, computed from the weights alone; no activations are involved, so "can
never fire" is the only statement about latents' activity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sae_lens_t5gemma.loading import mindchain as mindchain
from sae_lens_t5gemma.loading.registration import check_sae_id
from sae_lens_t5gemma.loading.saelens_folder import check_cfg_json, read_saelens_folder


def load_sae_spec(spec: str | Path, device: str = "cpu") -> tuple[Any, str]:
    """``(SAE, source)`` from ``RELEASE:SAE_ID``, a SAELens folder or a mindchain ``.pt`` file.

    ``source`` is the resolved path of a file or folder, or the spec of a release.

    Raises:
        ValueError: a spec that is neither an existing path nor ``RELEASE:SAE_ID``; an unknown
            release or SAE id (all valid ids are listed).
        FileNotFoundError: an existing path that is neither a ``.pt`` file nor a folder with
            ``cfg.json``.
        RegistrationError: (a ``ValueError``) a malformed ``cfg.json`` or weights file, or
            weights holding NaN or Inf (the message names the file and the tensor).
        MindchainCheckpointError: (a ``ValueError``) a broken mindchain file.
    """
    from sae_lens import SAE

    p = Path(spec)
    if p.is_file():
        # absolute, not resolved: a hub-cache file is a symlink to a blob with no readable name
        sae = SAE.load_from_disk(p, device=device, converter=mindchain.mindchain_disk_loader)
        return sae, str(p.absolute())
    if p.is_dir():
        if not (p / "cfg.json").is_file():
            raise FileNotFoundError(f"{p}: neither a mindchain .pt file nor a SAELens folder with cfg.json")
        check_cfg_json(p)
        return SAE.load_from_disk(p, device=device, converter=read_saelens_folder), str(p.resolve())
    release, sep, sae_id = str(spec).partition(":")
    if not sep or not release or not sae_id:
        raise ValueError(
            f"SAE {str(spec)!r}: expected RELEASE:SAE_ID, a SAELens folder or a mindchain .pt file"
        )
    check_sae_id(release, sae_id)
    from sae_lens_t5gemma._compat import read_gemma_scope_shapes_from_cache, saelens_release_directory

    if saelens_release_directory()[release].conversion_func == "gemma_3":
        read_gemma_scope_shapes_from_cache()  # Gemma Scope 2 must load offline from the cache too
    return SAE.from_pretrained(release=release, sae_id=sae_id, device=device), str(spec)


def _stats(t: torch.Tensor) -> dict[str, Any]:
    x = t.detach().float()
    return {
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
        "mean": x.mean().item(),
        "std": x.std().item() if x.numel() > 1 else 0.0,
        "min": x.min().item(),
        "max": x.max().item(),
        "norm": x.norm().item(),
    }


def sae_stats(sae: Any) -> dict[str, Any]:
    """Config and weight statistics of a loaded SAE, as plain numbers.

    Keys: ``config`` (the config dict, training history summarised), ``tensors``
    (per parameter: shape, dtype, mean, std, min, max, Frobenius norm), ``latents``
    (decoder-row and encoder-column norms, and counts of latents with a zero decoder
    row or encoder column, and of latents that can never fire: zero encoder column and
    ``b_enc <= 0``, so ``relu(x @ W_enc + b_enc)`` is 0 for every input).
    """
    cfg = sae.cfg.to_dict()
    history = cfg["metadata"].pop("training_history", None)
    if history:
        cfg["metadata"]["training_history"] = {
            k: f"{len(v)} values, last {v[-1]}" if isinstance(v, list) and v else v
            for k, v in history.items()
        }
    tensors = {name: _stats(p) for name, p in sae.named_parameters()}
    latents: dict[str, Any] = {"d_sae": sae.cfg.d_sae}
    with torch.no_grad():
        dec = sae.W_dec.float().norm(dim=1)
        enc = sae.W_enc.float().norm(dim=0)
        latents["W_dec_row_norm"] = {
            "mean": dec.mean().item(),
            "min": dec.min().item(),
            "max": dec.max().item(),
        }
        latents["W_enc_col_norm"] = {
            "mean": enc.mean().item(),
            "min": enc.min().item(),
            "max": enc.max().item(),
        }
        latents["zero_decoder_rows"] = int((dec == 0).sum())
        latents["zero_encoder_columns"] = int((enc == 0).sum())
        if hasattr(sae, "b_enc"):
            latents["never_fire"] = int(((enc == 0) & (sae.b_enc.float() <= 0)).sum())
            latents["b_enc_negative_fraction"] = (sae.b_enc < 0).float().mean().item()
    return {"config": cfg, "tensors": tensors, "latents": latents}


def describe_sae(
    release: str | None = None, sae_id: str | None = None, path: str | Path | None = None, device: str = "cpu"
) -> str:
    """Text for ``sae-lens-t5gemma inspect``: config, shapes and weight statistics.

    Give either ``release`` and ``sae_id``, or ``path`` (a SAELens folder or a mindchain ``.pt``).

    Raises:
        ValueError: neither or both of (release, sae_id) and path; see :func:`load_sae_spec`.
    """
    if (path is None) == (release is None or sae_id is None):
        raise ValueError("give either RELEASE and SAE_ID, or --path FOLDER_OR_PT")
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"{path}: neither a mindchain .pt file nor a SAELens folder with cfg.json")
    sae, _ = load_sae_spec(path if path is not None else f"{release}:{sae_id}", device)
    st = sae_stats(sae)
    what = str(path) if path is not None else f"{release} / {sae_id}"
    lines = [f"SAE {what}: {type(sae).__name__}", "config:"]
    lines += ["  " + ln for ln in json.dumps(st["config"], indent=2, default=str).splitlines()]
    lines.append("tensors:")
    lines.append(
        f"  {'name':<8}{'shape':<16}{'dtype':<10}{'mean':>11}{'std':>11}{'min':>11}{'max':>11}{'norm':>11}"
    )
    for name, t in st["tensors"].items():
        lines.append(
            f"  {name:<8}{str(t['shape']):<16}{t['dtype']:<10}"
            + "".join(f"{t[k]:>11.4g}" for k in ("mean", "std", "min", "max", "norm"))
        )
    la = st["latents"]
    lines.append("latents:")
    for key in ("W_dec_row_norm", "W_enc_col_norm"):
        v = la[key]
        lines.append(f"  {key}: mean {v['mean']:.4g}, min {v['min']:.4g}, max {v['max']:.4g}")
    lines.append(f"  zero decoder rows: {la['zero_decoder_rows']} / {la['d_sae']}")
    lines.append(f"  zero encoder columns: {la['zero_encoder_columns']} / {la['d_sae']}")
    if "never_fire" in la:
        lines.append(
            f"  can never fire (zero encoder column, b_enc <= 0): {la['never_fire']} / {la['d_sae']}"
        )
        lines.append(f"  b_enc < 0: {la['b_enc_negative_fraction']:.1%} of latents")
    return "\n".join(lines)
