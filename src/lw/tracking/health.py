"""A tracking server's health: whether it refuses connections, whether an error is a store
that went away, the one line a job whose results stay in its folder ends with, and marking a
run FAILED.

A store that is away never stops a computation (docs/DESIGN.md): a job computes to the end
into its folder whatever its server does; if the store is unreachable when the job ends (or was
at its start), the job says where its results are kept and exits non-zero, and `python -m
lw.sync <folder>` logs them later. How long a job waits on a dead server at its end is bounded
by lw.tracking.store.SERVER_RETRIES (about 15 s per refused request), and a job checks
:func:`server_refuses` (``REFUSED_PROBE_S``) before it starts its uploads.
"""


from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from lw.errors import LwError

# How long one probe of the server (a TCP connect) may take before it counts as "slow, not
# dead"; LW_REFUSED_PROBE_S makes it shorter (tests).
REFUSED_PROBE_S = float(os.environ.get("LW_REFUSED_PROBE_S", "5"))


# In a job's folder: the line saying its results wait for lw.sync (removed by lw.sync once it
# logged them); the sweep counts these files for its last line.
KEPT_FILE = "lw_kept.txt"


def server_refuses(uri: str, timeout: float | None = None) -> str | None:
    """Why the tracking server at ``uri`` is dead (connection refused or reset, host
    unreachable), or None: it accepts connections, or is only slow (a timeout), or the store
    is not a server."""
    url = urlparse(uri)
    if url.scheme not in ("http", "https"):
        return None
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https"
                                                             else 80)),
                                 timeout=timeout or REFUSED_PROBE_S).close()
    except TimeoutError:
        return None
    except OSError as error:
        return error.strerror or type(error).__name__
    return None


class StoreUnreachable(LwError):
    """The tracking server refused the connection (client_for, or a job's end)."""


def is_connection_failure(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a tracking request that found no server."""
    import requests

    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, (StoreUnreachable, requests.exceptions.ConnectionError,
                              ConnectionRefusedError, ConnectionResetError)):
            return True
        text = str(error)
        if any(s in text for s in ("Max retries exceeded", "Connection refused",
                                    "Connection reset", "Connection aborted")):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def store_lost(error: BaseException, uri: str) -> bool:
    """Whether ``error`` is the store that went away (a refused connection, a server that
    now refuses), not the job's own failure."""
    if isinstance(error, StoreUnreachable):
        return True
    if isinstance(error, LwError):
        return False
    return is_connection_failure(error) or server_refuses(uri) is not None and \
        any(s in type(error).__name__ for s in ("Mlflow", "Connection", "HTTP"))


class ResultsKept(LwError):
    """The job computed to the end, its store is away: its results wait in its folder."""


def results_kept(uri: str, folder: Path, why: str | None = None) -> ResultsKept:
    """The job's last line when its store is away: its results are kept in its folder, and
    the command that logs them. Written to the folder too (KEPT_FILE: the sweep counts it)."""
    why = why or server_refuses(uri) or "connection failed"
    line = (f"tracking server {uri} is unreachable ({why}): the job's results are kept in "
            f"{folder}; `python -m lw.sync {folder}` logs them once the server is back")
    try:
        (Path(folder) / KEPT_FILE).write_text(line + "\n")
    except OSError:
        pass
    return ResultsKept(line)


def fail_run(client, run_id: str, error: BaseException, uri: str, folder: Path | None) -> None:
    """Mark the run FAILED with its error (tag ``lw.error``, artifact ``error.txt``), each
    step on its own, so that one failing (a full disk) does not leave the run RUNNING; on a
    dead server there is nothing to mark (lw.sync logs the kept results later)."""
    import traceback

    text = "".join(traceback.format_exception(error))
    if folder is not None:
        try:
            (Path(folder) / "error.txt").write_text(text)
        except OSError:
            pass
    if server_refuses(uri) is not None:
        return
    for step in (lambda: client.set_tag(run_id, "lw.error",
                                        f"{type(error).__name__}: {error}"[:5000]),
                 lambda: client.set_terminated(run_id, "FAILED"),
                 lambda: client.log_text(run_id, text, "error.txt")):
        try:
            step()
        except Exception:  # noqa: BLE001 - the next step may still get through
            pass
