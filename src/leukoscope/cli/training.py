"""`leukoscope train`, `search`, `compare`, `train-detector` and `mil`: a config checked and its run started.

Argument checks run before the heavy imports (torch takes seconds to load), so a typo in a path or key
fails in well under a second: the config module, the dataset path check and the bundle check import no torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

import typer

from leukoscope.cli._common import call_or_exit, check_bundle, check_writable_folder, fail, flag
from leukoscope.pretrained import is_pretrained_spec, peek_bundle
from leukoscope.progress import console

if TYPE_CHECKING:
    from leukoscope.engine.config import ExperimentConfig


SPLIT_FILE_HELP = ("Split JSON (from `leukoscope split`) to train and score on; made and saved there if absent "
                   "(same as data.split_file=...).")


def _load_config(config: Optional[Path], overrides: List[str], data: Optional[str], model: Optional[str],
                 split_file: Optional[Path] = None) -> "ExperimentConfig":
    """A classification config (search, compare) once its dataset path exists (a missing one would
    otherwise fail only after torch loads)."""
    from leukoscope.data.readers import check_dataset_path
    from leukoscope.engine.config import load_config

    cfg = call_or_exit(load_config, config, _overrides(overrides, data, model, split_file))
    if cfg.data.path:
        call_or_exit(check_dataset_path, cfg.data.path)
    _check_run_paths(cfg)  # output_root writable, before minutes of training
    return cfg


def _check_run_paths(cfg: Any) -> None:
    """Where a run writes, checked before the data are prepared: ``output_root`` a folder (or to be one), and
    ``data.split_file`` a file in one (written there only when it does not exist yet: a frozen split on a
    read-only share is read, not refused)."""
    if getattr(cfg, "output_root", None):
        check_writable_folder(Path(cfg.output_root), "output_root")
    split_file = getattr(getattr(cfg, "data", None), "split_file", None)
    if split_file:
        if Path(split_file).is_dir():
            fail(f"data.split_file {split_file}: is a folder, not a split file")
        if not Path(split_file).exists():
            check_writable_folder(Path(split_file).parent, "data.split_file", Path(split_file))


def _refuse_option_and_override(option: str, value: object, key: str, overrides: Sequence[str]) -> None:
    given = [o for o in overrides if o.partition("=")[0].strip() == key]
    if value and given:
        fail(f"{option} and the override {given[0]} both set {key}: give one")


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
        return task_named(peek_bundle(check_bundle(init, "--init")).task)
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
    return None if declared is None else call_or_exit(task_named, str(declared)).name


def _train(task, config: Optional[Path], overrides: List[str], data: Optional[str], model: Optional[str],
           resume: Optional[Path], quiet: bool, split_file: Optional[Path] = None, init: Optional[str] = None) -> None:
    """Load and check the task's config, then train; the run prints its report's path (also to train.log)."""
    source = resume / "config.yaml" if resume is not None else config
    if source is not None and Path(source).is_file():  # a config of another task: say so, not its every key
        found = _declared_task(Path(source)) or task.name
        if found != task.name:
            command = {"detect": "train-detector (or train)", "mil": "mil (or train)"}.get(found, "train")
            fail(f"{source} is a {found} {'run' if resume is not None else 'config'} (task: {found}), not a "
                 f"{task.name} one: use `leukoscope {command}`")
    if split_file is not None and task.name != "classify":
        fail(f"--split-file applies to classifier training; a {task.name} config sets its split otherwise")
    if resume is not None:
        from leukoscope.engine.run_dir import require_run_dir

        if split_file is not None:
            fail("--split-file cannot change the split of a run being resumed (it keeps its split.json)")
        if init is not None:
            fail("--init cannot change the starting weights of a run being resumed (it continues its checkpoint)")
        for option, given in (("--config", config), ("--data", data), ("--model", model)):
            if given is not None:
                fail(f"{option} cannot change a run being resumed: it continues with its own config.yaml "
                     f"(start a new run to train on other data or another model)")
        fixed = [o for o in overrides if o.partition("=")[0].strip() not in RESUME_OVERRIDES]
        if fixed:
            fail(f"{', '.join(fixed)}: a run being resumed keeps its model, data and optimizer (its checkpoint "
                 f"holds their state); only {', '.join(RESUME_OVERRIDES)} may change on --resume")
        call_or_exit(require_run_dir, resume)
        config, data, model = resume / "config.yaml", None, None
    extra = list(overrides or [])
    if init is not None:  # checked here, before torch loads; kept as written (pretrained:NAME) in config.yaml
        _refuse_option_and_override("--init", init, "model.init", extra)
        check_bundle(init, "--init")
        extra.append(f"model.init={json.dumps(init if is_pretrained_spec(init) else str(Path(init).resolve()))}")
    cfg = call_or_exit(task.function("load_config"), config, _overrides(extra, data, model, split_file))
    epochs = getattr(getattr(cfg, "train", None), "epochs", None)
    model_name = getattr(getattr(cfg, "model", None), "name", None)
    if resume is not None and model_name is not None:
        from leukoscope.models.classic import CLASSIC_MODELS  # (imports scikit-learn: only when resuming)

        if model_name in CLASSIC_MODELS:  # fitted in one step, no checkpoint: --resume fits it again
            epochs = None
    if resume is not None and isinstance(epochs, int):  # now, not after the data are prepared
        from leukoscope.engine.checkpoint import CHECKPOINT_FILE, check_resume_epochs, trained_epochs

        if not (resume / CHECKPOINT_FILE).exists():  # said now, not after the data are prepared (minutes)
            fail(f"cannot resume: no {CHECKPOINT_FILE} in {resume}"
                 + ("; the run completed and removed it (train.keep_checkpoint=true keeps it for training further)"
                    if (resume / "bundle").is_dir() else ""))
        trained = call_or_exit(trained_epochs, resume / CHECKPOINT_FILE)
        if trained is not None:
            call_or_exit(check_resume_epochs, trained, epochs)
    data_path = getattr(getattr(cfg, "data", None), "path", None)
    if data_path:  # a missing dataset fails now, not after torch has loaded
        from leukoscope.data.readers import check_dataset_path

        call_or_exit(check_dataset_path, data_path)
    _check_run_paths(cfg)
    if getattr(cfg, "search", None) is not None:
        console.print("[yellow]note: this config has a search section; `leukoscope search` runs the grid[/yellow]")
    result = call_or_exit(task.function("train"), cfg, run_dir=resume, resume=resume is not None,
                          show_progress=not quiet)
    print(result.bundle_dir)


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
    task = call_or_exit(_train_task, config, model, overrides or [], resume, init)
    _train(task, config, overrides or [], data, model, resume, quiet, split_file, init)


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
    call_or_exit(cfg.require_search)  # before minutes of training the defaults under a search's name
    from leukoscope.tasks.search import run_search

    result = call_or_exit(run_search, cfg, show_progress=not quiet)
    console.print(f"results: {result.search_dir / 'results.csv'}")
    print(result.best.bundle_dir)


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
    result = call_or_exit(run_compare, cfg, models=names, show_progress=not quiet)
    console.print(f"table: {result.compare_dir / 'compare.md'}; page: {result.compare_dir / 'compare.html'}")
    print(result.compare_dir if result.best is None else result.best.bundle_dir)  # no row chosen: its folder


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
