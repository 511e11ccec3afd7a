"""What this machine has: CPU, SIMD flags, RAM, GPUs (NVIDIA, AMD, Apple).

Every probe is optional: a missing tool, file or library gives an empty answer,
never an exception. The parsers are pure functions so tests feed them text.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("hearth.models.hardware")

SIMD_FLAGS = ("avx", "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "fma", "f16c", "sse4_2",
              "neon", "asimd", "sve", "dotprod", "i8mm")


@dataclass(slots=True)
class GPU:
    """One accelerator and its memory in bytes."""

    vendor: str  # nvidia | amd | apple
    name: str
    memory_total: int
    memory_free: int
    unified: bool = False


@dataclass(slots=True)
class Hardware:
    """The machine, as far as hearth can tell."""

    os: str
    arch: str
    cpu_model: str
    cores: int
    threads: int
    simd: list[str] = field(default_factory=list)
    ram_total: int = 0
    ram_available: int = 0
    gpus: list[GPU] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def vram_free(self) -> int:
        """Free memory on dedicated (non-unified) GPUs."""
        return sum(g.memory_free for g in self.gpus if not g.unified)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(cmd: list[str], timeout: float = 5.0) -> str | None:
    """Output of a tool, or None if it is absent or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def read(path: str | Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


# -- parsers (pure) --------------------------------------------------------------
def parse_cpuinfo(text: str) -> tuple[str, int, int, list[str]]:
    """(model name, physical cores, logical threads, SIMD flags) from /proc/cpuinfo."""
    model, flags, threads, cores = "", set(), 0, set()
    phys = ""
    for line in text.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "processor":
            threads += 1
        elif key in ("model name", "Hardware", "cpu model") and not model:
            model = value
        elif key in ("flags", "Features"):
            flags.update(value.split())
        elif key == "physical id":
            phys = value
        elif key == "core id":
            cores.add((phys, value))
    simd = [f for f in SIMD_FLAGS if f in flags]
    if "asimd" in simd and "neon" not in simd:
        simd.insert(0, "neon")
    return model, len(cores) or threads, threads, simd


def parse_meminfo(text: str) -> tuple[int, int]:
    """(total, available) bytes from /proc/meminfo."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if m:
            values[m.group(1)] = int(m.group(2)) * 1024
    return values.get("MemTotal", 0), values.get("MemAvailable", values.get("MemFree", 0))


def parse_nvidia_smi(text: str) -> list[GPU]:
    """`nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv,noheader,nounits` (MiB)."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and parts[1].isdigit() and parts[2].isdigit():
            gpus.append(GPU("nvidia", parts[0], int(parts[1]) << 20, int(parts[2]) << 20))
    return gpus


def parse_rocm_smi(text: str) -> list[GPU]:
    """`rocm-smi --showmeminfo vram --showproductname --json`."""
    try:
        data = json.loads(text)
    except ValueError:
        return []
    gpus = []
    for card, info in sorted(data.items()) if isinstance(data, dict) else []:
        if not isinstance(info, dict):
            continue
        total = int(info.get("VRAM Total Memory (B)", 0) or 0)
        used = int(info.get("VRAM Total Used Memory (B)", 0) or 0)
        name = str(info.get("Card Series") or info.get("Card series") or card)
        if total:
            gpus.append(GPU("amd", name, total, total - used))
    return gpus


# -- probes ------------------------------------------------------------------------
def nvidia_gpus() -> list[GPU]:
    """NVIDIA GPUs through NVML (pynvml) if installed, else `nvidia-smi`."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            gpus = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                name = pynvml.nvmlDeviceGetName(h)
                gpus.append(GPU("nvidia", name.decode() if isinstance(name, bytes) else str(name),
                                int(mem.total), int(mem.free)))
            pynvml.nvmlShutdown()
            return gpus
        except pynvml.NVMLError as exc:  # no driver or no device: try nvidia-smi
            log.debug("NVML unavailable: %s", exc)
    out = run(["nvidia-smi", "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"])
    return parse_nvidia_smi(out) if out else []


def amd_sysfs_gpus(root: Path = Path("/sys/class/drm")) -> list[GPU]:
    """AMD GPUs from amdgpu's sysfs files (no tools needed)."""
    gpus = []
    for dev in sorted(root.glob("card*/device")):
        total = read(dev / "mem_info_vram_total").strip()
        used = read(dev / "mem_info_vram_used").strip()
        if total.isdigit() and read(dev / "vendor").strip() == "0x1002":
            name = read(dev / "product_name").strip() or dev.parent.name
            gpus.append(GPU("amd", name, int(total), int(total) - int(used or 0)))
    return gpus


def amd_gpus() -> list[GPU]:
    out = run(["rocm-smi", "--showmeminfo", "vram", "--showproductname", "--json"])
    return (parse_rocm_smi(out) if out else []) or amd_sysfs_gpus()


def apple_gpu(ram_total: int) -> list[GPU]:
    """Apple Silicon: the GPU shares RAM; Metal may use about 75% of it."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return []
    brand = (run(["sysctl", "-n", "machdep.cpu.brand_string"]) or "Apple Silicon").strip()
    usable = ram_total * 3 // 4
    return [GPU("apple", brand, usable, usable, unified=True)]


def darwin_memory() -> tuple[int, int]:
    total = int((run(["sysctl", "-n", "hw.memsize"]) or "0").strip() or 0)
    vm = run(["vm_stat"]) or ""
    pages = sum(int(m.group(1)) for m in re.finditer(r"Pages (?:free|inactive|speculative):\s+(\d+)", vm))
    return total, pages * 16384 if pages else total // 2


def detect() -> Hardware:
    """Probe this machine (milliseconds; tools that are absent are skipped)."""
    system = platform.system()
    model, cores, threads, simd = parse_cpuinfo(read("/proc/cpuinfo"))
    if system == "Darwin":
        model = (run(["sysctl", "-n", "machdep.cpu.brand_string"]) or model).strip()
        total, avail = darwin_memory()
        simd = ["neon"] if platform.machine() == "arm64" else simd
    else:
        total, avail = parse_meminfo(read("/proc/meminfo"))
    threads = threads or os.cpu_count() or 1
    hw = Hardware(os=system, arch=platform.machine(), cpu_model=model or platform.processor() or "unknown",
                  cores=cores or threads, threads=threads, simd=simd, ram_total=total, ram_available=avail)
    hw.gpus = nvidia_gpus() + amd_gpus() + apple_gpu(total)
    if not hw.gpus:
        hw.notes.append("no GPU found (looked for NVML/nvidia-smi, rocm-smi/amdgpu sysfs, Apple Silicon)")
    return hw
