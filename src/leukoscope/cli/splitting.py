"""`leukoscope split`: a stratified, subject-grouped, duplicate-aware split saved for every later run."""

from __future__ import annotations

from pathlib import Path

import typer

from leukoscope.cli._common import call_or_exit, check_writable_folder, fail, flag
from leukoscope.progress import console


def split(
    data: str = typer.Option(..., "--data", help="Dataset folder or CSV."),
    out: Path = typer.Option(..., "--out", help="Split JSON to write."),
    ratios: str = typer.Option("0.8,0.1,0.1", help="train,val,test (or train,test)."),
    seed: int = typer.Option(0, help="Seed of the random deal of subject groups to the parts."),
    near_duplicates: bool = flag(True, help="Group near-identical images by perceptual hash."),
    overwrite: bool = flag(False, "--overwrite", help="Replace an existing --out file (runs and scores "
                           "made with the old split no longer match it)."),
) -> None:
    """Make a stratified, subject-grouped, duplicate-aware split and save it.

    Use it with `--split-file FILE` (or data.split_file=FILE) on train, search,
    compare and evaluate, so that every run and score uses these same parts.

    Duplicates kept in one part: byte copies, re-encoded copies, resized copies,
    rotations and mirror images, and brightness changes. Not caught: cropped or
    re-framed copies (a few percent of the border trimmed can be missed) and a
    cell photographed again; give such copies one subject in a CSV manifest.

    Refused, as train refuses them: ratios that give the training part nothing,
    a class with no training images, and a class named uncertain.
    """
    from leukoscope.data.readers import check_spellings, read_dataset, refuse_uncertain_class
    from leukoscope.data.splits import check_training_part, make_split, parts_not_asked_for
    from leukoscope.progress import counter_callback, progress_bar

    if out.is_dir():
        fail(f"--out {out} is a folder: give the split file's path (e.g. {out / 'split.json'})")
    if out.exists() and not overwrite:  # a split is made once and shared: replacing it silently changes every run
        fail(f"--out {out} already exists: it may be the split other runs used; choose another file, or pass "
             f"--overwrite")
    check_writable_folder(out.parent, "--out", out)
    try:
        values = [float(r) for r in ratios.split(",")]
    except ValueError:
        fail(f"--ratios must be numbers separated by commas (train,val,test or train,test), got {ratios!r}")

    def work():
        manifest = read_dataset(data, require_labels=True, check_files=True)
        check_spellings(data, manifest.classes)
        refuse_uncertain_class(data, manifest.classes, "or list the others in a CSV manifest")  # as train does
        with progress_bar(len(manifest), "hashing images") as update:
            result = make_split(manifest, ratios=values, seed=seed, near_duplicates=near_duplicates,
                                progress=counter_callback(update))
        check_training_part(result, data)  # a split that training would refuse is not written
        result.info["dataset"] = str(Path(data).resolve())
        result.save(out)
        return result

    result = call_or_exit(work)
    for name, counts in result.class_table().items():
        console.print(f"{name:>5}: {sum(counts.values()):>5} images {counts}")
    console.print(f"{result.info['n_samples_in_shared_groups']} images share a subject or duplicate group; "
                  f"no group straddles two splits")
    missing = parts_not_asked_for(values)  # asked for, not for want of images: said so, with what it means
    if missing:
        console.print(f"note: no {' or '.join('validation' if name == 'val' else name for name in missing)} part: "
                      f"--ratios {ratios} gives {'them' if len(missing) > 1 else 'it'} none. "
                      + _WITHOUT_PARTS[tuple(missing)], soft_wrap=True)
    print(out)


#: What a split without these parts (by its ratios) means for the runs that use it.
_WITHOUT_PARTS = {
    ("val",): "A run chooses its epoch by training scores and fits no temperature; search refuses it, and "
              "compare chooses no row.",
    ("test",): "A run is scored on its validation part, which chose its epoch: an optimistic score.",
    ("val", "test"): "A run's scores are its training images' own and say nothing of new images.",
}
