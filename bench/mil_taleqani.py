"""Benchmark: a cell classifier from field labels on all-taleqani (issue #3, item 5).

    python bench/mil_taleqani.py --minutes 3            # each of the two classifiers gets 3 minutes
    python bench/mil_taleqani.py --binary               # Benign vs malignant (Early+Pre+Pro)

The fields are split 80/10/10 (stratified, duplicate-aware); the white cells of
each field are located by colour segmentation and cropped; every crop inherits
its field's label; a cell classifier is trained on the crops and each test
field is classified from its cells (mean log-probability). A whole-image
classifier with the same model, budget and split is trained beside it.
Prints both field-level accuracies; the last line is the cell classifier bundle.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "all-taleqani"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--out", default=str(ROOT / "runs" / "mil-taleqani"))
    parser.add_argument("--model", default="abas_cnn")
    parser.add_argument("--cell-size", type=int, default=64)
    parser.add_argument("--field-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=None, help="time budget of each classifier")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--binary", action="store_true", help="Benign vs malignant instead of 4 classes")
    parser.add_argument("--detector", default=None, help="locate cells with this detector bundle instead")
    parser.add_argument("--whole-image-bundle", default=None,
                        help="also score this whole-image classifier (e.g. the last line of bench/taleqani.py) on "
                             "the same test fields; refused if it was trained on any of them")
    args = parser.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"{args.data} is absent: nothing to benchmark", file=sys.stderr)
        return 2

    from leukoscope.tasks.mil import run_mil_experiment

    class_map = {"Early": "Malignant", "Pre": "Malignant", "Pro": "Malignant"} if args.binary else None
    result = run_mil_experiment(args.data, args.out, model=args.model, cell_size=args.cell_size,
                                field_size=args.field_size, epochs=args.epochs, minutes=args.minutes,
                                batch_size=args.batch_size,
                                detector=args.detector, class_map=class_map, show_progress=sys.stderr.isatty(),
                                whole_image_bundle=args.whole_image_bundle)
    m = result.metrics
    print(f"fields {m['fields']}, cells {m['cells']}, fields without a located cell: {m['fields_without_cells']}")
    print(f"cell-level test accuracy (labels inherited from fields): {m['cell_level_test_accuracy_inherited_labels']:.4f}")
    print(f"field accuracy from its cells:   {m['field_accuracy_from_cells']:.4f} "
          f"(macro F1 {m['field_macro_f1_from_cells']:.4f}; cell classifier {m['cell_train_minutes']:.1f} min)")
    if "whole_image_accuracy" in m:
        print(f"whole-image classifier accuracy: {m['whole_image_accuracy']:.4f} "
              f"(macro F1 {m['whole_image_macro_f1']:.4f}; {m['whole_image_train_minutes']:.1f} min)")
    if "whole_image_bundle_accuracy" in m:
        print(f"whole-image bundle {m['whole_image_bundle_model']} on the same test fields: "
              f"{m['whole_image_bundle_accuracy']:.4f} (macro F1 {m['whole_image_bundle_macro_f1']:.4f})")
    print(result.cell_bundle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
