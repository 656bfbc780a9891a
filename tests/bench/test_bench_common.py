"""The benchmarks' shared pieces: the printed report, repeat statistics and the in-memory shard."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.common import Repeats, format_report, mean_std, publish
from bench.in_memory import EpochCounter, InMemoryShard
from cromss_ray.data.storage import epoch_permutation, scan_shards
from cromss_ray.data.synth import synthesize
from cromss_ray.data.transforms import CutSamples, SampleDraw

LOCATIONS = 5
TILE = 40
CROP = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("locations")
    synthesize(out, "pretrain", locations=LOCATIONS, size=TILE, seed=9, noise_rate=0.2)
    return scan_shards(str(out))


def training_shard(shards, clock: EpochCounter, shuffle_seed: int | None) -> InMemoryShard:
    cut = CutSamples(shards.meta, 13, CROP, SampleDraw(True, 0, 0.2, clock), labels_all=True)
    return InMemoryShard(shards, cut, clock, shuffle_seed=shuffle_seed)


def keys_of(shard: InMemoryShard, **kwargs) -> list[list[int]]:
    return [batch["key"].tolist() for batch in shard.iter_torch_batches(**kwargs)]


def test_report_aligns_rows_and_rounds_floats():
    text = format_report("t", {"a": {"x": 1.234567, "longer_key": "kept"}, "b": {"n": 3}})
    assert text.splitlines() == [
        "== t ==",
        "[a]",
        "  x           1.235",
        "  longer_key  kept",
        "[b]",
        "  n           3",
    ]


def test_publish_writes_sections_and_details(tmp_path, capsys):
    path = tmp_path / "deep" / "report.json"
    publish("title", {"s": {"k": 1.5}}, path, {"runs": [{"seed": 0}]})
    assert json.loads(path.read_text()) == {"title": "title", "sections": {"s": {"k": 1.5}}, "runs": [{"seed": 0}]}
    assert capsys.readouterr().out.startswith("== title ==\n[s]\n  k  1.5")


def test_repeats_median_and_spread():
    repeats = Repeats((0.003, 0.001, 0.002), (0.006, 0.004, 0.005))
    assert repeats.median == 0.002
    assert repeats.cpu_median == 0.005
    assert repeats.spread == "1.0 .. 3.0 ms over 3"


def test_mean_and_sample_standard_deviation():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_std([4.0]) == (4.0, 0.0)


def test_in_memory_shard_yields_every_row_once_in_stored_order(shards):
    shard = training_shard(shards, EpochCounter(), shuffle_seed=None)
    batches = list(shard.iter_torch_batches(batch_size=2))
    assert [len(batch["key"]) for batch in batches] == [2, 2, 1]
    first = batches[0]
    assert tuple(first["s2"].shape) == (2, 13, CROP, CROP)
    assert tuple(first["labels_all"].shape) == (2, 4, CROP, CROP)
    assert {"s1", "label", "clean_label", "season"} <= set(first)
    keys = [key for batch in keys_of(shard, batch_size=2) for key in batch]
    assert len(set(keys)) == LOCATIONS == shard.num_rows


def test_in_memory_shard_drops_the_smaller_last_batch_when_asked(shards):
    shard = training_shard(shards, EpochCounter(), shuffle_seed=None)
    assert [len(keys) for keys in keys_of(shard, batch_size=2, drop_last=True)] == [2, 2]


def test_shuffled_order_is_a_function_of_seed_and_epoch(shards):
    """The training pipeline's order: the epoch's permutation of the stored rows."""
    stored = keys_of(training_shard(shards, EpochCounter(), shuffle_seed=None), batch_size=LOCATIONS)[0]
    clock = EpochCounter()
    shard = training_shard(shards, clock, shuffle_seed=3)
    epoch0 = keys_of(shard, batch_size=LOCATIONS)[0]
    assert keys_of(shard, batch_size=LOCATIONS)[0] == epoch0
    orders = set()
    for epoch in range(1, 6):
        clock.epoch = epoch
        keys = keys_of(shard, batch_size=LOCATIONS)[0]
        assert sorted(keys) == sorted(epoch0)
        assert keys == [stored[row] for row in epoch_permutation(len(stored), 3, epoch)]
        orders.add(tuple(keys))
    assert len(orders) > 1


def test_samples_follow_the_epoch_as_the_pipeline_draws_them(shards):
    """The same row is cut differently in another epoch (season, crop, flips come from (seed, epoch, id))."""
    clock = EpochCounter()
    shard = training_shard(shards, clock, shuffle_seed=None)
    first = next(shard.iter_torch_batches(batch_size=LOCATIONS))
    clock.epoch = 1
    second = next(shard.iter_torch_batches(batch_size=LOCATIONS))
    assert first["key"].tolist() == second["key"].tolist()
    assert not np.array_equal(first["s2"].numpy(), second["s2"].numpy())
