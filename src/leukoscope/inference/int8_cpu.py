"""Whether an int8 graph's weights fit this CPU's integer kernels.

On an x86 CPU without VNNI (AVX2 or AVX-512F alone, e.g. many AMD EPYC), onnxruntime's and
oneDNN's (OpenVINO's) uint8 x int8 kernels add pairs of products in int16, which saturates with
weights using all 8 bits. ``leukoscope export --int8`` has written weights in a 7-bit range since
2026-12-07 (its record's ``weight_bits``: 7); a graph exported before runs on such a CPU with
wrong scores (the shipped classifier's int8 top class agreed with the float model's on 0.40 of
BCCD's cells, docs/benchmarks.md, "int8 on a CPU without VNNI"), so loading it says so.
"""

from __future__ import annotations

import logging
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

#: The range an int8 export's weights take since 2026-12-07: onnxruntime's quantizers with ``reduce_range=True``
#: (:mod:`leukoscope.inference.quantize`), which is 7 bits.
WEIGHT_BITS = 7
CPUINFO = Path("/proc/cpuinfo")
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@lru_cache(maxsize=1)
def cpu_lacks_vnni(cpuinfo: Path = CPUINFO) -> bool:
    """True on an x86 CPU whose flags (Linux's ``/proc/cpuinfo``) show no VNNI; False on one with it, on
    another architecture, or where the flags cannot be read (no warning on a guess)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    return flags is not None and not VNNI_FLAGS & set(flags)


def full_range_warning(directory: str | Path, export: Mapping[str, Any] | None, *,
                       lacks_vnni: bool | None = None) -> str | None:
    """The warning for an int8 graph in ``directory`` whose weights use the full 8 bits, loaded on a CPU
    without VNNI (``lacks_vnni``: this CPU's, when not given); None for any other graph or CPU."""
    if not export or export.get("precision") != "int8" or export.get("weight_bits") == WEIGHT_BITS:
        return None  # a record without weight_bits (or another value) is an export of before 2026-12-07
    if not (cpu_lacks_vnni() if lacks_vnni is None else lacks_vnni):
        return None
    return (f"{directory}: its int8 graph was exported with weights in the full 8-bit range, which this CPU "
            f"(no VNNI) sums with overflow: its classes and out-of-distribution scores may be wrong. Export it "
            f"again (`leukoscope export --int8`, which now writes a {WEIGHT_BITS}-bit range), or use --backend torch")


def warn_if_full_range(directory: str | Path, export: Mapping[str, Any] | None) -> None:
    """Log :func:`full_range_warning` when it applies (loading a graph)."""
    warning = full_range_warning(directory, export)
    if warning:
        log.warning(warning)
