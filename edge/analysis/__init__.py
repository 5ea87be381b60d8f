"""A slide's tiles to a result: detection, classification, scoring, scan QC and the files written."""
