"""Convert a local snapshot of the mindchain repo into SAELens-native folders.

Each SAE becomes a folder ``<stack>/layer_<L>/`` with ``cfg.json`` and
``sae_weights.safetensors`` written by SAELens' own ``SAE.save_model``, so plain SAELens
loads it with ``SAE.load_from_disk(folder)`` without this package. Next to them goes
``pretrained_saes.yaml``: a release block in SAELens' schema for those folders, ready to
propose upstream once they are uploaded to a Hugging Face repo.

The output is complete or absent, never mixed:

- **Locked.** A lock file ``.<OUT>.lock`` beside ``OUT`` holds the writer's pid; a second
  writer fails at once naming it. A lock left by a dead process is cleared.
- **Validated first.** Every checkpoint is read, checked and turned into an SAE, and its
  safetensors serialisation is tried in memory, before anything is written.
- **Staged, then renamed.** The whole output is written into a hidden
  ``.<OUT>.staging-<pid>-<id>`` folder beside ``OUT`` (marked ``CONVERT_INCOMPLETE``
  until done), read back with SAELens alone, then renamed to ``OUT`` in one step. A
  staging folder left by a killed run is removed by the next run.
- **``force`` replaces only convert's own output.** ``OUT`` carries a manifest
  (:data:`MANIFEST_NAME`) with the sha256 of every file convert wrote; ``force`` replaces
  ``OUT`` only if everything in it is listed there, unchanged, and refuses by name otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from sae_lens_t5gemma.loading import mindchain as mindchain
from sae_lens_t5gemma.loading.mindchain_history import final_l0
from sae_lens_t5gemma.loading.registration import PACKAGE_RELEASE
from sae_lens_t5gemma.loading.release_yaml import release_yaml
from sae_lens_t5gemma.model.sizes import MINDCHAIN_REPO
from sae_lens_t5gemma.outputs import OutputLockedError, lock_path, output_lock  # noqa: F401 (lock_path: convert's API)

YAML_NAME = "pretrained_saes.yaml"
MANIFEST_NAME = ".sae_lens_t5gemma_convert.json"
"""The file in ``OUT`` that lists what convert wrote (path -> sha256)."""
INCOMPLETE_MARKER = "CONVERT_INCOMPLETE"
"""Present in a staging folder until it is complete; never in a finished ``OUT``."""
REPO_ID_PLACEHOLDER = "YOUR-HF-USER/t5gemma2-270m-attn_out-saelens"
"""Where the converted folders would be uploaded; replace it in the YAML before proposing."""


class ConvertLockedError(OutputLockedError):
    """Another ``convert`` holds the lock on the output folder; the message names its pid."""


def _step(name: str) -> None:
    """A named point in a conversion; does nothing (tests stop a run here to kill it)."""


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
    """Read, check and materialise every SAE, and try its serialisation, writing nothing.

    Raises:
        MindchainCheckpointError: every problem, listed; nothing was written.
    """
    from sae_lens import SAE
    from safetensors.torch import save as safetensors_bytes

    checked, errors = [], []
    for f in files:
        try:
            ckpt = mindchain.read_checkpoint(f)
            # Build the SAE from the checkpoint just read, not by reading the file again.
            sae = SAE.load_from_disk(f, converter=mindchain.converter_for(ckpt))
            # What SAE.save_model will do, in memory: a safetensors refusal (shared
            # memory, odd layouts) or a config that is not standard JSON shows here.
            safetensors_bytes({k: v.contiguous() for k, v in sae.state_dict().items()})
            json.dumps(sae.cfg.to_dict(), allow_nan=False, default=str)
        except (mindchain.MindchainCheckpointError, FileNotFoundError) as e:
            errors.append(str(e))
            continue
        except (ValueError, RuntimeError, TypeError) as e:
            errors.append(f"{f}: cannot be converted ({type(e).__name__}: {str(e)[:300]})")
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


# --------------------------------------------------------------------------- the output


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _remove_leftovers(out: Path) -> list[Path]:
    """Clean up after killed runs (we hold the lock, so these are nobody's work in progress).

    Staging folders are removed. An earlier output moved aside (``.<OUT>.old-*``) just
    before a run was killed is put back if ``OUT`` is missing, else removed.
    """
    gone = []
    for p in out.parent.glob(f".{out.name}.staging-*"):
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p)
    for p in sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda q: q.stat().st_mtime, reverse=True):
        if not out.exists() and (p / MANIFEST_NAME).is_file():
            os.rename(p, out)
            continue
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p)
    return gone


def _foreign_entries(out: Path) -> list[str]:
    """Entries of ``out`` that convert did not write (or that changed since), by name."""
    manifest = out / MANIFEST_NAME
    listed: dict[str, str] = {}
    if manifest.is_file() and not manifest.is_symlink():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            listed = data.get("files", {}) if isinstance(data, dict) else {}
        except (OSError, ValueError):
            listed = {}
    foreign = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if rel == MANIFEST_NAME and listed:
            continue
        if p.is_symlink():
            foreign.append(f"{rel} (a symlink)")
        elif p.is_dir():
            if not any(k.startswith(rel + "/") for k in listed):
                foreign.append(rel + "/")
        elif rel not in listed:
            foreign.append(rel)
        elif _sha256(p) != listed[rel]:
            foreign.append(f"{rel} (changed since convert wrote it)")
    return foreign


def _check_out_dir(out: Path, force: bool) -> None:
    if out.is_symlink() and not out.exists():
        raise FileExistsError(
            f"{out}: is a symlink to {os.readlink(out)}, which does not exist; remove the link or choose another folder"
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not force:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(
            f"{out}: output folder is not empty ({len(entries)} entries: {shown}); "
            "pass force=True (--force) to replace an earlier convert output in it"
        )
    if out.is_symlink():
        raise FileExistsError(f"{out}: is a symlink; --force replaces only a folder that convert wrote")
    foreign = _foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{out}: --force replaces only what convert wrote, and this folder holds {len(foreign)} other "
            f"entries: {shown}. Move them away or choose another output folder; nothing was changed"
        )


def _write_one(path: Path, target: Path) -> None:
    """Convert one checkpoint into ``target`` (inside the staging folder) and read it back."""
    import torch
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader

    partial = target.parent / f"{target.name}.partial"
    target.parent.mkdir(parents=True, exist_ok=True)
    sae = SAE.load_from_disk(path, converter=mindchain.mindchain_disk_loader)
    sae.save_model(partial)
    # Read back with SAELens alone: the folder must hold exactly the source weights.
    _, state = sae_lens_disk_loader(partial, "cpu")
    src = {k: v.detach() for k, v in sae.state_dict().items()}
    bad = [k for k in src if not torch.equal(state[k], src[k])]
    if bad:
        raise mindchain.MindchainCheckpointError(f"{path}: written weights {bad} differ from the source")
    os.replace(partial, target)


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
        out_dir: the output folder: ``<stack>/layer_<L>/`` folders, ``pretrained_saes.yaml``
            and the manifest. Created whole at the end (see the module docstring).
        force: replace an existing output folder, if everything in it was written by convert.
        progress: show a progress bar.
        release: the release name in the YAML.
        repo_id: the Hugging Face repo the folders would be uploaded to (a placeholder by default).

    Returns:
        The path of the written ``pretrained_saes.yaml``.

    Raises:
        FileNotFoundError: no snapshot or no checkpoints in it.
        FileExistsError: ``out_dir`` is not empty and ``force`` is False; or ``force`` and
            it holds entries convert did not write (named); or it is a dangling symlink.
        ConvertLockedError: (a ``FileExistsError``) another convert is writing ``out_dir``.
        MindchainCheckpointError: (a ``ValueError``) some checkpoint is invalid; all
            problems are listed and nothing is written.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    files = find_checkpoints(src_dir)
    _check_out_dir(out, force)
    with output_lock(out, "convert", ConvertLockedError):
        _step("locked")
        _remove_leftovers(out)
        _check_out_dir(out, force)  # again, now that nobody else can write it
        checked = _validate_all(files)
        _step("validated")

        staging = out.parent / f".{out.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            (staging / INCOMPLETE_MARKER).write_text(
                "A convert run is writing this folder, or was killed while writing it; the next run removes it.\n"
            )
            entries = []
            for f, ckpt in tqdm(
                list(zip(files, checked, strict=True)), desc="convert", unit="SAE", disable=not progress
            ):
                sae_id = sae_id_for(ckpt)
                _write_one(f, staging / sae_id)
                _step(f"wrote {sae_id}")
                entry: dict[str, object] = {"id": sae_id, "path": sae_id}
                l0 = final_l0(ckpt.history)
                if l0 is not None:
                    entry["l0"] = l0
                entries.append(entry)
            (staging / YAML_NAME).write_text(_yaml_text(release, repo_id, checked[0].model_name, entries))
            (staging / INCOMPLETE_MARKER).unlink()
            written = {
                p.relative_to(staging).as_posix(): _sha256(p)
                for p in sorted(staging.rglob("*"))
                if p.is_file()
            }
            manifest = {"written_by": "sae-lens-t5gemma convert", "source": str(src_dir), "files": written}
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
            _step("staged")
            _swap_in(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _step("done")
    return out / YAML_NAME


def _swap_in(staging: Path, out: Path) -> None:
    """Make ``staging`` the output folder, replacing an earlier (checked) output."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        _step("moved old output aside")
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)


def _yaml_text(release: str, repo_id: str, model: str, entries: list[dict[str, object]]) -> str:
    return release_yaml(
        release,
        repo_id,
        model,
        entries,
        links={
            "model": f"https://huggingface.co/{model}",
            "original": f"https://huggingface.co/{MINDCHAIN_REPO}",
        },
        header=(
            f"{release}: the mindchain T5Gemma 2 SAEs in SAELens' native format (sae-lens-t5gemma convert).\n"
            f"Upload this folder to the Hugging Face repo {repo_id!r} (replace the placeholder),\n"
            "then propose this block for sae_lens/pretrained_saes.yaml. No conversion_func: SAELens' own loader reads it.\n"
            "l0: the last L0 of each SAE's training history."
        ),
    )
