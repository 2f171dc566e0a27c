"""What every command shares: switches without a value, one-line errors with exit code 2, the cheap
checks of bundles and output folders made before torch loads."""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.markup import escape

from leukoscope.pretrained import resolve_bundle
from leukoscope.progress import console


#: `predict`/`analyze`/`evaluate --backend` choices (leukoscope.inference.runtime.BACKENDS, which imports torch).
BACKENDS = ("auto", "torch", "onnxruntime", "openvino")


def flag(default: bool | None, *names: str, **options: Any) -> Any:
    """A switch (``--quiet``, ``--class-map/--no-class-map``): typer's option without the ``<bool>`` its help
    would show beside the name, which reads as a value to type after it (``--quiet true`` is refused)."""
    return typer.Option(default, *names, metavar="", **options)


#: Exit codes of commands that read many images: 0 every input was used; 3 some could not be read or
#: analysed (the others' results are written, the failures named in them); 2 nothing was done (bad input,
#: a usage error, or no input usable). A batch script can tell a clean run from a partial one, and a partial
#: one from a crash (Python exits with 1 on an uncaught error, click on Ctrl-C: outputs may then be missing).
EXIT_SOME_FAILED = 3


def fail(message: str) -> None:
    # escape: messages quote lists ("[sgd, adam]", "['blast']") that rich would take for markup
    console.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=2)


#: (module, class) of the errors that mean "bad input", shown as one line.
_USER_ERROR_CLASSES = (("leukoscope.data.manifest", "DatasetError"), ("leukoscope.engine.config", "ConfigError"),
                       ("leukoscope.bundle", "BundleError"), ("leukoscope.io", "ImageDecodeError"),
                       ("leukoscope.models", "WeightsError"))


def user_errors() -> tuple[type[BaseException], ...]:
    # Only classes of modules already imported: a module not loaded cannot have raised,
    # and importing it here would load torch (seconds) to report a typo.
    loaded = tuple(getattr(sys.modules[module], name) for module, name in _USER_ERROR_CLASSES
                   if module in sys.modules)
    return (*loaded, FileNotFoundError, FloatingPointError, ValueError)


def call_or_exit(fn, *args, **kwargs):
    """Call ``fn``; turn expected user errors into one clear line and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except user_errors() as exc:
        fail(str(exc))
    except OSError as exc:  # a write refused after the checks (a share remounted read-only): one line too
        message = write_error(exc)
        if message is None:
            raise
        fail(message)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
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


def check_writable_folder(folder: Path, option: str, shown: Path | None = None) -> None:
    """Fail (one line, exit 2) when ``folder`` or a folder above it is an existing file, or when the nearest
    existing one cannot be written in (a read-only file system, a folder without write permission): the outputs
    could not be written there, and that should be said before any model loads or any image is processed, not
    as a traceback after (predict had classified every image first). ``shown``: the path the option gave
    (a file in ``folder``), named in the message."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                fail(f"{option} {shown or folder}: {path} is a file, not a folder")
            why = unwritable(path)
            if why:
                fail(f"{option} {shown or folder}: cannot write there ({why})")
            return


def unwritable(folder: Path) -> str | None:
    """Why files cannot be made in the existing ``folder`` (None: they can). ``os.access`` answers for this
    user (root passes a folder's permission bits, as it writes past them) and says no on a read-only mount."""
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows)
        read_only = False
    return "read-only file system" if read_only else f"no permission to write in {folder}"


#: The errors of a write refused late (a share remounted read-only, a folder's permissions changed meanwhile).
_WRITE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_error(exc: OSError) -> str | None:
    """One line for an ``OSError`` of a refused write or read (None: another error, for a traceback)."""
    if exc.errno not in _WRITE_ERRNOS:
        return None
    return f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)


def own_dataset(info: Any, data: str) -> bool:
    """Whether ``data`` is the dataset the classifier bundle was trained from (its crops already cut)."""
    own = info.provenance.get("dataset")
    return bool(own) and Path(str(own)).resolve() == Path(data).resolve()


def frames_cells(info: Any, data: str, as_given: bool, um_per_px: Optional[float]) -> bool:
    """Whether a classifier's single-cell images of ``data`` are framed for its window as predict frames them:
    not with --as-given or without a window, nor the bundle's own training dataset (crops cut at the window,
    as training took them) unless --um-per-px says otherwise."""
    if as_given or info.preprocessing.cell_window_um is None:
        return False
    return um_per_px is not None or not own_dataset(info, data)


def check_bundle(spec: Path | str, option: str | None = None) -> Path:
    """The bundle folder ``spec`` names (``pretrained:NAME``: a shipped model's), checked to exist.
    The bundle readers import torch; these checks are the cheap part of theirs."""
    path = call_or_exit(resolve_bundle, spec, option=option)
    if path.is_file():
        fail(f"{path}: is a file; a bundle is a folder (with bundle.json)")
    if not path.is_dir():
        fail(f"{path}: bundle folder does not exist")
    if not (path / "bundle.json").is_file():
        fail(f"{path}: not a leukoscope bundle (no bundle.json)")
    return path
