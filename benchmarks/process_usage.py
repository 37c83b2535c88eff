"""Memory and CPU time of processes, as the benchmarks measure them (Linux: /proc).

Two ways, for two questions. ``dp_overhead.py`` asks what training adds to one process: it
resets the kernel's peak-RSS mark once the model is loaded and reads it after training.
``scale.py`` asks what a whole simulated federation takes: a thread samples the process tree
of the child that runs it (driver, Ray's GCS and raylet, the actors) every half second.
"""

from __future__ import annotations

import threading
import time

import numpy as np

SAMPLE_INTERVAL_S = 0.5
PSS_EVERY = 4  # PSS reads /proc/PID/smaps_rollup: every 4th tick (2 s), RSS every tick (0.5 s)


def status_kb(field: str) -> int:
    """A ``kB`` field of this process' /proc/self/status (VmRSS, VmHWM...)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark VmHWM (Linux >= 4.0), so that it then covers only what follows (training).

    ``ru_maxrss`` cannot be reset this way: it also keeps the mark of every thread that has
    exited, and loading (tokenising, reading weights) peaks well above training.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return status_kb("VmHWM") <= status_kb("VmRSS") + 1024


class TreeSampler:
    """Peak summed RSS (and PSS) of a process and all its descendants, and their CPU time so far, in a thread.

    CPU time is the contention-proof companion of wall time: on a shared machine the niced
    Ray actors wait for other people's processes, which lengthens rounds but not CPU seconds.
    """

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peak_rss = self.peak_pss = self.peak_root_rss = 0
        self.peak_processes = 0
        self.cpu_seen: dict[int, float] = {}  # per pid, its last CPU seconds: exited processes keep counting
        self.cpu_series: list[tuple[float, float]] = []  # (time, CPU seconds of the tree so far)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _tree(self) -> list:
        import psutil

        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _sample(self, with_pss: bool) -> None:
        import psutil

        rss = pss = 0
        procs = self._tree()
        for proc in procs:
            try:
                cpu = proc.cpu_times()
                self.cpu_seen[proc.pid] = cpu.user + cpu.system + cpu.children_user + cpu.children_system
                if with_pss:
                    info = proc.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
                else:
                    rss += proc.memory_info().rss
                if proc is self.root:
                    self.peak_root_rss = max(self.peak_root_rss, proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, len(procs))
        self.cpu_series.append((time.time(), sum(self.cpu_seen.values())))

    def _loop(self) -> None:
        tick = 0
        while not self._stop.is_set():
            self._sample(with_pss=tick % PSS_EVERY == 0)
            tick += 1
            self._stop.wait(SAMPLE_INTERVAL_S)

    def cpu_at(self, when: float) -> float:
        times, cpus = zip(*self.cpu_series, strict=True)
        return float(np.interp(when, times, cpus))

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
