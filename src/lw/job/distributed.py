"""One job over several processes: `torchrun --nproc_per_node N -m lw.run ...` or
`accelerate launch --num_processes N -m lw.run ...`.

Accelerate's PartialState forms the process group from the launcher's environment (nccl on
GPUs, one device per rank; gloo on CPUs). Every rank plans the same prompts from the job's
seed, takes its share (balanced by tokens), runs the forward pass on it, and the products are
gathered on rank 0, which alone measures and logs (nanoGPT's ``master_process``). Every step,
rank-0-only ones included, ends in an agreement (:func:`together`), so a failure on any rank
stops every rank with the failing rank named instead of waiting on a collective that will
never come, and the next job of a sweep starts in step on every rank.

Waiting policy: agreements (and the small objects of :func:`all_objects`) go over a gloo group
of their own whose timeout is ``LW_RANK_WAIT_HOURS`` (default 72 h), so idle ranks wait out
rank 0's measuring (MTEB, probes on a large N) and logging; the tensors of the gather keep the
30-minute ``TIMEOUT``, since by then every rank is ready. A rank that dies is seen at once
(gloo's sockets close, and torchrun / accelerate stop the other ranks).
"""

from __future__ import annotations

import atexit
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache

import torch

from lw.errors import LwError
from lw.job.extract import Extraction

# A collective that waits this long means a rank is gone without a word (killed): fail.
TIMEOUT = timedelta(minutes=30)
# An agreement waits this long for the slowest rank (rank 0 measuring alone): see the docstring.
WAIT_ENV = "LW_RANK_WAIT_HOURS"
# Test-only fault injection: "<rank>:<step>:<n>" raises on that rank in the n-th (1-based)
# agreement on <step> of this process (under -m: the n-th job that reaches it).
FAULT_ENV = "LW_TEST_FAULT"


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device | None = None   # this rank's device (None: extraction.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RankFailure(LwError):
    """A step failed on some rank; raised on every rank, naming the rank(s) and the error."""


@lru_cache(maxsize=1)
def current_ranks() -> Ranks:
    """This process's place in the launch: one process unless a launcher set WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    from accelerate import PartialState

    # cpu=True is how Accelerate forms a gloo group when there is no GPU
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=TIMEOUT)
    atexit.register(_leave)
    _agreement_group()  # every rank creates it here, at the same point (a collective)
    device = state.device if state.device.type == "cuda" else None
    return Ranks(state.process_index, state.num_processes, device)


@lru_cache(maxsize=1)
def _agreement_group():
    """The gloo group agreements go over, with the long wait (module docstring)."""
    import torch.distributed as dist

    try:
        hours = float(os.environ.get(WAIT_ENV, "72"))
    except ValueError:
        raise LwError(f"{WAIT_ENV}={os.environ[WAIT_ENV]!r}: must be a number of hours "
                      "(e.g. 72)") from None
    if not hours > 0:
        raise LwError(f"{WAIT_ENV}={hours}: must be > 0 hours")
    return dist.new_group(backend="gloo", timeout=timedelta(hours=hours))


def _leave() -> None:
    """Leave the process group on exit (gloo aborts a process that exits while in it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _comm_device(ranks: Ranks) -> torch.device:
    # nccl moves CUDA tensors only; gloo CPU tensors
    return ranks.device if ranks.device is not None else torch.device("cpu")


def all_objects(value, ranks: Ranks) -> list:
    """Every rank's ``value`` (small picklable objects), on every rank."""
    if ranks.world == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * ranks.world
    dist.all_gather_object(out, value, group=_agreement_group())
    return out


def from_main(value, ranks: Ranks):
    """Rank 0's ``value`` on every rank."""
    return all_objects(value if ranks.is_main else None, ranks)[0]


def agree(step: str, error: BaseException | None, ranks: Ranks) -> None:
    """Every rank says whether its part of ``step`` failed; if any did, every rank raises.

    One process: the error itself is re-raised unchanged."""
    if ranks.world == 1:
        if error is not None:
            raise error
        return
    if isinstance(error, RankFailure):  # an inner step's agreement: every rank holds it
        raise error
    if error is not None and not isinstance(error, LwError):
        traceback.print_exc(file=sys.stderr)  # the failing rank keeps its own traceback
    said = None if error is None else f"{type(error).__name__}: {error}"
    failed = [(rank, what) for rank, what in enumerate(all_objects(said, ranks)) if what]
    if failed:
        raise RankFailure("; ".join(f"rank {rank} of {ranks.world} failed in {step}: {what}"
                                    for rank, what in failed)) from error


@contextmanager
def together(step: str, ranks: Ranks) -> Iterator[None]:
    """Run the block on every rank, then :func:`agree` on how it went."""
    error = None
    try:
        _injected_fault(step, ranks)
        yield
    except Exception as caught:  # noqa: BLE001 - carried to every rank by agree
        error = caught
    agree(step, error, ranks)


_STEPS_SEEN: dict[str, int] = {}


def _injected_fault(step: str, ranks: Ranks) -> None:
    """Raise here if ``LW_TEST_FAULT`` names this rank, step and occurrence (tests only)."""
    _STEPS_SEEN[step] = _STEPS_SEEN.get(step, 0) + 1
    fault = os.environ.get(FAULT_ENV)
    if fault and fault == f"{ranks.rank}:{step}:{_STEPS_SEEN[step]}":
        raise RuntimeError(f"{FAULT_ENV}={fault}: injected failure")


def shard(lengths: list[int], world: int) -> list[list[int]]:
    """Prompt indices per rank, balanced by tokens: longest first, each to the rank with the
    fewest tokens so far (ties to the lower rank). Deterministic: every rank computes the
    same split. Each rank's indices ascend."""
    shares: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        shares[rank].append(i)
        load[rank] += lengths[i]
    return [sorted(share) for share in shares]


def gather_extraction(local: Extraction, shares: list[list[int]], n: int,
                      ranks: Ranks) -> Extraction | None:
    """Rank 0 gets the whole ``Extraction`` of ``n`` prompts (pooled vectors and per-prompt
    products; ``n_tokens`` is left to the caller, which has the plan) from every rank's share;
    other ranks get None. Rank 0 holds the full tensors plus one rank's share at a time,
    whatever the number of ranks."""
    if ranks.world == 1:
        return local
    import torch.distributed as dist

    shapes = all_objects({name: tuple(value.shape[1:])
                          for name, value in local.per_prompt.items()}, ranks)
    names = sorted(set().union(*shapes))  # a rank with no prompt has no product at all
    device = _comm_device(ranks)
    with together("making room for the gathered products", ranks):  # before any rank sends
        if ranks.is_main:
            pooled = torch.empty((n, *local.pooled.shape[1:]), dtype=local.pooled.dtype)
            per_prompt = {}
            for name in names:
                width = [max(dims) for dims in zip(*(shape[name] for shape in shapes
                                                       if name in shape), strict=True)]
                fill = float("nan") if len(width) == 1 else 0.0  # (L+1,) values; (L+1, m) spectra
                per_prompt[name] = torch.full((n, *width), fill, dtype=torch.float64)
    if not ranks.is_main:
        if shares[ranks.rank]:
            mine = [local.per_prompt[name] for name in sorted(shapes[ranks.rank])]
            for tensor in [local.pooled, *mine]:
                dist.send(tensor.contiguous().to(device), dst=0)
        return None
    pooled[shares[0]] = local.pooled
    for name in names:
        if name in local.per_prompt:
            per_prompt[name][shares[0]] = _widen(local.per_prompt[name],
                                                 list(per_prompt[name].shape[1:]))
    for rank in range(1, ranks.world):
        if not shares[rank]:
            continue
        part = torch.empty((len(shares[rank]), *local.pooled.shape[1:]),
                           dtype=local.pooled.dtype, device=device)
        dist.recv(part, src=rank)
        pooled[shares[rank]] = part.cpu()
        for name in sorted(shapes[rank]):
            part = torch.empty((len(shares[rank]), *shapes[rank][name]), dtype=torch.float64,
                               device=device)
            dist.recv(part, src=rank)
            per_prompt[name][shares[rank]] = _widen(part.cpu(), list(per_prompt[name].shape[1:]))
    # Prompt lengths are the plan's, known to every rank: not sent.
    return Extraction(pooled=pooled, per_prompt=per_prompt, n_tokens=None)


def _widen(tensor: torch.Tensor, width: list[int]) -> torch.Tensor:
    """Zero-pad the trailing dims of ``(n, *dims)`` up to ``width`` (spectra of other ranks'
    longer prompts are wider; zeros are not eigenvalues any metric counts)."""
    pad = []
    for have, want in zip(reversed(tensor.shape[1:]), reversed(width), strict=True):
        pad += [0, want - have]
    return torch.nn.functional.pad(tensor, pad) if any(pad) else tensor


def shared_now(pattern: str) -> str:
    """``datetime.now()`` formatted with ``pattern``, the same on every rank (rank 0's clock):
    Hydra's ``${now:...}`` is evaluated per process, so two ranks started a second apart
    would write to two sweep folders. Registered as the ``lw_now`` resolver."""
    return _launch_time().strftime(pattern)


@lru_cache(maxsize=1)
def _launch_time() -> datetime:
    return from_main(datetime.now(), current_ranks())
