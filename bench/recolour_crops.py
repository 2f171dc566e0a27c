"""Recolour a share of one source's training crops in another source's colours (Reinhard colour transfer).

The shipped classifier learned all-taleqani's lavender stain together with that lab's cells (its blasts
and its Benign lymphocytes), and types another lavender lab's cells (BCCD) as those. This writes a
training set in which a share of pbc's *training* crops (``--share``, seeded) are rebuilt with the mean
and spread, per CIELAB channel, of a random all-taleqani training crop (one of ``--targets`` drawn), so
that pbc's eight types are seen in both labs' colours, while all-taleqani's crops, and so the colours
that tell its Benign cells from its blasts, stay as they are. Validation and test crops are untouched:
the split is the given one with only the recoloured training paths replaced, so in-domain scores stay
comparable with a classifier trained on it unchanged.

    python bench/recolour_crops.py --split runs/ood-shipped/split.json --out runs/recoloured [--share 0.5]
    leukoscope train --config configs/zoo_classifier.yaml data.path=runs/recoloured/train.csv \\
        data.split_file=runs/recoloured/split.json data.cell_window_um=24 output_root=runs/recoloured/run

Writes ``<out>/recoloured/<label>/<name>.png``, ``<out>/train.csv`` and ``<out>/split.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path
from typing import Any, Sequence


def source_of(row: dict[str, Any]) -> str:
    """``pbc`` or ``taleqani`` (bench/zoo.py's subjects are ``<source>-<image>``)."""
    return str(row["subject"]).split("-", 1)[0]


def lab_statistics(path: str | Path) -> tuple[Any, Any]:
    """Mean and standard deviation of an image's CIELAB channels."""
    import numpy as np
    from PIL import Image
    from skimage import color

    lab = color.rgb2lab(np.asarray(Image.open(path).convert("RGB")) / 255.0).reshape(-1, 3)
    return lab.mean(axis=0), lab.std(axis=0) + 1e-6


def recolour(path: str | Path, mean: Any, std: Any) -> Any:
    """The image at ``path`` with its CIELAB channels moved to ``mean`` / ``std`` (Reinhard et al. 2001)."""
    import numpy as np
    from PIL import Image
    from skimage import color

    lab = color.rgb2lab(np.asarray(Image.open(path).convert("RGB")) / 255.0)
    own_mean, own_std = lab.reshape(-1, 3).mean(axis=0), lab.reshape(-1, 3).std(axis=0) + 1e-6
    moved = (lab - own_mean) / own_std * std + mean
    moved[..., 0] = moved[..., 0].clip(0, 100)
    return Image.fromarray((color.lab2rgb(moved).clip(0, 1) * 255).round().astype(np.uint8))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, required=True, help="the training split (bench/zoo.py's crops)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--share", type=float, default=0.5, help="share of the --source training crops recoloured")
    parser.add_argument("--source", default="pbc", help="whose crops are recoloured")
    parser.add_argument("--colours-of", default="taleqani", help="whose training crops give the colours")
    parser.add_argument("--targets", type=int, default=400, help="colour donors drawn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not 0.0 < args.share <= 1.0 or args.targets < 1:
        parser.error("--share must be in (0, 1] and --targets at least 1")
    split = json.loads(args.split.read_text())
    train = split["splits"]["train"]
    donors = [row for row in train if source_of(row) == args.colours_of]
    if not donors or not any(source_of(row) == args.source for row in train):
        parser.error(f"{args.split}: its training part needs crops of both {args.source} and {args.colours_of}")
    rng = random.Random(args.seed)
    colours = [lab_statistics(row["path"]) for row in rng.sample(donors, min(args.targets, len(donors)))]
    changed = 0
    for row in train:
        if source_of(row) != args.source or rng.random() >= args.share:
            continue
        target = args.out / "recoloured" / row["label"] / f"{Path(row['path']).stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        recolour(row["path"], *colours[rng.randrange(len(colours))]).save(target)
        row["path"] = str(target.resolve())
        changed += 1
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "subject"])
        writer.writerows((row["path"], row["label"], row["subject"]) for part in split["splits"].values()
                         for row in part)
    split.setdefault("info", {})["dataset"] = str((args.out / "train.csv").resolve())
    (args.out / "split.json").write_text(json.dumps(split))
    total = sum(source_of(row) == args.source for row in train)
    print(json.dumps({"recoloured": changed, "of": total, "source": args.source, "colours_of": args.colours_of,
                      "donors": len(colours), "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
