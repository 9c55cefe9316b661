"""Fault injection: SIGKILL loops during training and deletion, a full disk, tampered bytes.

The kill loops run a real child process (forked from a server that imported sisa and torch
once; it trains in its own local training process) and SIGKILL it at seeded random moments or
at chosen phases; the store must come back consistent, finish the work on the next open, and
end bit-identical to an uninterrupted run. They are marked ``faults`` (``pytest -m faults``
runs only them; the README test command runs everything).
"""

import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray

from sisa.ensemble import Ensemble
from sisa.errors import IntegrityError
from tests.conftest import (
    blobs,
    files_containing,
    live_state,
    plaintexts,
    sample_evidence,
    small_config,
    store_digest,
)

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.faults]

KILLS = 20


@pytest.fixture(scope="module")
def ray_address(ray_session: None) -> str:
    """The test session's Ray, which the child drivers join (saves a Ray start per trial)."""
    return ray.get_runtime_context().gcs_address


def assert_consistent(path: Path) -> None:
    """Readable, every committed stage present from 1 up, every checkpoint's bytes intact."""
    with Ensemble.open(path, readonly=True) as ens:
        status = ens.status()
        with ens.store.read() as txn:
            for shard in range(ens.config.shards):
                records = ens.store.stage_records(txn, shard)
                assert [r["stage"] for r in records] == list(range(1, len(records) + 1)), records
                for r in records:
                    ens.store.checkpoint(txn, r)  # raises IntegrityError on altered bytes
                live = ens.store.live(txn).get(shard)
                if live is not None:
                    assert live["key"] == records[-1]["key"] and len(records) == ens.config.slices
        assert status["samples"] > 0


# Every kill-loop child is forked from one Python that imported sisa and torch once: a fresh
# interpreter paid those imports (2-4 s on a loaded 2-core machine) on each of the loops' ~45
# runs, before it touched the store, so a kill timed from its start mostly landed in them. A
# forked child is still a process of its own, SIGKILLed as before; it imports nothing new, opens
# and recovers the store itself, and its local trainer is a fresh process as before. The server
# only imports (it runs no torch op, so no OpenMP pool exists yet when it forks).
FORK_SERVER = """
import atexit, json, os, sys, threading, traceback
import torch  # noqa: F401
import sisa.ensemble, sisa.store.environment, sisa.store.keyring, sisa.train.local_runner, sisa.train.planner
import sisa.unlearn.deletion


def child(code, args, output):
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)  # the server's stdout is its protocol: the child writes only to its own file
    os.dup2(fd, 2)
    os.close(fd)
    sys.argv = ["-c", *args]
    status = 0
    try:
        exec(compile(code, "<child>", "exec"), {"__name__": "__main__"})
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        traceback.print_exc()
        status = 1
    # What an interpreter does at exit: wait for non-daemon threads (a phase's timer), run atexit.
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


print("ready", flush=True)
for line in sys.stdin:  # one child at a time: its pid, then its exit code (-9: SIGKILL), as Popen says
    code, args, output = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(code, args, output)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class ForkServer:
    """The FORK_SERVER process: :meth:`start` forks a child that runs ``code`` with ``args`` as argv."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0
        )
        self.folder = folder  # where each child's stdout and stderr go, one file per child
        self.started = 0
        self._buffer = b""
        assert self.line(300) == "ready", "the fork server did not start"

    def line(self, timeout: float | None) -> str | None:
        """The server's next line, or None if none came within ``timeout`` s (None: wait for it)."""
        assert self.proc.stdout is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        # Our own buffer over select(): a buffered reader could hold the next line where select cannot see it.
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            assert chunk, f"the fork server exited ({self.proc.wait()})"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def start(self, code: str, args: list[str]) -> "Forked":
        assert self.proc.stdin is not None
        self.started += 1
        output = self.folder / f"child-{self.started}.out"
        request = (json.dumps([code, args, str(output)]) + "\n").encode()
        assert self.proc.stdin.write(request) == len(request)
        pid = self.line(60)
        assert pid is not None, "the fork server did not fork"
        return Forked(self, int(pid), output)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # the server's loop ends
        try:
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


class Forked:
    """A child of the fork server, with the part of Popen's interface the kill loops use."""

    def __init__(self, server: ForkServer, pid: int, output: Path) -> None:
        self.server, self.pid, self.output = server, pid, output
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code (-9 when SIGKILLed); raises TimeoutExpired if it runs past ``timeout`` s."""
        if self.returncode is None:
            line = self.server.line(timeout)
            if line is None:
                raise subprocess.TimeoutExpired(f"forked child {self.pid}", timeout or 0)
            self.returncode = int(line)
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL it unless it has exited (the server reaps it only after it said so: no pid reuse)."""
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)

    def text(self) -> str:
        """What it wrote to stdout and stderr."""
        return self.output.read_text(errors="replace") if self.output.exists() else ""


@pytest.fixture
def fork_server(tmp_path: Path, env_python: dict[str, str]) -> Iterator[ForkServer]:
    server = ForkServer(env_python, tmp_path)
    yield server
    server.close()


def run_child(server: ForkServer, code: str, args: list[str], kill_after: float | None) -> int:
    """Run ``code`` in a forked child; SIGKILL it after ``kill_after`` s unless it exits first."""
    child = server.start(code, args)
    try:
        child.wait(timeout=kill_after if kill_after is not None else 300)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(timeout=60)
    if child.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"child failed ({child.returncode}): {child.text()}")
    return child.wait()


# Children train with address="local" (in their own process, no Ray): a Ray driver per trial
# would pay a Ray connection and fresh worker processes every time. The references are trained
# on the session's Ray, so every comparison below also shows that both paths give the same bytes.
CHILD_FIT = """
import os, sys
from sisa.ensemble import Ensemble
log = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
with Ensemble.open(sys.argv[1], address="local") as ens:
    os.write(log, b"fit\\n")  # opened, recovered, about to train
    # one unbuffered line per committed stage: a SIGKILL loses none that was written
    ens.fit(lambda r: os.write(log, f"{r.shard} {r.stage}\\n".encode()))
"""


def run_fit_child(server: ForkServer, work: Path, log: Path, kill: tuple[str, int, float] | None) -> int:
    """Run CHILD_FIT in a forked child and SIGKILL it on a clock, unless it exits first.

    ``kill`` is (clock, lines, delay): SIGKILL ``delay`` s after the child starts
    (``process``), or after its log holds ``lines`` lines (``log``: 1 is "about to fit",
    each further line a committed stage).
    """
    log.unlink(missing_ok=True)
    child = server.start(CHILD_FIT, [str(work), str(log)])
    try:
        if kill is not None:
            clock, lines, delay = kill
            deadline = time.monotonic() + 120
            while clock == "log" and child.poll() is None:
                if log.exists() and log.read_bytes().count(b"\n") >= lines:
                    break
                assert time.monotonic() < deadline, f"the child never wrote {lines} log lines"
                time.sleep(0.002)
            try:
                child.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                child.kill()
        child.wait(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"child failed ({child.returncode}): {child.text()}")
    return child.wait()


def committed_stages(path: Path) -> dict[int, int]:
    """Shard -> how many of its stages are committed."""
    with Ensemble.open(path, readonly=True) as ens, ens.store.read() as txn:
        return {s: len(ens.store.stage_records(txn, s)) for s in range(ens.config.shards)}


@pytest.mark.faults
def test_training_survives_20_random_kills(tmp_path: Path, ray_address: str, fork_server: ForkServer) -> None:
    x, y = blobs(2000, d=16)
    shards, slices = 2, 4
    cfg = small_config(f"shards={shards}", f"slices={slices}", "train.epochs=12", "model.hidden=[32]")
    template = tmp_path / "template"
    with Ensemble.create(template, cfg) as ens:
        ens.ingest(x, y)
    shutil.copytree(template, tmp_path / "ref")
    with Ensemble.open(tmp_path / "ref") as ref:
        started = time.perf_counter()
        ref.fit()
        fit_seconds = time.perf_counter() - started
        expected = live_state(ref)

    rng = random.Random(20261126)
    work, log = tmp_path / "work", tmp_path / "stages.log"
    kills = completions = 0
    inside: list[int] = []  # stages committed at each kill that landed strictly inside training
    while kills < KILLS or not completions:
        if not work.exists():
            shutil.copytree(template, work)
        before = committed_stages(work)
        kill: tuple[str, int, float] | None = None
        remaining = shards * slices - sum(before.values())
        if kills < KILLS and remaining > 1:
            # Three kills in four land a random moment after a random stage this run commits, with
            # stages still to train: strictly inside training. The others are timed from the start
            # of fitting (the local trainer's start-up, the first stage) or of the (forked) process
            # (the open and recovery of the last kill's store, the fit's start). A store with one
            # stage left trains to the end (and the next cycle starts from the template).
            if kills % 4 != 3:
                kill = ("log", 1 + rng.randint(1, remaining - 1), rng.uniform(0.0, 0.05))
            elif kills % 8 == 3:
                kill = ("log", 1, rng.uniform(0.0, 1.3 * fit_seconds))
            else:
                kill = ("process", 0, rng.uniform(0.0, 2.5))
        code = run_fit_child(fork_server, work, log, kill)
        assert_consistent(work)
        after = committed_stages(work)
        lines = log.read_text().splitlines() if log.exists() else []
        trained: dict[int, list[int]] = {s: [] for s in range(shards)}
        for line in lines[1:]:
            shard, stage = map(int, line.split())
            trained[shard].append(stage)
        for s in range(shards):
            # This run trained only the stages after those committed before it, each once, in
            # order (not from scratch); a kill may fall between a commit and its progress line.
            assert trained[s] == list(range(before[s] + 1, before[s] + 1 + len(trained[s]))), (s, before, trained)
            if code == 0:
                assert trained[s] == list(range(before[s] + 1, slices + 1)) and after[s] == slices, (s, trained)
            else:
                assert after[s] - before[s] - len(trained[s]) in (0, 1), (s, before, after, trained)
        if code == 0:
            with Ensemble.open(work, readonly=True) as ens:
                assert live_state(ens) == expected  # bit-identical to the uninterrupted run
            completions += 1
            shutil.rmtree(work)
        else:
            kills += 1
            total = sum(after.values())
            if len(lines) > 1 and total < shards * slices:  # this run committed a stage; others remain
                inside.append(total)
    assert kills == KILLS and completions >= 1
    # Half the kills or more landed strictly inside training: after this run committed a stage,
    # with stages left to train (and the next run trained only those, as checked above).
    assert len(inside) >= KILLS // 2, inside


CHILD_DELETE = """
import os, signal, sys, threading
import sisa.store.environment, sisa.store.keyring, sisa.unlearn.deletion
from sisa.ensemble import Ensemble
from sisa.train.planner import Planner

path, address, phase, arg = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
victims = [int(v) for v in sys.argv[5].split(",")]

def die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

stages = []
def progress(_result):
    stages.append(1)
    if phase == "retrain" and len(stages) > arg:
        die()

if phase == "timer":
    threading.Timer(arg, die).start()
elif phase == "accepted":  # the request is durable; nothing erased yet (no new key, old keys on disk)
    sisa.unlearn.deletion.erase = die
elif phase == "rotate":  # re-keyed: samples re-encrypted under the new key, the old key not yet deleted
    sisa.store.keyring.KeyRing.drop_keys = die
elif phase == "dropped":  # old keys deleted from keys/, still in its free pages: the key file not compacted
    sisa.store.keyring.KeyRing.compact = die
elif phase == "compact-copy":  # keys re-keyed; the compacted copy of keys/ is written but not swapped in
    real_fsync = sisa.store.environment.fsync_path
    def fsync_then_die(p):
        real_fsync(p)
        if p.name == "data.mdb":
            die()
    sisa.store.environment.fsync_path = fsync_then_die
elif phase == "compact-swap":  # the copy replaced keys/data.mdb; directory not fsync'd, copy dir not removed
    real_replace = os.replace
    def replace_then_die(a, b):
        real_replace(a, b)
        die()
    os.replace = replace_then_die
elif phase == "unrecorded":  # the key file compacted; the journal does not say the request is erased
    sisa.unlearn.deletion.mark_erased = die
elif phase == "erased":  # erased and recorded; the retrain has not started
    Planner.fit = die
elif phase == "sweep":  # retrained; the retired checkpoints' keys deleted, the key file not compacted again
    real_compact = sisa.store.keyring.KeyRing.compact
    calls = []
    def second_compact_dies(self):
        calls.append(1)
        if len(calls) > 1:
            die()
        return real_compact(self)
    sisa.store.keyring.KeyRing.compact = second_compact_dies
elif phase == "certify":  # retrained and swept; the certificate is not written
    sisa.unlearn.deletion.append_entry = die
ens = Ensemble.open(path, address="local")
ens.delete(victims, progress=progress)
"""
# In the order a deletion goes through them: accepted (journaled) .. erased before any retrain, then
# the retrain, the sweep of retired checkpoints' keys and the certificate; the timer kills anywhere.
PHASES = (
    "accepted", "rotate", "dropped", "compact-copy", "compact-swap", "unrecorded", "erased", "retrain", "sweep",
    "certify", "timer",
)  # fmt: skip
ERASED_BEFORE_RETRAIN = ("erased", "retrain", "sweep", "certify")  # killed after delete's erasure finished
# The phases whose kill point is drawn at random (a stage count, a time) get a second trial with
# another draw; every other phase kills at one fixed point, which a second trial would only repeat.
RANDOM_PHASES = ("retrain", "timer")


@pytest.mark.faults
def test_deletion_survives_kills_at_every_phase(tmp_path: Path, ray_address: str, fork_server: ForkServer) -> None:
    x, y = blobs(1500, d=10)
    # 4 epochs: every check below is exact (same weights digests as the reference deletion, no
    # key or plaintext on any file), whatever the epochs; the kill points count stages, not time.
    cfg = small_config("shards=3", "slices=4", "train.epochs=4")
    template = tmp_path / "template"
    with Ensemble.create(template, cfg) as ens:
        ens.ingest(x, y)
        ens.fit()
        ens.delete([5])  # an earlier request, which must survive every crash below
        with ens.store.read() as txn:
            # Victims in the first slice of shards 0 and 1: both retrain all four stages.
            victims = [int(ens.store.slice_ids(txn, s, 0)[1]) for s in (0, 1)]
        # the keys that decrypt the victims' records: after any crash and the next open, on no file
        needles = [k for v in victims for k in sample_evidence(ens, v)[1]]
    survivors = sorted(set(range(1500)) - {5, *victims})
    shutil.copytree(template, tmp_path / "ref")
    with Ensemble.open(tmp_path / "ref") as ref:
        started = time.perf_counter()
        ref.delete(victims)
        delete_seconds = time.perf_counter() - started
        expected = live_state(ref)
    needles += [form for v in victims for form in plaintexts(x[v])]

    rng = random.Random(5)
    seen_phases: dict[str, int] = {}
    schedule = [*PHASES, *RANDOM_PHASES]
    trials = len(schedule)
    for trial, phase in enumerate(schedule):
        arg = {"retrain": rng.randrange(0, 8), "timer": rng.uniform(1.5, 2.5 + 1.5 * delete_seconds)}.get(phase, 0)
        work = tmp_path / f"trial{trial}"
        shutil.copytree(template, work)
        code = run_child(
            fork_server, CHILD_DELETE, [str(work), ray_address, phase, str(arg), ",".join(map(str, victims))], None
        )
        seen_phases[phase] = seen_phases.get(phase, 0) + (code == -signal.SIGKILL)
        if phase in ERASED_BEFORE_RETRAIN:
            # Killed after the erasure, before or during the retrain and before any writable open: the
            # erasure came first, so the victims' keys and plaintext are on no file already.
            assert [files_containing(work, needle) for needle in needles] == [[]] * len(needles), phase
        assert_consistent(work)
        with Ensemble.open(work, readonly=True) as reader:
            with reader.store.read() as txn:
                journaled = not any(reader.store.has_sample(txn, v) for v in victims)
            if journaled:
                # In between: no shard that saw a victim serves a model that saw it. A shard
                # is either out of service or serves the clean retrain (bit-identical to ref).
                for shard, state in live_state(reader).items():
                    if shard in (0, 1):
                        assert state == expected[shard], (phase, shard)
                reader.predict_proba(x[:8])
            else:  # killed before the request was durable: it was never acknowledged
                assert code == -signal.SIGKILL and phase == "timer"
        with Ensemble.open(work, address=ray_address) as ens:  # opening for writing finishes it
            if not journaled:
                ens.delete(victims)  # the client retries an unacknowledged request
            assert ens.pending() == []
            # Same weights digests as the uninterrupted deletion: the check `verify` makes against a
            # replay; the replay itself runs once, on the last trial, to keep the loop short.
            assert live_state(ens) == expected
            if trial == trials - 1:
                assert ens.verify()["ok"]
            audit = ens.audit()
            assert audit.ok and audit.entries == 2, audit.problems
            with ens.store.read() as txn:
                assert all(ens.store.has_sample(txn, i) for i in survivors[::97])
                assert ens.store.count_samples(txn) == len(survivors)
        for needle in needles:
            assert files_containing(work, needle) == []
        assert not (work / ".compact").exists() and not (work / "keys" / ".compact").exists()
        shutil.rmtree(work)
    # Every phase was really interrupted at least once (a kill that came too late would not count).
    assert all(seen_phases[p] >= 1 for p in PHASES if p != "timer"), seen_phases


CHILD_FULL_DISK = """
import resource, signal, sys
import numpy as np
from sisa.ensemble import Ensemble
from sisa.errors import StoreFullError
limit = int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
rng = np.random.default_rng(0)
with Ensemble.open(sys.argv[1], resume=False) as ens:
    try:
        ens.ingest(rng.normal(size=(20000, 10)).astype("float32"), rng.integers(0, 3, 20000),
                   ids=np.arange(10**6, 10**6 + 20000))
    except StoreFullError as exc:
        print("STORE FULL:", exc)
        sys.exit(3)
print("ingested")
"""


def test_full_disk_fails_cleanly_and_leaves_the_store_consistent(tmp_path: Path, env_python: dict) -> None:
    x, y = blobs(600, d=10)
    with Ensemble.create(tmp_path / "st", small_config()) as ens:
        ens.ingest(x, y)
        ens.fit()
        before = live_state(ens)
    size = (tmp_path / "st" / "data.mdb").stat().st_size
    # The file may not grow by more than 64 KiB: the 20,000-sample ingest (~1 MB) cannot fit.
    child = subprocess.run(
        [sys.executable, "-c", CHILD_FULL_DISK, str(tmp_path / "st"), str(size + 65536)],
        env=env_python,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 3, child.stdout + child.stderr
    # The documented message (the child prints "STORE FULL:" itself, so only the error's own words count).
    documented = "the disk is full, over quota or failing; nothing of the change was written (the store is as before)"
    assert re.search(
        r"^STORE FULL: store \S+: the write failed \(.+\): " + re.escape(documented), child.stdout, re.M
    ), child.stdout
    assert_consistent(tmp_path / "st")
    with Ensemble.open(tmp_path / "st") as ens:
        assert ens.status()["samples"] == 600  # the failed ingest wrote nothing
        assert live_state(ens) == before
        assert ens.verify()["ok"]
        ens.ingest(x[:10] + 1, y[:10], ids=np.arange(5000, 5010))  # and it still takes writes
        assert ens.status()["samples"] == 610


def flip_byte_in_file(path: Path, needle: bytes, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0, "needle not found in the file"
    data[at + offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_sample_record_names_shard_and_slice(tmp_path: Path) -> None:
    x, y = blobs(600, d=10)
    with Ensemble.create(tmp_path / "st", small_config()) as ens:
        ens.ingest(x, y)
        with ens.store.read() as txn:
            victim = int(ens.store.slice_ids(txn, 2, 1)[3])
            sealed = ens.store.sealed_sample(txn, victim)
    assert sealed is not None
    flip_byte_in_file(tmp_path / "st" / "data.mdb", sealed, offset=5)
    with Ensemble.open(tmp_path / "st") as ens, pytest.raises(IntegrityError) as err:
        ens.fit()
    assert f"sample {victim} (shard 2 slice 1)" in str(err.value) and "was modified" in str(err.value)


def test_flipped_byte_in_a_checkpoint_names_shard_and_stage(tmp_path: Path) -> None:
    x, y = blobs(600, d=10)
    with Ensemble.create(tmp_path / "st", small_config()) as ens:
        ens.ingest(x, y)
        ens.fit()
        with ens.store.read() as txn:
            record = ens.store.stage_record(txn, 1, 3)
            blob = ens.store.sealed_checkpoint(txn, record)
    assert blob is not None
    # Flip a byte in the middle of the checkpoint's (encrypted) bytes inside data.mdb (the weights).
    flip_byte_in_file(tmp_path / "st" / "data.mdb", blob[len(blob) // 2 : len(blob) // 2 + 64])
    with Ensemble.open(tmp_path / "st", readonly=True) as ens, pytest.raises(IntegrityError) as err:
        ens.predict(x[:4])
    assert "checkpoint of shard 1 stage 3" in str(err.value) and "was modified" in str(err.value)


READER = """
import json, sys, time
from pathlib import Path
import numpy as np
from sisa.ensemble import Ensemble
path, out, stop = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
x = np.load(sys.argv[4])
with Ensemble.open(path, readonly=True) as ens, out.open("w") as f:
    while not stop.exists():
        started = time.time()
        ens.predict_proba(x)
        used = {str(s): key for s, key in ens.provenance().items()}  # the snapshot just used
        samples = ens.status()["samples"]
        f.write(json.dumps({"t": started, "used": used, "samples": samples}) + "\\n")
        f.flush()
"""


def test_readers_during_a_deletion_see_old_or_new_never_a_mix(tmp_path: Path, env_python: dict) -> None:
    x, y = blobs(3000, d=10)
    with Ensemble.create(tmp_path / "st", small_config("shards=3", "slices=4", "train.epochs=12")) as ens:
        ens.ingest(x, y)
        ens.fit()
        with ens.store.read() as txn:
            victims = [int(ens.store.slice_ids(txn, s, 0)[2]) for s in (0, 1)]
            before = {str(s): r["key"] for s, r in ens.store.live(txn).items()}
    np.save(tmp_path / "x.npy", x[:64])
    out, stop = tmp_path / "reads.jsonl", tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(tmp_path / "st"), str(out), str(stop), str(tmp_path / "x.npy")],
        env=env_python,
    )
    try:
        deadline = time.time() + 60
        while (not out.exists() or out.stat().st_size == 0) and time.time() < deadline:
            time.sleep(0.1)  # the reader is serving before the deletion starts
        with Ensemble.open(tmp_path / "st") as ens:
            ens.delete(victims)
            acked = time.time()
            with ens.store.read() as txn:
                after = {str(s): r["key"] for s, r in ens.store.live(txn).items()}
        time.sleep(1.0)
    finally:
        stop.touch()
        reader.wait(timeout=60)
    assert reader.returncode == 0
    reads = [json.loads(line) for line in out.read_text().splitlines()]
    affected, others = {"0", "1"}, {"2"}
    assert any(r["used"] == before for r in reads) and any(r["used"] == after for r in reads)
    for r in reads:
        used = r["used"]
        assert all(used[s] == before[s] for s in others)  # untouched shards never change
        old = {s for s in affected if used.get(s) == before[s]}
        # The journal retires every affected shard in one transaction: all old or none.
        assert old in (set(), affected), r
        if not old:
            assert all(used.get(s) in (None, after[s]) for s in affected), r
            assert r["samples"] == 2998
        if r["t"] > acked:
            assert used == after
    # Once a read saw the deletion, no later read went back to a model that saw the ids.
    first_new = next(i for i, r in enumerate(reads) if not {s for s in affected if r["used"].get(s) == before[s]})
    assert all(r["used"].get("0") != before["0"] for r in reads[first_new:])


CHILD_COMPACT_FULL = """
import resource, signal, sys
from sisa.ensemble import Ensemble
from sisa.errors import StoreFullError
with Ensemble.open(sys.argv[1], resume=False) as ens:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # the compacted copy cannot be written
    try:
        ens.store.compact()
    except StoreFullError as exc:
        print("STORE FULL:", exc)
        sys.exit(3)
"""


def test_compaction_that_cannot_write_its_copy_leaves_the_store_as_it_was(tmp_path: Path, env_python: dict) -> None:
    x, y = blobs(600, d=10)
    with Ensemble.create(tmp_path / "st", small_config()) as ens:
        ens.ingest(x, y)
        ens.fit()
        before = live_state(ens)
    digest = store_digest(tmp_path / "st")
    child = subprocess.run(
        [sys.executable, "-c", CHILD_COMPACT_FULL, str(tmp_path / "st")],
        env=env_python,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 3, child.stdout + child.stderr
    assert "compaction could not write its copy" in child.stdout and "sisa resume" in child.stdout
    assert store_digest(tmp_path / "st") == digest  # data.mdb untouched, no .compact left
    assert not (tmp_path / "st" / ".compact").exists()
    with Ensemble.open(tmp_path / "st") as ens:
        assert live_state(ens) == before and ens.delete([3])["state"] == "applied"


CHILD_DELETE_KEYS_FULL = """
import resource, shutil, signal, sys
import sisa.store.keyring
from sisa.ensemble import Ensemble
from sisa.errors import StoreFullError
path, snapshot, victim = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_compact = sisa.store.keyring.KeyRing.compact

def compact_on_a_full_disk(self):
    # Journaled and re-keyed (before any retrain); the old key's bytes are in the key file's free pages. Keep
    # the file as it is now, then let no file grow past 4 KiB: the compacted copy cannot be written.
    shutil.copyfile(self.path / "data.mdb", snapshot)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    return real_compact(self)

sisa.store.keyring.KeyRing.compact = compact_on_a_full_disk
with Ensemble.open(path, address="local") as ens:
    try:
        ens.delete([victim])
    except StoreFullError as exc:
        print("STORE FULL:", exc)
        sys.exit(3)
print("deleted")
"""


def test_a_deletion_whose_key_file_cannot_be_compacted_stays_pending_until_resume(
    tmp_path: Path, env_python: dict
) -> None:
    x, y = blobs(600, d=10)
    store = tmp_path / "st"
    with Ensemble.create(store, small_config()) as ens:
        ens.ingest(x, y)
        ens.fit()
        with ens.store.read() as txn:
            victim = int(ens.store.slice_ids(txn, 1, 0)[2])
        _, old_keys = sample_evidence(ens, victim)  # what decrypts the victim's ciphertext
    reference = tmp_path / "ref"
    shutil.copytree(store, reference)
    with Ensemble.open(reference) as ref:
        ref.delete([victim])
        expected = live_state(ref)

    snapshot = tmp_path / "keys-at-compaction.mdb"
    child = subprocess.run(
        [sys.executable, "-c", CHILD_DELETE_KEYS_FULL, str(store), str(snapshot), str(victim)],
        env=env_python,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 3, child.stdout + child.stderr
    assert "compaction could not write its copy" in child.stdout and "sisa resume" in child.stdout, child.stdout
    # The failed compaction left the key file as it found it, and no partial copy.
    assert (store / "keys" / "data.mdb").read_bytes() == snapshot.read_bytes()
    assert not (store / "keys" / ".compact").exists()
    # The old key is still on disk, so the deletion must not be certified: it is pending.
    assert any(files_containing(store / "keys", k) for k in old_keys)
    with Ensemble.open(store, readonly=True) as reader:
        (waiting,) = reader.pending()
        assert waiting["deleted"] == 1 and not waiting["defer"]
        assert reader.certificates() == []
        with reader.store.read() as txn:
            assert not reader.store.has_sample(txn, victim)

    with Ensemble.open(store, resume=False) as ens:
        assert [r["request_id"] for r in ens.pending()] == [waiting["request_id"]]
        done = ens.resume()
        assert [c["request_id"] for c in done["applied"]] == [waiting["request_id"]]
        assert done["trained"] == {}  # apply retrained the shard; fit after it found nothing left
        assert ens.pending() == []
        assert live_state(ens) == expected
        audit = ens.audit()
        assert audit.ok and audit.entries == 1, audit.problems
    for key in old_keys:
        assert files_containing(store, key) == []


CHILD_APPLY_NO_COMPACT = """
import os, signal, sys
import sisa.store.keyring
from sisa.ensemble import Ensemble

def die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

# Retrained; the retired checkpoints' keys are deleted from keys/ but the key file is not compacted.
sisa.store.keyring.KeyRing.compact = die
with Ensemble.open(sys.argv[1], address="local") as ens:
    ens.apply()
"""


def test_a_key_dropped_just_before_a_crash_is_compacted_away_by_the_next_writable_open(
    tmp_path: Path, fork_server: ForkServer
) -> None:
    x, y = blobs(600, d=10)
    path = tmp_path / "st"
    with Ensemble.create(path, small_config("unlearn.policy=serve-stale"), address="local") as ens:
        ens.ingest(x, y)
        ens.fit()
        with ens.store.read() as txn:
            victim = int(ens.store.slice_ids(txn, 1, 0)[2])
        # Erased now; the stale model, which saw the victim, serves (and keeps its key) until the apply.
        ens.delete([victim], defer=True)
        tokens = ens.store.checkpoint_tokens()
        with ens.store.keys.read() as ktxn:
            keys = {t: ens.store.keys.checkpoint_key(ktxn, t) for t in tokens}
    assert run_child(fork_server, CHILD_APPLY_NO_COMPACT, [str(path)], None) == -signal.SIGKILL
    with Ensemble.open(path, readonly=True) as reader:
        retired = [k for t, k in keys.items() if k is not None and t not in reader.store.checkpoint_tokens()]
        assert reader.status()["key_compaction_pending"]
    assert retired  # the stale model's checkpoint at least
    # Deleted from the key table, but its bytes are still in a free page of keys/data.mdb.
    assert any(files_containing(path / "keys", k) for k in retired)
    with Ensemble.open(path, resume=False) as ens:  # a writable open that applies nothing
        assert not ens.status()["key_compaction_pending"]
        assert [r["request_id"] for r in ens.pending()] == [1]  # the deferred request is still pending
    assert all(files_containing(path, k) == [] for k in retired)
