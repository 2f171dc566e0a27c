"""Command-line interface: a thin layer over the Python API.

    leukoscope demo                       synthetic data -> train ~2 min -> report
    leukoscope train --config FILE [k=v]  one training run
    leukoscope search --config FILE       grid search (epochs x lr x optimizer ...)
    leukoscope evaluate --bundle B --data D
    leukoscope predict --bundle B INPUT [--explain DIR]
    leukoscope split --data D --out split.json
    leukoscope models
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from leukoscope.progress import console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="leukoscope: leukemia screening in blood-smear microscopy. Decision support, not a diagnosis.",
)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/bold red] {message}")
    raise typer.Exit(code=2)


def _user_errors():
    from leukoscope.data.manifest import DatasetError
    from leukoscope.engine.config import ConfigError
    from leukoscope.inference.bundle import BundleError
    from leukoscope.io import ImageDecodeError
    from leukoscope.models import WeightsError

    return (DatasetError, ConfigError, BundleError, ImageDecodeError, WeightsError, FileNotFoundError,
            FloatingPointError, ValueError)


def _run(fn, *args, **kwargs):
    """Call ``fn``; turn expected user errors into one clear line and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except _user_errors() as exc:
        _fail(str(exc))


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")


@app.command()
def models() -> None:
    """List the models that can be trained."""
    from leukoscope.models import list_models, model_entry

    for name in list_models():
        entry = model_entry(name)
        console.print(f"{name:<20} {entry.kind:<11} {entry.description}")


def _load_config(config: Optional[Path], overrides: List[str], data: Optional[str], model: Optional[str]):
    from leukoscope.engine.config import load_config

    extra = list(overrides)
    if data:
        extra.append(f"data.path={data}")
    if model:
        extra.append(f"model.name={model}")
    return load_config(config, extra)


@app.command()
def train(
    overrides: List[str] = typer.Argument(None, help="Config overrides such as train.epochs=5 model.name=resnet18."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Experiment YAML file."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset folder or CSV (same as data.path=...)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name (same as model.name=...)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train one model and write its bundle, metrics and report."""
    from leukoscope.engine.config import load_config
    from leukoscope.engine.experiment import run_experiment

    if resume is not None:
        cfg = _run(load_config, resume / "config.yaml", overrides or [])
    else:
        cfg = _run(_load_config, config, overrides or [], data, model)
    if cfg.search is not None:
        console.print("[yellow]note: this config has a search section; `leukoscope search` runs the grid[/yellow]")
    result = _run(run_experiment, cfg, run_dir=resume, resume=resume is not None, show_progress=not quiet)
    console.print(f"report: {result.run_dir / 'report.html'}")
    print(result.bundle_dir)


@app.command()
def search(
    overrides: List[str] = typer.Argument(None, help="Config overrides, e.g. search.lr=[0.01,0.001]."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Experiment YAML with a search section."),
    data: Optional[str] = typer.Option(None, "--data"),
    model: Optional[str] = typer.Option(None, "--model"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Grid search; the chosen run is the best by validation score."""
    from leukoscope.engine.search import run_search

    cfg = _run(_load_config, config, overrides or [], data, model)
    result = _run(run_search, cfg, show_progress=not quiet)
    console.print(f"results: {result.search_dir / 'results.csv'}")
    print(result.best.bundle_dir)


@app.command()
def split(
    data: str = typer.Option(..., "--data", help="Dataset folder or CSV."),
    out: Path = typer.Option(..., "--out", help="Split JSON to write."),
    ratios: str = typer.Option("0.8,0.1,0.1", help="train,val,test (or train,test)."),
    seed: int = typer.Option(0),
    near_duplicates: bool = typer.Option(True, help="Group near-identical images by perceptual hash."),
) -> None:
    """Make a stratified, subject-grouped, duplicate-aware split and save it."""
    from leukoscope.data.readers import read_dataset
    from leukoscope.data.splits import make_split
    from leukoscope.progress import counter_callback, progress_bar

    def work():
        manifest = read_dataset(data)
        values = [float(r) for r in ratios.split(",")]
        with progress_bar(len(manifest), "hashing images") as update:
            result = make_split(manifest, ratios=values, seed=seed, near_duplicates=near_duplicates,
                                progress=counter_callback(update))
        result.info["dataset"] = str(Path(data).resolve())
        result.save(out)
        return result

    result = _run(work)
    for name, counts in result.class_table().items():
        console.print(f"{name:>5}: {sum(counts.values()):>5} images {counts}")
    console.print(f"{result.info['n_samples_in_shared_groups']} images share a subject or duplicate group; "
                  f"no group straddles two splits")
    print(out)


@app.command()
def evaluate(
    bundle: Path = typer.Option(..., "--bundle", help="Bundle directory."),
    data: str = typer.Option(..., "--data", help="Labelled dataset folder or CSV."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: <bundle>/../eval-<data>)."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Score only one part of this split."),
    subset: str = typer.Option("test", help="Which part of --split-file to score."),
    on_corrupt: str = typer.Option("skip", help="skip or fail on unreadable images."),
) -> None:
    """Score a bundle on a labelled dataset with the same class names."""
    from leukoscope.inference.evaluate import evaluate_bundle

    out = out or bundle.parent / f"eval-{Path(data).stem}"
    metrics = _run(evaluate_bundle, bundle, data, out, split_file=split_file, subset=subset, on_corrupt=on_corrupt)
    console.print(f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro']['f1']:.4f} on {metrics['n']} images")
    print(out / "report.html")


@app.command()
def predict(
    inputs: List[Path] = typer.Argument(..., help="Image files and/or folders."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle directory."),
    out: Path = typer.Option(Path("predictions.csv"), "--out", help=".csv or .json"),
    threshold: Optional[float] = typer.Option(None, help="Below this confidence answer 'uncertain' "
                                              "(default: the bundle's)."),
    explain: Optional[Path] = typer.Option(None, "--explain", help="Save a Grad-CAM overlay per image here."),
    batch_size: int = typer.Option(32),
) -> None:
    """Classify images; writes probabilities per class, 'uncertain' below the threshold."""
    from leukoscope.inference.predict_files import collect_images, predict_to_file

    paths = _run(collect_images, inputs)
    predictions = _run(predict_to_file, bundle, paths, out, threshold=threshold, explain_dir=explain,
                       batch_size=batch_size)
    counts: dict[str, int] = {}
    for p in predictions:
        counts[p.label] = counts.get(p.label, 0) + 1
    console.print(f"{len(predictions)} images: {counts}")
    print(out)


@app.command()
def demo(
    out: Path = typer.Option(Path("leukoscope-demo"), "--out", help="Folder for data and run."),
    minutes: float = typer.Option(2.0, help="Training time budget."),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Generate synthetic stained cells, train ~2 minutes, evaluate, write the report."""
    from leukoscope.demo import run_demo

    result = _run(run_demo, out, minutes=minutes, show_progress=not quiet)
    console.print(f"[bold green]demo finished[/bold green]: test accuracy {result.metrics['accuracy']:.3f}")
    console.print(f"report: {result.run_dir / 'report.html'}")
    print(result.bundle_dir)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
