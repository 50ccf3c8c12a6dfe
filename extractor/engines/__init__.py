"""Engines that run `extractor run` somewhere other than this process.

The local engine lives in `extractor.run`; `ray_engine` spreads the same `Extraction` over a Ray cluster.
Each engine is imported only when selected (`engine: ray`), so its dependencies stay optional extras.
"""
