"""Convert a local snapshot of the mindchain repo into SAELens-native folders.

Each SAE becomes a folder ``<stack>/layer_<L>/`` with ``cfg.json`` and
``sae_weights.safetensors`` written by SAELens' own ``SAE.save_model``, so plain SAELens
loads it with ``SAE.load_from_disk(folder)`` without this package. Next to them goes
``pretrained_saes.yaml``: a release block in SAELens' schema for those folders, ready to
propose upstream once they are uploaded to a Hugging Face repo.

Every checkpoint is validated before anything is written, and each folder is written to
a temporary folder and then renamed, so a failure never leaves a half-written SAE.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch

from sae_lens_t5gemma import mindchain
from sae_lens_t5gemma.registration import PACKAGE_RELEASE, release_yaml

YAML_NAME = "pretrained_saes.yaml"
REPO_ID_PLACEHOLDER = "YOUR-HF-USER/t5gemma2-270m-attn_out-saelens"
"""Where the converted folders would be uploaded; replace it in the YAML before proposing."""


def find_checkpoints(src_dir: str | Path) -> list[Path]:
    """The mindchain checkpoints of a snapshot folder, encoder layers first, then decoder.

    ``src_dir`` may be a plain download (``hf download ... --local-dir``) or a repo folder
    of the hub cache (``models--mindchain--t5gemma2-sae-all-layers``), whose ``main``
    snapshot is used.

    Raises:
        FileNotFoundError: no such folder, or no ``encoder/sae_encoder_NN.pt`` /
            ``decoder/sae_decoder_NN.pt`` files in it.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such snapshot folder")
    if (src / "snapshots").is_dir():
        ref = src / "refs" / "main"
        snaps = (
            [src / "snapshots" / ref.read_text().strip()]
            if ref.is_file()
            else sorted((src / "snapshots").iterdir())
        )
        if len(snaps) == 1 and snaps[0].is_dir():
            src = snaps[0]
    found = []
    for stack in ("encoder", "decoder"):
        for f in (src / stack).glob(f"sae_{stack}_*.pt") if (src / stack).is_dir() else []:
            s = mindchain.site_for_filename(f)
            if s is not None and s.stack == stack:
                found.append((stack == "decoder", s.layer, f))
    if not found:
        raise FileNotFoundError(
            f"{src}: no mindchain checkpoints (encoder/sae_encoder_NN.pt, decoder/sae_decoder_NN.pt) found"
        )
    return [f for *_, f in sorted(found)]


def sae_id_for(ckpt: mindchain.MindchainCheckpoint) -> str:
    """The release id of a checkpoint, e.g. ``encoder/layer_5``."""
    return f"{ckpt.layer_type}/layer_{ckpt.layer_idx}"


def _validate_all(files: list[Path]) -> list[mindchain.MindchainCheckpoint]:
    checked, errors = [], []
    for f in files:
        try:
            ckpt = mindchain.read_checkpoint(f)
        except (mindchain.MindchainCheckpointError, FileNotFoundError) as e:
            errors.append(str(e))
            continue
        # Keep only the fields: holding 36 real weight sets (~760 MB) is not needed.
        ckpt.tensors = {}
        checked.append(ckpt)
    if errors:
        raise mindchain.MindchainCheckpointError(
            f"{len(errors)} of {len(files)} checkpoints are invalid; nothing was written:\n  "
            + "\n  ".join(errors)
        )
    models = sorted({c.model_name for c in checked})
    if len(models) > 1:
        raise mindchain.MindchainCheckpointError(
            f"the checkpoints name {len(models)} different models {models}; one release has one model"
        )
    return checked


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and not force:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise FileExistsError(
                f"{out}: output folder is not empty ({len(entries)} entries: {shown}); "
                "pass force=True (--force) to overwrite the converted SAEs in it"
            )


def _write_one(path: Path, target: Path) -> None:
    """Convert one checkpoint into ``target`` atomically: temp folder, check, rename."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        sae = SAE.load_from_disk(path, converter=mindchain.mindchain_disk_loader)
        sae.save_model(tmp)
        # Read back with SAELens alone: the folder must hold exactly the source weights.
        _, state = sae_lens_disk_loader(tmp, "cpu")
        src = mindchain.read_checkpoint(path).tensors
        bad = [k for k in src if not torch.equal(state[k], src[k])]
        if bad:
            raise mindchain.MindchainCheckpointError(f"{path}: written weights {bad} differ from the source")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def convert_snapshot(
    src_dir: str | Path,
    out_dir: str | Path,
    force: bool = False,
    progress: bool = True,
    release: str = PACKAGE_RELEASE,
    repo_id: str = REPO_ID_PLACEHOLDER,
) -> Path:
    """Convert a local mindchain snapshot into SAELens-native folders plus a release YAML.

    Args:
        src_dir: the snapshot (a folder with ``encoder/`` and ``decoder/``, or the repo's
            folder in a hub cache).
        out_dir: where ``<stack>/layer_<L>/`` folders and ``pretrained_saes.yaml`` go.
        force: write into a non-empty ``out_dir``, replacing converted folders of the same names.
        progress: show a progress bar.
        release: the release name in the YAML.
        repo_id: the Hugging Face repo the folders would be uploaded to (a placeholder by default).

    Returns:
        The path of the written ``pretrained_saes.yaml``.

    Raises:
        FileNotFoundError: no snapshot or no checkpoints in it.
        FileExistsError: ``out_dir`` is not empty and ``force`` is False.
        MindchainCheckpointError: (a ``ValueError``) some checkpoint is invalid; all
            problems are listed and nothing is written.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    files = find_checkpoints(src_dir)
    _check_out_dir(out, force)
    checked = _validate_all(files)

    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for f, ckpt in tqdm(
        list(zip(files, checked, strict=True)), desc="convert", unit="SAE", disable=not progress
    ):
        sae_id = sae_id_for(ckpt)
        _write_one(f, out / sae_id)
        entry: dict[str, object] = {"id": sae_id, "path": sae_id}
        l0 = mindchain.final_l0(ckpt.history)
        if l0 is not None:
            entry["l0"] = l0
        entries.append(entry)

    model = checked[0].model_name
    text = release_yaml(
        release,
        repo_id,
        model,
        entries,
        links={
            "model": f"https://huggingface.co/{model}",
            "original": f"https://huggingface.co/{mindchain.MINDCHAIN_REPO}",
        },
        header=(
            f"{release}: the mindchain T5Gemma 2 SAEs in SAELens' native format (sae-lens-t5gemma convert).\n"
            f"Upload this folder to the Hugging Face repo {repo_id!r} (replace the placeholder),\n"
            "then propose this block for sae_lens/pretrained_saes.yaml. No conversion_func: SAELens' own loader reads it.\n"
            "l0: the last L0 of each SAE's training history."
        ),
    )
    yaml_path = out / YAML_NAME
    tmp = out / f".{YAML_NAME}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, yaml_path)
    return yaml_path
