"""The one image decoder: 16-bit images scaled (not clipped), the pixel limit with JPEG draft decoding,
degenerate images flagged by `data check`, and bad images as one clear line (also from DataLoader workers)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from promptkd.cli import main
from promptkd.data.decode import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, image_problem, read_image
from promptkd.data.loader import LabelledImages, UnlabelledImages, make_loader


def write_png16(path: Path, values: np.ndarray, color_type: int, size: tuple[int, int] | None = None) -> Path:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): color type 0 gray, 2 RGB, 6 RGBA.
    ``size`` (w, h) writes only the header claiming that size (for limit tests: nothing is decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w = values.shape[:2] if size is None else size[::-1]
    rows = b"" if size else b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def ramp16(h: int = 3, w: int = 300) -> np.ndarray:
    """A 16-bit ramp over the whole range 0..65535 (every row the same)."""
    return np.tile(np.round(np.linspace(0, 65535, w)).astype(np.uint16), (h, 1))


def expected_8bit(values: np.ndarray) -> np.ndarray:
    """The hand computation: v / 65535 * 255 in float64, rounded to the nearest level."""
    return np.round(values.astype(np.float64) / 65535.0 * 255.0).astype(np.uint8)


def as_tensor(img, generator=None) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    values = ramp16()
    want = expected_8bit(values)
    path = write_png16(tmp_path / "ramp.png", values, color_type=0)
    assert Image.open(path).mode == "I;16"  # what Pillow makes of it (and clips with convert("RGB"))
    got = np.asarray(read_image(path))
    assert got.dtype == np.uint8 and got.shape == (3, 300, 3)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], want)
    # the dataset path (training, evaluation) decodes the same way
    sample = LabelledImages([type("S", (), {"path": str(path), "label": 0})()], as_tensor)[0]
    np.testing.assert_array_equal(sample["image"][0].numpy(), want.astype(np.float32))


@pytest.mark.parametrize("mode,suffix", [("I;16", ".tif"), ("I;16B", ".tif"), ("I;16", ".png")])
def test_16bit_files_written_by_pillow(tmp_path, mode, suffix):
    values = ramp16(2, 257)
    img = Image.fromarray(values.astype(">u2" if mode == "I;16B" else "<u2"))
    assert img.mode == mode
    img.save(tmp_path / f"x{suffix}")
    assert Image.open(tmp_path / f"x{suffix}").mode in ("I;16", "I;16B", "I")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / f"x{suffix}"))[..., 1], expected_8bit(values))


def test_32bit_integer_mode_in_16bit_range_is_scaled_and_beyond_it_refused(tmp_path):
    values = ramp16(2, 100).astype(np.int32)
    Image.fromarray(values).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "i.tif"))[..., 0], expected_8bit(values))
    Image.fromarray(values * 4).save(tmp_path / "wide.tif")
    with pytest.raises(BadImageError, match=r"wide.tif: 32-bit integer pixels in 0..262140"):
        read_image(tmp_path / "wide.tif")


@pytest.mark.parametrize("color_type,channels", [(2, 3), (6, 4)])
def test_16bit_rgb_png_keeps_its_range(tmp_path, color_type, channels):
    ramp = ramp16()
    planes = [ramp, ramp[:, ::-1], np.full_like(ramp, 40000), np.full_like(ramp, 65535)][:channels]
    path = write_png16(tmp_path / "rgb.png", np.stack(planes, -1), color_type)
    got = np.asarray(read_image(path)).astype(int)
    for c in range(3):  # Pillow keeps the high byte: within one level of the exact mapping
        assert np.abs(got[..., c] - expected_8bit(planes[c])).max() <= 1
    assert got[..., 0].min() == 0 and got[..., 0].max() == 255


def test_verify_images_flags_degenerate_decodes_but_not_real_16bit(tmp_path, capsys):
    data = tmp_path / "shapes"
    for c in ("circle", "square"):
        (data / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                data / c / f"{i}.png")
    write_png16(data / "circle" / "ramp16.png", ramp16(20, 20), color_type=0)
    Image.new("RGB", (20, 20), (10, 200, 30)).save(data / "square" / "flat.png")
    Image.fromarray(np.full((20, 20), 300, np.uint16)).save(data / "square" / "white16.png")  # 16-bit, constant
    rc = main(["data", "check", str(tmp_path), "--dataset", "folder:shapes", "--verify-images"])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"{data / 'square' / 'flat.png'}: decodes to a constant image (values 10..200)" in out
    assert f"{data / 'square' / 'white16.png'}: decodes to a constant image (values 1..1)" in out
    assert "ramp16.png" not in out and "2 problem(s)" in out
    assert image_problem(data / "circle" / "0.png") is None


def test_pixel_limit_refuses_large_non_jpegs_before_decoding(tmp_path):
    # a header claiming 12000 x 12000 (~1 GB as RGB): refused at the default limit without decoding anything
    big = write_png16(tmp_path / "big.png", np.zeros((1, 1), np.uint16), 0, size=(12000, 12000))
    with pytest.raises(BadImageError) as err:
        read_image(big)
    msg = str(err.value)
    assert msg.startswith(f"{big}: image too large: 12000x12000 = 144,000,000 pixels, over the limit of "
                          f"{DEFAULT_MAX_IMAGE_PIXELS:,} (data.max_image_pixels)") and "\n" not in msg
    assert DEFAULT_MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)  # Pillow's documented default
    Image.new("L", (400, 300), 9).save(tmp_path / "small.png")
    assert read_image(tmp_path / "small.png", max_pixels=120_000).size == (400, 300)
    with pytest.raises(BadImageError, match="400x300 = 120,000 pixels, over the limit of 119,999"):
        read_image(tmp_path / "small.png", max_pixels=119_999)
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS  # Pillow's global is left as it was


def test_large_jpegs_are_decoded_reduced(tmp_path):
    rng = np.random.default_rng(0)
    pixels = np.kron(rng.integers(0, 255, (30, 40, 3)), np.ones((16, 16, 1))).astype(np.uint8)  # 640 x 480 blocks
    Image.fromarray(pixels).save(tmp_path / "p.jpg", quality=95)
    full = np.asarray(read_image(tmp_path / "p.jpg")).astype(float)
    cases = {640 * 480: (640, 480), 640 * 480 - 1: (320, 240), 160 * 120: (160, 120), 100 * 100: (80, 60)}
    for limit, size in cases.items():
        img = read_image(tmp_path / "p.jpg", max_pixels=limit)
        assert img.size == size and img.size[0] * img.size[1] <= limit
        scale = 640 // size[0]
        reference = full.reshape(480 // scale, scale, 640 // scale, scale, 3).mean(axis=(1, 3))  # box downscale
        assert np.abs(np.asarray(img).astype(float) - reference).mean() < 6, limit
    with pytest.raises(BadImageError, match=r"p.jpg: image too large: .*even at the smallest JPEG decoding scale"):
        read_image(tmp_path / "p.jpg", max_pixels=80 * 60 - 1)
    ds = UnlabelledImages([str(tmp_path / "p.jpg")], as_tensor, max_image_pixels=160 * 120)  # the config's setting
    assert ds[0]["image"].shape == (3, 120, 160)
    with pytest.raises(ValueError, match="max_image_pixels must be a positive"):
        UnlabelledImages([str(tmp_path / "p.jpg")], as_tensor, max_image_pixels=0)


def test_bad_image_error_is_a_value_error_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError) as err:
        read_image(bad)
    assert isinstance(err.value, BadImageError) and str(err.value).startswith(f"{bad}: cannot decode image")


@pytest.mark.parametrize("workers", [0, 2])
def test_error_from_a_dataloader_worker_arrives_as_the_same_line(tmp_path, workers):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    ds = UnlabelledImages([str(good), str(bad)], as_tensor, on_bad_image="error")
    with pytest.raises(BadImageError) as err:
        list(make_loader(ds, batch_size=1, num_workers=workers))
    msg = str(err.value)
    assert msg.startswith(f"{bad}: cannot decode image (UnidentifiedImageError") and "\n" not in msg
    assert "Traceback" not in msg and "worker" not in msg
