"""``--address local``: train shard jobs without Ray, in this process or in one pinned child.

torch, MKL and oneDNN read their kernel-level switches once per process, so a process
that did not start with ``resources.cpu_isa``'s pins cannot train in that domain. Then
the jobs go to one child Python process started with the pins, which trains them one
after another and streams each stage back over a pipe (length-prefixed pickles between
two processes of this package). A process that did start pinned, or a ``native``
config, trains in place, as fast as before. The child (a torch import: seconds) is
started once per process and settings and kept for later calls (:func:`shared`), so a
notebook that fits, deletes and verifies pays for it once.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Iterator
from typing import IO, Any

from sisa.config.settings import SisaConfig
from sisa.errors import SisaError, TrainingError
from sisa.train import domain as domains
from sisa.train import priority
from sisa.train.jobs import ShardJob, StageResult
from sisa.train.trainer import train_shard

__all__ = ["LocalRunner", "close_all", "cpu_domain", "materialise", "pool", "shared", "warm_children"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">Q")


def materialise(job: ShardJob) -> ShardJob:
    """The job with every slice loaded, so it can be pickled to another process."""
    import dataclasses

    return dataclasses.replace(job, slices=tuple(job.slices[r] for r in range(len(job.slices))))


def _send(stream: IO[bytes], message: Any) -> None:
    blob = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(blob)))
    stream.write(blob)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    blob = stream.read(size)
    if len(blob) < size:
        raise EOFError
    return pickle.loads(blob)  # noqa: S301 - our own child process, over a private pipe


class LocalRunner:
    """Runs jobs in this process when it is in the pinned domain, else in one pinned child.

    Args:
        cpu_isa: ``resources.cpu_isa`` of the jobs.
        threads: ``resources.threads_per_shard``.
        device: ``cpu`` or ``cuda``.
        child: Train in a child process even when this process could train in place.
    """

    def __init__(self, cpu_isa: str, threads: int, device: str, *, child: bool = False) -> None:
        self.cpu_isa = cpu_isa
        self.threads = threads
        self.device = device
        # child=True: always a child process, also when this one is pinned (one of parallel_runner's slots).
        self.in_process = not child and domains.pinned_from_start(cpu_isa, device)
        self._child: subprocess.Popen[bytes] | None = None
        self._nice: int | None = None  # the niceness setting the child runs at (sisa.train.priority)
        self._domain: domains.Domain | None = None

    def __enter__(self) -> LocalRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the child now, if this runner uses one (it then imports torch while others do too)."""
        if not self.in_process:
            self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        if self._child is None:
            env = {**os.environ, **domains.pin_env(self.cpu_isa, self.device)}
            log.info("local training in a child process pinned to cpu_isa=%s", self.cpu_isa)
            self._child = subprocess.Popen(
                [sys.executable, "-m", "sisa.train.local_runner"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
            # Before it imports torch (seconds away): every thread it starts inherits the niceness.
            self._nice = priority.training_nice()
            if self._nice:
                priority.renice(self._child.pid, self._nice)
                log.info("training child %d runs niced (setting %d)", self._child.pid, self._nice)
        return self._child

    def _renice(self) -> None:
        """Apply the current :func:`sisa.train.priority.training_nice` to a running child before a job.

        Raising a niceness is always allowed; lowering it is not (unprivileged), so a child that
        must run at a higher priority than it does is replaced by a fresh one.
        """
        nice = priority.training_nice()
        if self._child is None or nice == self._nice:
            return
        if priority.renice(self._child.pid, nice):
            self._nice = nice
        else:
            self.close()

    def _call(self, message: Any) -> Iterator[Any]:
        self._renice()
        child = self._start()
        assert child.stdin is not None and child.stdout is not None
        answered = False
        try:
            _send(child.stdin, message)
            while True:
                kind, payload = _receive(child.stdout)
                if kind == "error":
                    answered = True
                    raise payload
                if kind == "done":
                    answered = True
                    return
                yield payload
        except (EOFError, BrokenPipeError) as exc:
            code = child.poll()
            raise TrainingError(
                f"the local training process (pinned to cpu_isa={self.cpu_isa}) died (exit code {code}); "
                "its stderr above says why. Re-run the command: committed stages are kept"
            ) from exc
        finally:
            if not answered:
                # Abandoned mid-answer (a commit that raised, Ctrl-C, a dead child): the rest of the
                # answer would be read by the next call, so this child is done for.
                self.close(kill=True)

    @property
    def warm(self) -> bool:
        """Whether training costs no process start: in place, or its child is up."""
        return self.in_process or (self._child is not None and self._child.poll() is None)

    @property
    def pid(self) -> int | None:
        """The child's pid, if one is running."""
        return self._child.pid if self._child is not None else None

    @property
    def domain(self) -> domains.Domain:
        """The domain the jobs train in."""
        if self._domain is None:
            if self.in_process:
                self._domain = domains.current(self.threads, self.device)
            else:
                # Drain the whole answer (item, then done), or the next call would read its tail.
                (self._domain,) = list(self._call(("domain", self.threads, self.device)))
        return self._domain

    def call(self, module: str, name: str, *args: Any) -> Any:
        """``module.name(*args)`` in the jobs' domain: here when this process is pinned, else in the child.

        For work besides training whose bits must come out as a shard's would (the combiner's fit);
        ``module`` must be one of this package's, and the arguments and result must pickle.
        """
        if self.in_process:
            return _function(module, name)(*args)
        (out,) = list(self._call(("call", module, name, args)))  # drain the whole answer, as domain does
        return out

    def train(self, job: ShardJob) -> Iterator[StageResult]:
        """Train ``job``, yielding each stage as it finishes."""
        if self.in_process:
            yield from train_shard(job)
        else:
            yield from self._call(("train", materialise(job)))

    def close(self, *, kill: bool = False) -> None:
        """End the child process, if one was started.

        Args:
            kill: Kill it at once instead of letting it finish the job in hand.
        """
        child, self._child = self._child, None
        if child is None:
            return
        assert child.stdin is not None
        try:
            if kill:
                child.kill()
            child.stdin.close()  # EOF: the child's loop ends
            child.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            child.kill()
            child.wait()


_runners: dict[tuple[str, int, str], LocalRunner] = {}
# Per settings, the child-process runners of parallel_runner, kept warm like the shared one.
_pools: dict[tuple[str, int, str], list[LocalRunner]] = {}


def shared(cpu_isa: str, threads: int, device: str) -> LocalRunner:
    """This process's runner for these settings, created on first use and closed at exit.

    Args:
        cpu_isa: ``resources.cpu_isa``.
        threads: ``resources.threads_per_shard``.
        device: ``cpu`` or ``cuda``.

    Returns:
        A runner whose child process (if it needs one) outlives the call.
    """
    key = (cpu_isa, threads, device)
    if key not in _runners:
        if not _runners and not _pools:
            atexit.register(close_all)
        _runners[key] = LocalRunner(cpu_isa, threads, device)
    return _runners[key]


def cpu_domain(cfg: SisaConfig) -> LocalRunner:
    """Where work besides the shards' stages must run to come out as a shard's would: the config's CPU domain.

    This process when it started pinned to ``resources.cpu_isa``, else the pinned child that
    ``--address local`` trains in (:func:`shared`): the core backbone's training and the stored
    combiner's fit then do not depend on how the driving process was started.
    """
    return shared(cfg.resources.cpu_isa, cfg.resources.threads_per_shard, "cpu")


def pool(cpu_isa: str, threads: int, device: str, size: int) -> list[LocalRunner]:
    """This process's ``size`` child-process runners for these settings (for side-by-side training).

    Created on first use and kept, like :func:`shared`'s, until exit; a later call for more
    slots adds runners, for fewer uses the first ``size``. Their children start when first used.

    Args:
        cpu_isa: ``resources.cpu_isa``.
        threads: ``resources.threads_per_shard``.
        device: ``cpu`` or ``cuda``.
        size: Slots wanted.

    Returns:
        ``size`` runners, each always training in its own child process.
    """
    key = (cpu_isa, threads, device)
    if not _runners and not _pools:
        atexit.register(close_all)
    runners = _pools.setdefault(key, [])
    while len(runners) < size:
        runners.append(LocalRunner(cpu_isa, threads, device, child=True))
    return runners[:size]


def warm_children(cpu_isa: str, threads: int, device: str) -> tuple[bool, int]:
    """Whether the shared runner trains at no start cost, and how many pool children are up."""
    key = (cpu_isa, threads, device)
    one = _runners.get(key)
    return (one is not None and one.warm), sum(r.warm for r in _pools.get(key, []))


def close_all() -> None:
    """End every shared and pooled runner's child process (also done at exit)."""
    for runner in [*_runners.values(), *(r for runners in _pools.values() for r in runners)]:
        runner.close()


def _function(module: str, name: str) -> Any:
    """A function of this package by module and name (imported by name: the modules it names import this one)."""
    if not module.startswith("sisa."):
        raise TrainingError(f"the training process runs this package's functions only, not {module}.{name}")
    return getattr(importlib.import_module(module), name)


def _serve(inbox: IO[bytes], outbox: IO[bytes]) -> None:
    """The child's loop: answer domain probes, train jobs and calls until the parent closes the pipe."""
    while True:
        try:
            message = _receive(inbox)
        except EOFError:
            return
        try:
            if message[0] == "domain":
                _send(outbox, ("item", domains.current(message[1], message[2])))
            elif message[0] == "call":
                _send(outbox, ("item", _function(message[1], message[2])(*message[3])))
            else:
                for result in train_shard(message[1]):
                    _send(outbox, ("item", result))
            _send(outbox, ("done", None))
        except BrokenPipeError:
            return
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent
            error = exc if isinstance(exc, SisaError) else TrainingError(f"{type(exc).__name__}: {exc}")
            _send(outbox, ("error", error))


if __name__ == "__main__":
    # Our protocol owns the real stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _serve(sys.stdin.buffer, out)
