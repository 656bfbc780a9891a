"""Converters from the formats NoLDO-S12 and DFC2020 are published in to Parquet shards.

``ssl4eo`` (SSL4EO-S12 folders + NoL labels), ``lmdb`` (the reference implementation's
LMDB files) and ``downstream`` (SSL4EO-S12@DW, @OSM, DFC2020 GeoTIFFs); ``common`` holds
the shared write loop and bad-input handling (spec 10; ``docs/data.md``).
"""
