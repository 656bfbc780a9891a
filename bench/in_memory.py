"""Shard rows held in memory and cut by the pipeline's own UDF: Ray Data's samples without Ray.

:class:`InMemoryShard` cuts rows into samples with
:class:`~cromss_ray.data.transforms.CutSamples` (the Ray Data UDF), so a plain PyTorch
loop sees exactly the samples Ray Data would deliver. ``bench.ray_overhead`` compares
against it and ``bench.noise_robustness`` trains on it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cromss_ray.data.storage import ShardSet, epoch_permutation
from cromss_ray.data.transforms import CutSamples


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
    functions run unchanged on it. ``shuffle_seed`` orders the rows as the training pipeline
    does, in the epoch's (``clock.epoch``) :func:`epoch_permutation`; without it the rows
    keep their stored order.
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
            order = epoch_permutation(self.table.num_rows, self.shuffle_seed, self.clock.epoch)
        end = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, end, batch_size):
            arrays = self.cut(self.table.take(order[start : start + batch_size]))
            yield {name: torch.from_numpy(array) for name, array in arrays.items()}
