"""One file of a hub repo: the cached copy if there is one, else a download that fails fast."""

from __future__ import annotations

from pathlib import Path

CONNECT_TIMEOUT = 5.0
"""Seconds to wait for the hub before deciding there is no network (a cached file needs none)."""


def _hub_fix(repo_id: str) -> str:
    return f"or on a machine with network run `hf download {repo_id}` and point HF_HUB_CACHE at that cache."


def download(repo_id: str, filename: str, force_download: bool = False) -> Path:
    """A hub file's local path: the cached copy if there is one, else ``hf_hub_download``.

    A cached file is used without asking the hub (as ``HF_HUB_OFFLINE`` would), which makes
    a warm load independent of the network. A missing file fails fast: one short request
    tells whether the hub can be reached, instead of huggingface_hub's retry loop.

    Raises:
        FileNotFoundError: the file is not cached and the hub cannot be reached (or
            ``HF_HUB_OFFLINE`` is set), or the repo has no such file; the message says how to fix it.
    """
    from huggingface_hub import (
        constants,
        get_hf_file_metadata,
        hf_hub_download,
        hf_hub_url,
        try_to_load_from_cache,
    )
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if not force_download:
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return Path(cached)
    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"{repo_id}/{filename}: not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set. "
            f"To fix: unset HF_HUB_OFFLINE and retry with network; {_hub_fix(repo_id)}"
        )

    def no_network(e: BaseException) -> FileNotFoundError:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else "(no message)"
        return FileNotFoundError(
            f"{repo_id}/{filename}: no network and no cached copy: the hub ({constants.ENDPOINT}) cannot be "
            f"reached ({type(e).__name__}: {reason}) and the file is not in the local Hugging Face cache "
            f"({cache}). To fix: connect to the network and retry; {_hub_fix(repo_id)}"
        )

    try:
        # One short request without retries: a cached miss must not wait out a retry loop.
        get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=CONNECT_TIMEOUT)
    except EntryNotFoundError as e:
        raise FileNotFoundError(f"{repo_id}: the repo has no file {filename!r}") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{repo_id}: no such Hugging Face repo (or it is private)") from e
    except HfHubHTTPError:
        raise  # the hub answered (401, 500, ...): its own message says why
    except Exception as e:  # connection refused, DNS, timeout: httpx's and the OS's errors
        raise no_network(e) from e
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, force_download=force_download))
    except LocalEntryNotFoundError as e:
        raise no_network(e) from e
