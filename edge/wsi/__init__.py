"""Whole-slide images in: open a slide, its metadata and mpp, the tissue mask and tile grid, the tile stream."""
