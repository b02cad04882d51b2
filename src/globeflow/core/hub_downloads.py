"""Hugging Face hub downloads: what each known repo costs, and one notice before the first fetch.

The published PLONK checkpoints and the paper's encoders are fetched once into the standard
Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) and read from there afterwards, also with
``HF_HUB_OFFLINE=1``. Before a repo is fetched for the first time the user is told, on stderr,
what it is, roughly how large it is and under which licence it comes (StreetCLIP is
non-commercial), once per process.

Every request to the hub gives up when the endpoint does not connect or sends nothing for
``GLOBEFLOW_HUB_TIMEOUT`` seconds (default: huggingface_hub's ``HF_HUB_DOWNLOAD_TIMEOUT``, 10 s):
some versions of huggingface_hub send their API calls with no timeout at all, so an endpoint
that accepts the connection and never answers would hang the job forever. Such a stall is
reported in one line naming the endpoint (:class:`HubTimeoutError`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO


@dataclass(frozen=True)
class HubRepo:
    """A hub repository globeflow knows how to use."""

    repo_id: str
    size: str
    """Approximate download, e.g. ``"1.7 GB"``."""
    licence: str
    files: tuple[str, ...]
    """Files whose presence in the cache means the repo was fetched before."""
    encoder: str | None = None
    """For PLONK checkpoints: the registered encoder their embeddings came from."""


DINOV2_HUB_ID = "facebook/dinov2-with-registers-large"
STREETCLIP_HUB_ID = "geolocal/StreetCLIP"
_PLONK_FILES = ("config.json", "model.safetensors")


def _plonk_repos() -> list[HubRepo]:
    # (dataset, network size, encoder); every dataset has an RFM, a _flow and a _diffusion repo
    datasets = [
        ("YFCC", "144 MB", "dinov2-vitl14-reg"),
        ("OSV_5M", "144 MB", "streetclip"),
        ("iNaturalist", "37 MB", "dinov2-vitl14-reg"),
    ]
    return [
        HubRepo(f"nicolas-dufour/PLONK_{name}{suffix}", size, "MIT", _PLONK_FILES, encoder)
        for name, size, encoder in datasets
        for suffix in ("", "_flow", "_diffusion")
    ]


KNOWN_REPOS: dict[str, HubRepo] = {
    repo.repo_id.lower(): repo
    for repo in [
        *_plonk_repos(),
        HubRepo(DINOV2_HUB_ID, "1.2 GB", "Apache-2.0", ("config.json", "model.safetensors")),
        # The weights may come from the repo's safetensors conversion branch, so the config
        # alone marks a repo that was fetched before.
        HubRepo(
            STREETCLIP_HUB_ID, "1.7 GB", "CC-BY-NC-4.0 (non-commercial use only)", ("config.json",)
        ),
    ]
}

_announced: set[str] = set()

HUB_TIMEOUT_ENV = "GLOBEFLOW_HUB_TIMEOUT"


class HubTimeoutError(TimeoutError):
    """The hub endpoint did not connect or answer in time."""


def hub_timeout_s() -> float:
    """Seconds a hub request may wait to connect or for its next bytes (see module doc)."""
    text = os.environ.get(HUB_TIMEOUT_ENV, "").strip()
    if text:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ValueError(f"{HUB_TIMEOUT_ENV}={text!r}: not a positive number of seconds")
        return value
    from huggingface_hub import constants

    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


def _fill_timeouts(request) -> None:  # noqa: ANN001 - an httpx request
    """Request hook: a bound on every wait the caller left unbounded (``None``)."""
    limits = dict(request.extensions.get("timeout") or {})
    bound = hub_timeout_s()
    for key in ("connect", "read", "write", "pool"):
        if limits.get(key) is None:
            limits[key] = bound
    request.extensions["timeout"] = limits


def bound_hub_waits() -> None:
    """Give every request of huggingface_hub's shared HTTP client a timeout (httpx-based
    versions; older, requests-based ones pass their own timeouts and are left alone)."""
    from huggingface_hub import get_session

    session = get_session()
    hooks = getattr(session, "event_hooks", None)
    if isinstance(hooks, dict) and _fill_timeouts not in hooks.get("request", []):
        session.event_hooks = {**hooks, "request": [*hooks.get("request", []), _fill_timeouts]}


def _timeout_cause(exc: BaseException) -> BaseException | None:
    """The first timeout (httpx's, requests' or the OS's) in the chain of ``exc``."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__:
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def hub_timeout(exc: BaseException, repo_id: str) -> HubTimeoutError | None:
    """A one-line :class:`HubTimeoutError` naming the endpoint when ``exc`` (or an exception it
    came from) is a connect or read timeout; None otherwise."""
    cause = _timeout_cause(exc)
    if cause is None:
        return None
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    try:
        url = cause.request.url  # type: ignore[attr-defined]
        endpoint = f"{url.scheme}://{url.netloc.decode()}"
    except (AttributeError, RuntimeError):
        pass
    return HubTimeoutError(
        f"{endpoint} did not answer within {hub_timeout_s():g} s (connect or read timeout) "
        f"while fetching {repo_id}; check the network or HF_ENDPOINT, or set {HUB_TIMEOUT_ENV} "
        "to wait longer"
    )


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` has the form of a hub id ("owner/name"), not of a local path."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))


def known_repo(name: str) -> HubRepo | None:
    """The known repo for a hub id (case-insensitive), or for a local directory named after a
    PLONK repo (``.../PLONK_YFCC``); ``None`` otherwise."""
    text = str(name).rstrip("/")
    if text.lower() in KNOWN_REPOS:
        return KNOWN_REPOS[text.lower()]
    base = Path(text).name.lower()
    matches = [r for r in KNOWN_REPOS.values() if r.repo_id.split("/")[1].lower() == base]
    return matches[0] if len(matches) == 1 else None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache in use (honours ``HF_HOME`` / ``HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_cached(repo_id: str, files: tuple[str, ...], cache_dir: str | Path | None = None) -> bool:
    """True if every file of ``files`` of ``repo_id`` (main revision) is in the hub cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in files:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if not isinstance(found, str):
            return False
    return True


def download_notice(repo_id: str, cache_dir: str | Path | None = None) -> str:
    """One line telling what fetching ``repo_id`` means (size, licence, where it goes)."""
    from huggingface_hub import constants

    repo = known_repo(repo_id)
    where = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    what = f"about {repo.size}, licence {repo.licence}" if repo else "size and licence unknown"
    if constants.HF_HUB_OFFLINE:
        return (
            f"globeflow: {repo_id} is not in the Hugging Face cache ({where}) and HF_HUB_OFFLINE "
            f"is set; it needs a one-time download ({what})."
        )
    return (
        f"globeflow: first use of {repo_id}: downloading it once into {where} ({what}); "
        "later runs use the cached copy."
    )


def announce_download(
    repo_id: str,
    files: tuple[str, ...] | None = None,
    cache_dir: str | Path | None = None,
    stream: TextIO | None = None,
) -> bool:
    """Print :func:`download_notice` to ``stream`` (stderr) if ``repo_id`` is not cached yet,
    once per process and repo. Returns whether it printed."""
    key = repo_id.lower()
    try:
        import huggingface_hub  # noqa: F401 - without it nothing can be downloaded anyway
    except ImportError:
        return False
    bound_hub_waits()
    if key in _announced:
        return False
    repo = known_repo(repo_id)
    needed = files or (repo.files if repo else ("config.json",))
    if is_cached(repo_id, needed, cache_dir):
        return False
    _announced.add(key)
    print(download_notice(repo_id, cache_dir), file=stream or sys.stderr, flush=True)
    _check_endpoint_answers(repo_id)
    return True


def _check_endpoint_answers(repo_id: str) -> None:
    """One request with the timeout before a download: huggingface_hub retries a stalled
    request with backoff, file after file (minutes for a silent endpoint), so a stall is
    reported here at once. Any answer, even an error status, means the endpoint is alive; other
    failures (no route, refused) are left to the download to report."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return
    try:
        get_session().head(f"{constants.ENDPOINT}/api/models/{repo_id}", timeout=hub_timeout_s())
    except Exception as exc:
        stalled = hub_timeout(exc, repo_id)
        if stalled is not None:
            raise stalled from exc


def snapshot(repo_id: str, files: tuple[str, ...], cache_dir: str | Path | None = None) -> Path:
    """Local directory holding ``files`` of ``repo_id``: from the cache, else downloaded (after
    the notice). Raises ``ImportError`` without ``huggingface_hub`` and the hub's own errors
    when offline and not cached."""
    from huggingface_hub import snapshot_download

    announce_download(repo_id, files, cache_dir)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(files), cache_dir=cache_dir))
    except Exception as exc:
        stalled = hub_timeout(exc, repo_id)
        if stalled is None:
            raise
        raise stalled from exc
