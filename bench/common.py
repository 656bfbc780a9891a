"""What the benchmark scripts share: device timing, repeat statistics, the printed report, in-memory shards.

Every script prints one plain-text report: a title, a ``machine`` section (cores,
threads, load, versions, device) and one section per configuration, each a list of
``key  value`` rows whose keys carry their unit (``step_ms``, ``images_per_s``,
``objective_share_pct``). ``--json PATH`` writes the same sections as JSON.

:class:`InMemoryShard` holds shard rows in memory and cuts them into samples with the
pipeline's own :class:`~cromss_ray.data.transforms.CutSamples` (the Ray Data UDF), so a
plain PyTorch loop sees exactly the samples Ray Data would deliver, without Ray.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cromss_ray.data.storage import ShardSet
from cromss_ray.data.transforms import CutSamples

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


class EpochCounter:
    """The epoch an in-memory pipeline augments for: the ``epoch_source`` of a SampleDraw, set by the loop."""

    def __init__(self) -> None:
        self.epoch = 0

    def __call__(self) -> int:
        return self.epoch


def read_shard_table(shards: ShardSet) -> pa.Table:
    """Every row of a shard set in one table, with the ``path`` column Ray Data's reader adds."""
    tables = []
    for path in shards.files:
        table = pq.read_table(path, filesystem=shards.filesystem)
        tables.append(table.append_column("path", pa.array([path] * table.num_rows, pa.string())))
    return pa.concat_tables(tables)


class InMemoryShard:
    """Shard rows in memory, cut per batch by the pipeline's UDF; iterates like a Ray DataIterator.

    :meth:`iter_torch_batches` has the signature the training loops call, so their epoch
    functions run unchanged on it. ``shuffle_seed`` permutes the rows anew every epoch
    (``clock.epoch``); without it the rows keep their stored order.
    """

    def __init__(self, shards: ShardSet, cut: CutSamples, clock: EpochCounter, shuffle_seed: int | None = None) -> None:
        self.table = read_shard_table(shards)
        self.cut = cut
        self.clock = clock
        self.shuffle_seed = shuffle_seed

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def iter_torch_batches(
        self, *, batch_size: int, prefetch_batches: int = 0, drop_last: bool = False
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of ``batch_size`` samples as CPU tensors; ``drop_last`` drops a smaller last batch.

        ``prefetch_batches`` is accepted, as Ray's iterator takes it, and unused.
        """
        order = np.arange(self.table.num_rows)
        if self.shuffle_seed is not None:
            order = np.random.default_rng([self.shuffle_seed, self.clock.epoch]).permutation(order)
        end = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, end, batch_size):
            arrays = self.cut(self.table.take(order[start : start + batch_size]))
            yield {name: torch.from_numpy(array) for name, array in arrays.items()}
