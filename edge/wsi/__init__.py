"""Whole-slide images in: open a slide, its metadata and mpp, the tissue mask and tile grid, the tile stream.

Internal: the implementation behind ``edge.open_slide``; what the package promises is ``edge.__all__``.
Layer: imports only the base (errors, config, vocab, fileio, logs, logsafe); tests/test_import_contracts.py
holds it to that.
"""
