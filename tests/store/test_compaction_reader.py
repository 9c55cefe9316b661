"""Compaction while another process has the store open: no process may lose the data.

LMDB picks the current meta page by the parity of the txnid kept in ``lock.mdb``. A
compacted copy swapped in under that lock file, while a reader process keeps it open,
used to show an empty store to everyone (and the next commit wrote that emptiness over
the data) whenever the inherited txnid was even.
"""

import subprocess
import sys
from pathlib import Path

from sisa.store.database import Store

READER = """
import sys
from sisa.store.database import Store
store = Store.open(sys.argv[1], readonly=True)
for line in sys.stdin:
    with store.read() as txn:
        n = txn.stat(store.db("samples"))["entries"]
        fmt = txn.get(b"format", db=store.db("meta"))
    print(n, bytes(fmt).decode() if fmt is not None else None, flush=True)
"""


def test_compaction_under_a_reader_process_keeps_the_data(tmp_path: Path, env_python: dict) -> None:
    store = Store.create(tmp_path / "st", {"config": {}})
    count = 0

    def put(n: int) -> None:
        nonlocal count
        for _ in range(n):  # one write transaction each: moves the txnid parity
            key = count.to_bytes(8, "big")
            store.write(lambda txn, key=key: txn.put(key, b"x" * 100, db=store.db("samples")))
            count += 1

    put(3)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(tmp_path / "st")],
        env=env_python,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert reader.stdin is not None and reader.stdout is not None
    try:
        reader.stdin.write("check\n")
        reader.stdin.flush()
        assert reader.stdout.readline().split()[0] == "3"  # the reader holds lock.mdb open from now on
        # 1, 2, 1, 2 writes between compactions: the inherited txnid takes both parities.
        for writes in (1, 2, 1, 2):
            put(writes)
            store.compact()
            with store.read() as txn:
                assert txn.stat(store.db("samples"))["entries"] == count
            put(1)  # a commit after the swap must build on the data, not on an empty page
            with store.read() as txn:
                assert txn.stat(store.db("samples"))["entries"] == count
            reader.stdin.write("check\n")
            reader.stdin.flush()
            seen, fmt = reader.stdout.readline().split()
            assert int(seen) == count and fmt != "None"
    finally:
        reader.stdin.close()
        reader.wait(timeout=60)
    store.close()
    reopened = Store.open(tmp_path / "st", readonly=True)
    with reopened.read() as txn:
        assert txn.stat(reopened.db("samples"))["entries"] == count
    reopened.close()
