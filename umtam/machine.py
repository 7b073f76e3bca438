"""What a result was measured on: the GPU's name, or the CPU's model and the kernels torch picked.

Results record it because the same float32 program rounds differently on
another kind of CPU (tests/golden_runs.py measured it: up to 4e-5 relative in a
20-step loss curve), so two results are bit-comparable only on one kind.
"""

from __future__ import annotations

from pathlib import Path


def machine_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu: {cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first 'model name' in /proc/cpuinfo, or the platform's processor string elsewhere."""
    import platform

    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
