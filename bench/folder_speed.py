"""Benchmark: a folder of full-size smear fields through `leukoscope analyze`, old code beside new.

    python bench/folder_speed.py [--old-src OLD/src] [--fields 6] [--repeats 3] [--threads 2] [--backend torch]
                                 [--detector D] [--classifier C] [--torch-too]

The fields are at CBC's physical scale (unlike bench/smear_speed.py's mosaic of shrunken
fields): each is a 4x4 mosaic of whole 640x480 CBC test fields on a 2592x1944 canvas
(``--field-size``), so the red-cell scale estimate finds CBC's ~0.08 um/px, the shipped
detector (trained at that scale) sees it unresampled, and a field holds the cells of 16.

For this checkout's ``src`` and, with ``--old-src``, another version's (``git archive COMMIT src |
tar -x -C /tmp/old`` gives ``/tmp/old/src``), each in its own process:

a. detection in one 640x480 CBC test field as analysis runs it (``SmearAnalyzer.detect``: the
   field's tiles, the detector, the merge), median of ``--repeats``;
b. the analysis of one mosaic field (``SmearAnalyzer.analyze`` from the decoded image: scale,
   tiles, detection, crops, classification; no files), median of ``--repeats``;
c. ``leukoscope analyze FOLDER --out ... --threads T --quiet`` over the ``--fields`` fields, wall
   seconds of the whole command (start-up and every output file included) per field, and its
   CPU seconds (user + system, all threads: less sensitive to other work on the machine);
   the versions take turns in each repeat, so both see the same load. Also the same command on
   the first field alone, so that the cost of each further field (``(wall(N) - wall(1)) / (N - 1)``:
   the folder's rate once started, what a large folder tends to) is printed beside it.

``--torch-too`` (with ``--backend`` other than torch, for exported bundles): this checkout once more
with ``--backend torch`` on the same bundles (eager PyTorch), taking turns with the others, as
``new_torch``.

Stage times of one field in this checkout (decode, prepare = scale + tiles, detection,
classification, drawing, PNG encoding, CSV/JSON) and the start-up are printed as well. Default
models: the shipped ones. Prints one JSON line of the measurements last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "cbc"


def cbc_test_images(data: Path) -> list[Path]:
    return sorted(p for p in (data / "Testing" / "Images").iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def make_fields(data: Path, out: Path, n: int, width: int, height: int) -> list[Path]:
    """``n`` mosaics of 4x4 whole CBC test fields (640x480 each, on a light canvas), JPEG quality 92."""
    from PIL import Image

    sources = cbc_test_images(data)
    if not sources:
        raise SystemExit(f"no CBC test images in {data / 'Testing' / 'Images'}")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(n):
        canvas = Image.new("RGB", (width, height), (230, 220, 225))
        for k in range(16):
            with Image.open(sources[(f * 16 + k) % len(sources)]) as piece:
                canvas.paste(piece.convert("RGB"), ((k % 4) * (width // 4), (k // 4) * (height // 4)))
        paths.append(out / f"field_{f:02d}.jpg")
        canvas.save(paths[-1], quality=92)
    return paths


def measure(args: argparse.Namespace) -> dict:
    """(a), (b) and, where this version has them, the stages of one field: in this process."""
    start = time.perf_counter()
    import inspect
    import io

    import torch

    from leukoscope.inference.smear import SmearAnalyzer
    from leukoscope.io import load_image
    from leukoscope.pretrained import resolve_bundle

    torch.set_num_threads(args.threads)
    classifier = None if args.classifier.lower() == "none" else resolve_bundle(args.classifier)
    # --backend exists in this checkout; an older version (--old-src) runs torch.
    takes_backend = "backend" in inspect.signature(SmearAnalyzer.__init__).parameters
    analyzer = SmearAnalyzer.from_bundles(resolve_bundle(args.detector), classifier,
                                          **({"backend": args.backend} if takes_backend else {}))
    startup = time.perf_counter() - start
    small = load_image(cbc_test_images(Path(args.data))[0])
    field_path = sorted(Path(args.fields_dir).glob("*.jpg"))[0]
    field = load_image(field_path)
    out = {"startup_s": round(startup, 3),
           # as analysis detects (older versions without SmearAnalyzer.detect: the detector alone)
           "detect_640x480_s": round(median_seconds((lambda: analyzer.detect(small)) if hasattr(analyzer, "detect")
                                                    else (lambda: analyzer.detector.detect([small])), args.repeats), 3)}
    results = []
    out["analyze_field_s"] = round(median_seconds(lambda: results.append(analyzer.analyze(field, "f")), args.repeats), 3)
    out["wbc"] = len(results[-1].cells)
    out["tiles"] = results[-1].tiles
    if hasattr(analyzer, "prepare"):  # the stages, in this version's own terms
        from leukoscope.inference.drawing import annotate
        from leukoscope.inference.smear_output import write_field

        def pillow_png(image):  # what versions before imagecodecs wrote
            return image.save(io.BytesIO(), format="PNG", compress_level=1, compress_type=zlib.Z_RLE)

        try:
            from leukoscope.inference.smear_output import encode_png
        except ImportError:
            encode_png = pillow_png

        result = results[-1]
        prepared = analyzer.prepare(field)
        crops = analyzer.cell_crops(field, result)
        drawn = annotate(field, result)
        stages = {
            "decode": lambda: load_image(field_path),
            "prepare (scale + tiles)": lambda: analyzer.prepare(field),
            "scale estimate": lambda: analyzer.field_scale(field),
            "detection": lambda: analyzer.detect(prepared.detector_image, prepared.tiles),
            "crops + classification": lambda: analyzer.classifier.predict_images(analyzer.cell_crops(field, result))
            if analyzer.classifier is not None and crops else None,
            "drawing": lambda: annotate(field, result),
            "png encode": lambda: encode_png(drawn),
            "png encode (Pillow, zlib level 1 + RLE, before)": lambda: pillow_png(drawn),
            "csv + json": lambda: write_field(result.__class__(**{**result.__dict__, "error": "skip png"}),
                                              Path(args.fields_dir).parent / "stage_out", "f"),
        }
        out["stages_s"] = {name: round(median_seconds(fn, args.repeats), 3) for name, fn in stages.items()}
    return out


def run_version(src: Path, backend: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", "--fields-dir", str(args.fields_dir),
               "--data", args.data, "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--detector", args.detector, "--classifier", args.classifier, "--backend", backend]
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"measuring {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def folder_run(src: Path, fields_dir: Path, out: Path, args: argparse.Namespace,
               backend: str | None) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, all threads) of one `leukoscope analyze` of the folder
    (``backend``: its --backend; None: none passed, the version's default)."""
    command = [sys.executable, "-m", "leukoscope.cli", "analyze", str(fields_dir), "--out", str(out),
               "--threads", str(args.threads), "--quiet", "--detector", args.detector, "--classifier", args.classifier]
    command += ["--backend", backend] if backend else []
    env = {**os.environ, "PYTHONPATH": str(src)}
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"`leukoscope analyze` of {src} failed:\n{done.stderr[-3000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-src", default=None, help="the src folder of the version to compare with")
    parser.add_argument("--data", default=str(DATA), help="CBC (VOC layout with Testing/Images)")
    parser.add_argument("--fields", type=int, default=6)
    parser.add_argument("--field-size", default="2592x1944", help="WIDTHxHEIGHT of each mosaic field")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--detector", default="pretrained:smear-detector")
    parser.add_argument("--classifier", default="pretrained:wbc-classifier", help="a bundle, pretrained:NAME or none")
    parser.add_argument("--backend", default="torch", help="what runs the models of this checkout: torch, auto, "
                        "onnxruntime, openvino (exported bundles: leukoscope export)")
    parser.add_argument("--torch-too", action="store_true", help="also this checkout with --backend torch "
                        "(eager PyTorch on the same bundles), as new_torch")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fields-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args)))
        return 0
    try:
        width, height = (int(v) for v in args.field_size.lower().split("x"))
    except ValueError:
        parser.error(f"--field-size needs WIDTHxHEIGHT, e.g. 2592x1944, got {args.field_size!r}")
    if args.fields < 1 or args.repeats < 1:
        parser.error("--fields and --repeats must be at least 1")
    if not Path(args.data).is_dir():
        print(f"{args.data} is absent: nothing to benchmark", file=sys.stderr)
        return 2
    # name -> (src, the --backend its `analyze` gets: None for the old version, whose default it keeps)
    versions: dict[str, tuple[Path, str | None]] = {"new": (ROOT / "src", args.backend)}
    if args.old_src:
        if not (Path(args.old_src) / "leukoscope").is_dir():
            parser.error(f"--old-src {args.old_src} holds no leukoscope package")
        versions = {"old": (Path(args.old_src).resolve(), None), **versions}
    if args.torch_too and args.backend != "torch":
        versions["new_torch"] = (ROOT / "src", "torch")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        args.fields_dir = work / "fields"
        make_fields(Path(args.data), args.fields_dir, args.fields, width, height)
        measured: dict = {"fields": args.fields, "field_size": f"{width}x{height}", "repeats": args.repeats,
                          "threads": args.threads, "backend": args.backend, "load_average_1min_start": round(os.getloadavg()[0], 2)}
        for name, (src, backend) in versions.items():
            measured[name] = run_version(src, backend or args.backend, args)
        one_field = work / "one_field"
        one_field.mkdir()
        (one_field / args.fields_dir.joinpath("field_00.jpg").name).symlink_to(args.fields_dir / "field_00.jpg")
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in versions}
        singles: dict[str, list[float]] = {name: [] for name in versions}
        for repeat in range(args.repeats):
            for name, (src, backend) in versions.items():
                runs[name].append(folder_run(src, args.fields_dir, work / f"out_{name}_{repeat}", args, backend))
                if args.fields > 1:
                    singles[name].append(folder_run(src, one_field, work / f"one_{name}_{repeat}", args, backend)[0])
        for name in versions:
            walls, cpus = [wall for wall, _ in runs[name]], [cpu for _, cpu in runs[name]]
            measured[name]["folder_wall_s"] = [round(s, 2) for s in walls]
            measured[name]["folder_cpu_s"] = [round(s, 2) for s in cpus]
            measured[name]["folder_s_per_field"] = round(statistics.median(walls) / args.fields, 3)
            measured[name]["folder_cpu_s_per_field"] = round(statistics.median(cpus) / args.fields, 3)
            if singles[name]:
                measured[name]["one_field_wall_s"] = [round(s, 2) for s in singles[name]]
                measured[name]["folder_s_per_further_field"] = round(
                    (statistics.median(walls) - statistics.median(singles[name])) / (args.fields - 1), 3)
        measured["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    for name in versions:
        m = measured[name]
        print(f"{name}: detection 640x480 {m['detect_640x480_s']:.3f} s (target <= 0.05 s); analysis of one "
              f"{width}x{height} field {m['analyze_field_s']:.3f} s ({m['tiles']} tiles, {m['wbc']} WBC; "
              f"target <= 1.0 s); "
              f"folder {m['folder_s_per_field']:.3f} s per field with every output (target <= 1.2 s; "
              f"CPU {m['folder_cpu_s_per_field']:.3f} s per field"
              + (f"; {m['folder_s_per_further_field']:.3f} s per further field" if "folder_s_per_further_field" in m
                 else "") + f"); start-up {m['startup_s']:.2f} s")
    for stage, seconds in measured["new"].get("stages_s", {}).items():
        print(f"  {stage}: {seconds:.3f} s")
    print(json.dumps(measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
