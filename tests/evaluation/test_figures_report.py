"""Figures are real PNGs; the HTML report is self-contained and escaped; evaluate_logits ties it together."""

from __future__ import annotations

import base64
import json
import re
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from leukoscope.evaluation import (
    DISCLAIMER,
    classification_metrics,
    confusion_matrix_figure,
    evaluate_logits,
    pr_figure,
    reliability_figure,
    roc_figure,
    softmax,
    training_curves_figure,
    write_html_report,
)

CLASSES = ["blast", "lymphocyte", "<script>alert(1)</script>"]


def noisy_logits(y: np.ndarray, n_classes: int, seed: int, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.0, size=(y.size, n_classes))
    logits[np.arange(y.size), y] += 1.5
    return logits * scale


def labels(n: int, n_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_classes, size=n)


def assert_png(path: Path, min_side: int = 300) -> tuple[int, int]:
    assert path.is_file()
    with Image.open(path) as image:
        image.verify()  # raises on a truncated or corrupt file
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_side
        return image.size


HISTORY = [
    {"epoch": 1, "train_loss": 1.2, "train_accuracy": 0.4, "val_loss": 1.1, "val_accuracy": 0.5, "lr": 1e-3},
    {"epoch": 2, "train_loss": 0.8, "train_accuracy": 0.6, "val_loss": 0.9, "val_accuracy": 0.6, "lr": 1e-3},
    {"epoch": 3, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.95, "val_accuracy": 0.62, "lr": 1e-4},
]


# --------------------------------------------------------------------------- figures
def test_every_figure_is_a_valid_png_and_leaves_no_pyplot_figures(tmp_path: Path) -> None:
    y = labels(90, 3, seed=0)
    probs = softmax(noisy_logits(y, 3, seed=0))
    open_before = plt.get_fignums()
    paths = [
        confusion_matrix_figure(np.array([[5, 1, 0], [2, 7, 1], [0, 0, 4]]), CLASSES, tmp_path / "cm.png"),
        confusion_matrix_figure(np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]]), CLASSES, tmp_path / "cmn.png",
                                normalize=True, title="normalised"),
        roc_figure(y, probs, CLASSES, tmp_path / "roc.png"),
        pr_figure(y, probs, CLASSES, tmp_path / "pr.png"),
        reliability_figure(y, probs, softmax(noisy_logits(y, 3, seed=0), 2.0), tmp_path / "rel.png"),
        training_curves_figure(HISTORY, tmp_path / "sub" / "curves.png"),
    ]
    for path in paths:
        assert_png(path)
    assert paths[-1] == tmp_path / "sub" / "curves.png"  # parent folder created, path returned
    assert plt.get_fignums() == open_before


def test_confusion_matrix_figure_grows_with_the_number_of_classes(tmp_path: Path) -> None:
    small = assert_png(confusion_matrix_figure(np.eye(3, dtype=int), ["a", "b", "c"], tmp_path / "s.png"))
    names = [f"class {i}" for i in range(14)]
    large = assert_png(confusion_matrix_figure(np.eye(14, dtype=int), names, tmp_path / "l.png"))
    assert large[0] > small[0] and large[1] > small[1]


def test_confusion_matrix_figure_rejects_mismatched_classes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not match"):
        confusion_matrix_figure(np.eye(3), ["a", "b"], tmp_path / "x.png")


def test_curves_handle_binary_and_absent_classes(tmp_path: Path) -> None:
    y = np.array([0, 1, 0, 1, 1, 0])
    p1 = np.array([0.2, 0.7, 0.4, 0.9, 0.3, 0.1])
    binary = np.column_stack([1 - p1, p1])
    assert_png(roc_figure(y, binary, ["normal", "blast"], tmp_path / "roc2.png"))
    assert_png(pr_figure(y, binary, ["normal", "blast"], tmp_path / "pr2.png"))
    three = np.column_stack([binary * 0.9, np.full(6, 0.1)])  # third class never occurs in y
    assert_png(roc_figure(y, three, CLASSES, tmp_path / "roc3.png"))
    assert_png(pr_figure(y, three, CLASSES, tmp_path / "pr3.png"))


def test_reliability_without_calibrated_probs(tmp_path: Path) -> None:
    y = labels(40, 3, seed=1)
    assert_png(reliability_figure(y, softmax(noisy_logits(y, 3, seed=1)), None, tmp_path / "rel.png"))


def test_training_curves_tolerate_missing_validation_and_none(tmp_path: Path) -> None:
    history = [{"epoch": 1, "train_loss": 1.0, "train_accuracy": None, "lr": 0.1}, {"train_loss": 0.7}]
    assert_png(training_curves_figure(history, tmp_path / "curves.png"))


def test_training_curves_reject_empty_history(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        training_curves_figure([], tmp_path / "curves.png")


# --------------------------------------------------------------------------- report
def external_references(html: str) -> list[str]:
    """Every src/href value that is not an embedded data: URI."""
    values = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", html, flags=re.IGNORECASE)
    return [v for v in values if not v.startswith("data:")]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict]:
    tmp = tmp_path_factory.mktemp("report")
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 2, 2, 2, 2, 0])
    probs = np.full((9, 3), 0.1)
    probs[np.arange(9), pred] = 0.8
    metrics = classification_metrics(y, probs, CLASSES)
    metrics["calibration"] = {"temperature": 1.75, "ece_before": 0.2, "ece_after": 0.05}
    metrics["best_epoch"] = 7
    figure = confusion_matrix_figure(np.asarray(metrics["confusion_matrix"]), CLASSES, tmp / "cm.png")
    path = write_html_report(
        tmp / "out" / "report.html",
        title="Run <b>42</b>",
        sections=[("Data", "Images from lab & clinic")],
        metrics=metrics,
        figures={"confusion_matrix": figure},
        config={"model": {"name": "resnet18"}, "lr": 0.001, "homepage": "https://example.org"},
        notes=["skipped corrupt.png (truncated <file>)"],
    )
    return path.read_text(encoding="utf-8"), figure, metrics


def test_report_has_disclaimer_title_and_headline_numbers(report: tuple[str, Path, dict]) -> None:
    html, _, metrics = report
    assert DISCLAIMER in html
    assert "Run &lt;b&gt;42&lt;/b&gt;" in html and "<b>42</b>" not in html
    assert f"{metrics['accuracy']:.3f}" in html  # 0.667
    assert f"{metrics['macro']['f1']:.3f}" in html
    assert "0.200" in html and "0.050" in html and "1.75" in html  # ECE before/after, T


def test_report_per_class_and_confusion_tables(report: tuple[str, Path, dict]) -> None:
    html = report[0]
    assert "blast" in html and "lymphocyte" in html
    assert "0.833" in html  # specificity of blast: 5/6
    assert "0.857" in html  # specificity of lymphocyte: 6/7
    cm_table = html[html.index('<table class="cm">'):]
    cm_table = cm_table[: cm_table.index("</table>")]
    counts = [int(c) for c in re.findall(r'<td class="[^"]*"[^>]*>(\d+)</td>', cm_table)]
    assert counts == [2, 1, 0, 0, 1, 1, 1, 0, 3]


def test_report_escapes_user_text(report: tuple[str, Path, dict]) -> None:
    html = report[0]
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "truncated &lt;file&gt;" in html
    assert "lab &amp; clinic" in html


def test_report_is_self_contained_with_embedded_figure(report: tuple[str, Path, dict]) -> None:
    html, figure, _ = report
    assert external_references(html) == []
    assert "<link" not in html and "@import" not in html
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 1
    assert base64.b64decode(uris[0]) == figure.read_bytes()
    assert "Counts of true (rows)" in html  # caption


def test_report_shows_config_as_json_and_scalar_extras(report: tuple[str, Path, dict]) -> None:
    html = report[0]
    assert "&#34;lr&#34;: 0.001" in html or "&quot;lr&quot;: 0.001" in html
    assert "best_epoch" in html


def test_report_with_missing_figure_file_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="roc"):
        write_html_report(tmp_path / "r.html", title="t", figures={"roc": tmp_path / "missing.png"})


# --------------------------------------------------------------------------- evaluate_logits
def strict_json(path: Path) -> dict:
    def reject(value: str) -> None:
        raise AssertionError(f"non-standard JSON constant {value}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def test_evaluate_logits_writes_everything_and_calibrates(tmp_path: Path) -> None:
    n_classes = 4
    classes = ["blast", "lymphocyte", "monocyte", "neutrophil"]
    y_test = labels(240, 3, seed=2)  # "neutrophil" never occurs in the test set
    y_val = labels(240, n_classes, seed=3)
    result = evaluate_logits(
        y_test,
        noisy_logits(y_test, n_classes, seed=2, scale=4.0),  # over-confident model
        classes,
        tmp_path / "run",
        val_logits=noisy_logits(y_val, n_classes, seed=3, scale=4.0),
        val_true=y_val,
        history=HISTORY,
        config={"train": {"epochs": 3}},
        title="test run",
        notes=["2 unreadable image(s) were skipped"],
        extra={"evaluated_on": "test", "split_file": tmp_path / "split.json", "history": HISTORY},
    )
    run = tmp_path / "run"
    on_disk = strict_json(run / "metrics.json")
    assert on_disk == result
    assert result["evaluated_on"] == "test" and result["split_file"] == str(tmp_path / "split.json")
    assert result["absent_classes"] == ["neutrophil"]
    assert result["per_class"]["neutrophil"]["roc_auc"] is None

    calibration = result["calibration"]
    assert calibration["temperature"] > 1.5
    assert calibration["ece_after"] < calibration["ece_before"]
    assert calibration["nll_after"] < calibration["nll_before"]
    assert calibration["ece_after"] == pytest.approx(result["ece"])  # the metrics: of the calibrated probabilities

    expected = {"confusion_matrix", "confusion_matrix_normalized", "roc", "pr", "reliability", "training_curves"}
    assert set(result["figures"]) == expected
    for relative in result["figures"].values():
        assert not Path(relative).is_absolute()
        assert_png(run / relative)

    html = (run / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == len(expected)
    assert "2 unreadable image(s) were skipped" in html
    assert "neutrophil" in html and external_references(html) == []


def test_evaluate_logits_without_validation_or_history(tmp_path: Path) -> None:
    y = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    result = evaluate_logits(y, noisy_logits(y, 2, seed=4), ["normal", "blast"], tmp_path)
    assert "calibration" not in result
    assert "training_curves" not in result["figures"]
    assert (tmp_path / "figures" / "reliability.png").is_file()
    assert (tmp_path / "report.html").is_file()


def test_evaluate_logits_rejects_half_a_validation_set(tmp_path: Path) -> None:
    y = np.array([0, 1])
    with pytest.raises(ValueError, match="both"):
        evaluate_logits(y, noisy_logits(y, 2, seed=5), ["a", "b"], tmp_path, val_logits=np.zeros((2, 2)))


def test_evaluate_logits_refuses_extra_that_shadows_a_metric(tmp_path: Path) -> None:
    y = np.array([0, 1])
    with pytest.raises(ValueError, match="accuracy"):
        evaluate_logits(y, noisy_logits(y, 2, seed=6), ["a", "b"], tmp_path, extra={"accuracy": 1.0})
    assert not (tmp_path / "metrics.json").exists()


def test_a_temperature_fit_on_its_bound_is_a_report_note_not_a_printed_warning(tmp_path: Path) -> None:
    # a tiny, perfectly separated validation set (every small run has one) puts the optimum on the bound
    y = np.array([0, 1, 0, 1, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test: it would be printed with a source path
        result = evaluate_logits(y, noisy_logits(y, 2, seed=6), ["normal", "blast"], tmp_path,
                                 val_logits=np.array([[2.0, 0.0], [0.0, 1.0]]), val_true=np.array([0, 1]))
    assert result["calibration"]["temperature"] == 1.0
    assert "reached its search limit" in (tmp_path / "report.html").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- second review of the figures


def _drawn_figure(monkeypatch: pytest.MonkeyPatch) -> list:
    """What the figure functions drew, one ``[axis][text]`` list per figure saved (read back before the
    figure is cleared)."""
    from leukoscope.evaluation import figures

    saved: list = []
    real = figures.save_figure

    def keep(fig, path):
        saved.append([[text.get_text() for text in ax.texts] for ax in fig.axes])
        return real(fig, path)

    monkeypatch.setattr(figures, "save_figure", keep)
    return saved


def test_class_names_with_dollar_signs_are_drawn_literally(tmp_path: Path) -> None:
    """A class named "CD34$^$ blast" made matplotlib parse mathtext and savefig raise: the run ended with
    neither metrics.json nor report.html."""
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    classes = ["CD34$^$ blast", "a $x$ cell", "normal"]
    result = evaluate_logits(y, noisy_logits(y, 3, seed=6), classes, tmp_path, history=HISTORY)
    assert (tmp_path / "metrics.json").is_file() and set(result["figures"]) >= {"roc", "pr", "confusion_matrix"}


def test_normalised_confusion_matrix_says_n_a_for_an_absent_class(tmp_path: Path, monkeypatch) -> None:
    """A class with no images showed a recall of 0.00 on the diagonal."""
    saved = _drawn_figure(monkeypatch)
    cm = np.array([[3, 1, 0], [0, 0, 0], [1, 0, 2]])
    confusion_matrix_figure(cm, ["a", "absent", "c"], tmp_path / "n.png", normalize=True)
    texts = saved[-1][0]
    assert texts[3:6] == ["n/a"] * 3 and texts[0] == "0.75" and "n/a" not in texts[:3] + texts[6:]


def test_training_curves_mark_the_checkpoint_kept(tmp_path: Path, monkeypatch) -> None:
    """The dashed line said "lowest val loss", usually not the checkpoint kept (chosen by val accuracy)."""
    saved = _drawn_figure(monkeypatch)
    training_curves_figure(HISTORY, tmp_path / "c.png", best_epoch=3, monitor="val_accuracy")
    assert sum(saved[-1], []) == ["checkpoint kept (epoch 3, by val_accuracy)"]
    training_curves_figure(HISTORY, tmp_path / "d.png")  # no checkpoint known: the lowest val loss, said so
    assert sum(saved[-1], []) == ["lowest val loss (epoch 2)"]


def test_evaluate_marks_the_run_s_best_epoch_on_the_curves(tmp_path: Path, monkeypatch) -> None:
    saved = _drawn_figure(monkeypatch)
    y = np.array([0, 1, 0, 1])
    evaluate_logits(y, noisy_logits(y, 2, seed=7), ["a", "b"], tmp_path, history=HISTORY,
                    config={"train": {"monitor": "val_macro_f1"}}, extra={"best_epoch": 1})
    assert sum(saved[-1], []) == ["checkpoint kept (epoch 1, by val_macro_f1)"]


def test_report_precision_of_a_class_never_predicted_is_n_a(tmp_path: Path) -> None:
    """sklearn's zero_division=0 printed 0.000: "every call of it was wrong", for a class never called."""
    y = np.array([0, 1, 2, 0, 1, 2])
    logits = np.zeros((6, 3))
    logits[np.arange(6), [0, 1, 0, 0, 1, 0]] = 5.0  # class 2 is never predicted
    evaluate_logits(y, logits, ["a", "b", "never"], tmp_path)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    row = re.search(r"<tr>\s*<td[^>]*>never</td>(.*?)</tr>", html, re.S)
    assert row is not None
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)
    assert cells[0].strip() == "n/a" and cells[1].strip() == "0.000"  # precision n/a, recall 0 (missed both)


def test_report_says_how_the_averages_count_an_n_a_precision(tmp_path: Path) -> None:
    """The table said n/a for a never-predicted class's precision, yet its macro row averaged it as 0, unsaid."""
    y = np.array([0, 1, 2, 0, 1, 2])
    logits = np.zeros((6, 3))
    logits[np.arange(6), [0, 1, 0, 0, 1, 0]] = 5.0  # class 2 is never predicted
    metrics = evaluate_logits(y, logits, ["a", "b", "never"], tmp_path)
    written = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert written["per_class"]["never"]["precision"] is None and written["never_predicted_classes"] == ["never"]
    assert written["macro"]["precision"] == pytest.approx((0.5 + 1.0 + 0.0) / 3) == metrics["macro"]["precision"]
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "The n/a precision of never (never predicted) is counted as 0 in both averages." in html
    assert "average_convention" not in html  # said under the table, not dumped in Run details


def test_report_says_when_images_were_called_a_class_absent_from_the_set(tmp_path: Path) -> None:
    """Most images called a class with none in the set: macro precision 0.70, weighted 0.91, beside accuracy 0.18,
    and nothing said."""
    y = np.array([0, 0, 1, 1, 0, 1])
    logits = np.zeros((6, 3))
    logits[np.arange(6), [0, 2, 2, 2, 2, 1]] = 5.0  # four images called "absent", a class with no images here
    evaluate_logits(y, logits, ["a", "b", "absent"], tmp_path)
    written = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert written["called_absent"] == {"absent": 4} and written["accuracy"] == pytest.approx(2 / 6)
    assert written["macro"]["precision"] == 1.0  # what the averages see: only the classes present
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert '<ul class="notes">' in html and "4 of 6 images (67%) were called a class with no images in this set " \
        "(absent 4)" in html


# --------------------------------------------------------------------------- figure review (third)
def _drawn_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    """Per saved file name: each axis's title, legend (title, entries, overlap with its own axes once drawn),
    tick labels and texts, plus the figure's colour-bar ticks; read back before the figure is cleared."""
    from leukoscope.evaluation import figures

    saved: dict[str, dict] = {}
    real = figures.save_figure

    def keep(fig, path):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        axes = []
        for ax in fig.axes:
            legend = ax.get_legend()
            box = legend.get_window_extent(renderer) if legend is not None else None
            axes.append({
                "title": ax.get_title(), "label": ax.get_label(), "ylabel": ax.get_ylabel(),
                "legend_title": legend.get_title().get_text() if legend is not None else None,
                "legend": [t.get_text() for t in legend.get_texts()] if legend is not None else [],
                "legend_overlaps_axes": box is not None and box.overlaps(ax.get_window_extent(renderer)),
                "yticks": [float(v) for v in ax.get_yticks()], "ylim": ax.get_ylim(),
                "texts": [t.get_text() for t in ax.texts],
                "text_boxes": [t.get_window_extent(renderer) for t in ax.texts],
                "axes_box": ax.get_window_extent(renderer),
                "lines": [(line.get_label(), line.get_xdata(), line.get_ydata()) for line in ax.get_lines()],
            })
        saved[Path(path).name] = {"axes": axes}
        return real(fig, path)

    monkeypatch.setattr(figures, "save_figure", keep)
    return saved


def test_reliability_names_the_temperature_and_n_and_keeps_its_legend_off_the_points(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate's curve was labelled "model" though its logits were divided by the bundle's T = 5.39; the legend sat
    in the upper left, over points at accuracy 1.0; neither split nor n was on the figure."""
    saved = _drawn_figures(monkeypatch)
    y = labels(40, 3, seed=1)
    reliability_figure(y, softmax(noisy_logits(y, 3, seed=1)), None, tmp_path / "rel.png",
                       applied_temperature=5.386, subset="heldout.csv")
    ax = saved["rel.png"]["axes"][0]
    assert ax["legend"][1].startswith("after temperature T = 5.39 (ECE = ")
    assert ax["legend_title"] == "heldout.csv, n = 40" and not ax["legend_overlaps_axes"]

    y_val = labels(60, 3, seed=3)
    result = evaluate_logits(y, noisy_logits(y, 3, seed=1, scale=4.0), ["a", "b", "c"], tmp_path / "run",
                             val_logits=noisy_logits(y_val, 3, seed=3, scale=4.0), val_true=y_val,
                             extra={"evaluated_on": "test"})
    ax = saved["reliability.png"]["axes"][0]
    temperature = result["calibration"]["temperature"]
    assert [entry.split(" (ECE")[0] for entry in ax["legend"][1:]] == [
        "before calibration (T = 1)", f"after temperature T = {temperature:.2f}"]
    assert ax["legend_title"] == "test, n = 40" and not ax["legend_overlaps_axes"]


def test_roc_and_pr_show_coinciding_curves_positives_n_and_the_chance_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two classes at AUC 1.0 drew one line over the other (blast vanished under platelet); no figure said n or the
    positives per class; pr.png quoted a "prevalence" it did not draw, and its APs were in no metrics.json."""
    saved = _drawn_figures(monkeypatch)
    y = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    # a and b both perfectly ranked (sklearn keeps a point on b's curve that draws nothing); c is not
    probs = np.array([[.8, .1, .1], [.8, .1, .1], [.1, .8, .1], [.05, .55, .4], [.35, .35, .3], [.35, .35, .3],
                      [.1, .1, .8], [.1, .1, .8]])
    result = evaluate_logits(y, np.log(probs), ["a", "b", "c"], tmp_path, extra={"evaluated_on": "test"})
    roc = saved["roc.png"]["axes"][0]
    assert roc["title"] == "ROC curves (one-vs-rest; test, n = 8)"
    assert roc["legend"][1:3] == ["a (AUC = 1.000, 2 positive)", "b (AUC = 1.000, 2 positive), same curve as a"]
    assert not roc["legend"][3].endswith("same curve as a")
    pr = saved["pr.png"]["axes"][0]
    assert pr["title"] == "Precision-recall curves (one-vs-rest; test, n = 8)"
    assert "prevalence" not in " ".join(pr["legend"]) and pr["legend"][1].endswith("same curve as a")
    baselines = sorted(float(line[2][0]) for line in pr["lines"] if len(line[2]) == 2 and line[2][0] == line[2][1])
    assert baselines == pytest.approx([2 / 8, 2 / 8, 4 / 8])  # each class's chance precision, drawn
    aps = {entry.split(" (AP = ")[0]: float(entry.split(" (AP = ")[1][:5])
           for entry in pr["legend"] if "(AP = " in entry}
    written = strict_json(tmp_path / "metrics.json")["per_class"]
    assert aps == {name: pytest.approx(written[name]["average_precision"], abs=5e-4) for name in ("a", "b", "c")}
    assert written["c"]["average_precision"] < 1.0 == written["a"]["average_precision"]
    assert result["per_class"]["c"]["average_precision"] == written["c"]["average_precision"]
    # the report's per-class table carries the AP pr.png draws (it was in metrics.json only), and its macro mean
    table = (tmp_path / "report.html").read_text()
    table = table[table.index('<table class="per-class">'):]
    table = table[:table.index("</table>")]
    assert "<th>AP</th>" in table
    rows = re.findall(r"<tr><t[dh] class=\"name\">([^<]+)</t[dh]>(.*?)</tr>", table)
    last_cell = {name: re.findall(r">([^<]*)</t[dh]>", cells)[-1] for name, cells in rows}
    assert last_cell["c"] == f"{written['c']['average_precision']:.3f}"
    macro = strict_json(tmp_path / "metrics.json")["average_precision_macro"]
    assert macro == pytest.approx(sum(written[k]["average_precision"] for k in "abc") / 3)
    assert last_cell["macro average"] == f"{macro:.3f}" and last_cell["weighted average"] == ""


def test_identical_curves_are_drawn_widest_first(tmp_path: Path) -> None:
    from leukoscope.evaluation.figures import curve_widths

    widths = curve_widths(9)
    assert all(a > b for a, b in zip(widths, widths[1:])) and widths[-1] >= 1.0


@pytest.mark.parametrize("best_epoch", [1, 2, 3])
def test_the_checkpoint_note_stays_inside_its_panel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    best_epoch: int) -> None:
    """With the best epoch last, "checkpoint kept (...)" started at the line and ran off the right of the panel."""
    saved = _drawn_figures(monkeypatch)
    training_curves_figure(HISTORY, tmp_path / "c.png", best_epoch=best_epoch, monitor="val_accuracy")
    accuracy = saved["c.png"]["axes"][1]
    (box,) = accuracy["text_boxes"]
    panel = accuracy["axes_box"]
    assert panel.x0 <= box.x0 and box.x1 <= panel.x1, (box, panel)


def test_confusion_matrix_titles_name_split_and_n_and_count_ticks_are_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The counts' colour bar read 0.5, 1.5, 2.5, 3.5; the title said neither the split nor n."""
    saved = _drawn_figures(monkeypatch)
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    evaluate_logits(y, noisy_logits(y, 3, seed=8), ["a", "b", "c"], tmp_path, extra={"evaluated_on": "test"})
    counts, bar = saved["confusion_matrix.png"]["axes"][:2]
    assert counts["title"] == "Confusion matrix (counts; test, n = 9)"
    normalised = saved["confusion_matrix_normalized.png"]["axes"][0]
    assert normalised["title"] == "Confusion matrix (row-normalised; test, n = 9)"
    ticks = [v for v in bar["yticks"] if bar["ylim"][0] <= v <= bar["ylim"][1]]
    assert len(ticks) >= 2 and all(v == int(v) for v in ticks), ticks


def test_run_details_show_the_split_sizes_and_readable_numbers(tmp_path: Path) -> None:
    """"36 images evaluated" was all: split_sizes (288/36/36) were in metrics.json only; parameters read 11181129
    and images_per_second 301.018."""
    y = np.array([0, 1, 0, 1])
    evaluate_logits(y, noisy_logits(y, 2, seed=9), ["a", "b"], tmp_path, extra={
        "split_sizes": {"train": 288, "val": 36, "test": 36}, "split_info": {"ratios": [0.8, 0.1, 0.1], "seed": 0},
        "parameters": 11181129, "images_per_second": 301.01789, "best_epoch": 3, "train_minutes": 0.2127})
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    details = dict(re.findall(r'<tr><th class="name">([^<]+)</th><td class="name">([^<]*)</td></tr>', html))
    assert details["split_sizes"] == "train 288, val 36, test 36 (ratios 0.8 / 0.1 / 0.1)"
    assert details["parameters"] == "11,181,129" and details["images_per_second"] == "301.0"
    assert details["best_epoch"] == "3" and details["train_minutes"] == "0.213"


def test_many_classes_curves_keep_the_legend_below_not_beside(tmp_path: Path) -> None:
    """With nine classes the legend sat right of the axes: the picture grew to 1,250 px wide and the report
    shrank the whole figure to fit its page."""
    classes = ["basophil", "blast", "eosinophil", "erythroblast", "immature_granulocyte", "lymphocyte",
               "monocyte", "neutrophil", "platelet"]
    y = np.arange(90) % 9
    probs = np.exp(noisy_logits(y, 9, seed=3))
    probs /= probs.sum(axis=1, keepdims=True)
    for draw in (roc_figure, pr_figure):
        width, height = Image.open(draw(y, probs, classes, tmp_path / f"{draw.__name__}.png")).size
        assert width < 800 and height > width, (draw.__name__, width, height)


def test_a_class_without_a_curve_says_why(tmp_path: Path) -> None:
    """'AUC n/a (no positives or negatives)' for a class with no images among 20: which of the two it was."""
    from leukoscope.evaluation import figures

    saved: dict[str, list[str]] = {}
    real = figures.save_figure

    def keep(fig, path):
        saved[Path(path).name] = [text.get_text() for ax in fig.axes if ax.get_legend() for text in
                                  ax.get_legend().get_texts()]
        return real(fig, path)

    y = np.array([0, 1] * 10)
    probs = np.exp(noisy_logits(y, 3, seed=1))
    probs /= probs.sum(axis=1, keepdims=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "save_figure", keep)
        roc_figure(y, probs, ["a", "b", "none here"], tmp_path / "roc.png")
        pr_figure(y, probs, ["a", "b", "none here"], tmp_path / "pr.png")
    assert "none here: AUC n/a (no positives)" in saved["roc.png"]
    assert "none here: AP n/a (no positives)" in saved["pr.png"]
    with pytest.MonkeyPatch.context() as patch:  # every image of one class: that class has no negatives
        patch.setattr(figures, "save_figure", keep)
        roc_figure(np.zeros(20, int), probs, ["a", "b", "none here"], tmp_path / "roc.png")
    assert "a: AUC n/a (no negatives: every image is of it)" in saved["roc.png"]
