"""What a benchmark prints about the machine it ran on, and the two conditions it can impose on it.

* :func:`cpu_description`: CPU model, the ISA extensions the kernels care about, numba's code-generation
  target and threading layer, cores and load average: CPUs differ between machines (a kernel tuned on one
  fell to a fifth of a plain loop's speed on another), so every figure goes out with these.
* :class:`BusyCore`: another process keeping one core busy for the duration (``--busy-core``), as on a
  shared machine.
* :func:`peak_rss`: a command's peak resident memory (VmHWM), measured in a child process so that
  nothing else the benchmark loaded counts.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

ISA = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def cpu_description() -> dict:
    info = {"cpu": "?", "isa": [], "cores": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2)}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and info["cpu"] == "?":
                    info["cpu"] = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not info["isa"]:
                    have = set(line.split(":", 1)[1].split())
                    info["isa"] = [x for x in ISA if x in have]
    except OSError:
        pass
    try:
        import llvmlite.binding as ll
        from numba.core import config

        info["numba_target"] = config.CPU_NAME or ll.get_host_cpu_name()
        if config.CPU_FEATURES is not None:
            info["numba_features"] = config.CPU_FEATURES or "(the target's defaults)"
        from offload.cpu.pool import threading_layer

        info["threading_layer"] = threading_layer()
    except Exception as e:  # a description must not fail the benchmark
        info["numba"] = f"unavailable ({type(e).__name__})"
    return info


def describe(info: dict) -> str:
    """One line for a table's footer."""
    text = (f"CPU {info['cpu']} ({info['cores']} cores), ISA {' '.join(info['isa']) or '?'}, "
            f"numba target {info.get('numba_target', '?')}")
    if "numba_features" in info:
        text += f" features {info['numba_features']}"
    return text + f", threading layer {info.get('threading_layer', '?')}, load average {info['load_average']}"


class BusyCore:
    """``with BusyCore():`` another process spins on CPU 0 meanwhile (pinned there), then is stopped."""

    def __enter__(self):
        code = "import os\ntry:\n    os.sched_setaffinity(0, {0})\nexcept OSError:\n    pass\nwhile True:\n    pass\n"
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def peak_rss(code: str, *args: str, env: dict | None = None, timeout: float = 1800) -> int:
    """Peak resident bytes (VmHWM) of ``python -c code args...``: the code runs, then its peak is read."""
    probe = code + ("\nfor _line in open('/proc/self/status'):\n"
                    "    if _line.startswith('VmHWM:'):\n"
                    "        print('PEAK_RSS_KB', int(_line.split()[1]))\n")
    proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK_RSS_KB"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"peak_rss: the child failed (rc={proc.returncode}): {proc.stderr[-2000:]}")


def machine_info(threads: int, bandwidth: float, bandwidth_source: str) -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "platform": platform.platform(),
            "cpu_bandwidth_GBps": round(bandwidth / 1e9, 2), "cpu_bandwidth_source": bandwidth_source,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
