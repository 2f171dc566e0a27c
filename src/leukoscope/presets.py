"""Names of the augmentation presets, apart from their torch implementation.

The experiment config validates ``train.augmentation`` against these names on
every command; keeping them here lets the config (and so every argument check of
the CLI) load without importing torch. :mod:`leukoscope.transforms` builds them.
"""

from __future__ import annotations

AUGMENTATION_PRESETS: tuple[str, ...] = ("none", "default", "geometric", "tusar", "abas", "jabeena", "stain",
                                         "cross_source")
