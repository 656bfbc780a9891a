"""The data layer: NoLDO-S12 Parquet shards, converters, synthetic data and the Ray Data pipeline.

``schema`` declares what a shard holds, ``shards`` writes and reads them, ``synth`` makes
realistic synthetic ones, ``convert`` turns the published formats into shards, ``check``
validates a shard directory, ``scaling`` turns stored values into the network input
(:func:`network_input`), and ``pipeline`` streams shards into training batches (spec 9,
10; ``docs/data.md``).
"""

from cromss_ray.data.scaling import network_input

__all__ = ["network_input"]
