"""Node metrics the daemon samples for the runs it writes: CPU, memory, disk and network I/O, GPUs.

Read from Linux's ``/proc`` (no dependency) and, when an NVIDIA driver is
present and the optional ``nvidia-ml-py`` package (module ``pynvml``) is
installed, from NVML per GPU.  Names are relative to ``sys/{host}/``:

* ``cpu/percent`` (all cores, over the interval), ``cpu/load1``
* ``memory/percent``, ``memory/used_gb`` (total minus available)
* ``disk/read_mb_s``, ``disk/write_mb_s`` (whole disks, no partitions, loop or
  device-mapper devices), ``net/recv_mb_s``, ``net/sent_mb_s`` (all interfaces
  but ``lo``); rates need two samples, so the first sample has none
* ``gpu{i}/util_percent``, ``gpu{i}/memory_percent``, ``gpu{i}/memory_used_gb``,
  ``gpu{i}/temperature_c``, ``gpu{i}/power_w`` (``i``: NVML's index)

A source that cannot be read is left out of the sample; sampling never raises.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

log = logging.getLogger("kohakuboard.daemon")

_GB = 1 << 30
_MB = 1 << 20


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs."""
    text = _read("/proc/stat")
    if not text or not text.startswith("cpu "):
        return None
    fields = [int(x) for x in text.split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user/nice
    return total - idle, total


def _memory() -> dict[str, float]:
    text = _read("/proc/meminfo")
    if not text:
        return {}
    info = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            info[key] = int(parts[0]) * 1024
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    if not total or available is None:
        return {}
    used = total - available
    return {"memory/percent": 100.0 * used / total, "memory/used_gb": used / _GB}


def _disk_bytes() -> tuple[int, int] | None:
    text = _read("/proc/diskstats")
    if text is None:
        return None
    try:
        disks = {d for d in os.listdir("/sys/block") if not d.startswith(("loop", "ram", "zram", "dm-", "md"))}
    except OSError:
        disks = set()
    read = written = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 10 and parts[2] in disks:
            read += int(parts[5]) * 512  # sectors are always 512 bytes here
            written += int(parts[9]) * 512
    return read, written


def _net_bytes() -> tuple[int, int] | None:
    text = _read("/proc/net/dev")
    if text is None:
        return None
    recv = sent = 0
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if name.strip() != "lo" and len(parts) >= 9:
            recv += int(parts[0])
            sent += int(parts[8])
    return recv, sent


class _Gpus:
    """NVML handles, or nothing when there is no driver or no pynvml."""

    def __init__(self) -> None:
        self.nvml: Any = None
        self.handles: list[Any] = []
        self.why = ""
        try:
            import pynvml
        except ImportError:
            self.why = "nvidia-ml-py is not installed"
            return
        try:
            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:  # NVMLError: no driver, no device, permission
            self.why = f"NVML: {exc}"
            return
        self.nvml = pynvml

    def sample(self) -> dict[str, float]:
        nv = self.nvml
        out: dict[str, float] = {}
        if nv is None:
            return out
        for i, h in enumerate(self.handles):
            p = f"gpu{i}/"
            for name, fn in (
                ("util_percent", lambda h=h: nv.nvmlDeviceGetUtilizationRates(h).gpu),
                ("temperature_c", lambda h=h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                ("power_w", lambda h=h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ):
                try:
                    out[p + name] = float(fn())
                except Exception:  # not supported on this GPU
                    pass
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                out[p + "memory_used_gb"] = mem.used / _GB
                out[p + "memory_percent"] = 100.0 * mem.used / mem.total if mem.total else 0.0
            except Exception:
                pass
        return out

    def close(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass
            self.nvml = None


class NodeSampler:
    """Samples this node; :meth:`sample` returns ``{name: value}`` with names under ``sys/{host}/``."""

    def __init__(self, host: str | None = None) -> None:
        self.host = host or socket.gethostname()
        self.prefix = f"sys/{self.host}/"
        self.gpus = _Gpus()
        if self.gpus.nvml is None:
            log.info("system metrics: no GPU metrics (%s)", self.gpus.why)
        else:
            log.info("system metrics: %d GPU(s) through NVML", len(self.gpus.handles))
        self._last: dict[str, Any] = {}
        self._last_at = 0.0
        self._take_counters()

    def _take_counters(self) -> dict[str, Any]:
        prev, prev_at = self._last, self._last_at
        self._last = {"cpu": _cpu_times(), "disk": _disk_bytes(), "net": _net_bytes()}
        self._last_at = time.monotonic()
        return {"prev": prev, "dt": self._last_at - prev_at}

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            d = self._take_counters()
            prev, now, dt = d["prev"], self._last, d["dt"]
            if prev.get("cpu") and now["cpu"]:
                busy = now["cpu"][0] - prev["cpu"][0]
                total = now["cpu"][1] - prev["cpu"][1]
                if total > 0:
                    out["cpu/percent"] = 100.0 * busy / total
            try:
                out["cpu/load1"] = os.getloadavg()[0]
            except OSError:
                pass
            out.update(_memory())
            if dt > 0:
                for key, names in (
                    ("disk", ("disk/read_mb_s", "disk/write_mb_s")),
                    ("net", ("net/recv_mb_s", "net/sent_mb_s")),
                ):
                    if prev.get(key) and now[key]:
                        for j, name in enumerate(names):
                            out[name] = max(0, now[key][j] - prev[key][j]) / _MB / dt
            out.update(self.gpus.sample())
        except Exception as exc:  # a sample is never worth a daemon error
            log.debug("system metrics: sampling failed: %r", exc)
        return {self.prefix + k: float(v) for k, v in out.items()}

    def close(self) -> None:
        self.gpus.close()
