"""Pretrained weights from the local caches, or one quick download attempt: never a minute of retries offline.

torchvision downloads through ``torch.hub`` (one ``urlopen`` without a timeout: a firewall that drops packets
stalls it for minutes) and timm through ``huggingface_hub`` (five retries with back-off, ~45 s without a network).
Here cached weights load with the hub in offline mode (no network call at all), and weights that are not cached
are fetched only after one TCP connection to their server (or the proxy that would carry the request) succeeds
within :data:`PROBE_TIMEOUT` seconds; otherwise :class:`HubUnreachable` is raised at once, which the callers turn
into their one-line ``--pretrained`` error. ``HF_HUB_OFFLINE=1`` is respected: no attempt at all.
"""

import os
import socket
import urllib.request
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Tuple, TypeVar
from urllib.parse import urlparse

__all__ = ["PROBE_TIMEOUT", "HubUnreachable", "reachable", "torch_hub_cached", "fetch_url_weights", "create_timm"]

PROBE_TIMEOUT = 3.0  # seconds for the one connection attempt
T = TypeVar("T")


class HubUnreachable(OSError):
    """The weights are not cached and their server cannot be reached (or offline mode is set)."""


def _address(url: str) -> Tuple[str, int]:
    """(host, port) the request for ``url`` would connect to: the proxy's when one applies, else the server's."""
    parts = urlparse(url)
    host = parts.hostname or ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
    return host, parts.port or (443 if parts.scheme == "https" else 80)


def _connect(host: str, port: int, timeout: float) -> None:
    socket.create_connection((host, port), timeout=timeout).close()


def reachable(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """One TCP connection to ``url``'s server (or proxy) within ``timeout`` seconds: the only network attempt made
    before a download."""
    try:
        _connect(*_address(url), timeout)
    except OSError:
        return False
    return True


def _require(url: str) -> None:
    if not reachable(url):
        raise HubUnreachable(f"{_address(url)[0]} unreachable")


def torch_hub_cached(url: str) -> bool:
    """Whether ``torch.hub.load_state_dict_from_url(url)`` would find the file in ``$TORCH_HOME/hub/checkpoints``."""
    import torch.hub

    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path)))


def fetch_url_weights(url: str, load: Callable[[], T]) -> T:
    """``load()`` (a torch.hub download of ``url``) when the file is cached or the server answers; else raise
    :class:`HubUnreachable` after one attempt."""
    if not torch_hub_cached(url):
        _require(url)
    return load()


def _hf_offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


@contextmanager
def _hf_offline() -> Iterator[None]:
    """huggingface_hub's offline mode for the block: cached files only, no request."""
    try:
        from huggingface_hub import constants
    except ImportError:  # timm without huggingface_hub downloads through torch.hub only
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _not_cached(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is huggingface_hub's "not in the cache and offline"."""
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:
        return False
    seen: Optional[BaseException] = error
    while seen is not None:
        if isinstance(seen, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _torch_hub_url(name: str) -> Optional[str]:
    """The URL timm downloads ``name``'s weights from through torch.hub (models without Hugging Face weights)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an hf-hub: name or an unknown tag: timm reports it when creating
        return None
    return cfg.url if cfg is not None and not cfg.hf_hub_id and cfg.url else None


def create_timm(name: str, create: Callable[[], T]) -> T:
    """``create()`` = ``timm.create_model(name, pretrained=True, ...)``: from the caches with the hub offline; when
    the weights are not cached, one probe of the hub, then the download (or :class:`HubUnreachable`)."""
    url = _torch_hub_url(name)
    if url is not None:
        return fetch_url_weights(url, create)
    try:
        with _hf_offline():
            return create()
    except Exception as e:  # noqa: BLE001 - re-raised unless it says "not cached"
        if not _not_cached(e):
            raise
    if _hf_offline_env():
        raise HubUnreachable("HF_HUB_OFFLINE is set and the weights are not in the Hugging Face cache")
    from huggingface_hub import constants

    _require(constants.ENDPOINT)
    return create()
