"""The hardware a plan is made for: GPUs (count and memory each), CPU cores, RAM.

Read from the machine (nvidia-smi when present, /proc/meminfo), or declared: a spec's
`resources.gpus` + `resources.gpu_memory`, or `cortex plan --gpus N --gpu-memory 46GiB`,
so a plan for a GPU server can be made on a laptop.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

from cortex.spec import MAX_GPUS


class HardwareError(ValueError):
    """The declared hardware cannot be used as written; the message says what to change."""


@dataclass(frozen=True)
class Gpu:
    index: int
    memory_bytes: int  # free memory the plan may use
    name: str = "declared"
    total_bytes: int = 0  # the GPU's whole memory (0: not known, e.g. declared)


@dataclass(frozen=True)
class Inventory:
    gpus: list[Gpu] = field(default_factory=list)
    cpu_cores: int = 1
    ram_bytes: int = 0
    source: str = "detected"  # "detected" | "declared"

    @property
    def gpu_memory_total(self) -> int:
        return sum(g.memory_bytes for g in self.gpus)


def _ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0  # no /proc (not Linux): RAM unknown, a CPU plan will say it does not fit
    return 0


def _nvidia_gpus() -> list[Gpu]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,memory.free,memory.total,name", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        idx, free_mib, total_mib, name = [x.strip() for x in line.split(",", 3)]
        gpus.append(Gpu(int(idx), int(free_mib) * 2**20, name, int(total_mib) * 2**20))
    return gpus


def detect() -> Inventory:
    return Inventory(gpus=_nvidia_gpus(), cpu_cores=os.cpu_count() or 1, ram_bytes=_ram_bytes())


def resolve(
    detected: Inventory,
    gpus: int | list[int] | None,
    gpu_memory: int | None,
) -> Inventory:
    """The inventory a plan uses: declared GPUs and memory override what was detected."""
    if gpus is None and gpu_memory is None:
        return detected
    count = len(gpus) if isinstance(gpus, list) else gpus or 0
    if count > MAX_GPUS:
        raise HardwareError(f"{count} GPUs is more than {MAX_GPUS} on one host; declare one host's GPUs")
    if isinstance(gpus, list):
        ids = gpus
    elif gpus is not None:
        ids = list(range(gpus))
    else:
        ids = [g.index for g in detected.gpus]
    by_index = {g.index: g for g in detected.gpus}
    chosen = []
    for i in ids:
        if gpu_memory is not None:
            chosen.append(Gpu(i, gpu_memory, by_index[i].name if i in by_index else "declared"))
        elif i in by_index:
            chosen.append(by_index[i])
        else:
            raise HardwareError(
                f"GPU {i} is not on this machine; declare its memory (resources.gpu_memory or --gpu-memory) "
                "to plan for hardware you do not have here"
            )
    return Inventory(chosen, detected.cpu_cores, detected.ram_bytes, source="declared")
