"""Pretrained weights from the local caches, or one quick download attempt: never a minute of retries offline.

torchvision downloads through ``torch.hub`` (one ``urlopen`` without a timeout: a firewall that drops packets
stalls it for minutes) and timm through ``huggingface_hub`` (five retries with back-off, ~45 s without a network).
Here cached weights load with no network call at all, and weights that are not cached are fetched only after one
TCP connection to their server (or the proxy that would carry the request) succeeds within :data:`PROBE_TIMEOUT`
seconds; otherwise :class:`HubUnreachable` is raised at once. ``HF_HUB_OFFLINE=1`` is respected: no attempt at all.
Every loader of ImageNet weights (torchvision ResNets, ``timm:NAME`` backbones, IRT's ViTs) probes through
:func:`fetch_url_weights` / :func:`require_hf_hub`, and :func:`weights_unavailable` is the one-line error that
names the weights and the cache folder.
"""

import os
import socket
import urllib.request
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Tuple, TypeVar
from urllib.parse import urlparse

from common.errors import UserError

__all__ = [
    "PROBE_TIMEOUT",
    "HubUnreachable",
    "reachable",
    "require_hf_hub",
    "torch_hub_cached",
    "fetch_url_weights",
    "create_timm",
    "hf_cache",
    "torch_hub_checkpoints",
    "weights_unavailable",
]

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


def torch_hub_checkpoints() -> str:
    """The folder torch.hub downloads weights to (``$TORCH_HOME/hub/checkpoints``)."""
    import torch.hub

    return os.path.join(torch.hub.get_dir(), "checkpoints")


def hf_cache() -> str:
    """The folder huggingface_hub keeps downloaded repositories in."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def torch_hub_cached(url: str) -> bool:
    """Whether ``torch.hub.load_state_dict_from_url(url)`` would find the file in ``$TORCH_HOME/hub/checkpoints``."""
    return os.path.isfile(os.path.join(torch_hub_checkpoints(), os.path.basename(urlparse(url).path)))


def weights_unavailable(weights: str, cache: str, folder: str, error: BaseException) -> UserError:
    """The one-line refusal of ``--pretrained imagenet`` when loading failed: the weights, the cache looked in, and
    the two flags that need no network."""
    return UserError(
        f"cannot load ImageNet weights of {weights} ({type(error).__name__}: not in the {cache} cache {folder} and "
        f"its server unreachable?); use --pretrained PATH (a local .pth or .safetensors file) or --pretrained none"
    )


def fetch_url_weights(url: str, load: Callable[[], T]) -> T:
    """``load()`` (a torch.hub download of ``url``) when the file is cached or the server answers; else raise
    :class:`HubUnreachable` after one attempt."""
    if not torch_hub_cached(url):
        _require(url)
    return load()


def _hf_offline_set() -> bool:
    """``HF_HUB_OFFLINE`` in the environment, or huggingface_hub's own switch (read from it at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def require_hf_hub() -> None:
    """Return when the Hugging Face hub may be asked for weights that are not cached: offline mode unset and one
    connection to its server (or proxy) made; else raise :class:`HubUnreachable` without any further attempt."""
    if _hf_offline_set():
        raise HubUnreachable("HF_HUB_OFFLINE is set and the weights are not in the Hugging Face cache")
    from huggingface_hub import constants

    _require(constants.ENDPOINT)


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
    require_hf_hub()
    return create()
