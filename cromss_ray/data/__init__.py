"""The data layer: NoLDO-S12 Parquet shards, converters, synthetic data and the Ray Data pipeline.

``schema`` declares what a shard holds, ``shards`` writes and reads them, ``synth`` makes
realistic synthetic ones, ``convert`` turns the published formats into shards, ``check``
validates a shard directory, and ``pipeline`` streams shards into training batches
(spec 9, 10; ``docs/data.md``).
"""
