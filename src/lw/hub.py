"""The Hugging Face hub: fail in seconds, with a useful message, when it cannot be reached."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

from lw.config import LwError


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub endpoint opens within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str, offline_options: list[str]) -> None:
    """Raise LwError naming ``what`` (e.g. "model EleutherAI/pythia-410m") when the hub is out
    of reach, listing the ``offline_options`` that work without it."""
    if hub_reachable():
        return
    raise LwError(
        f"{what} comes from the Hugging Face hub, which is unreachable from this machine "
        f"(no connection to {os.environ.get('HF_ENDPOINT', 'https://huggingface.co')} within 3 s, "
        f"or HF_HUB_OFFLINE is set). Offline options: {', '.join(offline_options)}."
    )
