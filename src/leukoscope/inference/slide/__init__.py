"""Whole-slide images: the reader (``reader``), where to count (``monolayer``), which tiles and
when to stop (``sampler``), and the slide's analysis and files (``analysis``)."""
