"""Resident memory of processes, read from ``/proc`` (Linux): one reading, a process tree, a sampler thread.

``VmRSS`` is what a process holds in RAM now; ``VmHWM`` its peak since it started or since
:func:`reset_peak` (writing 5 to ``/proc/self/clear_refs``). A sampler polls the summed RSS of a set of
process trees every ``interval`` seconds and keeps the peak; it can miss a peak shorter than the interval,
so a process that can read its own ``VmHWM`` reports that instead.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

MiB = 1 << 20


def status_kib(pid: int | str, field: str) -> int | None:
    """The ``field`` line (e.g. ``VmRSS``) of ``/proc/<pid>/status`` in KiB; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return 0


def rss_bytes(pid: int | str = "self") -> int:
    return (status_kib(pid, "VmRSS") or 0) * 1024


def peak_bytes(pid: int | str = "self") -> int:
    return (status_kib(pid, "VmHWM") or 0) * 1024


def reset_peak() -> None:
    """Make this process's ``VmHWM`` restart from its current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (scanned from ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


class RssSampler:
    """Samples the summed RSS of ``roots`` and their descendants every ``interval`` s in a thread.

    The process list is rescanned every ``rescan`` seconds (ServerApps and workers start late).
    ``mark()`` records the current sum, e.g. the idle RSS before a run starts.
    """

    def __init__(self, roots: list[int], interval: float = 0.01, rescan: float = 0.25) -> None:
        self.roots = list(roots)
        self.interval = interval
        self.rescan = rescan
        self.peak = 0
        self.samples = 0
        self.names: dict[int, str] = {}
        self._pids: list[int] = list(roots)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def current(self) -> int:
        return sum(rss_bytes(pid) for pid in self._pids)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def reset(self) -> int:
        """Forget the peak; return the current sum (the baseline)."""
        self._rescan()
        value = self.current()
        self.peak = value
        return value

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak

    def _rescan(self) -> None:
        pids: list[int] = []
        for root in self.roots:
            pids.extend(descendants(root))
        self._pids = pids
        for pid in pids:
            if pid not in self.names:
                try:
                    self.names[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120].decode()
                except OSError:
                    pass

    def _run(self) -> None:
        next_scan = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_scan:
                self._rescan()
                next_scan = now + self.rescan
            value = self.current()
            self.samples += 1
            self.peak = max(self.peak, value)
            self._stop.wait(self.interval)


def idle_fraction(seconds: float = 1.0) -> float:
    """Fraction of all cores' time spent idle over ``seconds`` (``/proc/stat``: idle + iowait over total)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(total1 - total0, 1)


def wait_until_quiet(max_wait: float, threshold: float = 0.85) -> float:
    """Wait up to ``max_wait`` s until the cores are >= ``threshold`` idle; return the last idle fraction seen.

    Other work on a small machine (test suites) slows whichever side of a comparison runs beside it.
    """
    deadline = time.monotonic() + max_wait
    idle = idle_fraction()
    while idle < threshold and time.monotonic() < deadline:
        idle = idle_fraction(2.0)
    return idle
