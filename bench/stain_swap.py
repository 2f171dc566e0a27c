"""Does the blast call come from the cell or from the slide's colours? Swap the colours and see.

all-taleqani's Benign fields and its malignant fields come from different slides of one lab, and the
shipped classifier learned "lymphocyte" from the first and "blast" from the second. Its Benign control
(the Benign fields it never saw, called blast <= 5%) can hold because those cells are Benign-looking *or*
because they wear the Benign slides' colours. This rebuilds each cell in the colours of the other group
(Reinhard colour transfer, ``recolour_crops.recolour``: the CIELAB mean and spread of a random training
crop of the other group) and scores the classifier on both versions:

- the Benign control cells, as they are and in the colours of the blasts' training crops;
- the blasts of the classifier's test part (all-taleqani), as they are and in the colours of the Benign
  cells' training crops (all-taleqani's ``lymphocyte`` crops);
- each also recoloured in its own group's colours (a control: what recolouring alone changes).

A classifier that reads the cell calls each group the same in either colouring; one that reads the slide
follows the colours. Nothing is fitted on these cells; the donors are training crops.

    python bench/stain_swap.py --bundle pretrained:wbc-classifier --crops runs/zoo/crops \\
        --split runs/ood-shipped/split.json [--out swap.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import recolour_crops  # noqa: E402  (bench/ is not a package)
import zoo  # noqa: E402

BLAST = zoo.BLAST


def taleqani(rows: Sequence[dict[str, Any]], label: str) -> list[str]:
    """Paths of all-taleqani's crops of ``label`` as they are (bench/zoo.py's subjects are ``<source>-<image>``;
    a crop recoloured for training, ``<out>/recoloured/<label>/<name>.png`` of bench/recolour_crops.py, wears
    another lab's colours)."""
    return [row["path"] for row in rows if recolour_crops.source_of(row) == "taleqani" and row["label"] == label
            and Path(row["path"]).parent.parent.name != "recoloured"]


def blast_share(classifier: Any, images: Sequence[Any]) -> float:
    calls = [p.top_class for chunk in range(0, len(images), 64)
             for p in classifier.predict_images(images[chunk:chunk + 64])]
    return round(sum(call == BLAST for call in calls) / max(1, len(calls)), 4)


def swap_scores(classifier: Any, split: dict[str, list[dict[str, Any]]], benign: Sequence[str], *,
                donors: int = 200, seed: int = 0) -> dict[str, Any]:
    """The two rows (called blast as they are, and swapped) for a loaded ``classifier``, its split's parts
    (``split["train"]`` gives the colours, ``split["test"]`` the blasts) and the Benign control's crops.
    Raises ValueError when a group is missing."""
    from PIL import Image

    blast_donors, benign_donors = taleqani(split["train"], BLAST), taleqani(split["train"], zoo.BENIGN_LABEL)
    blasts = taleqani(split["test"], BLAST)
    if not (blast_donors and benign_donors and benign and blasts):
        raise ValueError("needs all-taleqani blast and lymphocyte training crops, Benign control crops and "
                         "test blasts")
    rng = random.Random(seed)

    def colours(paths: list[str]) -> list[tuple[Any, Any]]:
        return [recolour_crops.lab_statistics(path) for path in rng.sample(paths, min(donors, len(paths)))]

    in_blast_colours, in_benign_colours = colours(blast_donors), colours(benign_donors)

    own_rng = random.Random(seed + 1)  # its own draws: the swapped rows stay those of a run without it

    def score(paths: Sequence[str], other: list[tuple[Any, Any]], own: list[tuple[Any, Any]]) -> dict[str, Any]:
        originals = [Image.open(path).convert("RGB") for path in paths]
        swapped = [recolour_crops.recolour(path, *other[rng.randrange(len(other))]) for path in paths]
        # The control: recoloured as much, but in its own group's colours (what recolouring alone does).
        recoloured = [recolour_crops.recolour(path, *own[own_rng.randrange(len(own))]) for path in paths]
        return {"cells": len(paths), "called_blast": blast_share(classifier, originals),
                "called_blast_own_colours": blast_share(classifier, recoloured),
                "called_blast_swapped": blast_share(classifier, swapped)}

    return {"benign_control_in_blast_colours": score(list(benign), in_blast_colours, in_benign_colours),
            "test_blasts_in_benign_colours": score(blasts, in_benign_colours, in_blast_colours)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="classifier bundle folder or pretrained:NAME")
    parser.add_argument("--crops", type=Path, required=True, help="bench/zoo.py's crops folder (controls.json)")
    parser.add_argument("--split", type=Path, required=True, help="the bundle's training split")
    parser.add_argument("--donors", type=int, default=200, help="training crops of each group giving colours")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the result here (JSON)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    listing = args.crops / "controls.json"
    if not listing.is_file():
        parser.error(f"{listing} does not exist: run `python bench/zoo.py --crops-only` first")
    benign = [str(path) for path, _ in zoo.load_controls(listing).get("taleqani-benign", [])]
    start = time.perf_counter()
    try:
        rows = swap_scores(zoo._loaded_classifier(str(args.bundle)), json.loads(args.split.read_text())["splits"],
                           benign, donors=args.donors, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    result = {"bundle": str(args.bundle), **rows, "minutes": round((time.perf_counter() - start) / 60, 2)}
    print(json.dumps(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
