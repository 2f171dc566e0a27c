"""Command-line interface: a thin layer over the Python API, one module per command (or family of commands).

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

import logging

import typer

from leukoscope.cli._common import flag
from leukoscope.cli.analysis import analyze
from leukoscope.cli.demo import demo
from leukoscope.cli.evaluation import calibrate_ood, evaluate
from leukoscope.cli.exporting import export
from leukoscope.cli.listing import models
from leukoscope.cli.prediction import predict
from leukoscope.cli.segmentation import segment
from leukoscope.cli.service import serve, user_app
from leukoscope.cli.splitting import split
from leukoscope.cli.training import compare, mil, search, train, train_detector

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # a docstring's paragraphs reflowed to the terminal (rich mode kept its line breaks: ragged lines at 80 columns)
    rich_markup_mode="markdown",
    help="leukoscope: leukemia screening in blood-smear microscopy. Decision support, not a diagnosis.",
)
# In the order `leukoscope --help` lists them.
for command, name in ((models, None), (train, None), (search, None), (split, None), (evaluate, None),
                      (calibrate_ood, "calibrate-ood"), (predict, None), (export, None), (demo, None), (serve, None),
                      (segment, None), (compare, None), (train_detector, "train-detector"), (mil, None),
                      (analyze, None)):
    app.command(name)(command)
app.add_typer(user_app, name="user")


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


def main() -> None:  # pragma: no cover - console entry point
    app()


__all__ = ["app", "main"]
