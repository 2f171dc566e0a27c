"""Benchmark: drawing the annotated smear picture (``leukoscope.inference.drawing.annotate``) alone.

    PYTHONPATH=src python bench/annotate_speed.py [--repeats 3]

A 2592x1944 field (random pixels) with 50 white cells of the shipped classifier's 9 classes (every
7th uncertain, every 5th unfamiliar) and 300 red-cell/platelet boxes; the same seed each run, so
that two versions (``PYTHONPATH=OLD/src``) draw the same result. Prints the wall and CPU seconds
of one drawing, median of ``--repeats`` after one warm-up (CPU time: less sensitive to other work
on the machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from PIL import Image

from leukoscope.inference.detector import DetectionResult
from leukoscope.inference.differential import CountRules
from leukoscope.inference.drawing import annotate
from leukoscope.inference.smear_result import Cell, SmearResult

CLASSES = ["basophil", "blast", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


def field_and_result(width: int = 2592, height: int = 1944, cells: int = 50,
                     others: int = 300) -> tuple[Image.Image, SmearResult]:
    rng = np.random.default_rng(0)
    field = Image.fromarray(rng.integers(150, 255, (height, width, 3), dtype=np.uint8))
    found, boxes, labels = [], [], []
    for i in range(cells):
        x, y = rng.uniform(0, width - 150), rng.uniform(0, height - 150)
        box = (x, y, x + rng.uniform(90, 150), y + rng.uniform(90, 150))
        label, uncertain = CLASSES[i % len(CLASSES)], i % 7 == 0
        found.append(Cell(i + 1, box, "WBC", 0.9, "uncertain" if uncertain else label, label, 0.8, uncertain, {},
                          1.0, i % 5 == 0))
        boxes.append(box)
        labels.append(0)
    for i in range(others):
        x, y = rng.uniform(0, width - 60), rng.uniform(0, height - 60)
        boxes.append((x, y, x + 50, y + 50))
        labels.append(1 + i % 2)
    detections = DetectionResult(np.array(boxes), np.ones(len(boxes)), np.array(labels), ["WBC", "RBC", "Platelets"])
    rules = CountRules(tuple(CLASSES), ("blast",))
    result = SmearResult("f.png", width, height, found, {}, rules.count([c.label for c in found]),
                         detections=detections, cell_classes=CLASSES)
    return field, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    field, result = field_and_result()
    annotate(field, result)  # warm-up: fonts
    wall, cpu = [], []
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        annotate(field, result)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    print(f"annotate, 2592x1944, 50 cells: wall {statistics.median(wall):.3f} s, CPU {statistics.median(cpu):.3f} s "
          f"(median of {args.repeats}; wall {', '.join(f'{t:.3f}' for t in wall)})")


if __name__ == "__main__":
    main()
