"""What a peer's handler calls, and what the measuring process reads back, across processes.

Every worker process (forked from the measuring process, so it inherits FOLDER) keeps one 24-byte
file <FOLDER>/c.<pid>, mmap'ed: the time_ns of its first handler call, of its last one, and how
many calls it has made. Updating it is a memory write (no system call), so the no-op handler stays
close to no-op. In the latency workload the handler also appends "<i> <latency ns>" to
<FOLDER>/lat.<pid> (O_APPEND, one write per item), as bench/latency.py does.
"""

from __future__ import annotations

import glob
import mmap
import os
import struct
import time

FOLDER: str | None = None
_SLOT = struct.Struct("qqq")  # first_ns, last_ns, count
_state: dict = {}


def hit(t: int | None = None, i: int | None = None) -> None:
    """One handler call; with t (the submitter's time_ns) also records the latency of item i."""
    now = time.time_ns()
    st = _state.get(os.getpid())
    if st is None:
        fd = os.open(os.path.join(FOLDER, f"c.{os.getpid()}"), os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, _SLOT.size)
        st = _state[os.getpid()] = {"mm": mmap.mmap(fd, _SLOT.size), "first": now, "n": 0, "lat": None}
        os.close(fd)
    st["n"] += 1
    _SLOT.pack_into(st["mm"], 0, st["first"], now, st["n"])
    if t is not None:
        if st["lat"] is None:
            st["lat"] = os.open(os.path.join(FOLDER, f"lat.{os.getpid()}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(st["lat"], b"%d %d\n" % (i, now - t))


def counters(folder: str) -> tuple[int, int | None, int | None]:
    """(calls so far over all processes, earliest first call ns, latest call ns)."""
    total, first, last = 0, None, None
    for path in glob.glob(os.path.join(folder, "c.*")):
        with open(path, "rb") as f:
            data = f.read(_SLOT.size)
        if len(data) < _SLOT.size:
            continue
        a, b, n = _SLOT.unpack(data)
        if n:
            total += n
            first = a if first is None else min(first, a)
            last = b if last is None else max(last, b)
    return total, first, last


def latencies(folder: str) -> dict[int, int]:
    """{item number: latency ns} from every process's file."""
    out: dict[int, int] = {}
    for path in glob.glob(os.path.join(folder, "lat.*")):
        with open(path, "rb") as f:
            xs = f.read().split()
        out.update(zip(map(int, xs[0::2]), map(int, xs[1::2])))
    return out


def wait_for(predicate, timeout: float, interval: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
