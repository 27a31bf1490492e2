"""What machine this is: chip, memory, and which MLX backend it gets. Read-only, no MLX import."""

from __future__ import annotations

import platform
import shutil
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Hardware:
    system: str  # "Darwin", "Linux"
    machine: str  # "arm64", "x86_64"
    chip: str
    cores: int
    memory_gb: float
    backend: str  # "metal", "cuda", "cpu"

    @property
    def summary(self) -> str:
        return (
            f"{self.chip} ({self.system} {self.machine}), {self.cores} cores, "
            f"{self.memory_gb:.0f} GiB, MLX backend: {self.backend}"
        )


def _chip() -> str:
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _backend(system: str, machine: str) -> str:
    if system == "Darwin" and machine == "arm64":
        return "metal"
    try:
        metadata.version("mlx-cuda")
    except metadata.PackageNotFoundError:
        return "cpu"
    return "cuda" if shutil.which("nvidia-smi") else "cpu"


def detect() -> Hardware:
    system, machine = platform.system(), platform.machine()
    return Hardware(
        system=system,
        machine=machine,
        chip=_chip(),
        cores=psutil.cpu_count(logical=True) or 1,
        memory_gb=psutil.virtual_memory().total / 2**30,
        backend=_backend(system, machine),
    )
