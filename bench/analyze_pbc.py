"""pbc's own images through smear analysis: is a cell typed as well in `leukoscope analyze` as in a test crop?

Each pbc image is a CellaVision photograph of one labelled white cell at its centre. This runs the
analyzer (`leukoscope analyze`'s, shipped models by default) on them as one folder run, takes the
detected white cell nearest the image centre and compares its call with the image's label. Two ways
for the fields whose own red cells are too few for a scale estimate (half of pbc's): the run's scale
(the median estimate of the folder's fields, what `analyze` does with several fields) and the
detector's training scale (what it does with one field, and did before). Nothing is fitted.

    python bench/analyze_pbc.py --data ../shared/datasets/pbc --split runs/ood-shipped/split.json

``--split``: a classifier's training split whose test part holds pbc crops (subjects ``pbc-<stem>``):
its pbc images are used (held out from that classifier); else ``--images`` images drawn (seed 0).
Prints one JSON line per way: images, cells found, right, flagged unfamiliar, the run's scale.

Then the same images through `leukoscope predict` (one cell per image, no detector): taken whole
(``--as-given``, what predict did before it framed single cells) and framed at the classifier's
window around the centre at each image's own scale, else the run's (predict's default).
``--predict-only``: these rows alone.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def held_out_images(data: Path, split: Path | None, count: int) -> list[tuple[Path, str]]:
    """(image, label) pairs: the pbc images of ``split``'s test part, else ``count`` drawn from ``data``."""
    if split is not None:
        rows = json.loads(split.read_text())["splits"]["test"]
        stems = {row["subject"][len("pbc-"):]: row["label"] for row in rows if row["subject"].startswith("pbc-")}
        found = {path.stem: path for path in data.glob("*/*.jpg")}
        missing = sorted(set(stems) - set(found))
        if missing:
            raise SystemExit(f"{len(missing)} images of the split are not in {data} (e.g. {missing[0]})")
        return [(found[stem], label) for stem, label in sorted(stems.items())]
    images = sorted((path, path.parent.name) for path in data.glob("*/*.jpg"))
    if not images:
        raise SystemExit(f"{data} holds no pbc images (<class>/<name>.jpg)")
    return random.Random(0).sample(images, min(count, len(images)))


def score(analyzer: Any, images: list[tuple[Path, str]]) -> dict[str, Any]:
    """The centre cell's call against the label, image by image."""
    from leukoscope.io import load_image

    found = right = unfamiliar = run_scaled = 0
    for path, label in images:
        image = load_image(path)
        result = analyzer.analyze(image, str(path))
        run_scaled += (result.scale or {}).get("source") == "run"
        if not result.cells:
            continue
        width, height = image.size
        cell = min(result.cells, key=lambda c: ((c.box[0] + c.box[2]) / 2 - width / 2) ** 2
                   + ((c.box[1] + c.box[3]) / 2 - height / 2) ** 2)
        found += 1
        right += cell.top_class == label
        unfamiliar += bool(cell.unfamiliar)
    n = max(1, len(images))
    return {"images": len(images), "cell_found": round(found / n, 4), "right": round(right / n, 4),
            "unfamiliar": round(unfamiliar / n, 4), "fields_at_run_scale": run_scaled}


def score_predict(classifier: Any, images: list[tuple[Path, str]], **framing: Any) -> dict[str, Any]:
    """`leukoscope predict`'s call for each image (``framing``: :meth:`CellClassifier.predict_paths`'s)."""
    predictions = classifier.predict_paths([path for path, _ in images], **framing)
    n = max(1, len(images))
    scales = [p.scale.source for p in predictions if p.scale is not None]
    return {"images": len(images), "right": round(sum(p.top_class == label for p, (_, label) in
                                                      zip(predictions, images)) / n, 4),
            "unfamiliar": round(sum(p.unfamiliar for p in predictions) / n, 4),
            "scale_sources": {source: scales.count(source) for source in sorted(set(scales))}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "pbc")
    parser.add_argument("--split", type=Path, default=None, help="a classifier's split: its pbc test images")
    parser.add_argument("--images", type=int, default=200, help="without --split: this many images")
    parser.add_argument("--detector", default="pretrained:smear-detector")
    parser.add_argument("--classifier", default="pretrained:wbc-classifier")
    parser.add_argument("--predict-only", action="store_true", help="only the rows of `leukoscope predict`")
    args = parser.parse_args(list(argv) if argv is not None else None)
    from leukoscope.inference.predictor import CellClassifier
    from leukoscope.inference.smear import SmearAnalyzer
    from leukoscope.scale import run_scale

    images = held_out_images(args.data, args.split, args.images)
    scale = run_scale([path for path, _ in images])
    print(f"run scale: {scale.um_per_px} ({scale.note})", file=sys.stderr)
    classifier = CellClassifier.from_bundle(args.classifier)
    for way, framing in (("whole image (--as-given)", {}),
                         ("framed: own scale, else the run's", {"frame": True, "run_um_per_px": scale.um_per_px})):
        print(json.dumps({"predict": way, **score_predict(classifier, images, **framing)}))
    if args.predict_only:
        return 0
    for way, lent in (("run's scale", scale.um_per_px), ("detector's scale", None)):
        analyzer = SmearAnalyzer(args.detector, args.classifier, run_um_per_px=lent)
        print(json.dumps({"fields without a scale": way, "run_um_per_px": lent, **score(analyzer, images)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
