"""Trained networks and how they predict: stored networks, the one segmenter, whole-tile scoring.

Between ``data``/``method`` and ``tracking``: nothing here imports MLflow or Ray, so
``predict``, ``evaluate``, the pyfunc models and the transfer runs all call the same code.
``stored.py`` (a network's files, built from its config in one place, one loader for both
kinds), ``segmenter.py`` (any image size in blended windows), ``geotiff.py`` (class-map
GeoTIFFs), ``scoring.py`` (whole-tile scores against labels).

This file stays free of heavy imports: the command line reads :data:`MODEL_TILE` from it.
"""

MODEL_TILE = 512
"""The window of registered models, ``cromss evaluate``, ``cromss predict`` and a transfer run's test
scores: whole SSL4EO-S12 tiles (510 / 512 px) in one window, so all of them predict alike."""
