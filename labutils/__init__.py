"""Helpers for Siamese Plateau Lab, imported by the course notebooks.

Modules follow the Siamese pipeline: `data` (data sets and splits), `pairs` (pairs and triplets), `models` (the
encoder), `losses`, `training` (`fit`), `metrics`, `plots`, `record` (metrics and claims for the runner) and
`runner` (the headless course run).
"""

__version__ = "0.1.0"
