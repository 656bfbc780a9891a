"""A registered model applied to new data: ``cromss evaluate`` (scores) and ``cromss predict`` (GeoTIFFs)."""
