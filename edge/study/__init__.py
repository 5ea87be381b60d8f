"""Cohort studies: an archive of slides scored once, then survival by the slide scores (paper §2.4)."""
