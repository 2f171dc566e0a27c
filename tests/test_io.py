"""load_image: format sniffing, pixel limit, truncation, EXIF orientation, RGB output."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukoscope.data.synthetic import render_cell
from leukoscope.io import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_FORMATS,
    ImageDecodeError,
    ImageTooLargeError,
    is_image_file,
    load_image,
)


@pytest.fixture(scope="module")
def cell() -> np.ndarray:
    return render_cell("blast", np.random.default_rng(0), 96)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that *declares* ``width x height`` but carries (almost) no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# -- supported formats -------------------------------------------------------


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("BMP", ".bmp"), ("TIFF", ".tif")])
def test_lossless_formats_round_trip_exactly(tmp_path: Path, cell: np.ndarray, fmt: str, suffix: str) -> None:
    path = tmp_path / f"cell{suffix}"
    Image.fromarray(cell).save(path, fmt)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (96, 96)
    np.testing.assert_array_equal(np.asarray(image), cell)


def test_jpeg(tmp_path: Path, cell: np.ndarray) -> None:
    path = tmp_path / "cell.jpg"
    Image.fromarray(cell).save(path, "JPEG", quality=95)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (96, 96)
    assert np.abs(np.asarray(image).astype(int) - cell).mean() < 4


def test_format_is_sniffed_not_taken_from_the_suffix(tmp_path: Path, cell: np.ndarray) -> None:
    path = tmp_path / "actually_a_png.jpg"
    Image.fromarray(cell).save(path, "PNG")
    np.testing.assert_array_equal(np.asarray(load_image(path)), cell)


def test_str_path_bytes_and_file_object_agree(tmp_path: Path, cell: np.ndarray) -> None:
    path = tmp_path / "cell.png"
    Image.fromarray(cell).save(path)
    data = path.read_bytes()
    from_path = np.asarray(load_image(str(path)))
    from_bytes = np.asarray(load_image(data))
    from_file = np.asarray(load_image(io.BytesIO(data)))
    np.testing.assert_array_equal(from_path, cell)
    np.testing.assert_array_equal(from_bytes, cell)
    np.testing.assert_array_equal(from_file, cell)


def test_8bit_grayscale_tiff_becomes_rgb(tmp_path: Path) -> None:
    gray = (np.arange(32 * 48).reshape(32, 48) % 256).astype(np.uint8)
    path = tmp_path / "gray.tif"
    Image.fromarray(gray).save(path, "TIFF")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (48, 32)
    array = np.asarray(image)
    for channel in range(3):
        np.testing.assert_array_equal(array[..., channel], gray)


@pytest.mark.parametrize("fmt", ["TIFF", "PNG"])
def test_16bit_grayscale_is_rescaled_to_full_8bit_range(tmp_path: Path, fmt: str) -> None:
    # A microscope camera's 12-bit range stored in 16 bits: 1000..4000.
    values = np.linspace(1000, 4000, 32 * 48).reshape(32, 48).astype(np.uint16)
    source = Image.fromarray(values)
    assert source.mode.startswith("I;16")
    path = tmp_path / f"deep.{fmt.lower()}"
    source.save(path, fmt)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (48, 32)
    array = np.asarray(image)
    assert array.min() == 0 and array.max() == 255  # stretched, not clipped to white
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    expected = (values.astype(float) - 1000) * 255 / 3000
    assert np.abs(array[..., 0] - expected).max() <= 1
    # monotonic: brighter input -> not darker output
    assert (np.diff(array[..., 0].ravel().astype(int)) >= 0).all()


def test_float_tiff_is_rescaled_not_black(tmp_path: Path) -> None:
    values = np.linspace(0.0, 1.0, 32 * 48, dtype=np.float32).reshape(32, 48)
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path, "TIFF")
    array = np.asarray(load_image(path))
    assert array.min() == 0 and array.max() == 255


def test_constant_16bit_image_does_not_divide_by_zero(tmp_path: Path) -> None:
    path = tmp_path / "flat.tif"
    Image.fromarray(np.full((8, 8), 1234, dtype=np.uint16)).save(path, "TIFF")
    array = np.asarray(load_image(path))
    assert array.shape == (8, 8, 3)
    assert (array == 0).all()


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[:, :5] = [200, 0, 0, 255]  # opaque red
    rgba[:, 5:] = [0, 0, 200, 0]  # fully transparent blue
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    array = np.asarray(image)
    assert tuple(array[0, 0]) == (200, 0, 0)
    assert tuple(array[0, 9]) == (255, 255, 255)


def test_grayscale_alpha_is_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    Image.new("LA", (4, 4), (0, 0)).save(path)
    assert tuple(np.asarray(load_image(path))[1, 1]) == (255, 255, 255)


def test_palette_image_uses_palette_colours(tmp_path: Path) -> None:
    palette = Image.new("P", (6, 6), 3)
    palette.putpalette([0, 0, 0, 10, 10, 10, 20, 20, 20, 0, 200, 0] + [0] * (256 * 3 - 12))
    path = tmp_path / "palette.png"
    palette.save(path)
    assert tuple(np.asarray(load_image(path))[2, 2]) == (0, 200, 0)
    # ...and a transparent palette entry becomes white background
    transparent = tmp_path / "palette_t.png"
    palette.save(transparent, transparency=3)
    image = load_image(transparent)
    assert image.mode == "RGB"
    assert tuple(np.asarray(image)[2, 2]) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # 40 wide x 20 high, left half red, right half blue; Orientation=6 means
    # "rotate 90 degrees clockwise to display" -> 20 wide x 40 high, red on top.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = [255, 0, 0]
    pixels[:, 20:] = [0, 0, 255]
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (40, 20)  # stored unrotated

    image = load_image(path)
    assert image.size == (20, 40)
    array = np.asarray(image).astype(int)
    top, bottom = array[5, 10], array[-5, 10]
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


# -- rejected inputs ---------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty") as info:
        load_image(path)
    assert "empty.jpg" in str(info.value)


def test_empty_bytes() -> None:
    with pytest.raises(ImageDecodeError, match="empty"):
        load_image(b"")


@pytest.mark.parametrize("fmt,suffix,cut", [("JPEG", ".jpg", 0.5), ("JPEG", ".jpg", 0.95), ("PNG", ".png", 0.5), ("PNG", ".png", 0.95)])
def test_truncated_file_fails_naming_the_file(tmp_path: Path, cell: np.ndarray, fmt: str, suffix: str, cut: float) -> None:
    data = encode(Image.fromarray(cell), fmt)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ImageDecodeError, match="truncated or corrupt") as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert not isinstance(info.value, ImageTooLargeError)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "TIFF"])
def test_no_truncation_decodes_silently_to_a_different_image(cell: np.ndarray, fmt: str) -> None:
    """Every prefix of a valid file either fails or decodes to the full, identical image."""
    data = encode(Image.fromarray(cell), fmt)
    reference = np.asarray(load_image(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's TIFF plugin warns about short tags
        for keep in range(1, len(data), max(1, len(data) // 150)):
            try:
                image = load_image(data[:keep])
            except ImageDecodeError:
                continue
            np.testing.assert_array_equal(np.asarray(image), reference, err_msg=f"{fmt} cut to {keep} bytes")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageDecodeError, match="not a recognised image") as info:
        load_image(path)
    assert "noise.jpg" in str(info.value)


def test_archives_and_undecodable_tiffs_are_said_for_what_they_are(tmp_path: Path) -> None:
    """A .zip of fields and a 32-bit float colour TIFF were each "not a recognised image (expected one of BMP,
    JPEG, PNG, TIFF)": of the TIFF, a contradiction."""
    import io
    import tarfile
    import zipfile

    import tifffile

    field = tmp_path / "field.png"
    Image.new("RGB", (8, 8)).save(field)
    with zipfile.ZipFile(tmp_path / "fields.zip", "w") as archive:
        archive.write(field, "field.png")
    for mode, name in (("w:gz", "fields.tar.gz"), ("w", "fields.tar")):
        with tarfile.open(tmp_path / name, mode) as archive:
            archive.add(field, "field.png")
    for name, said in (("fields.zip", "a ZIP archive, not an image"), ("fields.tar.gz", "a gzip file"),
                       ("fields.tar", "a tar archive, not an image")):
        with pytest.raises(ImageDecodeError, match=f"{name}: {said}.*unpack the fields first"):
            load_image(tmp_path / name)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.random.default_rng(0).random((16, 16, 3), dtype=np.float32), photometric="rgb")
    with pytest.raises(ImageDecodeError, match="a TIFF whose samples cannot be decoded .*32-bit floating-point"):
        load_image(buffer.getvalue())


def test_text_file_renamed_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("patient 12, smear 3, looks like ALL\n" * 20)
    with pytest.raises(ImageDecodeError, match="notes.jpg"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_pillow_formats_outside_the_supported_set_are_rejected(tmp_path: Path, cell: np.ndarray, fmt: str) -> None:
    assert fmt not in SUPPORTED_FORMATS
    path = tmp_path / "cell.jpg"  # the suffix lies: the content decides
    path.write_bytes(encode(Image.fromarray(cell), fmt))
    with pytest.raises(ImageDecodeError, match=f"format {fmt} is not supported") as info:
        load_image(path)
    assert "cell.jpg" in str(info.value)


def test_formats_argument_narrows_the_supported_set(cell: np.ndarray) -> None:
    data = encode(Image.fromarray(cell), "BMP")
    with pytest.raises(ImageDecodeError, match="BMP is not supported"):
        load_image(data, formats=frozenset({"PNG"}))


def test_pixel_limit_is_checked_before_decoding() -> None:
    # 11000 x 11000 = 121 Mpx: above our default limit, below Pillow's own hard limit,
    # so this exercises leukoscope's check. The file holds 16 bytes of pixel data:
    # decoding would fail as truncated, so ImageTooLargeError proves no decode happened.
    data = png_header_only(11_000, 11_000)
    assert len(data) < 200
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="121,000,000 pixels exceeds the limit of 120,000,000") as info:
        load_image(data)
    assert time.perf_counter() - start < 1.0
    assert "<uploaded bytes>" in str(info.value)
    assert isinstance(info.value, ImageDecodeError)  # callers catching the base class still catch it
    assert DEFAULT_MAX_PIXELS == 120_000_000


def test_decompression_bomb_far_over_the_limit_is_too_large_error() -> None:
    with pytest.raises(ImageTooLargeError, match="exceeds the limit of 120,000,000 pixels") as info:
        load_image(png_header_only(100_000, 100_000))
    assert "10,000,000,000 pixels" in str(info.value) and "DOS" not in str(info.value)  # ours, not Pillow's words


def test_a_multi_page_tiff_says_only_its_first_page_is_read(tmp_path: Path, caplog) -> None:
    import logging

    pages = [Image.new("RGB", (8, 8), colour) for colour in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    with caplog.at_level(logging.WARNING, logger="leukoscope.io"):
        image = load_image(tmp_path / "stack.tif")
    assert image.getpixel((0, 0)) == (200, 0, 0) and "3 pages; only the first is read" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="leukoscope.io"):  # read again by the same run: said once
        load_image(tmp_path / "stack.tif")
        load_image((tmp_path / "stack.tif").read_bytes())  # unnamed bytes: said each time
    assert caplog.text.count("only the first is read") == 1 and "<uploaded bytes>" in caplog.text


def test_small_max_pixels(tmp_path: Path, cell: np.ndarray) -> None:
    path = tmp_path / "cell.png"
    Image.fromarray(cell).save(path)
    with pytest.raises(ImageTooLargeError, match="96x96") as info:
        load_image(path, max_pixels=96 * 96 - 1)
    assert str(path) in str(info.value)
    assert load_image(path, max_pixels=96 * 96).size == (96, 96)  # the limit is inclusive


def test_header_only_png_under_the_limit_is_truncated_not_too_large() -> None:
    with pytest.raises(ImageDecodeError, match="truncated or corrupt") as info:
        load_image(png_header_only(300, 200))
    assert not isinstance(info.value, ImageTooLargeError)


def test_folder_path(tmp_path: Path) -> None:
    folder = tmp_path / "images.png"
    folder.mkdir()
    with pytest.raises(ImageDecodeError, match="is a folder"):
        load_image(folder)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="does not exist") as info:
        load_image(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(info.value)


def test_bytes_input_is_named_as_upload() -> None:
    with pytest.raises(ImageDecodeError, match="<uploaded bytes>"):
        load_image(b"definitely not an image")


def test_is_image_file(tmp_path: Path) -> None:
    for name in ("a.JPG", "b.jpeg", "c.png", "d.bmp", "e.tif", "f.TIFF"):
        (tmp_path / name).write_bytes(b"x")
        assert is_image_file(tmp_path / name), name
    for name in ("g.gif", "h.txt", ".hidden.png", "._mac.jpg"):
        (tmp_path / name).write_bytes(b"x")
        assert not is_image_file(tmp_path / name), name
    (tmp_path / "folder.png").mkdir()
    assert not is_image_file(tmp_path / "folder.png")
    assert not is_image_file(tmp_path / "missing.png")


def png_with_rows(width: int, rows: int, height: int) -> bytes:
    """A PNG that declares ``height`` rows and carries ``rows`` of them in a complete zlib stream: its
    data end cleanly, so only a check of the row count can tell it from a whole image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\0" + bytes([200, 120, 160] * width) for _ in range(rows))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("as_", ["path", "bytes", "file"])
def test_png_whose_data_end_cleanly_before_the_last_row_is_refused(tmp_path: Path, as_: str) -> None:
    """Pillow decodes it, the missing rows black; load_image must not hand that on as a field."""
    whole, short = png_with_rows(40, 30, 30), png_with_rows(40, 15, 30)
    assert np.asarray(load_image(whole)).min() > 0  # the same construction, all rows: loads
    assert Image.open(io.BytesIO(short)).convert("RGB").getpixel((0, 29)) == (0, 0, 0)  # what Pillow gives
    path = tmp_path / "short.png"
    path.write_bytes(short)
    with open(path, "rb") as handle:  # a file object: the check reads it from byte 0, as Pillow does
        source = {"path": path, "bytes": short, "file": handle}[as_]
        with pytest.raises(ImageDecodeError, match="truncated or corrupt: Not enough image data") as info:
            load_image(source)
    assert (str(path) if as_ == "path" else "<uploaded bytes>") in str(info.value)



@pytest.mark.parametrize("fmt", ["TIFF", "PNG"])
def test_12_bit_colour_in_16_bit_samples_keeps_its_range(tmp_path: Path, cell: np.ndarray, fmt: str) -> None:
    """Pillow keeps the top 8 bits of 16-bit colour: a camera's 12-bit data came out nearly black (max 15)."""
    import imagecodecs
    import tifffile

    deep = (cell.astype(np.uint16) * 16 + 8)  # 12-bit data: 8..4088
    path = tmp_path / f"deep.{fmt.lower()}"
    if fmt == "TIFF":
        tifffile.imwrite(path, deep, photometric="rgb")
    else:
        path.write_bytes(imagecodecs.png_encode(deep))
    image = np.asarray(load_image(path)).astype(int)
    assert np.abs(image - cell.astype(int)).max() <= 1
    full = (cell.astype(np.uint16) * 257)  # full-range 16-bit: as Pillow would read it
    tifffile.imwrite(tmp_path / "full.tif", full, photometric="rgb")
    assert np.abs(np.asarray(load_image(tmp_path / "full.tif")).astype(int) - cell.astype(int)).max() <= 1


def test_a_phones_multi_picture_jpeg_is_read_as_jpeg(cell: np.ndarray) -> None:
    """Pillow calls a JPEG with an MPF block (depth or gain-map picture) MPO; it was refused."""
    first, second = Image.fromarray(cell), Image.fromarray(cell[::-1])
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert np.array_equal(np.asarray(load_image(data)), np.asarray(load_image(encode(first, "JPEG"))))  # 1st


def test_a_file_that_cannot_be_read_is_this_files_error(tmp_path: Path, cell: np.ndarray, monkeypatch) -> None:
    path = tmp_path / "locked.png"
    Image.fromarray(cell).save(path)
    real = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self.name == "locked.png":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ImageDecodeError, match="locked.png: cannot be read: Permission denied"):
        load_image(path)


def test_a_limit_above_pillows_own_is_honoured() -> None:
    """Pillow refuses images over twice its own limit (179 Mpx) before leukoscope's check, and the message
    then claimed the user's larger limit was exceeded."""
    data = png_header_only(15_000, 12_000)  # 180 Mpx
    with pytest.raises(ImageDecodeError, match="truncated or corrupt") as info:  # read, as far as it goes
        load_image(data, max_pixels=200_000_000)
    assert not isinstance(info.value, ImageTooLargeError)


def test_deep_colour_scaling_ignores_a_hot_pixel_and_handles_bigtiff_and_exif(tmp_path: Path, cell: np.ndarray,
                                                                              caplog) -> None:
    """The scale followed the brightest pixel (one hot pixel halved a field); a 16-bit BigTIFF raised a raw
    struct.error (its EXIF copied badly); a phone's MPO JPEG logged '2 pages'."""
    import logging

    import tifffile

    deep = cell.astype(np.uint16) * 16 + 8
    hot = deep.copy()
    hot[0, 0] = 65535
    tifffile.imwrite(tmp_path / "hot.tif", hot, photometric="rgb")
    image = np.asarray(load_image(tmp_path / "hot.tif")).astype(int)
    assert np.abs(image[1:, 1:] - cell[1:, 1:].astype(int)).max() <= 1
    tifffile.imwrite(tmp_path / "big.tif", deep, photometric="rgb", bigtiff=True)
    assert np.abs(np.asarray(load_image(tmp_path / "big.tif")).astype(int) - cell.astype(int)).max() <= 1
    second = Image.fromarray(cell).transpose(Image.Transpose.ROTATE_90)  # a phone's second picture
    with caplog.at_level(logging.WARNING, logger="leukoscope.io"):
        load_image(encode(Image.fromarray(cell), "MPO", save_all=True, append_images=[second]))
    assert "pages" not in caplog.text
