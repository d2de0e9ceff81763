"""Every Hugging Face Hub lookup of the library (checkpoints, a no-code job's config, tokenizer and weights): one path,
one line when it fails.

Whether the Hub can be asked is decided once per process: offline when ``HF_HUB_OFFLINE`` is set, else by one short
TCP probe of the endpoint (``HF_ENDPOINT``, default huggingface.co) on a background thread, so a machine without a
network answers in about :data:`PROBE_SECONDS` instead of the minute of retries the Hub clients spend. Offline, only
the local cache is read (``local_files_only``). A failure is a
:class:`~lightning_bigmodel.checkpoint.errors.CheckpointNotFoundError` that names the id, the local path tried, and
what the Hub said (or that it was not reachable), in one line. huggingface_hub is imported only here, when needed.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import threading
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import urlparse

from lightning_bigmodel.checkpoint.errors import CheckpointNotFoundError

PROBE_SECONDS = 3.0
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")
_TRUE = {"1", "on", "yes", "true"}
_probed: dict[str, Optional[str]] = {}  # endpoint -> None (reachable) or why not


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def can_be_repo_id(text: str) -> bool:
    """Whether ``text`` has the shape of a Hub repo id (``name`` or ``org/name``, no file suffix); a path starting
    with ``.``, ``/`` or ``~``, with more than one ``/``, or naming a weights or JSON file can only be local."""
    return bool(_REPO_ID.match(text)) and not text.lower().endswith(_FILE_SUFFIXES)


def hub_unavailable() -> Optional[str]:
    """``None`` when the Hub may be asked; else why not (``HF_HUB_OFFLINE`` set, or the probe failed). Probed once."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    endpoint = _endpoint()
    if endpoint not in _probed:
        _probed[endpoint] = _probe(endpoint)
    return _probed[endpoint]


def _probe(endpoint: str) -> Optional[str]:
    """Open (and close) one TCP connection to the endpoint; the DNS lookup has no timeout of its own, so the attempt
    runs on a daemon thread that is given up after :data:`PROBE_SECONDS`."""
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    outcome: list[Optional[str]] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{host}:{port} unreachable: {err.strerror or err}")

    thread = threading.Thread(target=attempt, name="lightning-bigmodel-hub-probe", daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS + 0.5)
    return outcome[0] if outcome else f"{host}:{port} did not answer within {PROBE_SECONDS:g} s"


def looked_for(text: str) -> str:
    """The local path tried, with a close sibling when there is one (``runs/minilm-shardd`` -> ``minilm-sharded``)."""
    path = Path(text).expanduser().absolute()
    hint = ""
    if path.parent.is_dir():
        close = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=1, cutoff=0.75)
        hint = f" (did you mean {str(path.parent / close[0])!r}?)" if close else ""
    return f"{str(path)!r}{hint}"


def hub_snapshot(repo_id: str, patterns: Sequence[str], what: str = "`checkpoint`") -> Path:
    """The local snapshot folder of ``repo_id`` holding the files that match ``patterns`` (downloaded when the Hub
    can be asked, else from the cache). ``what`` names the argument in the error."""
    from huggingface_hub import snapshot_download

    unavailable = hub_unavailable()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns), local_files_only=unavailable is not None))
    except Exception as err:  # noqa: BLE001 - every Hub failure becomes the one line below
        raise not_found(what, repo_id, _hub_said(err, unavailable)) from err


def _hub_said(err: Exception, unavailable: Optional[str]) -> str:
    name = type(err).__name__
    if unavailable is not None:
        from huggingface_hub.constants import HF_HUB_CACHE

        cache = os.environ.get("HF_HUB_CACHE") or HF_HUB_CACHE
        return f"Hub not asked: {unavailable}; only the cache {cache!r} was read"
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        return "the Hub (reachable) has no such public repo; a private or gated one needs `hf auth login`"
    if name in ("RevisionNotFoundError", "EntryNotFoundError", "RemoteEntryNotFoundError"):
        return "the Hub (reachable) has the repo but not the files asked for"
    cause = " ".join(str(err).split())
    return f"the Hub (reachable) failed: {name}: {cause[:160]}{'...' if len(cause) > 160 else ''}"


def not_found(what: str, text: str, hub: str) -> CheckpointNotFoundError:
    """One line: neither the local path nor the Hub repo ``text`` exists (``hub``: what the Hub said)."""
    return CheckpointNotFoundError(
        f"{what} {text!r} not found: no local path {looked_for(text)}, and no Hugging Face Hub repo {text!r} ({hub})."
    )


def only_local_not_found(what: str, text: str) -> CheckpointNotFoundError:
    """One line for a path that cannot be a Hub id (``./x``, ``/x``, ``a/b/c``, ``x.safetensors``) and is missing."""
    return CheckpointNotFoundError(f"{what} {text!r} not found: no local path {looked_for(text)} (not a Hub id).")
