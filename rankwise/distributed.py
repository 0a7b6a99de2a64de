"""Fan work out to Ray tasks (the optional ``rankwise[ray]`` extra): compare's candidates, a block's factorisations;
``ray`` is imported only when used."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any, TypeVar

from rankwise.progress import progress_bar

T = TypeVar("T")

INSTALL = "pip install 'rankwise[ray]'"
PROBE_TIMEOUT_S = 5.0  # a TCP connection to the head node's port before ray.init, which would retry for minutes
# Read by Ray's core when ``ray`` is first imported: how long one attempt to fetch the cluster id waits (Ray's default
# is 30 s, after two 5 s connection waits). Keeps a port that answers but is not Ray under 30 s.
CONNECT_ENV = {"RAY_py_gcs_connect_timeout_s": "15"}
# Read by ray.init when it joins a cluster: attempts at the GCS (Ray's default is 20, each as long as above).
ATTEMPTS_ENV = {"RAY_gcs_server_port_wait_time_s": "1"}
_ADDRESS = re.compile(r"(?:ray://)?(?P<host>\[[^\]]+\]|[^:/\s\[\]]+):(?P<port>\d{1,5})")


@contextmanager
def _env(values: Mapping[str, str]) -> Iterator[None]:
    """Set the environment variables the user has not set, for the duration of the block."""
    added = {name: value for name, value in values.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def import_ray(joining: bool = False) -> ModuleType:
    """Import ``ray`` (with short connection timeouts when ``joining`` a cluster), or explain how to install it."""
    try:
        with _env(CONNECT_ENV if joining and "ray" not in sys.modules else {}):
            import ray
    except ImportError:
        raise ValueError(f"--ray needs the 'ray' package: {INSTALL}") from None
    return ray


def check_reachable(address: str) -> None:
    """Open (and close) a TCP connection to the Ray head node at ``host:port`` (or ``ray://host:port``).

    Raises:
        ValueError: the address is malformed or nothing accepts connections there within ``PROBE_TIMEOUT_S``.
    """
    match = _ADDRESS.fullmatch(address)
    if match is None:
        raise ValueError(f"--ray must be 'local', 'auto' or HOST:PORT, got {address!r}")
    host, port = match["host"].strip("[]"), int(match["port"])
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise ValueError(f"cannot reach the Ray cluster at {address!r}: {err.strerror or err}") from None


@contextmanager
def ray_session(address: str) -> Iterator[None]:
    """Connect to Ray for the duration of the block; shut it down afterwards only if this call started it.

    A process already connected to Ray keeps that connection, whatever ``address`` says.

    Args:
        address: ``"local"`` starts a local instance using every CPU of this machine; ``"auto"`` joins the cluster
            that ``ray start`` started on this machine (or the one ``RAY_ADDRESS`` names); ``"host:port"`` (or
            ``"ray://host:port"`` for Ray Client) joins the cluster whose head node listens there.

    Raises:
        ValueError: ``ray`` is not installed, or the address is malformed or unreachable: at once where nothing
            listens, in about 26 s where something other than Ray does (about 41 s if ``ray`` was imported before
            this call, as Ray reads its connection timeouts at import).
    """
    joining = address != "local"
    ray = import_ray(joining)
    if ray.is_initialized():
        yield
        return
    if joining and address != "auto":
        check_reachable(address)
    try:
        with _env(ATTEMPTS_ENV if joining else {}):
            ray.init(address=address, include_dashboard=None if joining else False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, TimeoutError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot connect to the Ray cluster at {address!r}: {reason}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _run_task(fn: Callable[..., T], item: Any, **shared: Any) -> T:
    """Body of every task: torch on as many threads as the task has CPUs (one by default), then ``fn``."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))
    return fn(item, **shared)


def map_on_ray(fn: Callable[..., T], items: Sequence[Any], shared: Mapping[str, Any], *,
               description: str = "ray tasks", progress: bool = True) -> list[T]:
    """``[fn(item, **shared) for item in items]`` with one Ray task per item, results in the order of ``items``.

    Every value of ``shared`` is put into the object store once and read from there by every task. Each task asks for
    one CPU. Needs a connected Ray (:func:`ray_session`); ``fn`` must be importable on the workers.

    Raises:
        Exception: the first error a task raised, as itself (not wrapped by Ray); the other tasks are cancelled.
    """
    ray = import_ray()
    refs = {name: ray.put(value) for name, value in shared.items()}
    task = ray.remote(num_cpus=1)(_run_task)
    pending = [task.remote(fn, item, **refs) for item in items]
    waiting = list(pending)
    try:
        for _ in progress_bar(range(len(pending)), description, enabled=progress):
            ready, waiting = ray.wait(waiting, num_returns=1)
            ray.get(ready)  # fail at the first error, not after the slowest task
        return ray.get(pending)
    except ray.exceptions.RayTaskError as err:
        for ref in waiting:
            ray.cancel(ref)
        raise err.cause from None
