"""Facts about one SAE: its config, tensor shapes and weight statistics.

Used by ``sae-lens-t5gemma inspect``. Works on a release id (through
``SAE.from_pretrained``), a SAELens folder (``cfg.json``) or a mindchain ``.pt`` file.
Everything reported is computed from the weights alone; no activations are involved,
so "can never fire" is the only statement about latents' activity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sae_lens_t5gemma.loading import mindchain as mindchain
from sae_lens_t5gemma.loading.registration import check_sae_id


def load_sae(
    release: str | None = None, sae_id: str | None = None, path: str | Path | None = None, device: str = "cpu"
):
    """Load an SAE from a release id, a SAELens folder or a mindchain ``.pt`` file.

    Raises:
        ValueError: neither or both of (release, sae_id) and path; an unknown release
            or sae_id (all valid ids are listed).
        FileNotFoundError: ``path`` is neither a ``.pt`` file nor a folder with ``cfg.json``.
    """
    from sae_lens import SAE

    if (path is None) == (release is None or sae_id is None):
        raise ValueError("give either RELEASE and SAE_ID, or --path FOLDER_OR_PT")
    if path is not None:
        p = Path(path)
        if p.is_file():
            return SAE.load_from_disk(p, device=device, converter=mindchain.mindchain_disk_loader)
        if (p / "cfg.json").is_file():
            from sae_lens_t5gemma.loading.registration import check_cfg_json, read_saelens_folder

            check_cfg_json(p)
            return SAE.load_from_disk(p, device=device, converter=read_saelens_folder)
        raise FileNotFoundError(f"{p}: neither a mindchain .pt file nor a SAELens folder with cfg.json")
    assert release is not None and sae_id is not None
    check_sae_id(release, sae_id)
    return SAE.from_pretrained(release=release, sae_id=sae_id, device=device)


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
    """Text for ``sae-lens-t5gemma inspect``: config, shapes and weight statistics."""
    sae = load_sae(release, sae_id, path, device)
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
