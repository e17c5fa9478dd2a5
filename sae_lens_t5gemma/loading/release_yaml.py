"""Release YAML files in SAELens' ``pretrained_saes.yaml`` schema: read safely, checked, written.

:func:`lookup_from_yaml` parses one release entry as SAELens does, with every field checked
(:class:`RegistrationError` names the file, release, SAE and field); :func:`read_yaml_file`
reads a file with a safe loader that refuses aliases and at most :data:`MAX_YAML_BYTES`;
:func:`release_yaml` writes such a block. Registering the result is
:mod:`sae_lens_t5gemma.loading.registration`'s job.
"""

from __future__ import annotations

import math
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup

from sae_lens_t5gemma.loading.untrusted import short_repr

MAX_YAML_BYTES = 2 * 2**20
"""Largest release YAML read (SAELens' whole directory of ~500 releases is 1.5 MB)."""


class RegistrationError(ValueError):
    """A release or loader name is taken, or a release YAML or SAELens config is malformed."""


def _number(where: str, release: str, sae_id: str, key: str, value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegistrationError(
            f"{where}: release {release!r}: SAE {sae_id!r}: {key} is {short_repr(value)}, expected a finite number"
        )
    return float(value)


def _check_overrides(where: str, release: str, value: Any) -> dict[str, Any] | None:
    # SAELens copies these into every SAE's config (and its cfg.json): only flat scalars,
    # or one level of them (e.g. model_from_pretrained_kwargs).
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 64:
        raise RegistrationError(
            f"{where}: release {release!r}: config_overrides must be a mapping of at most 64 fields, "
            f"found {short_repr(value)}"
        )
    scalar = (str, int, float, bool, type(None))
    for key, v in value.items():
        flat = isinstance(v, scalar) or (
            isinstance(v, dict) and len(v) <= 64 and all(isinstance(x, scalar) for x in v.values())
        )
        if not isinstance(key, str) or not flat:
            raise RegistrationError(
                f"{where}: release {release!r}: config_overrides[{short_repr(key)}] is {short_repr(v)}, "
                "expected a number, string, boolean or a flat mapping of them"
            )
    return value


def _check_rel_path(where: str, release: str, sae_id: str, rel: str, allow_outside_root: bool) -> None:
    p = PurePosixPath(rel.replace("\\", "/"))
    if allow_outside_root:
        return
    if p.is_absolute() or ".." in p.parts or rel.startswith("~"):
        raise RegistrationError(
            f"{where}: release {release!r}: SAE {sae_id!r} has path {rel!r}, which leaves the release folder; "
            "refused (pass allow_outside_root=True if you trust this file)"
        )


def lookup_from_yaml(
    release: str, value: Any, where: str = "<yaml>", allow_outside_root: bool = False
) -> PretrainedSAELookup:
    """Parse one release entry of SAELens' ``pretrained_saes.yaml`` schema, as SAELens does.

    Args:
        allow_outside_root: accept SAE paths that are absolute or contain ``..``.

    Raises:
        RegistrationError: a required field is missing or malformed, or a path leaves the
            release folder; names ``where``.
    """
    if not isinstance(value, dict):
        raise RegistrationError(
            f"{where}: release {release!r} must be a mapping, found {type(value).__name__}"
        )
    for key in ("repo_id", "model", "saes"):
        if key not in value:
            raise RegistrationError(f"{where}: release {release!r} has no {key!r} field")
    for key in ("repo_id", "model"):
        if not isinstance(value[key], str) or not value[key] or len(value[key]) > 1000:
            raise RegistrationError(
                f"{where}: release {release!r}: {key} is {short_repr(value[key])}, expected a string"
            )
    if value.get("conversion_func") is not None and not isinstance(value["conversion_func"], str):
        raise RegistrationError(
            f"{where}: release {release!r}: conversion_func is {short_repr(value['conversion_func'])}, "
            "expected a loader name"
        )
    if not isinstance(value["saes"], list) or not value["saes"]:
        raise RegistrationError(f"{where}: release {release!r}: 'saes' must be a non-empty list")
    saes_map: dict[str, str] = {}
    var_explained: dict[str, float] = {}
    l0: dict[str, float] = {}
    neuronpedia: dict[str, str] = {}
    norm_scaling: dict[str, float] = {}
    for i, info in enumerate(value["saes"]):
        if not isinstance(info, dict) or "id" not in info or "path" not in info:
            raise RegistrationError(
                f"{where}: release {release!r}: saes[{i}] needs 'id' and 'path', found {short_repr(info)}"
            )
        for key in ("id", "path"):
            if (
                not isinstance(info[key], (str, int))
                or isinstance(info[key], bool)
                or len(str(info[key])) > 1000
            ):
                raise RegistrationError(
                    f"{where}: release {release!r}: saes[{i}].{key} is {short_repr(info[key])}, expected a string"
                )
        sae_id = str(info["id"])
        if sae_id in saes_map:
            raise RegistrationError(f"{where}: release {release!r}: duplicate SAE id {sae_id!r}")
        _check_rel_path(where, release, sae_id, str(info["path"]), allow_outside_root)
        saes_map[sae_id] = str(info["path"])
        var_explained[sae_id] = _number(
            where, release, sae_id, "variance_explained", info.get("variance_explained"), 1.00
        )
        l0[sae_id] = _number(where, release, sae_id, "l0", info.get("l0"), 0.00)
        np_id = info.get("neuronpedia")
        if np_id is not None and not isinstance(np_id, str):
            raise RegistrationError(
                f"{where}: release {release!r}: SAE {sae_id!r}: neuronpedia is {short_repr(np_id)}, expected a string"
            )
        neuronpedia[sae_id] = np_id  # type: ignore[assignment]
        if "norm_scaling_factor" in info:
            norm_scaling[sae_id] = _number(
                where, release, sae_id, "norm_scaling_factor", info["norm_scaling_factor"], 1.0
            )
    return PretrainedSAELookup(
        release=release,
        repo_id=str(value["repo_id"]),
        model=str(value["model"]),
        conversion_func=value.get("conversion_func"),
        saes_map=saes_map,
        expected_var_explained=var_explained,
        expected_l0=l0,
        neuronpedia_id=neuronpedia,
        norm_scaling_factor=norm_scaling,
        config_overrides=_check_overrides(where, release, value.get("config_overrides")),
    )


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors/aliases: an alias bomb (a 1 KB file that expands
    to gigabytes wherever it is walked) cannot be built. SAELens' own YAML uses none."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"YAML aliases (*{event.anchor}) are not accepted in a release file",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def read_yaml_file(path: str | Path | Traversable) -> tuple[str, Any]:
    if isinstance(path, str):
        path = Path(path)
    where = str(path)
    try:
        if isinstance(path, Path):
            size = path.stat().st_size
            if size > MAX_YAML_BYTES:
                raise RegistrationError(
                    f"{where}: {size:,} bytes, more than the {MAX_YAML_BYTES:,} read for a release YAML"
                )
        raw = path.read_bytes()[: MAX_YAML_BYTES + 1]
        if len(raw) > MAX_YAML_BYTES:
            raise RegistrationError(
                f"{where}: more than the {MAX_YAML_BYTES:,} bytes read for a release YAML"
            )
        return where, yaml.load(raw.decode("utf-8"), Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{where}: no such release YAML file") from e
    except UnicodeDecodeError as e:
        raise RegistrationError(
            f"{where}: cannot read release YAML: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from e
    except RecursionError as e:
        raise RegistrationError(f"{where}: cannot read release YAML: nested too deeply") from e
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = str(e.problem or e.context or type(e).__name__)[:300]
        raise RegistrationError(f"{where}: cannot read release YAML: {problem}{at}") from e
    except (OSError, yaml.YAMLError) as e:
        raise RegistrationError(f"{where}: cannot read release YAML: {str(e)[:500]}") from e


def release_yaml(
    release: str,
    repo_id: str,
    model: str,
    saes: list[dict[str, Any]],
    conversion_func: str | None = None,
    links: dict[str, str] | None = None,
    header: str | None = None,
) -> str:
    """A release block in SAELens' ``pretrained_saes.yaml`` schema.

    Args:
        saes: entries with ``id`` and ``path`` and optionally ``l0``,
            ``variance_explained``, ``neuronpedia``.
        conversion_func: omit for SAELens-native folders (SAELens' default loader).
        header: comment lines put above the block.
    """
    body: dict[str, Any] = {}
    if conversion_func:
        body["conversion_func"] = conversion_func
    if links:
        body["links"] = links
    body["model"] = model
    body["repo_id"] = repo_id
    body["saes"] = saes
    text = yaml.safe_dump({release: body}, sort_keys=False, width=120)
    lookup_from_yaml(release, yaml.safe_load(text)[release])  # what we write must parse back
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
    return text
