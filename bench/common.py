"""What the benchmark scripts share: device timing, repeat statistics, the printed report.

Every script prints one plain-text report: a title, a ``machine`` section (cores,
threads, load, versions, device) and one section per configuration, each a list of
``key  value`` rows whose keys carry their unit (``step_ms``, ``images_per_s``,
``objective_share_pct``). ``--json PATH`` writes the same sections as JSON.

This module imports only torch and the standard library, so ``bench.step`` runs on a
GPU machine that has no Ray installed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")
Row = float | int | str
Section = dict[str, Row]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this machine has no CUDA device")
    return device


def check_crop(size: int) -> None:
    """Exit with a message unless ``size`` (``--size``) is a positive multiple of 32, the encoders' output stride."""
    if size % 32 or size < 32:
        raise SystemExit(f"--size {size}: must be a positive multiple of 32 (the encoders' output stride)")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(action: Callable[[], T], device: torch.device) -> tuple[float, float, T]:
    """Wall and process-CPU seconds of ``action()`` including the device work it queued, and its result.

    CPU seconds count every thread of this process, so on a shared machine they depend
    far less on other load than wall seconds do.
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = action()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, result


@dataclass(frozen=True)
class Repeats:
    """Wall and CPU seconds of repeated measurements; the medians are the reported figures."""

    seconds: tuple[float, ...]
    cpu_seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_seconds)

    @property
    def spread(self) -> str:
        """``min .. max over n`` of the wall time in milliseconds, to show how noisy the median is."""
        return f"{min(self.seconds) * 1e3:.1f} .. {max(self.seconds) * 1e3:.1f} ms over {len(self.seconds)}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def machine_section(device: torch.device) -> Section:
    """Where the figures come from: cores, threads, load average, versions and the device."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    section: Section = {
        "cpu_cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        section["gpu"] = torch.cuda.get_device_name(device)
    return section


def format_value(value: Row) -> str:
    """Floats to four significant digits, everything else as is."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_report(title: str, sections: Mapping[str, Mapping[str, Row]]) -> str:
    """The printed report: ``== title ==``, then ``[section]`` blocks of aligned ``key  value`` rows."""
    width = max((len(key) for rows in sections.values() for key in rows), default=0)
    lines = [f"== {title} =="]
    for name, rows in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"  {key:<{width}}  {format_value(value)}" for key, value in rows.items())
    return "\n".join(lines)


def publish(
    title: str,
    sections: Mapping[str, Mapping[str, Row]],
    json_path: Path | None,
    details: Mapping[str, object] | None = None,
) -> None:
    """Print the report and, when asked, write ``{"title", "sections", **details}`` as JSON."""
    print(format_report(title, sections), flush=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"title": title, "sections": sections, **(details or {})}
        json_path.write_text(json.dumps(payload, indent=2) + "\n")
