"""A slide's tiles to a result: detection, classification, scoring, scan QC and the files written.

Internal: the implementation behind ``edge.analyze_slide``; what the package promises is ``edge.__all__``.
Layer: imports edge.wsi, edge.engines and the base. Its numeric cores (detect, classify, scoring, review,
drift, caveats) import only the base, numpy and scipy (tests/test_import_contracts.py).
"""
