"""What this machine offers a sweep's local workers: CPU cores, CUDA devices, and where a pid means something."""

from __future__ import annotations

import os
import socket

from pd_lightning.errors import ConfigError


def process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def visible_gpus(listed: str | None = None, count: int | None = None) -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries (none on a CPU machine).

    `listed` / `count` default to this process's CUDA_VISIBLE_DEVICES and torch's device count.
    """
    if count is None:
        import torch

        count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES") if listed is None else listed
    if listed is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in listed.split(",") if d.strip()][:count]  # CUDA ignores entries past the count


def gpu_groups(workers: int, per_worker: int, visible: list[str]) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each local worker: its own `per_worker` GPUs, so workers never share one.

    None for every worker when no GPU is visible (CPU workers). Too few GPUs for workers x per_worker is
    refused: two trials on one GPU would run out of memory or crawl.
    """
    if not visible:
        return [None] * workers
    need = workers * per_worker
    if need > len(visible):
        fits = len(visible) // per_worker
        raise ConfigError(f"--workers={workers} with trainer.devices={per_worker} needs {need} GPUs and "
                          f"{len(visible)} are visible ({','.join(visible)}); use --workers {max(1, fits)}"
                          + ("" if fits else " and fewer trainer.devices"))
    return [",".join(visible[i * per_worker:(i + 1) * per_worker]) for i in range(workers)]


def process_namespace() -> str:
    """Where a pid means something: host name + pid namespace (containers on one host share a host name)."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return os.environ.get("PDL_WORKER_HOST") or f"{socket.gethostname()}/{ns}"

