"""What every result row records about the machine and the software."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[float]:
    """The 1-minute load average: other processes on the machine skew timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _busy_jiffies() -> Optional[tuple]:
    """(jiffies every CPU spent busy, jiffies this process spent) from /proc:
    their difference over a run is what other processes (and the hypervisor,
    as steal time) took from the machine meanwhile."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat", encoding="utf-8") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy, int(own[11]) + int(own[12])  # utime + stime, all threads


class Quietness:
    """How busy the machine was with other work while a benchmark ran.

    The 1-minute load average is recorded at the start and the end, as people
    read it, but at the end it mostly counts the benchmark's own threads; the
    verdict ``noisy`` therefore rests on the CPU time that *other* processes
    took during the run (from /proc/stat less this process's own time), and
    on the load average at the start where /proc is missing."""

    # Other work averaging more than this fraction of the cores makes a run noisy:
    # on 2 cores, a compiler running a fifth of the time already moves medians by ~5%.
    NOISY_SHARE = 0.1

    def __init__(self) -> None:
        self.loadavg_start = load_average()
        self.start = time.monotonic()
        self.jiffies = _busy_jiffies()

    def busy_at_start(self, cores: int) -> bool:
        """The load average at the start exceeded half the cores."""
        return self.loadavg_start is not None and self.loadavg_start > 0.5 * cores

    def finish(self, cpu_count: Optional[int]) -> Dict[str, Any]:
        cores = cpu_count or 1
        out: Dict[str, Any] = {"loadavg_start": self.loadavg_start, "loadavg_end": load_average(),
                               "other_busy_cores": None}
        end = _busy_jiffies()
        wall = time.monotonic() - self.start
        if self.jiffies and end and wall > 0:
            hz = os.sysconf("SC_CLK_TCK")
            others = (end[0] - self.jiffies[0]) - (end[1] - self.jiffies[1])
            out["other_busy_cores"] = round(max(others, 0) / hz / wall, 3)
            out["noisy"] = out["other_busy_cores"] > self.NOISY_SHARE * cores
        else:
            out["noisy"] = self.busy_at_start(cores)
        return out


def _git(args: list, cwd: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def source_commit() -> Dict[str, Any]:
    """The gradclip checkout's commit: ``GRADCLIP_COMMIT`` if set, else the git
    repository around the current directory when it is a gradclip checkout.
    (An installed wheel carries no commit; 'unknown' then.)"""
    env = os.environ.get("GRADCLIP_COMMIT")
    if env:
        return {"commit": env, "dirty": None}
    top = _git(["rev-parse", "--show-toplevel"], Path.cwd())
    if top and (Path(top) / "python" / "gradclip" / "__init__.py").exists():
        commit = _git(["rev-parse", "--short=12", "HEAD"], Path(top))
        status = _git(["status", "--porcelain", "--", "csrc", "python", "CMakeLists.txt"], Path(top))
        if commit:
            return {"commit": commit, "dirty": bool(status)}
    return {"commit": "unknown", "dirty": None}


def machine_tag(device_name: str, threads: Optional[int] = None) -> str:
    """A short file-name tag such as 'amd-epyc-2t' (CPU) or 'nvidia-h100-80gb-hbm3' (GPU)."""
    slug = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*$|\d+-core", "", device_name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")[:32].strip("-") or "machine"
    return f"{slug}-{threads}t" if threads else slug


def collect(torch: Any, device: str) -> Dict[str, Any]:
    import gradclip

    info = gradclip.build_info()
    gpu_name = ""
    if device == "cuda":
        gpu_name = torch.cuda.get_device_name(torch.cuda.current_device())
    cpu = cpu_model()
    meta: Dict[str, Any] = {
        "device": device,
        "device_name": gpu_name if device == "cuda" else cpu,
        "cpu_model": cpu,
        "gpu_name": gpu_name,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gradclip_threads": gradclip.get_num_threads(),
        "gradclip_isa": info["isa"],
        "gradclip_version": gradclip.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    meta.update(source_commit())
    if device == "cuda":
        meta["cuda_runtime"] = torch.version.cuda
    return meta
