"""Command-line interface: a thin layer over the Python API.

    leukoscope demo                       synthetic data -> train ~2 min -> report
    leukoscope train --config FILE [k=v]  one training run
    leukoscope search --config FILE       grid search (epochs x lr x optimizer ...)
    leukoscope evaluate --bundle B --data D
    leukoscope predict --bundle B INPUT [--explain DIR] [--backend auto|torch|onnxruntime|openvino]
    leukoscope export --bundle B --format onnx|openvino [--int8 --calibration DATA] [--out DIR] [--check DATA]
                                          an inference bundle with model.onnx (or OpenVINO's model.xml)
    leukoscope calibrate-ood --bundle B --data D  out-of-distribution flag for an existing classifier
    (B: a bundle folder, or pretrained:NAME for a model shipped in the package)
    leukoscope split --data D --out split.json  (then --split-file split.json on train/search/compare/evaluate)
    leukoscope segment INPUT... --out DIR [--figure]
    leukoscope compare --config FILE      several models (CNN + classical), one split, one table
    leukoscope train-detector --config FILE  a cell detector on a Pascal VOC folder (= train, task: detect)
    leukoscope mil --config FILE          a cell classifier from field labels (multiple-instance)
    leukoscope analyze FILE|FOLDER [--detector D] [--classifier B|none]   differential, blast %, flags
                                          (default: the shipped smear-detector and wbc-classifier)
    leukoscope analyze ARCHIVE --engine ray [--address auto]   the same on a Ray cluster, Parquet tables
    leukoscope train --init B --data D    fine-tune a trained bundle (or pretrained:NAME) on new data
    leukoscope models [--pretrained | --card NAME]
    leukoscope serve --bundle B [--detector D]   web service (needs the service extra)
    leukoscope user add NAME --role ROLE        service users; `user token NAME` for scripts
"""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Sequence

import typer
from rich.markup import escape

from leukoscope.pretrained import (DEFAULT_CLASSIFIER, DEFAULT_DETECTOR, PREFIX, is_pretrained_spec, list_pretrained,
                                   model_card, peek_bundle, pretrained_names, pretrained_root, resolve_bundle,
                                   shipped_spec)
from leukoscope.progress import console, name_some

#: `predict`/`analyze`/`evaluate --backend` choices (leukoscope.inference.runtime.BACKENDS, which imports torch).
BACKENDS = ("auto", "torch", "onnxruntime", "openvino")

if TYPE_CHECKING:
    from leukoscope.engine.config import ExperimentConfig


def flag(default: bool | None, *names: str, **options: Any) -> Any:
    """A switch (``--quiet``, ``--class-map/--no-class-map``): typer's option without the ``<bool>`` its help
    would show beside the name, which reads as a value to type after it (``--quiet true`` is refused)."""
    return typer.Option(default, *names, metavar="", **options)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # a docstring's paragraphs reflowed to the terminal (rich mode kept its line breaks: ragged lines at 80 columns)
    rich_markup_mode="markdown",
    help="leukoscope: leukemia screening in blood-smear microscopy. Decision support, not a diagnosis.",
)


#: Exit codes of commands that read many images: 0 every input was used; 3 some could not be read or
#: analysed (the others' results are written, the failures named in them); 2 nothing was done (bad input,
#: a usage error, or no input usable). A batch script can tell a clean run from a partial one, and a partial
#: one from a crash (Python exits with 1 on an uncaught error, click on Ctrl-C: outputs may then be missing).
EXIT_SOME_FAILED = 3


def _fail(message: str) -> None:
    # escape: messages quote lists ("[sgd, adam]", "['blast']") that rich would take for markup
    console.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=2)


#: (module, class) of the errors that mean "bad input", shown as one line.
_USER_ERROR_CLASSES = (("leukoscope.data.manifest", "DatasetError"), ("leukoscope.engine.config", "ConfigError"),
                       ("leukoscope.bundle", "BundleError"), ("leukoscope.io", "ImageDecodeError"),
                       ("leukoscope.models", "WeightsError"))


def _user_errors() -> tuple[type[BaseException], ...]:
    # Only classes of modules already imported: a module not loaded cannot have raised,
    # and importing it here would load torch (seconds) to report a typo.
    loaded = tuple(getattr(sys.modules[module], name) for module, name in _USER_ERROR_CLASSES
                   if module in sys.modules)
    return (*loaded, FileNotFoundError, FloatingPointError, ValueError)


def _run(fn, *args, **kwargs):
    """Call ``fn``; turn expected user errors into one clear line and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except _user_errors() as exc:
        _fail(str(exc))


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's time limit, `timeout`, a container stopped) as Ctrl-C, so that work which
    tidies up after Ctrl-C (an export's half-written folder) does so after it too."""
    import signal

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.getsignal(signal.SIGTERM)  # None: a handler installed outside Python
    try:
        signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (tests calling the command): nothing to take over
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _print_version(asked: bool) -> None:
    if asked:
        from leukoscope import __version__

        print(f"leukoscope {__version__}")
        raise typer.Exit()


@app.callback()
def _main(verbose: bool = flag(False, "--verbose", "-v", help="Log details."),
          version: bool = flag(False, "--version", callback=_print_version, is_eager=True,
                               help="Print leukoscope's version and exit.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")


@app.command()
def models(
    pretrained: bool = flag(False, "--pretrained", help="List the trained models shipped in the package "
                            "(use them as pretrained:NAME)."),
    card: Optional[str] = typer.Option(None, "--card", metavar="NAME", help="Print the model card of shipped model "
                                       "NAME."),
) -> None:
    """List the models that can be trained (or, with --pretrained, the shipped trained ones)."""
    from rich.console import Console

    listing = Console(soft_wrap=True)  # the answer goes to stdout (to a pipe or a file), messages to stderr
    if card is not None:
        text = _run(model_card, card)
        # wrapped, not soft-wrapped: rich crops each Markdown bullet and table cell of a soft-wrapping
        # console to one line (the card's "research use only" never reached the reader)
        Console().print(_card_markdown(text))
        return
    if pretrained:
        shipped = _run(list_pretrained)
        if not shipped:
            console.print(f"no shipped models in this install ({pretrained_root()} holds none); train your own "
                          f"with `leukoscope train`, or retrain them with python bench/zoo.py")
            return
        listing.print(f"{'name':<20} {'task':<9} {'classes':>7} {'size':>9}  summary")
        for model in shipped:
            listing.print(f"{model.name:<20} {model.task:<9} {len(model.classes):>7} "
                          f"{model.size_bytes / 1e6:>6.1f} MB  {escape(model.summary)}")
        return
    from leukoscope.models import list_models, model_entry

    names = list_models()
    width = max(len(name) for name in names) + 1  # one column, however long the longest name
    for name in names:
        entry = model_entry(name)
        listing.print(f"{name:<{width}} {entry.kind:<11} {escape(entry.description)}")


def _card_markdown(text: str) -> Any:
    """A model card as rich Markdown whose tables never cut a cell: rich's tables end a cell that does not fit
    with "…", and at 80 columns the card's sources read "taleqani-b…" and "cnmc-all-o…". Each column gets at
    least its longest word, the room left goes to the columns with more to say, and cells wrap at spaces."""
    from rich.markdown import Markdown, TableElement

    class WholeWordsTable(TableElement):
        def __rich_console__(self, console: Any, options: Any) -> Iterator[Any]:
            for table in super().__rich_console__(console, options):
                _fit_columns(table, console, options)
                yield table

    class CardMarkdown(Markdown):
        elements = {**Markdown.elements, "table_open": WholeWordsTable}

    return CardMarkdown(text)


def _fit_columns(table: Any, console: Any, options: Any) -> None:
    """Set the widths of ``table``'s columns to fit ``options.max_width`` without breaking a word where the
    longest words of the columns fit side by side; else leave rich its widths, folding words (never "…")."""
    from rich.measure import Measurement

    for column in table.columns:
        column.overflow = "fold"  # a word wider than its column is broken over lines, not cut
    wide = options.update_width(10_000)  # natural widths, not yet clipped to the terminal's
    measured = [[Measurement.get(console, wide, cell) for cell in (column.header, *column.cells)]
                for column in table.columns]
    low = [max(m.minimum for m in cells) for cells in measured]  # the longest word of the column
    high = [max(m.maximum for m in cells) for cells in measured]  # its longest cell on one line
    room = options.max_width - (Measurement.get(console, wide, table).minimum - sum(low))  # less padding, rules
    if sum(low) > room:
        return
    # the room beyond the longest words, shared fairly: the columns that lack least get all of it first (a
    # number's header on one line), and the rest is split among the others (the long verdicts wrap)
    spare, widths = room - sum(low), list(low)
    order = sorted(range(len(low)), key=lambda i: high[i] - low[i])
    for done, index in enumerate(order):
        given = min(high[index] - low[index], spare // (len(order) - done))
        widths[index] += given
        spare -= given
    for column, width in zip(table.columns, widths):
        column.width = width


# Argument checks run before the heavy imports (torch takes seconds to load), so a
# typo in a path or key fails in well under a second: the config module, the dataset
# path check and the bundle check below import no torch.

SPLIT_FILE_HELP = ("Split JSON (from `leukoscope split`) to train and score on; made and saved there if absent "
                   "(same as data.split_file=...).")


def _load_config(config: Optional[Path], overrides: List[str], data: Optional[str], model: Optional[str],
                 split_file: Optional[Path] = None) -> "ExperimentConfig":
    """A classification config (search, compare) once its dataset path exists (a missing one would
    otherwise fail only after torch loads)."""
    from leukoscope.data.readers import check_dataset_path
    from leukoscope.engine.config import load_config

    cfg = _run(load_config, config, _overrides(overrides, data, model, split_file))
    if cfg.data.path:
        _run(check_dataset_path, cfg.data.path)
    return cfg


def _check_writable_folder(folder: Path, option: str) -> None:
    """Fail (one line, exit 2) when ``folder`` or a folder above it is an existing file: the outputs could
    not be written there, and that should be said before any model loads, not as a traceback after."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                _fail(f"{option} {folder}: {path} is a file, not a folder")
            return


def _check_run_paths(cfg: Any) -> None:
    """Where a run writes, checked before the data are prepared: ``output_root`` a folder (or to be one), and
    ``data.split_file`` a file in one."""
    if getattr(cfg, "output_root", None):
        _check_writable_folder(Path(cfg.output_root), "output_root")
    split_file = getattr(getattr(cfg, "data", None), "split_file", None)
    if split_file:
        if Path(split_file).is_dir():
            _fail(f"data.split_file {split_file}: is a folder, not a split file")
        _check_writable_folder(Path(split_file).parent, "data.split_file")


def _own_dataset(info: Any, data: str) -> bool:
    """Whether ``data`` is the dataset the classifier bundle was trained from (its crops already cut)."""
    own = info.provenance.get("dataset")
    return bool(own) and Path(str(own)).resolve() == Path(data).resolve()


def _frames_cells(info: Any, data: str, as_given: bool, um_per_px: Optional[float]) -> bool:
    """Whether a classifier's single-cell images of ``data`` are framed for its window as predict frames them:
    not with --as-given or without a window, nor the bundle's own training dataset (crops cut at the window,
    as training took them) unless --um-per-px says otherwise."""
    if as_given or info.preprocessing.cell_window_um is None:
        return False
    return um_per_px is not None or not _own_dataset(info, data)


def _check_bundle(spec: Path | str, option: str | None = None) -> Path:
    """The bundle folder ``spec`` names (``pretrained:NAME``: a shipped model's), checked to exist.
    The bundle readers import torch; these checks are the cheap part of theirs."""
    path = _run(resolve_bundle, spec, option=option)
    if path.is_file():
        _fail(f"{path}: is a file; a bundle is a folder (with bundle.json)")
    if not path.is_dir():
        _fail(f"{path}: bundle folder does not exist")
    if not (path / "bundle.json").is_file():
        _fail(f"{path}: not a leukoscope bundle (no bundle.json)")
    return path


def _refuse_option_and_override(option: str, value: object, key: str, overrides: Sequence[str]) -> None:
    given = [o for o in overrides if o.partition("=")[0].strip() == key]
    if value and given:
        _fail(f"{option} and the override {given[0]} both set {key}: give one")


def _overrides(overrides: List[str], data: Optional[str], model: Optional[str],
               split_file: Optional[Path] = None) -> list[str]:
    extra = list(overrides)
    # An option and an override of the same key: the option won unseen (--model resnet18 model.name=mobilenet_v2
    # trained resnet18)
    for option, value, key in (("--data", data, "data.path"), ("--model", model, "model.name"),
                               ("--split-file", split_file, "data.split_file")):
        _refuse_option_and_override(option, value, key, overrides)
    # Paths given as options are strings as written: quoted, a YAML reading of "runs #2" or "2024" would cut or
    # retype them (an override's value is YAML; a JSON string is a YAML string).
    if data:
        extra.append(f"data.path={json.dumps(data)}")
    if model:
        extra.append(f"model.name={model}")
    if split_file:  # absolute: the run's config.yaml must find it from any folder
        extra.append(f"data.split_file={json.dumps(str(split_file.resolve()))}")
    return extra


def _train_task(config: Optional[Path], model: Optional[str], overrides: List[str], resume: Optional[Path],
                init: Optional[str] = None):
    """The task a `train` call means: the config's (or the resumed run's) ``task:``, else the task of
    the ``--init`` bundle, else the kind of the model named by ``--model`` or ``model.name=``."""
    from leukoscope.tasks import task_named, task_of_config_file, task_of_model

    if resume is not None:  # a missing run folder said as such, not as an unreadable config.yaml in it
        from leukoscope.engine.run_dir import require_run_dir

        require_run_dir(resume)
    source = resume / "config.yaml" if resume is not None else config
    if source is not None:
        return task_named(task_of_config_file(source))
    if init is not None:
        return task_named(peek_bundle(_check_bundle(init, "--init")).task)
    named = [o.partition("=")[2] for o in overrides if o.startswith("model.name=")]
    model = model or (named[-1] if named else None)
    return task_named(task_of_model(model) if model else "classify")


RESUME_HELP = ("Continue the run in this directory (only train.epochs, max_minutes, threads, device and "
               "keep_checkpoint may change).")
#: What ``train --resume`` may change: how long and where the run goes on, not what it learns.
RESUME_OVERRIDES = ("train.epochs", "train.max_minutes", "train.threads", "train.device", "train.keep_checkpoint")


def _declared_task(path: Path) -> str | None:
    """The ``task:`` the YAML at ``path`` names, as the task table spells it; None when it names none (it is
    then the command's own) or cannot be read (the config loader says why)."""
    import yaml

    from leukoscope.tasks import task_named

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    declared = raw.get("task") if isinstance(raw, dict) else None
    return None if declared is None else _run(task_named, str(declared)).name


def _train(task, config: Optional[Path], overrides: List[str], data: Optional[str], model: Optional[str],
           resume: Optional[Path], quiet: bool, split_file: Optional[Path] = None, init: Optional[str] = None) -> None:
    """Load and check the task's config, then train; the run prints its report's path (also to train.log)."""
    source = resume / "config.yaml" if resume is not None else config
    if source is not None and Path(source).is_file():  # a config of another task: say so, not its every key
        found = _declared_task(Path(source)) or task.name
        if found != task.name:
            command = {"detect": "train-detector (or train)", "mil": "mil (or train)"}.get(found, "train")
            _fail(f"{source} is a {found} {'run' if resume is not None else 'config'} (task: {found}), not a "
                  f"{task.name} one: use `leukoscope {command}`")
    if split_file is not None and task.name != "classify":
        _fail(f"--split-file applies to classifier training; a {task.name} config sets its split otherwise")
    if resume is not None:
        from leukoscope.engine.run_dir import require_run_dir

        if split_file is not None:
            _fail("--split-file cannot change the split of a run being resumed (it keeps its split.json)")
        if init is not None:
            _fail("--init cannot change the starting weights of a run being resumed (it continues its checkpoint)")
        for option, given in (("--config", config), ("--data", data), ("--model", model)):
            if given is not None:
                _fail(f"{option} cannot change a run being resumed: it continues with its own config.yaml "
                      f"(start a new run to train on other data or another model)")
        fixed = [o for o in overrides if o.partition("=")[0].strip() not in RESUME_OVERRIDES]
        if fixed:
            _fail(f"{', '.join(fixed)}: a run being resumed keeps its model, data and optimizer (its checkpoint "
                  f"holds their state); only {', '.join(RESUME_OVERRIDES)} may change on --resume")
        _run(require_run_dir, resume)
        config, data, model = resume / "config.yaml", None, None
    extra = list(overrides or [])
    if init is not None:  # checked here, before torch loads; kept as written (pretrained:NAME) in config.yaml
        _refuse_option_and_override("--init", init, "model.init", extra)
        _check_bundle(init, "--init")
        extra.append(f"model.init={json.dumps(init if is_pretrained_spec(init) else str(Path(init).resolve()))}")
    cfg = _run(task.function("load_config"), config, _overrides(extra, data, model, split_file))
    epochs = getattr(getattr(cfg, "train", None), "epochs", None)
    model_name = getattr(getattr(cfg, "model", None), "name", None)
    if resume is not None and model_name is not None:
        from leukoscope.models.classic import CLASSIC_MODELS  # (imports scikit-learn: only when resuming)

        if model_name in CLASSIC_MODELS:  # fitted in one step, no checkpoint: --resume fits it again
            epochs = None
    if resume is not None and isinstance(epochs, int):  # now, not after the data are prepared
        from leukoscope.engine.checkpoint import CHECKPOINT_FILE, check_resume_epochs, trained_epochs

        if not (resume / CHECKPOINT_FILE).exists():  # said now, not after the data are prepared (minutes)
            _fail(f"cannot resume: no {CHECKPOINT_FILE} in {resume}"
                  + ("; the run completed and removed it (train.keep_checkpoint=true keeps it for training further)"
                     if (resume / "bundle").is_dir() else ""))
        trained = _run(trained_epochs, resume / CHECKPOINT_FILE)
        if trained is not None:
            _run(check_resume_epochs, trained, epochs)
    data_path = getattr(getattr(cfg, "data", None), "path", None)
    if data_path:  # a missing dataset fails now, not after torch has loaded
        from leukoscope.data.readers import check_dataset_path

        _run(check_dataset_path, data_path)
    _check_run_paths(cfg)
    if getattr(cfg, "search", None) is not None:
        console.print("[yellow]note: this config has a search section; `leukoscope search` runs the grid[/yellow]")
    result = _run(task.function("train"), cfg, run_dir=resume, resume=resume is not None, show_progress=not quiet)
    print(result.bundle_dir)


@app.command()
def train(
    overrides: List[str] = typer.Argument(None, help="Config overrides such as train.epochs=5 model.name=resnet18."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Experiment YAML file (its task: "
                                          "classify, detect or mil)."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset folder or CSV, or a Pascal VOC folder for a "
                                       "detector (same as data.path=...)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name (same as model.name=...); a detector "
                                        "name trains a detector."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help=SPLIT_FILE_HELP),
    resume: Optional[Path] = typer.Option(None, "--resume", help=RESUME_HELP),
    init: Optional[str] = typer.Option(None, "--init", help="Fine-tune this trained bundle (a folder or "
                                       "pretrained:NAME; same as model.init=...): its architecture and input "
                                       "size, its head when the data has its classes."),
    quiet: bool = flag(False, "--quiet", help="No progress bars."),
) -> None:
    """Train one model (by the config's task, or the model's kind) and write its bundle and report.

    A config's `task:` (classify, detect or mil), a detector `--model` or an `--init`
    detector bundle chooses the trainer; the last line printed is the bundle.
    """
    task = _run(_train_task, config, model, overrides or [], resume, init)
    _train(task, config, overrides or [], data, model, resume, quiet, split_file, init)


@app.command()
def search(
    overrides: List[str] = typer.Argument(None, help="Config overrides, e.g. search.lr=[0.01,0.001]."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Experiment YAML with a search section."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset folder or CSV (same as data.path=...)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name (same as model.name=...)."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help=SPLIT_FILE_HELP),
    quiet: bool = flag(False, "--quiet", help="No progress bars."),
) -> None:
    """Grid search; the chosen run is the best by validation score.

    Needs a `search:` section (in --config, or as overrides such as search.lr=[0.01,0.001]
    search.epochs=[5,10]): the values to try of each key (docs/config.md). Every run trains on
    one saved split; the chosen run is the best on its validation part, never on test."""
    cfg = _load_config(config, overrides or [], data, model, split_file)
    _run(cfg.require_search)  # before minutes of training the defaults under a search's name
    from leukoscope.tasks.search import run_search

    result = _run(run_search, cfg, show_progress=not quiet)
    console.print(f"results: {result.search_dir / 'results.csv'}")
    print(result.best.bundle_dir)


@app.command()
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
        _fail(f"--out {out} is a folder: give the split file's path (e.g. {out / 'split.json'})")
    if out.exists() and not overwrite:  # a split is made once and shared: replacing it silently changes every run
        _fail(f"--out {out} already exists: it may be the split other runs used; choose another file, or pass "
              f"--overwrite")
    _check_writable_folder(out.parent, "--out")
    try:
        values = [float(r) for r in ratios.split(",")]
    except ValueError:
        _fail(f"--ratios must be numbers separated by commas (train,val,test or train,test), got {ratios!r}")

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

    result = _run(work)
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


#: What an evaluation writes: a folder holding one of them holds an earlier evaluation.
EVALUATION_FILES = ("metrics.json", "report.html", "scored_images.csv")


def _evaluation_out(out: Optional[Path], default: Path, overwrite: bool) -> tuple[Path, str]:
    """Where an evaluation goes: ``out`` unless it holds an earlier evaluation (refused without ``overwrite``);
    else ``default``, or the first ``default-2``, ``-3``... that is free (an honest test score was silently
    replaced by a training-data score written to the same default folder). With a note saying so when the
    default was taken, for the caller to print once the evaluation is written (printed before, it announced a
    folder that an evaluation refused next, e.g. of training images, never wrote)."""
    if out is not None:
        held = [name for name in EVALUATION_FILES if (out / name).is_file()]
        if held and not overwrite:
            _fail(f"--out {out} already holds an evaluation ({', '.join(held)}): choose another folder, or pass "
                  f"--overwrite to replace it")
        return out, ""
    folder, number = default, 1
    while folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):  # an empty folder is free
        number += 1
        folder = default.with_name(f"{default.name}-{number}")
    note = "" if folder == default else (f"note: {escape(str(default))} holds an earlier evaluation, kept; this one "
                                         f"went to {escape(str(folder))}")
    return folder, note


@app.command()
def evaluate(
    bundle: Path = typer.Option(..., "--bundle", help="Bundle directory, or pretrained:NAME."),
    data: str = typer.Option(..., "--data", help="Labelled dataset folder or CSV."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: `<bundle>/../eval-<data>`, "
                                       "or `eval-<data>-2`, -3... when it holds an earlier evaluation; for "
                                       "pretrained:NAME `./eval-NAME-<data>`); refused when it holds an evaluation "
                                       "already, unless --overwrite."),
    overwrite: bool = flag(False, "--overwrite", help="Replace the evaluation an existing --out holds "
                           "(with --out only: the default folder is never replaced)."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Score only one part of this split."),
    subset: Optional[str] = typer.Option(None, help="Which part of --split-file to score (default: test)."),
    on_corrupt: str = typer.Option("skip", help="skip or fail on unreadable images."),
    split: Optional[str] = typer.Option(None, "--split", help="Detector bundles: VOC split to score "
                                        "(e.g. Testing, test)."),
    allow_training_data: bool = flag(False, "--allow-training-data", help="Score images the bundle was "
                                     "trained or validated on (refused by default: such a score says "
                                     "nothing about new images)."),
    backend: str = typer.Option("auto", "--backend", help="What runs the model: auto (the fastest installed "
                                "backend the bundle has a graph for, else torch), torch, onnxruntime or openvino "
                                "(a bundle from `leukoscope export`); an exported int8 bundle is scored as int8 "
                                "unless torch."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for inference (default: the backend's)."),
    um_per_px: Optional[float] = typer.Option(None, "--um-per-px", help="Pixel size of the images (micrometres); "
                                              "default: each image's own scale (its red cells), else the images' "
                                              "together. Classifiers frame each cell at it, as predict; detectors "
                                              "see each field brought to their training scale, as analyze."),
    as_given: bool = flag(False, "--as-given", help="Score each image as it is: a classifier's whole "
                          "(crops already cut at its window, e.g. a training set's), a detector's at its "
                          "own size."),
    class_map: bool = flag(True, "--class-map/--no-class-map", help="Classifier bundles: label the data as "
                           "the bundle's run did, by the data.class_map it recorded (and leave out the "
                           "classes its data.classes left out); --no-class-map scores the labels as "
                           "written."),
    quiet: bool = flag(False, "--quiet", help="No progress bars."),
) -> None:
    """Score a bundle on a labelled dataset with the same class names (a detector bundle: on a VOC folder).

    A classifier trained on a physical window (the shipped one: 24 um) scores each image as predict
    classifies it: that many micrometres around its centre, at --um-per-px or the scale the image's red
    cells give (else the images' scale together); an image with none is scored whole, and the report
    says how many. --as-given scores crops already cut at the window as they are, as is the bundle's
    own training dataset (its --split-file test part) unless --um-per-px is given.
    A classifier trained with data.class_map (Early, Pre, Pro -> Malignant) scores its data's labels mapped
    the same way, and says so.
    """
    from leukoscope.data.readers import check_dataset_path

    if overwrite and out is None:  # the default folder goes to eval-<data>-2, -3...: there is nothing to replace
        _fail("--overwrite replaces the evaluation an --out folder holds; without --out each evaluation goes to a "
              "new folder (eval-<data>, then eval-<data>-2, ...) and none is replaced: give --out FOLDER to "
              "replace the evaluation it holds")
    if backend not in BACKENDS:
        _fail(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if on_corrupt not in ("skip", "fail"):
        _fail(f"--on-corrupt must be skip or fail, got {on_corrupt!r}")
    if threads is not None and threads < 1:
        _fail(f"--threads must be at least 1, got {threads}")
    if um_per_px is not None and as_given:
        _fail("--um-per-px gives the images' scale (a classifier frames each cell at it, a detector sees each field "
              "brought from it to its own); --as-given takes the images as they are: give one")
    if um_per_px is not None:
        from leukoscope.scale import checked_um_per_px

        _run(checked_um_per_px, um_per_px, "--um-per-px")

    spec, bundle = bundle, _check_bundle(bundle, "--bundle")
    _run(check_dataset_path, data)
    if split_file is not None and not split_file.is_file():
        _fail(f"{split_file}: split file does not exist (make one with `leukoscope split`)"
              if not split_file.exists() else f"{split_file}: is a folder, not a split file")
    if subset is not None and split_file is None:  # else every image would be scored, and said to be the part
        _fail(f"--subset {subset} names a part of a split: give the split with --split-file")
    from leukoscope.bundle import read_bundle_info
    from leukoscope.tasks import task_named

    info = _run(read_bundle_info, bundle)
    evaluate_bundle = task_named(info.task).function("evaluate")
    # Options of the other task would be silently ignored: refuse them.
    foreign = ({"--split-file": split_file, "--subset": subset, "--allow-training-data": allow_training_data,
                "--no-class-map": not class_map}
               if info.task == "detect" else {"--split": split})
    given = [name for name, value in foreign.items() if value]
    if given:
        _fail(f"{bundle} is a {'detector' if info.task == 'detect' else 'classifier'} bundle: "
              f"{', '.join(given)} does not apply to it")
    # a shipped model's folder is inside the installed package: its evaluations go to the working folder
    shipped = is_pretrained_spec(spec) or shipped_spec(bundle) is not None  # as pretrained:NAME or as its folder
    out_root, prefix = (Path("."), f"eval-{bundle.name}-") if shipped else (bundle.parent, "eval-")
    if threads:  # torch's share of either task (a detector's graph runs beside torch's proposal stage)
        import torch

        torch.set_num_threads(threads)
    if info.task == "detect":
        out, note = _evaluation_out(out, out_root / f"{prefix}{Path(data).name}{'-' + split if split else ''}",
                                    overwrite)
        _check_writable_folder(out, "--out")
        if um_per_px is not None and not getattr(info, "um_per_px", None):
            console.print("[yellow]warning:[/yellow] --um-per-px ignored: this detector records no training scale "
                          "to bring the fields to; they are scored as they are", soft_wrap=True)
        metrics = _run(evaluate_bundle, bundle, data, out, split=split, on_error=on_corrupt, backend=backend,
                       threads=threads, at_scale=not as_given, um_per_px=um_per_px, show_progress=not quiet)
        if (metrics.get("scales") or {}).get("note"):
            console.print(f"scale: {escape(metrics['scales']['note'])}", soft_wrap=True)
        console.print(f"mAP@[.5:.95] {metrics['map']:.4f}, mAP@0.5 {metrics['map_50']:.4f} "
                      f"on {metrics['n_images']} images")
        if metrics.get("training_overlap"):
            from leukoscope.data.fingerprints import describe_overlap

            console.print(f"[yellow]warning:[/yellow] these images include the detector's training images "
                          f"({describe_overlap(metrics['training_overlap'])}): the score says nothing about new "
                          f"images", soft_wrap=True)
    else:
        out, note = _evaluation_out(out, out_root / f"{prefix}{Path(data).stem}", overwrite)
        _check_writable_folder(out, "--out")
        if um_per_px is not None and info.preprocessing.cell_window_um is None:
            console.print("[yellow]warning:[/yellow] --um-per-px ignored: this classifier has no physical window "
                          "(it takes each image whole)", soft_wrap=True)
        # The bundle's own dataset holds crops already cut at its window (training took them as they are).
        own_data = _own_dataset(info, data)
        frame = _frames_cells(info, data, as_given, um_per_px)
        if own_data and not as_given and um_per_px is None and info.preprocessing.cell_window_um is not None:
            console.print("framing: the bundle's own dataset: its images are scored as they are (crops cut at "
                          "the window, as training took them)", soft_wrap=True)
        metrics = _run(evaluate_bundle, bundle, data, out, split_file=split_file, subset=subset or "test",
                       on_corrupt=on_corrupt, allow_training_data=allow_training_data, backend=backend,
                       threads=threads, frame=frame, um_per_px=um_per_px, as_trained=class_map,
                       show_progress=not quiet)
        if metrics.get("framing"):
            said = "[yellow]framing:[/yellow]" if metrics["framing"]["whole"] else "framing:"
            console.print(f"{said} {escape(metrics['framing']['note'])}", soft_wrap=True)
        console.print(f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro']['f1']:.4f} "
                      f"on {metrics['n']} images")
        from leukoscope.evaluation.metrics import called_absent_note

        if called_absent_note(metrics):
            console.print(f"[yellow]warning:[/yellow] {escape(called_absent_note(metrics))}", soft_wrap=True)
    if note:
        console.print(note, soft_wrap=True)
    print(out / "report.html")


def _check_predict_outputs(out: Path, explain: Optional[Path], overwrite: bool) -> None:
    """Refuse to replace a predictions file or mix two runs' heatmaps without ``overwrite`` (with it, the earlier
    heatmaps are removed by ``predict_to_file`` once the images are predicted: a run refused later keeps them)."""
    from leukoscope.inference.predict_files import earlier_heatmaps

    if overwrite:
        return
    if out.is_file():
        _fail(f"--out {out} exists (an earlier run's predictions?): give another file, or --overwrite to "
              f"replace it")
    earlier = earlier_heatmaps(explain) if explain is not None else []
    if earlier:
        _fail(f"--explain {explain} holds {len(earlier)} heatmap(s) of an earlier run (e.g. {earlier[0].name}): "
              f"two runs' maps would mix, rows numbered alike; give another folder, or --overwrite to replace them")


@app.command("calibrate-ood")
def calibrate_ood(
    bundle: Path = typer.Option(..., "--bundle", help="Classifier bundle directory (gets ood.safetensors)."),
    data: str = typer.Option(..., "--data", help="Labelled dataset folder or CSV (the bundle's training data, "
                             "or images of the same kind)."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Split whose train part fits the "
                                              "statistics and val part sets the threshold (without a val part: a "
                                              "fifth of its train part; never its test part) (default: the "
                                              "bundle's recorded split, when the data is its training data)."),
    method: str = typer.Option("mahalanobis", help="mahalanobis (embedding) or energy (logits)."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Stages (submodule names, comma-separated) read "
                                         "beside the penultimate embedding, or 'none' for that embedding alone "
                                         "(default: the architecture's; mobilenet_v2: features.3,features.6,"
                                         "features.10,features.13,features.16)."),
    quantile: float = typer.Option(0.95, help="Share of held-out in-distribution images below the threshold."),
    views: Optional[int] = typer.Option(None, "--views", help="Read every cell from now on in 1, 4 (its right-angle "
                                        "rotations) or 8 (and their mirror images) views, averaged; the temperature "
                                        "is refitted with them (default: the bundle's views, temperature kept)."),
    on_corrupt: str = typer.Option("skip", help="skip or fail on unreadable images."),
    quiet: bool = flag(False, "--quiet", help="No progress bars."),
) -> None:
    """Fit the out-of-distribution flag of a classifier bundle: 'unlike anything it was trained on'.

    Class means and a shrunk shared covariance of the embeddings on the training part
    (for the shipped architecture, one per stage of the network and one for its
    penultimate layer), the threshold at the 95th percentile of the validation part's
    scores (5% false alarms). Then `predict` gives every image an ood_score and an
    unfamiliar column, and `analyze` flags fields with many unfamiliar cells.

    --views 4 or 8 makes every later use of the bundle average the cell's rotations (and
    mirror images): steadier calls at 4 or 8 times the network's work per cell; the
    temperature is refitted on the same validation part, with the statistics.
    """
    from leukoscope.data.readers import check_dataset_path

    if not 0.5 <= quantile < 1:  # before any image is decoded
        _fail(f"--quantile must be in [0.5, 1), got {quantile}")
    if on_corrupt not in ("skip", "fail"):
        _fail(f"--on-corrupt must be skip or fail, got {on_corrupt!r}")

    folder = _check_bundle(bundle, "--bundle")
    if is_pretrained_spec(bundle) or shipped_spec(folder):  # it would write into the installed package
        _fail(f"{bundle} is a shipped model: copy its folder ({folder}) and calibrate the copy")
    _run(check_dataset_path, data)
    if split_file is not None and not split_file.is_file():
        _fail(f"{split_file}: split file does not exist (make one with `leukoscope split`)")
    if method not in ("mahalanobis", "energy"):
        _fail(f"--method must be mahalanobis or energy, got {method!r}")
    from leukoscope.preprocessing import VIEWS

    if views is not None and views not in VIEWS:
        _fail(f"--views must be one of {', '.join(map(str, VIEWS))}, got {views}")
    from leukoscope.bundle import BundleError, check_export_matches, read_bundle_info
    from leukoscope.tasks.ood import calibrate_bundle

    named = None if stages is None else [] if stages.strip() == "none" else [
        name.strip() for name in stages.split(",") if name.strip()]
    stats, source = _run(calibrate_bundle, bundle, data, split_file=split_file, method=method, quantile=quantile,
                         on_corrupt=on_corrupt, show_progress=not quiet, stages=named, views=views)
    console.print(f"OOD flag: {stats.method} threshold {stats.threshold:.4g} ({100 * stats.quantile:g}th percentile "
                  f"of {stats.details['threshold_images']} held-out images), fitted on "
                  f"{stats.details['fit_images']} images from {escape(source)}"
                  f"{'; stages ' + ', '.join(stats.stages) if stats.stages else ''}", soft_wrap=True)
    try:  # an exported graph made before the statistics: its embedding may no longer be theirs
        check_export_matches(bundle, read_bundle_info(bundle))
    except BundleError as exc:
        console.print(f"[yellow]warning:[/] {escape(str(exc))}", soft_wrap=True)
    print(bundle)


@app.command()
def predict(
    inputs: List[Path] = typer.Argument(..., help="Image files and/or folders."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle directory, or pretrained:NAME."),
    out: Path = typer.Option(Path("predictions.csv"), "--out", help=".csv or .json"),
    threshold: Optional[float] = typer.Option(None, help="Below this confidence answer 'uncertain' "
                                              "(default: the bundle's)."),
    explain: Optional[Path] = typer.Option(None, "--explain", help="Save a Grad-CAM overlay per image here."),
    overwrite: bool = flag(False, "--overwrite", help="Replace an existing --out file, and the heatmaps an "
                           "earlier run left in the --explain folder (refused without it)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    backend: str = typer.Option("auto", "--backend", help="What runs the network: torch, onnxruntime or openvino "
                                "(a bundle from `leukoscope export`) or auto (the fastest installed one that can "
                                "run the bundle's graph: openvino, onnxruntime, else torch). --explain loads the "
                                "torch model for Grad-CAM on any backend."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for inference (default: the backend's; 1 is "
                                          "faster on a machine busy with other work)."),
    um_per_px: Optional[float] = typer.Option(None, "--um-per-px", help="Pixel size of the images (micrometres); "
                                              "default: estimated from each image's red cells, else the images' "
                                              "scale together."),
    as_given: bool = flag(False, "--as-given", help="Classify each image whole, as it is (crops already "
                          "cut at the classifier's window, e.g. a training set's)."),
    quiet: bool = flag(False, "--quiet", help="No progress bars."),
) -> None:
    """Classify images; writes probabilities per class, 'uncertain' below the threshold.

    Each image is one cell. A classifier trained on a physical window (the shipped one: 24 um)
    sees that many micrometres around the image's centre, at --um-per-px or the scale the image's
    red cells give, else the images' scale together (a folder's); an image with none is classified
    whole, and the output says so (um_per_px and scale_source columns). --as-given skips this.
    An existing --out file, or heatmaps an earlier run left in --explain, are replaced only with
    --overwrite (the folder's heatmaps of two runs had mixed, one image under two labels).

    Exits with 2 when no image could be predicted, 3 when some could not (they are named, and
    get a row with their error in the output file, its label, class and confidence empty), 0 when
    every image was predicted.
    """
    from leukoscope.inference.predict_files import collect_images

    if backend not in BACKENDS:
        _fail(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if threads is not None and threads < 1:
        _fail(f"--threads must be at least 1, got {threads}")
    if batch_size < 1:
        _fail(f"--batch-size must be at least 1, got {batch_size}")
    if out.suffix.lower() not in (".csv", ".json"):  # before any image is read
        _fail(f"--out {out}: must end in .csv or .json")
    _check_writable_folder(out.parent, "--out")
    if out.is_dir():
        _fail(f"--out {out}: is a folder; give the file to write (.csv or .json)")
    if explain is not None:
        _check_writable_folder(explain, "--explain")
    _check_predict_outputs(out, explain, overwrite)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        _fail(f"--threshold must be in [0, 1], got {threshold}")
    if um_per_px is not None and as_given:
        _fail("--um-per-px frames each image at that scale; --as-given takes the images as they are: give one")
    if um_per_px is not None:
        from leukoscope.scale import checked_um_per_px

        _run(checked_um_per_px, um_per_px, "--um-per-px")
    bundle = _check_bundle(bundle, "--bundle")
    paths = _run(collect_images, inputs)
    from leukoscope.bundle import read_bundle_info
    from leukoscope.inference.predict_files import predict_to_file

    info = _run(read_bundle_info, bundle, "classify")  # a wrong bundle fails before any image is read
    if um_per_px is not None and info.preprocessing.cell_window_um is None:
        console.print("[yellow]warning:[/yellow] --um-per-px ignored: this classifier has no physical window "
                      "(it takes each image whole)", soft_wrap=True)
    if threads:
        import torch

        torch.set_num_threads(threads)
    _say_learned_from(paths, {"classifier": bundle})
    framing = not as_given and info.preprocessing.cell_window_um is not None
    # images of one run (a folder) lend their scale to those without one, as analyze's fields do
    lent = _run_scale(paths, out, "local", single_cells=True) if framing and um_per_px is None else None
    doubts = _stated_scale_doubts(paths, um_per_px, single_cells=True) if framing and um_per_px is not None else []
    predictions = _run(predict_to_file, bundle, paths, out, threshold=threshold, explain_dir=explain,
                       batch_size=batch_size, backend=backend, threads=threads, frame=not as_given, um_per_px=um_per_px,
                       run_um_per_px=lent, run_warnings=doubts, show_progress=not quiet, replace_heatmaps=overwrite)
    _say_framing(predictions, info.preprocessing.cell_window_um)
    _say_single_cell_warnings(predictions)
    failed = [p.source for p in predictions if p.error]
    counts: dict[str, int] = {}
    for p in predictions:
        if not p.error:
            counts[p.label] = counts.get(p.label, 0) + 1
    console.print(f"{len(predictions) - len(failed)} images predicted: {counts}; {len(failed)} failed")
    scored = [p for p in predictions if p.ood_score is not None]
    unfamiliar = sum(p.unfamiliar for p in scored)
    if unfamiliar:
        console.print(f"[yellow]{unfamiliar} of {len(scored)} images are unlike the training data[/yellow] "
                      f"(unfamiliar column): review them by eye")
    if failed:
        console.print(f"[red]could not read {len(failed)} of {len(predictions)} images[/red] (errors in {out}): "
                      f"{escape(name_some(failed))}", soft_wrap=True)
    if len(failed) == len(predictions):
        _fail(f"no image could be predicted; see the error column of {out}")
    print(out)
    if failed:
        raise typer.Exit(EXIT_SOME_FAILED)


#: The package's own folder of shipped models (``pretrained_root()`` unless LEUKOSCOPE_PRETRAINED_DIR moves it).
PACKAGE_MODELS = Path(__file__).resolve().with_name("pretrained")


def _export_out(bundle: Path, out: Optional[Path], suffix: str) -> Path:
    """Where `export` writes: ``--out``, else ``<bundle>-<suffix>`` beside the bundle (``./NAME-<suffix>`` for
    a shipped model, whose folder is inside the installed package). The bundle's own folder is allowed
    (the graph is added to it); any other folder must be new or empty."""
    shipped = shipped_spec(bundle)  # given as pretrained:NAME or as its folder: nothing is written inside
    if out is None:
        name = f"{bundle.name}-{suffix}"
        out = Path(name) if shipped else bundle.parent / name
    if out.resolve() == bundle.resolve():
        if shipped:
            _fail(f"{shipped} is a shipped model: export it to another folder (--out DIR)")
        return out
    protected = {pretrained_root().resolve(), PACKAGE_MODELS.resolve()}
    if any(out.resolve() == root or out.resolve().is_relative_to(root) for root in protected):
        _fail(f"{out} is inside the shipped models' folder (the installed package): choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        _fail(f"{out} already exists and is not empty: choose another --out (or remove it)")
    _check_writable_folder(out, "--out")  # a file above it
    return out


@app.command()
def export(
    bundle: str = typer.Option(..., "--bundle", help="Classifier or detector bundle directory, or pretrained:NAME."),
    export_format: str = typer.Option("onnx", "--format", help="Graph format: onnx (runs on onnxruntime or "
                                      "OpenVINO) or openvino (OpenVINO IR; classifiers)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder of the exported bundle (default: "
                                       "`<bundle>-<format>[-int8]` beside it; the bundle's own folder adds the graph "
                                       "to it)."),
    int8: bool = flag(False, "--int8", help="Quantize to int8 (static, calibrated on --calibration; a "
                      "detector's box head: dynamic)."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="Images like those the model will "
                                              "see (a folder, class folders or a CSV manifest; at least 16, up to "
                                              "512 used; a detector: a folder of 16 to 64 fields) to calibrate "
                                              "--int8 on; not "
                                              "the --check images."),
    check: Optional[str] = typer.Option(None, "--check", help="Images (a folder, class folders or a CSV manifest; "
                                        "for a detector a VOC folder) to compare the graph with the torch model on "
                                        "(labelled: accuracy change; a detector: mAP change)."),
    split: Optional[str] = typer.Option(None, "--split", help="Detectors: the VOC split of --check (e.g. Testing)."),
    opset: int = typer.Option(17, help="ONNX opset."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the --check inference."),
    as_given: bool = flag(False, "--as-given", help="Classifiers: take the --calibration and --check images "
                          "whole, as they are (crops already cut at the classifier's window); by default "
                          "they are framed as predict frames single-cell images (the bundle's own training "
                          "data: as given)."),
    um_per_px: Optional[float] = typer.Option(None, "--um-per-px", help="Classifiers: pixel size of the "
                                              "--calibration and --check images (micrometres), to frame them at."),
) -> None:
    """Export a classifier or detector bundle as an inference bundle: its files plus the graph, recorded
    in bundle.json.

    A classifier's graph takes the bundle's normalised input (preprocessing stays the bundle's) with a
    dynamic batch axis, and gives the logits and the penultimate embedding (for the OOD score).
    `leukoscope predict --backend auto` runs it (onnxruntime or openvino). A Faster R-CNN detector's
    graph is its dense part (backbone, feature pyramid, RPN head) for any image size, plus a box graph
    (RoIAlign, box head), as ONNX; proposal selection and NMS between them run in numpy (`leukoscope analyze
    --backend onnxruntime|openvino`). --int8 quantizes a classifier's graph, or both of a detector's.
    """
    import importlib.util

    if export_format not in ("onnx", "openvino"):
        _fail(f"--format must be onnx or openvino, got {export_format!r}")
    if int8 and calibration is None:
        _fail("--int8 needs --calibration DATA: images to measure the activation ranges on")
    if calibration is not None and not int8:
        _fail("--calibration is for --int8 (a float export needs no calibration)")
    source = _check_bundle(bundle, "--bundle")
    peek = _run(peek_bundle, source)
    detector = peek.task == "detect"
    if split is not None and not detector:
        _fail(f"{source} is a classifier bundle: --split applies to detector bundles only")
    if split is not None and check is None:
        _fail("--split names a split of --check DATA: give --check too")
    if detector and (as_given or um_per_px is not None):
        _fail(f"{source} is a detector bundle: --as-given and --um-per-px apply to classifiers (a detector's fields "
              f"are scaled by their red cells, as analyze does)")
    if um_per_px is not None and as_given:
        _fail("--um-per-px frames each image at that scale; --as-given takes the images as they are: give one")
    if um_per_px is not None:
        from leukoscope.scale import checked_um_per_px

        _run(checked_um_per_px, um_per_px, "--um-per-px")
    # The refusals of leukoscope.inference.export.check_exportable, before torch is imported.
    if detector and peek.model_name.startswith("fcos"):
        _fail(f"{source} is an FCOS detector: export supports Faster R-CNN detectors only for now")
    if detector and export_format != "onnx":
        _fail(f"{source} is a detector: it exports as ONNX graphs only (--format onnx); --backend openvino runs "
              f"those graphs too")
    if not detector and peek.framework != "torch":
        _fail(f"{source} is a classical (scikit-learn) model: export to ONNX supports torch CNN classifiers only "
              f"for now")
    needed = {"onnx": "onnx"}
    if int8 or (check and export_format == "onnx" and importlib.util.find_spec("openvino") is None):
        needed["onnxruntime"] = "onnx"
    if export_format == "openvino":
        needed["openvino"] = "openvino"
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        extras = ",".join(dict.fromkeys(needed[name] for name in missing))
        _fail(f"export needs {' and '.join(missing)}: pip install 'leukoscope[{extras}]'")
    from leukoscope.data.readers import check_dataset_path

    for given in (calibration, check):
        if given is not None:
            _run(check_dataset_path, given)
    if threads is not None and threads < 1:
        _fail(f"--threads must be at least 1, got {threads}")
    target = _export_out(source, out, export_format + ("-int8" if int8 else ""))
    if threads:
        import torch

        torch.set_num_threads(threads)
    from leukoscope.inference.export import export_bundle

    from leukoscope.bundle import read_bundle_info

    info = None if detector else _run(read_bundle_info, source)
    # single-cell images are framed for the classifier's window as predict frames them (int8 ranges and the
    # accuracy change are then measured on what the model will be given)
    frames = {given: _frames_cells(info, given, as_given, um_per_px) for given in (calibration, check)
              if given is not None and info is not None}
    with _terminate_as_interrupt():
        _run(export_bundle, source, target, export_format, opset=opset, calibration=calibration,
             frame_calibration=frames.get(calibration, False), um_per_px=um_per_px, show_progress=True)

    record = _run(read_bundle_info, target).export or {}
    precision = (f"int8, calibrated on {record.get('calibration_images')} images" if int8 else "float32")
    if detector:
        console.print(f"exported {escape(peek.model_name)} to {escape(str(target / 'model.onnx'))} (opset {opset}, "
                      f"{precision}, input (batch, 3, height, width: the dense part))", soft_wrap=True)
    else:
        console.print(f"exported {escape(peek.model_name)} to {escape(str(target / str(record.get('file'))))} "
                      f"({export_format}, {precision}, input (batch, 3, {peek.preprocessing['image_size']}, "
                      f"{peek.preprocessing['image_size']}))", soft_wrap=True)
    if check is not None and detector:
        from leukoscope.tasks.detect import compare_detector_backends

        report = _run(compare_detector_backends, target, check, split=split, threads=threads)
    elif check is not None:
        from leukoscope.inference.export_check import compare_backends

        report = _run(compare_backends, target, check, threads=threads, frame=frames.get(check, False),
                      um_per_px=um_per_px)
    if check is not None:
        from leukoscope.bundle import note_export_in_card

        for line in report.lines():
            console.print(line)
        windowed = info is not None and info.preprocessing.cell_window_um is not None
        framed = "" if not windowed else (" (framed as predict frames them)" if frames.get(check) else " (as given)")
        note_export_in_card(target, record, [f"--check {Path(check).name}" + (f" --split {split}" if split else "")
                                             + framed, *report.lines()])
    print(target)


@app.command()
def demo(
    out: Path = typer.Option(Path("leukoscope-demo"), "--out", help="Folder for data and run."),
    minutes: float = typer.Option(2.0, help="Training time budget."),
    quiet: bool = flag(False, "--quiet", help="No progress bars."),
) -> None:
    """Generate synthetic stained cells, train ~2 minutes, evaluate, write the report."""
    if not minutes > 0:  # before the synthetic data are made
        _fail(f"--minutes must be above 0, got {minutes}")
    _check_writable_folder(out, "--out")
    from leukoscope.demo import run_demo

    result = _run(run_demo, out, minutes=minutes, show_progress=not quiet)
    # the run itself printed the report's path
    console.print(f"[bold green]demo finished[/bold green]: test accuracy {result.metrics['accuracy']:.3f}")
    print(result.bundle_dir)


# ---------------------------------------------------------------- web service
# `leukoscope serve` and `leukoscope user ...`: needs the service extra
# (pip install 'leukoscope[service]').

user_app = typer.Typer(no_args_is_help=True, help="Web-service users and API tokens.")
app.add_typer(user_app, name="user")


def _service_settings(**overrides):
    try:
        from leukoscope.service.settings import ServiceSettings
    except ImportError as exc:  # pragma: no cover - extra not installed
        _fail(f"the web service needs its extra: pip install 'leukoscope[service]' ({exc})")
    from pydantic import ValidationError

    if overrides.get("data_dir") is not None:
        _check_writable_folder(Path(overrides["data_dir"]), "--data-dir")
    try:
        return ServiceSettings.from_env(**overrides)
    except ValidationError as exc:  # one line per setting, named as the user gives it (not pydantic's dump)
        def named(field: str) -> str:
            variable = f"LEUKOSCOPE_{field.upper()}"
            return f"--{field.replace('_', '-')} ({variable})" if field in overrides else variable

        _fail("; ".join(f"{named(str(error['loc'][0]))}: {error['msg'].removeprefix('Value error, ')}"
                        if error["loc"] else error["msg"] for error in exc.errors()))
    except ValueError as exc:
        _fail(str(exc))


def _service_call(fn, *args, **kwargs):
    from leukoscope.service.db import DatabaseError
    from leukoscope.service.errors import ServiceError

    try:
        return fn(*args, **kwargs)
    except ServiceError as exc:
        _fail(exc.message)
    except DatabaseError as exc:
        _fail(str(exc))


@app.command()
def serve(
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Cell-classifier bundle or pretrained:NAME (or "
                                          "LEUKOSCOPE_BUNDLE; default: the shipped "
                                          f"{DEFAULT_CLASSIFIER}, with the shipped {DEFAULT_DETECTOR})."),
    detector: Optional[Path] = typer.Option(None, "--detector", help="Detector bundle or pretrained:NAME: "
                                            f"enables smear fields (default: the shipped {DEFAULT_DETECTOR}, "
                                            "whatever --bundle)."),
    no_detector: bool = flag(False, "--no-detector", help="Serve single-cell images only: no smear "
                             "fields (no detector is loaded)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Database and image store "
                                            "(default ./leukoscope-data, or LEUKOSCOPE_DATA_DIR)."),
    database_url: Optional[str] = typer.Option(None, "--database-url", help="e.g. postgresql+psycopg://u:p@host/db "
                                               "(default: SQLite in the data dir)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (put a TLS proxy in front for a network)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    migrate: Optional[bool] = flag(None, "--migrate/--no-migrate", help="Apply database migrations at "
                                   "start-up (default on); --no-migrate refuses an outdated schema."),
    forwarded_allow_ips: str = typer.Option("127.0.0.1", help="Proxies trusted for X-Forwarded-Proto/For."),
    workers: int = typer.Option(1, min=1, help="Server processes (each loads the model; log-in and upload limits "
                                "are counted in the database, for all of them together)."),
    inference_threads: Optional[int] = typer.Option(None, help="Model threads per process (default 2)."),
    detector_backend: Optional[str] = typer.Option(None, "--detector-backend", help="What runs the detector: "
                                                   "torch (default), onnxruntime, openvino (a bundle from "
                                                   "`leukoscope export`) or auto."),
    classifier_backend: Optional[str] = typer.Option(None, "--classifier-backend", help="What runs the cell "
                                                     "classifier: torch (default), onnxruntime, openvino (a bundle "
                                                     "from `leukoscope export`) or auto; Grad-CAM loads torch's "
                                                     "model too."),
    blast_class: Optional[List[str]] = typer.Option(None, "--blast-class", help="Classifier class counted as blast "
                                                    "(repeatable; as analyze's; default: the classes named blast)."),
    log_level: str = typer.Option("info", help="uvicorn's log level: critical, error, warning, info, debug or "
                                  "trace."),
) -> None:
    """Run the telediagnosis web service (pages, JSON API, OpenAPI docs at /api/docs)."""
    import os

    if no_detector and detector is not None:
        _fail("--no-detector and --detector contradict each other; give one")
    settings = _service_settings(bundle=bundle, detector=detector, data_dir=data_dir, database_url=database_url,
                                 migrate=migrate, inference_threads=inference_threads,
                                 detector_backend=detector_backend, classifier_backend=classifier_backend,
                                 blast_classes=",".join(blast_class) if blast_class else None)
    settings = _shipped_service_models(settings, no_detector=no_detector)
    for model, option in ((settings.bundle, "--bundle"), (settings.detector, "--detector")):
        if model is not None:  # before the database and the store are made for a service that cannot start
            _check_bundle(str(model), option)
    import uvicorn

    from leukoscope.service.admin import collect_store_garbage, open_database, user_count
    from leukoscope.service.app import app_from_env
    from leukoscope.service.db import DatabaseError

    # Migrate (or check) once, here, before any worker starts; the workers only check.
    database = _service_call(_guarded, open_database, settings)
    database.close()
    removed = _service_call(_guarded, collect_store_garbage, settings)
    if removed:
        console.print(f"removed {len(removed)} stored files that no case references (uploads that never committed)")
    settings = settings.model_copy(update={"data_dir": settings.data_dir.resolve()})
    os.environ.update({f"LEUKOSCOPE_{name.upper()}": str(value) for name, value in settings.model_dump().items()
                       if value is not None})
    if settings.detector is None:  # --no-detector: the workers must not take one from the environment
        os.environ.pop("LEUKOSCOPE_DETECTOR", None)
    os.environ["LEUKOSCOPE_MIGRATE"] = "false"
    if user_count(settings.model_copy(update={"migrate": False})) == 0:
        console.print("[yellow]no users yet: add one with `leukoscope user add NAME --role admin` "
                      "(same --data-dir / --database-url)[/yellow]")
    options = dict(host=host, port=port, proxy_headers=True, forwarded_allow_ips=forwarded_allow_ips,
                   log_level=log_level, server_header=False)
    if workers > 1:
        console.print(f"leukoscope service on http://{host}:{port}/ with {workers} workers (API docs: /api/docs)")
        uvicorn.run("leukoscope.service.app:app_from_env", factory=True, workers=workers, **options)
        return
    try:
        application = app_from_env()
    except (DatabaseError, RuntimeError) as exc:
        _fail(str(exc))
    except _user_errors() as exc:
        _fail(str(exc))
    console.print(f"leukoscope service on http://{host}:{port}/  (API docs: /api/docs)")
    uvicorn.run(application, **options)


def _shipped_service_models(settings, no_detector: bool = False):
    """The models `serve` serves, and a line saying which: the configured ones; with no classifier, the shipped
    one (required); with no detector, the shipped one whatever the classifier (as `analyze` does: a fine-tuned
    --bundle had silently turned smear fields off), unless ``no_detector``."""
    shipped = pretrained_names()
    update: dict[str, Any] = {}
    if settings.bundle is None:
        if DEFAULT_CLASSIFIER not in shipped:
            _fail(f"give a cell-classifier bundle: --bundle DIR or pretrained:NAME (or LEUKOSCOPE_BUNDLE); no "
                  f"shipped model {DEFAULT_CLASSIFIER!r} in this install"
                  + (f" (shipped: {', '.join(shipped)})" if shipped else ""))
        update["bundle"] = resolve_bundle(PREFIX + DEFAULT_CLASSIFIER)
    if no_detector:
        update["detector"] = None
    elif settings.detector is None and DEFAULT_DETECTOR in shipped:
        update["detector"] = resolve_bundle(PREFIX + DEFAULT_DETECTOR)
    settings = settings.model_copy(update=update)

    def described(key: str, path: Any) -> str:
        return escape(str(path)) + (" (shipped)" if update.get(key) is not None else "")

    console.print(f"classifier: {described('bundle', settings.bundle)}", soft_wrap=True)
    if settings.detector is not None:
        console.print(f"smear fields: detector {described('detector', settings.detector)}", soft_wrap=True)
    else:
        why = "--no-detector" if no_detector else f"no --detector, and no shipped {DEFAULT_DETECTOR} in this install"
        console.print(f"[yellow]smear fields: off ({why}); single-cell images only[/yellow]", soft_wrap=True)
    return settings


def _guarded(fn, *args):
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return fn(*args)
    except SQLAlchemyError as exc:
        _fail(f"cannot open the database: {exc}")


#: The user commands' options: the service's database, as `serve` finds it.
USER_DATA_DIR_HELP = "The service's data folder, as given to serve (default ./leukoscope-data, or LEUKOSCOPE_DATA_DIR)."
USER_DATABASE_HELP = "The service's database URL, as given to serve (default: SQLite in the data folder)."


@user_app.command("add")
def user_add(
    username: str = typer.Argument(..., help="Log-in name."),
    role: str = typer.Option(..., "--role", help="admin, technician or hematologist."),
    password_stdin: bool = flag(False, "--password-stdin", help="Read the password from standard input."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=USER_DATA_DIR_HELP),
    database_url: Optional[str] = typer.Option(None, "--database-url", help=USER_DATABASE_HELP),
) -> None:
    """Add a user (the password is asked for, never given on the command line)."""
    settings = _service_settings(data_dir=data_dir, database_url=database_url)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    from leukoscope.service.admin import add_user

    user = _service_call(add_user, settings, username, password, role)
    console.print(f"user {user.username} ({user.role}) added")


@user_app.command("token")
def user_token(
    username: str = typer.Argument(..., help="The user the token acts as."),
    name: str = typer.Option("script", "--name", help="What the token is for."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=USER_DATA_DIR_HELP),
    database_url: Optional[str] = typer.Option(None, "--database-url", help=USER_DATABASE_HELP),
) -> None:
    """Issue an API token for a user; printed once (only its hash is stored)."""
    from leukoscope.service.admin import issue_token

    print(_service_call(issue_token, _service_settings(data_dir=data_dir, database_url=database_url), username, name))


@user_app.command("list")
def user_list(
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=USER_DATA_DIR_HELP),
    database_url: Optional[str] = typer.Option(None, "--database-url", help=USER_DATABASE_HELP),
) -> None:
    """List users, roles and how many cases each uploaded."""
    from leukoscope.service.admin import list_users

    for username, role, active, cases in _service_call(list_users, _service_settings(data_dir=data_dir,
                                                                                       database_url=database_url)):
        console.print(f"{username:<24} {role:<13} {'active' if active else 'inactive':<9} {cases} cases")


# ------------------------------------------------- segmentation and comparison


@app.command()
def segment(
    inputs: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", help="Folder for `<name>_mask.png` files and masks.csv."),
    method: str = typer.Option("lab_kmeans", "--method", help="lab_kmeans (system E) or hsv."),
    figure: bool = flag(False, "--figure", help="Also save original | mask | segmented side by side."),
    segmented: bool = flag(False, "--segmented", help="Also save the segmented image (cells on white)."),
    quiet: bool = flag(False, "--quiet", help="No progress bar."),
) -> None:
    """Segment stained cells: save masks (PNG, 255 = most stained: a white cell's nucleus) and optional figures.

    Exits with 3 when some images could not be read (their error in masks.csv), 2 when none could."""
    _check_writable_folder(out, "--out")
    from leukoscope.inference.segment_files import segment_files

    rows = _run(segment_files, inputs, out, method=method, figure=figure, segmented=segmented,
                show_progress=not quiet)
    failed = sum(1 for r in rows if r.error)
    empty = sum(1 for r in rows if not r.error and not r.found)
    console.print(f"{len(rows)} images: {len(rows) - failed - empty} segmented, {empty} with nothing stained found, "
                  f"{failed} unreadable")
    print(out / "masks.csv")
    if failed:  # named in masks.csv's error column
        raise typer.Exit(2 if failed == len(rows) else EXIT_SOME_FAILED)


@app.command()
def compare(
    overrides: List[str] = typer.Argument(None, help="Config overrides for every model, e.g. model.image_size=96."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Experiment YAML with a compare section."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset folder or CSV (same as data.path=...)."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated models (instead of compare.models; "
                                         "default: the six classical models)."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help=SPLIT_FILE_HELP),
    quiet: bool = flag(False, "--quiet", help="No progress bars."),
) -> None:
    """Train several models (CNN and classical) on one split; one table, one figure, one page.

    The last line printed is the bundle of the row best on validation by train.monitor (default: accuracy).
    Test scores never choose: without a validation part in the split every row is still scored, no row is
    chosen, and the last line is the comparison's folder.
    """
    cfg = _load_config(config, overrides or [], data, None, split_file)
    from leukoscope.tasks.compare import run_compare

    names = [m for m in models.split(",") if m.strip()] if models else None
    result = _run(run_compare, cfg, models=names, show_progress=not quiet)
    console.print(f"table: {result.compare_dir / 'compare.md'}; page: {result.compare_dir / 'compare.html'}")
    print(result.compare_dir if result.best is None else result.best.bundle_dir)  # no row chosen: its folder


@app.command("train-detector")
def train_detector(
    overrides: List[str] = typer.Argument(None, help="Config overrides such as train.epochs=5."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Detection experiment YAML file."),
    data: Optional[str] = typer.Option(None, "--data", help="Pascal VOC folder (same as data.path=...)."),
    model: Optional[str] = typer.Option(None, "--model", help="Detector name (same as model.name=...)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help=RESUME_HELP),
    quiet: bool = flag(False, "--quiet", help="No progress bars."),
) -> None:
    """Train a cell detector on a Pascal VOC folder (the same as `train` with a detection config)."""
    from leukoscope.tasks import task_named

    _train(task_named("detect"), config, overrides or [], data, model, resume, quiet)


@app.command()
def mil(
    overrides: List[str] = typer.Argument(None, help="Config overrides such as model.cell_size=64 "
                                          "locate.detector=runs/det/bundle."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="MIL experiment YAML (task: mil)."),
    data: Optional[str] = typer.Option(None, "--data", help="Labelled fields (same as data.path=...)."),
    model: Optional[str] = typer.Option(None, "--model", help="Cell classifier model (same as model.name=...)."),
    quiet: bool = flag(False, "--quiet", help="No progress bars."),
) -> None:
    """Train a cell classifier from field labels (multiple-instance learning).

    Locates the white cells of every field, trains on the crops (each with its
    field's label), classifies each test field from its cells and trains a
    whole-image classifier beside it for comparison.
    """
    from leukoscope.tasks import task_named

    _train(task_named("mil"), config, overrides or [], data, model, None, quiet)


def _analysis_models(detector: Optional[str], classifier: Optional[str],
                     no_classifier: bool) -> tuple[Path, Optional[Path], str]:
    """The detector and classifier folders `analyze` uses, and a line saying which they are.

    No --detector: the shipped detector. No --classifier: the shipped classifier; when it is not
    installed that is an error if no model was named at all, and with a --detector of one's own
    the cells keep the detector's classes (as before models shipped), with a note."""
    if no_classifier and classifier is not None and classifier.lower() != "none":
        _fail("--no-classifier and --classifier contradict each other; give one")
    named = detector is not None or classifier is not None
    detector_spec = detector if detector is not None else PREFIX + DEFAULT_DETECTOR
    detector_dir = _check_bundle(detector_spec, "--detector")
    note = ""
    if no_classifier or (classifier is not None and classifier.lower() == "none"):
        classifier_spec = None
    elif classifier is not None:
        classifier_spec = classifier
    elif named and DEFAULT_CLASSIFIER not in pretrained_names():
        classifier_spec = None
        note = (f" [yellow](no shipped {DEFAULT_CLASSIFIER} in this install: cells keep the detector's classes; "
                f"--classifier B classifies them, --no-classifier silences this)[/yellow]")
    else:
        classifier_spec = PREFIX + DEFAULT_CLASSIFIER
    classifier_dir = _check_bundle(classifier_spec, "--classifier") if classifier_spec is not None else None

    def described(spec: str, folder: Path) -> str:
        return escape(f"{spec} ({folder})" if is_pretrained_spec(spec) else str(folder))

    used = f"detector {described(detector_spec, detector_dir)}, classifier " + (
        described(classifier_spec, classifier_dir) if classifier_dir is not None else "none (detector classes)")
    return detector_dir, classifier_dir, used + note


@app.command()
def analyze(
    inputs: List[Path] = typer.Argument(..., help="Smear images and/or folders of them."),
    detector: Optional[str] = typer.Option(None, "--detector", help="Detector bundle (leukoscope train-detector) "
                                           f"or pretrained:NAME (default: {PREFIX}{DEFAULT_DETECTOR})."),
    classifier: Optional[str] = typer.Option(None, "--classifier", help="Cell classifier bundle for the "
                                             f"white-cell types, or pretrained:NAME (default: {PREFIX}"
                                             f"{DEFAULT_CLASSIFIER}); 'none' keeps the detector's classes."),
    no_classifier: bool = flag(False, "--no-classifier", help="Cells keep the detector's classes "
                               "(same as --classifier none)."),
    out: Path = typer.Option(Path("analysis"), "--out", help="Output folder."),
    blast_class: Optional[List[str]] = typer.Option(None, "--blast-class", help="Classifier class counted as "
                                                    "blast (repeatable; default: the classes named exactly, "
                                                    "ignoring case, one of leukoscope.labels.BLAST_CLASS_NAMES, "
                                                    "e.g. blast, lymphoblast, myeloblast, monoblast, ALL, "
                                                    "malignant, Early/Pre/Pro; never erythroblast)."),
    threshold: Optional[float] = typer.Option(None, help="Classifier confidence below which a cell is "
                                              "'uncertain' (default: the bundle's)."),
    detector_threshold: Optional[float] = typer.Option(None, help="Detector score threshold (default: the bundle's)."),
    min_detector_ap: Optional[float] = typer.Option(None, help="Warn, and raise no leukemia flag, when the "
                                                    "detector's recorded test AP@0.5 for white cells is below this "
                                                    "(default 0.9)."),
    um_per_px: Optional[float] = typer.Option(None, "--um-per-px", help="Pixel size of the fields in micrometres "
                                              "(default: estimated per field from its red cells, ~7.5 um "
                                              "across; recorded in each field's JSON). A field whose red cells "
                                              "measure another scale is warned."),
    tile_size: Optional[int] = typer.Option(None, help="Tile side for large fields, in pixels of the field as "
                                            "the detector is given it (resampled to its scale; default: 2048 "
                                            "pixels as its network sees them, 4096 for the shipped detector)."),
    overlap: int = typer.Option(320, help="Tile overlap in pixels (larger than the biggest white cell)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for inference (default: each backend's; 1 "
                                          "is faster on a machine busy with other work); --engine ray: per actor "
                                          "(default 1)."),
    backend: str = typer.Option("auto", "--backend", help="What runs both models: torch, onnxruntime or openvino "
                                "(bundles from `leukoscope export`) or auto (the fastest installed one a bundle "
                                "has a graph for, else torch)."),
    slide: bool = flag(False, "--slide", help="Treat every input file as a whole-slide image (default: "
                       ".svs/.ndpi/.mrxs..., and .tif/.tiff files with more than one resolution level)."),
    target_cells: int = typer.Option(200, "--target-cells", help="Slides: sample monolayer tiles until this many "
                                     "white cells are counted (200, as in a manual differential)."),
    workers: int = typer.Option(1, "--workers", help="Slides: tiles analysed at once (local threads; with "
                                "--engine ray the actors analyse them, see --actors)."),
    seed: int = typer.Option(0, "--seed", help="Slides: seed of the random tile order."),
    slide_tile: int = typer.Option(1024, "--slide-tile", help="Slides: tile side in pixels at the analysis scale."),
    min_coverage: float = typer.Option(0.35, "--min-coverage", help="Slides: least stained share of a monolayer "
                                       "tile (below: feathered edge or glass)."),
    max_coverage: float = typer.Option(0.75, "--max-coverage", help="Slides: largest stained share of a "
                                       "monolayer tile (above: thick area)."),
    engine: str = typer.Option("local", "--engine", help="'local' (this process) or 'ray' (a Ray cluster: "
                               "fields into Parquet tables OUT/fields and OUT/cells, resumable; slides' tiles on "
                               "its actors; needs the ray extra)."),
    address: Optional[str] = typer.Option(None, "--address", help="--engine ray: the cluster to join ('auto': the "
                                          "one `ray start` runs here; default: a Ray started for this run)."),
    actors: Optional[int] = typer.Option(None, "--actors", help="--engine ray: analysis actors (default: as "
                                         "many as the nodes can place, each node's CPUs / --threads)."),
    retry_failed: bool = flag(False, "--retry-failed", help="--engine ray: analyse again the fields whose "
                              "row in the output holds an error (others already there are skipped)."),
    cells: Optional[Path] = typer.Option(None, "--cells", help="Also write each cell of the fields, cut as the "
                                         "classifier saw it (its window; the box where a field has no scale), to "
                                         "`CELLS/<class>/field-<field>-cell-<n>.png` (uncertain ones in "
                                         "CELLS/uncertain): move the misnamed ones to their class and fine-tune on "
                                         "them (train --init ... --data CELLS). A new folder; local engine, fields "
                                         "(not slides)."),
    quiet: bool = flag(False, "--quiet", help="No progress bars."),
) -> None:
    """Analyse smear fields: detect and classify every white cell, differential count, blast % and flags.

    Writes per image `<name>.annotated.png`, `<name>.cells.csv` and `<name>.json`, and
    summary.csv / summary.json / summary.png (the pooled differential drawn) for the whole folder.
    Decision support, not a diagnosis.

    A whole-slide image (.svs, .ndpi, a pyramidal .tif; needs the slide extra) is sampled in its
    monolayer until --target-cells white cells are counted; its files go to `OUT/<slide name>/`:
    `<name>.slide.json`, `<name>.cells.csv`, `<name>.overview.png`, summary.csv / summary.json / summary.png.

    With --engine ray the fields are analysed on a Ray cluster (--address auto: the one `ray start`
    runs; see docs/cluster.md) into Parquet tables OUT/fields/ and OUT/cells/ and the same
    summary.csv / summary.json / summary.png, without per-field files; a rerun skips the fields already there.
    A slide's tiles are then analysed by the cluster's actors (the slide must be on storage every
    node sees at the same path); its sampling and count are those of the local engine.

    Without model flags it uses the models shipped in the package (`leukoscope models
    --pretrained`); with only --detector, the shipped classifier when installed.

    Exits with 0 when every input was analysed, 3 when some could not be (named on the console and
    in summary.csv; the others' results are written), 2 when none could.
    """
    _check_engine(engine, address, actors, retry_failed)
    if cells is not None:
        if engine != "local":
            _fail("--cells writes the cells of fields analysed here: use it with --engine local")
        _check_writable_folder(cells, "--cells")
        if cells.is_dir() and any(cells.iterdir()):  # cells sorted since would be written again, under their old class
            _fail(f"--cells {cells} is not empty (cells sorted there would be written again under the class "
                  f"predicted): give a new folder")
    _check_writable_folder(out, "--out")
    if engine == "local" and (out / "summary.csv").is_file():  # (a Ray archive's rerun goes on where it was)
        console.print(f"[yellow]{out} holds an earlier run's results: the files of its fields that this run does "
                      f"not analyse stay there, and summary.csv will list this run's fields only; use another "
                      f"--out to keep runs apart[/yellow]", soft_wrap=True)
    if threads is not None and threads < 1:
        _fail(f"--threads must be at least 1, got {threads}")
    from leukoscope.inference.predict_files import byte_copies, collect_images, copy_of

    from leukoscope.inference.slide.reader import is_slide_path

    if backend not in BACKENDS:
        _fail(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    slides = [p for p in inputs if p.is_file() and (slide or is_slide_path(p))]
    inputs = [p for p in inputs if p not in slides]
    paths = [p for p in _run(collect_images, inputs, slides=True) if not p.name.endswith(".annotated.png")] \
        if inputs else []
    in_folders = [p for p in paths if is_slide_path(p)]
    if in_folders:  # one rule for a file however it is reached: a pyramid in a folder had been read flat, one field
        console.print(f"note: {len(in_folders)} whole-slide file(s) found in the folders are analysed as slides: "
                      f"{escape(name_some([str(p) for p in in_folders]))}", soft_wrap=True)
        slides += in_folders
        taken = set(in_folders)
        paths = [p for p in paths if p not in taken]
    from leukoscope.inference.smear_output import shortened

    stems: dict[str, Path] = {}
    for path in slides:  # each slide writes OUT/<stem>/: a second of the same stem would replace the first's
        other = stems.setdefault(shortened(path.stem).casefold(), path)  # one folder on a case-insensitive system
        if other != path:
            _fail(f"{other} and {path} would both write {out / shortened(path.stem)}: analyse them into different "
                  f"--out folders, or rename one")
    left_out: dict[str, list[str]] = {}  # kept in the run's record (summary.json), by why
    for why, keep in (("written_by_an_earlier_analysis", lambda found: _without_earlier_outputs(found, inputs)),
                      ("cells_cut_by_leukoscope", lambda found: _without_cut_cells(found, inputs,
                                                                                   slides=bool(slides)))):
        kept = keep(paths)
        taken = set(kept)
        left_out[why] = [str(p) for p in paths if p not in taken]
        paths = kept
    copies = byte_copies(paths)
    left_out["byte_identical_copies"] = [copy_of(copy, original) for copy, original in copies.items()]
    paths = [p for p in paths if p not in copies]
    detector, classifier, used = _analysis_models(detector, classifier, no_classifier)
    console.print(f"models: {used}", soft_wrap=True)
    from leukoscope.inference.smear import SmearAnalyzer

    # One set of options for every engine (the Ray actors build their analyzers from the same).
    options = dict(tile_size=tile_size, overlap=overlap, blast_classes=blast_class or None,
                   uncertain_threshold=threshold, detector_threshold=detector_threshold, um_per_px=um_per_px,
                   backend=backend, **({} if min_detector_ap is None else {"min_detector_ap": min_detector_ap}))
    analyzer = _run(SmearAnalyzer.from_bundles, detector, classifier, threads=threads, **options)
    if cells is not None:
        from leukoscope.inference.smear_output import check_cell_folders

        _run(check_cell_folders, analyzer.rules.classes)
        if slides:
            console.print("[yellow]note:[/yellow] --cells writes the cells of fields, not of slides", soft_wrap=True)
    ran = f"detector on {analyzer.detector.backend}"
    detector_export = getattr(analyzer.detector.info, "export", None) or {}
    if detector_export.get("precision") == "int8" and analyzer.detector.backend != "torch":
        ran += " (int8 graphs: a different detector, see its --check figures)"
    if analyzer.classifier is not None:
        ran += f", classifier on {analyzer.classifier.backend}"
        exported = analyzer.classifier.info.export or {}
        if exported.get("precision") == "int8" and analyzer.classifier.backend != "torch":
            ran += " (int8 graph)"
    console.print(f"backends: {ran}", soft_wrap=True)
    learned = _say_learned_from(paths, {"detector": detector, "classifier": classifier})
    if learned:  # kept with the run's record of its models: an archived run keeps the caution the console gave
        analyzer.provenance["learned_from_these_inputs"] = learned
    if any(left_out.values()):  # said on the console, and kept: a pipeline reading summary.json saw fewer inputs
        analyzer.provenance["inputs_left_out"] = {why: files for why, files in left_out.items() if files}
    lent = _run_scale(paths, out, engine) if um_per_px is None else None
    doubts = _stated_scale_doubts(paths, um_per_px) if um_per_px is not None else []
    with _one_ray_session(address, engine == "ray" and bool(slides) and bool(paths)):
        _analyze_inputs(analyzer, detector, classifier, options, slides, paths, out, engine=engine, address=address,
                        actors=actors, threads=threads, retry_failed=retry_failed, quiet=quiet, run_um_per_px=lent,
                        run_warnings=doubts, cells=cells,
                        slide_options=dict(target_cells=target_cells, workers=workers, seed=seed, tile_size=slide_tile,
                                           min_coverage=min_coverage, max_coverage=max_coverage, quiet=quiet))


def _without_earlier_outputs(paths: list[Path], inputs: list[Path]) -> list[Path]:
    """``paths`` less the pictures an earlier analysis wrote into the input folders (its summary.png, a slide's
    overview): `leukoscope analyze .` run twice analysed them as fields. A file named on the command line stays
    in."""
    from leukoscope.inference.smear_output import earlier_outputs

    named = {p.resolve() for p in inputs if not p.is_dir()}
    written = set(earlier_outputs([p for p in paths if p.resolve() not in named]))
    if not written:
        return paths
    if len(written) == len(paths):
        _fail(f"every image found ({len(paths)}) is one an earlier analysis wrote (its summary.png, a slide's "
              f"overview, beside the analysis's summary.json): name the fields, or their folder")
    console.print(f"[yellow]note:[/yellow] {len(written)} picture(s) that earlier analyses wrote into the input "
                  f"folders left out ({escape(name_some(sorted(str(p) for p in written)))}): they are results, not "
                  f"fields", soft_wrap=True)
    return [p for p in paths if p not in written]


def _without_cut_cells(paths: list[Path], inputs: list[Path], *, slides: bool) -> list[Path]:
    """``paths`` less the images found in folders that are named as single cells this program cut (``analyze
    --cells``, the web service's export): analysed again as fields, each would add its cell to the count a second
    time (a ``--cells`` folder kept beside the fields was). A cell named on the command line stays in."""
    from leukoscope.data.readers import EXPORT_NAME, FIELD_CELL_NAME

    named = {p.resolve() for p in inputs if not p.is_dir()}
    cut = [p for p in paths
           if p.resolve() not in named and (FIELD_CELL_NAME.match(p.name) or EXPORT_NAME.match(p.name))]
    if not cut:
        return paths
    if len(cut) == len(paths) and not slides:
        _fail(f"every image found ({len(cut)}) is named as a cell that `analyze --cells` or the web service cut "
              f"(field-<name>-cell-<n>.png, case-<id>-cell-<n>.png): analyze takes smear fields; single cells go to "
              f"`leukoscope predict` (or name them on the command line to analyse them as fields)")
    console.print(f"[yellow]note:[/yellow] {len(cut)} image(s) named as cells that `analyze --cells` or the web "
                  f"service cut ({escape(name_some(sorted(p.name for p in cut)))}) left out: they are cells, not "
                  f"fields",
                  soft_wrap=True)
    left = set(cut)
    return [p for p in paths if p not in left]


def _run_scale(paths: list, out: Path, engine: str, *, single_cells: bool = False) -> Optional[float]:
    """The scale the fields lend to those too poor in red cells for their own
    (:func:`leukoscope.scale.run_scale`), said on the console; None when they have none. A Ray archive
    being resumed keeps the one it was started with (fields added since would change the sample).
    ``single_cells``: the images are cells (predict), said in those words."""
    from leukoscope.inference.archive_parts import SETTINGS
    from leukoscope.scale import FIELD_RUN_MAX_RATIO, RUN_SCALE_MIN_ESTIMATES, WEAK_ESTIMATE_RED_CELLS, run_scale

    recorded = out / SETTINGS
    if engine == "ray" and recorded.is_file():
        try:
            lent = json.loads(recorded.read_text()).get("options", {}).get("run_um_per_px")
        except (OSError, ValueError, AttributeError):
            lent = None  # an unreadable record: the archive's own check says so when the run claims it
        if not isinstance(lent, (int, float)) or not 0.005 <= lent <= 5.0:
            lent = None  # likewise a value no run could have recorded
        if lent is not None:
            console.print(f"scale: the archive's run scale, {lent:.4f} um/px, for fields without their own",
                          soft_wrap=True)
        return lent
    if len(paths) < RUN_SCALE_MIN_ESTIMATES:
        return None
    unit = "images" if single_cells else "fields"
    scale = run_scale(paths, unit=unit)
    if not scale.known:
        console.print(f"scale: no run scale for {unit} without their own ({scale.note})", soft_wrap=True)
        return None
    one, done = ("an image", "framed") if single_cells else ("a field", "analysed")
    console.print(f"scale: {one} with too few isolated red cells of its own, or an estimate on "
                  f"{WEAK_ESTIMATE_RED_CELLS} or fewer more than {FIELD_RUN_MAX_RATIO:g} times off, is {done} at "
                  f"{scale.um_per_px:.4f} um/px, the run's scale ({scale.note})", soft_wrap=True)
    return scale.um_per_px


def _say_single_cell_warnings(predictions: list) -> None:
    """Warnings naming the images too small to show a cell, those without colour, those that show several white
    cells (smear fields) and those without a white cell at their centre (their ``warnings`` column says so too, as
    analyze's fields do); their rows stand."""
    from leukoscope.inference.quality import (GRAYSCALE_CELL_WARNING, MIN_CELL_IMAGE_SIDE, NO_WHITE_CELL_WARNING,
                                              SEVERAL_CELLS_WORDING, TINY_CELL_WORDING)

    tiny = [Path(p.source).name for p in predictions if any(w.startswith(TINY_CELL_WORDING) for w in p.warnings)]
    if tiny:
        console.print(f"[yellow]warning:[/yellow] {len(tiny)} image(s) smaller than {MIN_CELL_IMAGE_SIDE} px a side "
                      f"cannot show a cell's detail; their classes are not to be trusted (warnings column): "
                      f"{escape(name_some(tiny))}", soft_wrap=True)
    grey = [Path(p.source).name for p in predictions if GRAYSCALE_CELL_WARNING in p.warnings]
    if grey:
        console.print(f"[yellow]warning:[/yellow] {len(grey)} image(s) have no colour (grey levels only): white cells "
                      f"are typed by their stain's colour, so their classes are not to be trusted (warnings "
                      f"column); classify the colour images: {escape(name_some(grey))}", soft_wrap=True)
    several = [Path(p.source).name for p in predictions if any(w.startswith(SEVERAL_CELLS_WORDING) for w in p.warnings)]
    if several:
        console.print(f"[yellow]warning:[/yellow] {len(several)} image(s) look like smear fields, with several white "
                      f"cells: only the cell at each one's centre was classified (warnings column); analyse fields "
                      f"with `leukoscope analyze`: {escape(name_some(several))}", soft_wrap=True)
    empty = [Path(p.source).name for p in predictions if NO_WHITE_CELL_WARNING in p.warnings]
    if empty:
        console.print(f"[yellow]warning:[/yellow] {len(empty)} image(s) show no white cell at their centre (no "
                      f"nuclear stain in the window read): their classes are not to be "
                      f"trusted (warnings column); images of a smear are analysed with `leukoscope analyze`: "
                      f"{escape(name_some(empty))}", soft_wrap=True)


def _say_learned_from(paths: list, bundles: dict[str, Optional[Path]]) -> dict[str, Any]:
    """A note for each model that learned from some of ``paths`` (by content: a sample of a large run): its
    results on them say nothing about its accuracy on new images (``evaluate`` refuses such data). Returns the
    record for a run's ``summary.json`` (``images_checked`` and, per model, its overlap; empty when none learned)."""
    from leukoscope.data.fingerprints import describe_overlap, learned_among

    found, checked = learned_among(bundles, paths)
    among = f"{len(paths)} images" if checked == len(paths) else f"{checked} images checked of {len(paths)}"
    for role, overlap in found.items():
        console.print(f"[yellow]note:[/yellow] the {role} learned from {describe_overlap(overlap)} among these "
                      f"{among}: its results on them say nothing about its accuracy on new images", soft_wrap=True)
    return {"images_checked": checked, **found} if found else {}


def _stated_scale_doubts(paths: list, um_per_px: float, *, single_cells: bool = False) -> list[str]:
    """The warning when the fields' (or single-cell images') red cells together measure another scale than the
    stated one (:func:`leukoscope.scale.stated_run_doubt`), said on the console; empty when they agree or cannot
    tell."""
    from leukoscope.scale import stated_run_doubt

    doubt = stated_run_doubt(paths, um_per_px, single_cells=single_cells)
    if doubt:
        console.print(f"[yellow]scale:[/yellow] {escape(doubt)}", soft_wrap=True)
    return [doubt] if doubt else []


def _say_framing(predictions: list, window_um: Optional[float]) -> None:
    """How many images were cut at the classifier's window, and at which scale; the ones classified whole."""
    scales = [p.scale for p in predictions if p.scale is not None and not p.error]
    if not scales or window_um is None:
        return
    framed = [s for s in scales if s.known]
    if framed:
        sources = sorted({s.source for s in framed})
        console.print(f"framing: {len(framed)} of {len(scales)} images classified on {window_um:g} um around their "
                      f"centre (scale {' / '.join(sources)}; um_per_px column)", soft_wrap=True)
    whole = len(scales) - len(framed)
    if whole:
        console.print(f"[yellow]framing:[/yellow] {whole} of {len(scales)} images had no scale (too few isolated red "
                      f"cells) and were classified whole, although the classifier expects {window_um:g} um around "
                      f"the cell: pass --um-per-px, or --as-given for crops already cut at that window",
                      soft_wrap=True)


@contextmanager
def _one_ray_session(address: Optional[str], needed: bool) -> Iterator[None]:
    """Slides and fields on Ray together share one Ray (started once, not once for each)."""
    if not needed:
        yield
        return
    from leukoscope.inference.archive import ray_session

    try:
        with ray_session(address):
            yield
    except ConnectionError as exc:
        _fail(f"cannot reach the Ray cluster at --address {address}: {exc}")


def _analyze_inputs(analyzer, detector: Path, classifier: Optional[Path], options: dict, slides: list, paths: list,
                    out: Path, *, engine: str, address: Optional[str], actors: Optional[int], threads: Optional[int],
                    retry_failed: bool, quiet: bool, slide_options: dict, run_um_per_px: Optional[float] = None,
                    run_warnings: Sequence[str] = (), cells: Optional[Path] = None) -> None:
    """The whole-slide images, then the fields, on the chosen engine; the summary printed.
    ``run_um_per_px``: the fields' run scale (:func:`_run_scale`); slides keep their own. ``run_warnings``: the
    fields' together (:func:`_stated_scale_doubts`). ``cells``: the fields' cells written there by class."""
    from leukoscope.progress import progress_bar

    analysed = 0
    if slides:
        if engine == "ray":
            analysed = _analyze_slides_on_ray(analyzer, detector, classifier, options, slides, out, address=address,
                                              actors=actors, threads=threads or 1, **slide_options)
        else:
            analysed = sum(_analyze_slide(analyzer, path, out, **slide_options) for path in slides)
        if analysed < len(slides):
            console.print(f"[red]{len(slides) - analysed} of {len(slides)} slide(s) could not be analysed[/red]")
    if not paths:
        print(out)
        if not analysed:
            raise typer.Exit(2)  # nothing analysed: a script must see it
        if analysed < len(slides):
            raise typer.Exit(EXIT_SOME_FAILED)
        return
    if run_um_per_px is not None:  # an option only when there is one: an archive's options stay as they were
        analyzer.run_um_per_px = run_um_per_px
        options = {**options, "run_um_per_px": run_um_per_px}
    with progress_bar(len(paths), "analysing", enabled=not quiet, unit="fields") as update:
        if engine == "ray":
            summary = _analyze_on_ray(analyzer, detector, classifier, options, paths, out, update, address=address,
                                      actors=actors, threads=threads or 1, retry_failed=retry_failed,
                                      run_warnings=run_warnings)
        else:  # the run's scale, or the doubt of a stated one, said above
            summary = _run(analyzer.analyze_paths, paths, out, progress=update, estimate_run_scale=False,
                           run_warnings=run_warnings, cells_dir=cells)
    pooled = summary.pooled
    failed = [r for r in summary.results if r.error]
    console.print(_analysed_line(len(summary.results), len(failed), pooled))
    if cells is not None:
        written = [cell for r in summary.results for cell in r.cells]
        unsure = sum(cell.uncertain for cell in written)
        # the classifier that cut and named them, as --init takes it (it said "<classifier>")
        start = shipped_spec(classifier) or str(classifier) if classifier is not None else "<a classifier bundle>"
        console.print(f"cells: {len(written)} written to {cells}/<class>/ ({unsure} in uncertain/): move the misnamed "
                      f"ones to their class, sort uncertain/ away, then fine-tune with `leukoscope train --init "
                      f"{escape(start)} --data {cells}`", soft_wrap=True)
    read = len(summary.results) - len(failed)  # the fields analysed: an unreadable file has no scale to speak of
    borrowed = [r for r in summary.results if r.scale and r.scale.get("source") == "run"]
    if borrowed:
        console.print(f"[yellow]scale:[/yellow] {len(borrowed)} of {read} field(s) had no scale "
                      f"estimate of their own (too few isolated red cells, or one far off the run's) and were "
                      f"analysed at the run's scale "
                      f"({borrowed[0].scale['um_per_px']:.4f} um/px; pass --um-per-px to state it)", soft_wrap=True)
    unscaled = [r for r in summary.results if r.scale and r.scale.get("source") == "unknown"]
    if unscaled:
        assumed = ("were analysed at the detector's training scale" if analyzer.detector.info.um_per_px else
                   "were analysed as they are (the detector records no training scale)")
        console.print(f"[yellow]scale:[/yellow] {len(unscaled)} of {read} field(s) had no scale "
                      f"estimate (too few isolated red cells, or objects too small to be red cells) and {assumed} "
                      f"(pass --um-per-px to state it)", soft_wrap=True)
    for flag in pooled.flags:
        console.print(f"[yellow]flag:[/yellow] {escape(flag)}", soft_wrap=True)
    if failed:
        console.print(f"[red]{len(failed)} image(s) could not be read[/red] (see summary.csv)")
    print(out)
    if failed and len(failed) == len(summary.results) and not analysed:
        raise typer.Exit(2)  # nothing analysed: as predict, a script must see it
    if failed or analysed < len(slides):
        raise typer.Exit(EXIT_SOME_FAILED)


def _analysed_line(images: int, failed: int, pooled) -> str:
    """The console's one line on a folder run: the images read, the white cells, the blasts."""
    if failed == images:
        return f"none of the {images} image(s) could be read"
    text = f"{images - failed} of {images} image(s) read" if failed else f"{images} image(s)"
    text += f", {pooled.total} white cell{'' if pooled.total == 1 else 's'}"
    if pooled.blast_percentage is not None and pooled.blast_percentage_meaningful:
        low, high = pooled.blast_ci95
        text += f", blasts {pooled.blasts} ({pooled.blast_percentage:.1f}%, 95% CI {low:.1f}-{high:.1f}%)"
    elif pooled.blasts is not None:
        text += f", {pooled.blasts} blast(s): too few cells for a blast percentage ({pooled.min_cells} asked)"
    return text


ENGINES = ("local", "ray")


def _check_engine(engine: str, address: Optional[str], actors: Optional[int], retry_failed: bool) -> None:
    """The engine options, and Ray installed for --engine ray (checked before torch loads)."""
    import importlib.util

    if engine not in ENGINES:
        _fail(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "local":
        given = [name for name, value in (("--address", address), ("--actors", actors),
                                          ("--retry-failed", retry_failed or None)) if value is not None]
        if given:
            _fail(f"{', '.join(given)}: only with --engine ray")
        return
    if actors is not None and actors < 1:
        _fail(f"--actors must be at least 1, got {actors}")
    missing = [name for name in ("ray", "pyarrow") if importlib.util.find_spec(name) is None]
    if missing:
        _fail(f"--engine ray needs {' and '.join(missing)}: pip install 'leukoscope[ray]'")


def _analyze_on_ray(analyzer, detector: Path, classifier: Optional[Path], options: dict, paths: list, out: Path,
                    update, **engine):
    """The fields on a Ray cluster (leukoscope.inference.archive); the local engine's summary back."""
    from leukoscope.inference.archive import AnalyzerSpec, analyze_archive

    try:
        run = _run(analyze_archive, AnalyzerSpec(detector, classifier, options), paths, out, analyzer=analyzer,
                   progress=update, **engine)
    except ConnectionError as exc:
        _fail(f"cannot reach the Ray cluster at --address {engine.get('address')}: {exc}")
    console.print(f"ray: {run.processed} field(s) analysed, {run.skipped} already in {out} (skipped); "
                  f"tables {out / 'fields'} and {out / 'cells'}", soft_wrap=True)
    return run.summary


def _analyze_slides_on_ray(analyzer, detector: Path, classifier: Optional[Path], options: dict, slides: list,
                           out: Path, *, address: Optional[str], actors: Optional[int], threads: int,
                           **slide_options) -> int:
    """Whole-slide images whose tiles Ray actors analyse (leukoscope.inference.slide.ray_tiles); how many were
    analysed."""
    from ray.exceptions import RayActorError

    from leukoscope.inference.archive import AnalyzerSpec, ray_session
    from leukoscope.inference.slide.ray_tiles import RayTileRunner

    try:
        with ray_session(address):
            with _run(RayTileRunner, AnalyzerSpec(detector, classifier, options), actors=actors,
                      threads=threads) as runner:
                console.print(f"ray: {runner.workers} actor(s) of {threads} CPU(s) analyse the slides' tiles",
                              soft_wrap=True)
                return sum(_analyze_slide(analyzer, path, out, runner=runner, **slide_options) for path in slides)
    except ConnectionError as exc:
        _fail(f"cannot reach the Ray cluster at --address {address}: {exc}")
    except RayActorError as exc:  # restarted twice and still dying: a node lost, memory, models missing there
        _fail(f"a Ray actor analysing the slides' tiles died and could not be restarted: "
              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def _analyze_slide(analyzer, path: Path, out: Path, *, quiet: bool, **options) -> bool:
    """One whole-slide image: its monolayer sampled to the target, files in ``out/<name>/``. False (said on
    the console) when the slide cannot be analysed (unreadable, one level only, an unsupported pixel type) or
    no tile of it was examined (smaller than one tile, no monolayer found: its files say so)."""
    from leukoscope.inference.slide.analysis import SlideAnalyzer, write_slide
    from leukoscope.inference.smear_output import shortened
    from leukoscope.progress import progress_bar

    slide_analyzer = _run(SlideAnalyzer, analyzer, **options)
    state: dict = {}

    def plan(n: int) -> None:
        state["bar"] = progress_bar(n, f"{path.name}: tiles", enabled=not quiet)
        state["update"] = state["bar"].__enter__()

    try:
        result = slide_analyzer.analyze(path, on_plan=plan, progress=lambda **kw: state["update"](**kw))
    except _user_errors() as exc:  # this slide only: the other slides and the fields are still analysed
        console.print(f"[red]{escape(path.name)}: not analysed:[/red] {escape(str(exc))}", soft_wrap=True)
        return False
    finally:
        if "bar" in state:
            state["bar"].__exit__(None, None, None)
    folder = out / shortened(path.stem)  # as write_slide names its files
    write_slide(result, folder)
    if not result.tiles:  # a run with nothing examined must not look like one that found no white cell
        console.print(f"[red]{escape(path.name)}: not analysed:[/red] {escape(' '.join(result.sampling_warnings))}",
                      soft_wrap=True)
        console.print(f"slide files: {folder}", soft_wrap=True)
        return False
    d = result.differential
    text = (f"{path.name}: {d.total} white cells in {len(result.tiles)} of {len(result.monolayer.tiles)} monolayer "
            f"tile(s)")
    if d.blast_percentage is not None and d.blast_percentage_meaningful:
        text += f", blasts {d.blasts} ({d.blast_percentage:.1f}%, 95% CI {d.blast_ci95[0]:.1f}-{d.blast_ci95[1]:.1f}%)"
    console.print(text, soft_wrap=True)
    for warning in result.sampling_warnings:
        console.print(f"[yellow]slide:[/yellow] {escape(warning)}", soft_wrap=True)
    for flag in d.flags:
        console.print(f"[yellow]flag:[/yellow] {escape(flag)}", soft_wrap=True)
    console.print(f"slide files: {folder}", soft_wrap=True)
    return True


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
