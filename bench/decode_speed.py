"""Benchmark: what decoding a field costs in ``leukoscope.io.load_image``, and the PNG row check's share.

    python bench/decode_speed.py [--image FIELD] [--size 2592x1944] [--repeats 7]

The field (default: a CBC test field, 640x480) is resized to ``--size`` (a camera's field; ``as-is``
keeps it) and encoded in memory as JPEG (quality 95) and as PNG (Pillow's default compression), then
each decoded by load_image. For the PNG: load_image
as shipped, load_image without its row check (libpng decoding the file once more to refuse data that
end cleanly before the last row, which Pillow fills with black), and the check alone. Medians of
``--repeats`` calls after a warm-up (:mod:`bench._timing`); prints a JSON line of milliseconds last.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from unittest import mock

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._timing import median_seconds  # noqa: E402

FIELD = ROOT.parent / "shared" / "datasets" / "cbc" / "Testing" / "Images" / "BloodImage_00379.jpg"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=FIELD, help="A field to decode (any supported format).")
    parser.add_argument("--size", default="2592x1944", help="WIDTHxHEIGHT to resize the field to, or as-is.")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if args.size != "as-is":
        try:
            args.size = tuple(int(part) for part in args.size.lower().split("x"))
        except ValueError:
            args.size = ()
        if len(args.size) != 2 or min(args.size) < 1:
            parser.error("--size must be WIDTHxHEIGHT (e.g. 2592x1944) or as-is")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not args.image.is_file():
        parser.error(f"{args.image} is not a file (the default needs ../shared/datasets)")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    from leukoscope import io as leuko_io

    args = parse_args(argv)
    image = leuko_io.load_image(args.image)
    if args.size != "as-is":
        image = image.resize(args.size, Image.Resampling.BICUBIC)

    def encoded(fmt: str, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        return buffer.getvalue()

    jpeg, png = encoded("JPEG", quality=95), encoded("PNG")

    def ms(fn) -> float:
        return round(1000 * median_seconds(fn, args.repeats), 2)

    timings = {"jpeg": ms(lambda: leuko_io.load_image(jpeg)),
               "png": ms(lambda: leuko_io.load_image(png))}
    with mock.patch.object(leuko_io, "_check_png_rows", lambda *_: None):
        timings["png_without_row_check"] = ms(lambda: leuko_io.load_image(png))
    timings["png_row_check_alone"] = ms(lambda: leuko_io._check_png_rows(io.BytesIO(png), "field"))
    result = {"image": str(args.image), "size": list(image.size), "bytes": {"jpeg": len(jpeg), "png": len(png)},
              "repeats": args.repeats, "median_ms": timings}
    for name, value in timings.items():
        print(f"{name:>24}: {value:9.2f} ms")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
