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

``--source`` takes several sources (``pbc,taleqani``: both labs' crops recoloured), and ``--colours-of``
may be ``other`` (each crop takes the colours of a crop from another source) or ``randstain`` (each crop
takes a mean and spread drawn, per CIELAB channel, from normal distributions fitted on the training
crops of every source: RandStainNA, Shen et al. 2022, colours between and around the labs' own).

Writes ``<out>/recoloured/<label>/<name>.png``, ``<out>/train.csv`` and ``<out>/split.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import warnings
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
    with warnings.catch_warnings():  # colours moved outside sRGB are clipped, as intended
        warnings.simplefilter("ignore", UserWarning)
        rgb = color.lab2rgb(moved)
    return Image.fromarray((rgb.clip(0, 1) * 255).round().astype(np.uint8))


DONOR_MODES = ("other", "randstain")


class ColourDonors:
    """Target CIELAB statistics for a crop of a given source, by ``--colours-of``'s rule."""

    def __init__(self, mode: str, train: list[dict[str, Any]], targets: int, rng: random.Random) -> None:
        import numpy as np

        self.mode, self.rng = mode, rng
        if mode in DONOR_MODES:  # up to ``targets`` donors of each source, so that every source has some
            by_source: dict[str, list[dict[str, Any]]] = {}
            for row in train:
                by_source.setdefault(source_of(row), []).append(row)
            drawn = [row for name in sorted(by_source)
                     for row in rng.sample(by_source[name], min(targets, len(by_source[name])))]
        else:
            pool = [row for row in train if source_of(row) == mode]
            drawn = rng.sample(pool, min(targets, len(pool)))
        self.colours = [(source_of(row), *lab_statistics(row["path"])) for row in drawn]
        if mode == "randstain":  # one normal distribution per statistic and channel
            stacked = np.array([np.concatenate([mean, std]) for _, mean, std in self.colours])
            self.centre, self.spread = stacked.mean(axis=0), stacked.std(axis=0)

    def for_source(self, source: str) -> tuple[Any, Any]:
        import numpy as np

        if self.mode == "randstain":
            draw = np.array([self.rng.gauss(c, s) for c, s in zip(self.centre, self.spread)])
            return draw[:3], np.maximum(draw[3:], 1.0)
        choices = self.colours if self.mode != "other" else [c for c in self.colours if c[0] != source]
        _, mean, std = choices[self.rng.randrange(len(choices))]
        return mean, std


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, required=True, help="the training split (bench/zoo.py's crops)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--share", type=float, default=0.5, help="share of the --source training crops recoloured")
    parser.add_argument("--source", default="pbc", help="whose crops are recoloured (comma-separated for several)")
    parser.add_argument("--colours-of", default="taleqani",
                        help=f"whose training crops give the colours: a source, or one of {', '.join(DONOR_MODES)}")
    parser.add_argument("--targets", type=int, default=400,
                        help="colour donors drawn (of each source with other and randstain)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not 0.0 < args.share <= 1.0 or args.targets < 1:
        parser.error("--share must be in (0, 1] and --targets at least 1")
    split = json.loads(args.split.read_text())
    train = split["splits"]["train"]
    sources = [name.strip() for name in args.source.split(",") if name.strip()]
    present = {source_of(row) for row in train}
    needed = set(sources) | ({args.colours_of} if args.colours_of not in DONOR_MODES else set())
    if not sources or not needed <= present or (args.colours_of == "other" and len(present) < 2):
        parser.error(f"{args.split}: its training part needs crops of {', '.join(sorted(needed))} "
                     f"(it has {', '.join(sorted(present))}); needs crops of both a source and its donors")
    rng = random.Random(args.seed)
    donors = ColourDonors(args.colours_of, train, args.targets, rng)
    changed = 0
    for row in train:
        if source_of(row) not in sources or rng.random() >= args.share:
            continue
        target = args.out / "recoloured" / row["label"] / f"{Path(row['path']).stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        recolour(row["path"], *donors.for_source(source_of(row))).save(target)
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
    total = sum(source_of(row) in sources for row in train)
    print(json.dumps({"recoloured": changed, "of": total, "source": ",".join(sources),
                      "colours_of": args.colours_of, "donors": len(donors.colours), "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
