"""What the eval checks in its environment before any work: torchrun's variables, the process group's
rendezvous (which waits at most ``STM_DIST_TIMEOUT`` seconds, 60 by default) and a forced scan backend
(``STM_SCAN_BACKEND``). Each problem is one ``RunError`` line that names the fix.

A bad launch is refused before anything waits: ``WORLD_SIZE`` without the variables torchrun sets with it
(``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), ranks that contradict each other, or torchrun's variables
left over in a shell after torchrun has gone (torchrun's own store no longer answers at
``MASTER_ADDR:MASTER_PORT``). Only the rendezvous itself waits for the other ranks, and only that long;
once the group exists its collectives keep torch's default timeout, since ranks legitimately wait long
for each other there (rank 0 writing the results while the others wait).
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import time

import torch

from ..ops.backends import names as backend_names
from ..ssm import BackendUnavailable, resolve_backend
from .errors import RunError

__all__ = ["distributed_env", "local_rank", "wait_seconds", "join_group", "check_scan_backend", "DEFAULT_WAIT_S"]

DEFAULT_WAIT_S = 60.0
_ONE_PROCESS = "unset WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT to run as one process"


def _launch(world):
    return f"launch with torchrun --nproc_per_node {world} -m stm_fast.eval ..."


def _int(name, default=None):
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise RunError(f"environment variable {name}={value!r} is not an integer (torchrun sets it; unset it to run "
                       f"as one process)") from None


def _agent_store() -> bool:
    """Whether torchrun's agent hosts the rendezvous store (every rank is then its client)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def local_rank() -> int:
    """LOCAL_RANK (0 when unset), the rank's GPU under torchrun."""
    return _int("LOCAL_RANK", 0)


def wait_seconds() -> float:
    """How long the rendezvous waits for the other ranks: ``STM_DIST_TIMEOUT`` seconds, else 60."""
    value = os.environ.get("STM_DIST_TIMEOUT")
    if not value:
        return DEFAULT_WAIT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise RunError(f"STM_DIST_TIMEOUT={value!r} is not a positive number of seconds: set e.g. STM_DIST_TIMEOUT=300, "
                       f"or unset it to wait {DEFAULT_WAIT_S:g} s for the other ranks")
    return seconds


def _check_local(world, rank):
    local, local_world = local_rank(), _int("LOCAL_WORLD_SIZE", None)
    if local < 0 or local > rank or (local_world is not None and not local < local_world <= world):
        lw = "" if local_world is None else f"LOCAL_WORLD_SIZE={local_world}, "
        raise RunError(f"LOCAL_RANK={local}, {lw}RANK={rank} and WORLD_SIZE={world} contradict each other (need 0 <= "
                       f"LOCAL_RANK <= RANK and LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE), as if left over from "
                       f"another launch: {_launch(world)}, or {_ONE_PROCESS}")


def _reachable(addr, port, seconds) -> bool:
    """Whether something accepts a connection at addr:port within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((addr, port), timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def distributed_env() -> tuple[int, int]:
    """(WORLD_SIZE, RANK) of this process, checked before anything waits (see the module docstring)."""
    world, rank = _int("WORLD_SIZE", 1), _int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise RunError(f"WORLD_SIZE={world} and RANK={rank} do not describe a process group (need 0 <= RANK < "
                       f"WORLD_SIZE): {_launch('N')}, or {_ONE_PROCESS}")
    if world == 1:
        return 1, 0
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise RunError(f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not, "
                       f"so this process was not started by torchrun: {_launch(world)}, or unset WORLD_SIZE to run "
                       f"as one process")
    _check_local(world, rank)
    addr, port = os.environ["MASTER_ADDR"], _int("MASTER_PORT")
    if not 0 < port < 65536:
        raise RunError(f"MASTER_PORT={port} is not a TCP port (1..65535): {_launch(world)}, or {_ONE_PROCESS}")
    wait_seconds()
    if _agent_store() and not _reachable(addr, port, 2.0):
        raise RunError(f"WORLD_SIZE={world}, RANK={rank} and TORCHELASTIC_USE_AGENT_STORE=True say torchrun started this "
                       f"process, but no torchrun answers at MASTER_ADDR:MASTER_PORT={addr}:{port}: these variables are "
                       f"left over from an earlier torchrun: {_launch(world)}, or {_ONE_PROCESS} (and the "
                       f"TORCHELASTIC_* variables)")
    return world, rank


def join_group(world, backend):
    """Create the default process group of ``world`` ranks, waiting at most ``wait_seconds()`` for the others
    to arrive; a RunError line otherwise. Run ``distributed_env()`` first."""
    seconds, rank = wait_seconds(), _int("RANK")
    addr, port = os.environ["MASTER_ADDR"], _int("MASTER_PORT")
    try:
        # a client that cannot connect floods stderr from C++ on every retry: wait for the store quietly first
        if (rank != 0 or _agent_store()) and not _reachable(addr, port, seconds):
            raise TimeoutError(f"nothing accepted a connection at {addr}:{port} in {seconds:g} s")
        store, _, _ = next(torch.distributed.rendezvous("env://", timeout=datetime.timedelta(seconds=seconds)))
        torch.distributed.init_process_group(backend=backend, store=torch.distributed.PrefixStore("default_pg", store),
                                             rank=rank, world_size=world)
    except (RuntimeError, OSError, ValueError) as e:  # torch's DistError is a RuntimeError
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RunError(f"rank {rank} of {world} could not form the process group at {addr}:{port} within {seconds:g} s "
                       f"({detail}): start all {world} ranks together ({_launch(world)}), or {_ONE_PROCESS}; "
                       f"STM_DIST_TIMEOUT=SECONDS waits longer") from None


def check_scan_backend(device):
    """RunError unless ``STM_SCAN_BACKEND``, when set, names a scan backend that runs on ``device``."""
    name = os.environ.get("STM_SCAN_BACKEND")
    if not name:
        return
    if name not in backend_names():
        raise RunError(f"STM_SCAN_BACKEND={name!r} is not a scan backend: set one of {', '.join(backend_names())}, or "
                       f"unset it for the automatic choice")
    try:
        resolve_backend(name, device, torch.float32)
    except BackendUnavailable as e:
        why = str(e).split(". Use backend=")[0]
        raise RunError(f"STM_SCAN_BACKEND={name}: {why}: unset it for the automatic choice, or set "
                       f"STM_SCAN_BACKEND=torch (it runs everywhere)") from None
