"""Reading images and masks as they are meant, atomic outputs, and the stage runner's messages."""

from __future__ import annotations

import builtins
import errno
import os
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
import typer

from anomalyncd import io
from anomalyncd.io import InputError, InputWarning, atomic_path, image_size, read_image, read_mask
from anomalyncd.stage import run


def _truncated_jpeg(path, size: int = 64):
    img = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_truncated_jpeg_is_an_error_naming_the_file(tmp_path):
    f = _truncated_jpeg(tmp_path / "half.jpg")
    assert cv2.imread(str(f)) is not None  # OpenCV alone accepts it, greying the missing half
    for read in (read_image, image_size):
        with pytest.raises(InputError, match="half.jpg: truncated JPEG"):
            read(f)


def test_a_complete_jpeg_with_a_thumbnail_like_marker_pair_is_read(tmp_path):
    f = tmp_path / "ok.jpg"
    assert cv2.imwrite(str(f), np.full((16, 16, 3), 90, np.uint8))
    assert read_image(f).shape == (16, 16, 3)
    assert io.jpeg_truncated(b"\xff\xd8" + b"\xff\xd9" + b"\xff\xda" + b"scan")  # a thumbnail's EOI, then a cut scan
    assert not io.jpeg_truncated(b"\xff\xd8\xff\xda" + b"scan" + b"\xff\xd9")


def test_16_bit_images_are_scaled_by_their_bit_depth_not_stretched_per_image(tmp_path):
    flat = np.full((8, 8), 1000, np.uint16)
    flat[0, 0] = 1010  # nearly flat: min-max stretching would make this full-range noise
    bright = np.full((8, 8), 65535, np.uint16)
    cv2.imwrite(str(tmp_path / "flat.png"), flat)
    cv2.imwrite(str(tmp_path / "bright.png"), bright)
    a, b = read_image(tmp_path / "flat.png"), read_image(tmp_path / "bright.png")
    assert a.dtype == np.uint8 and set(np.unique(a)) == {4}  # 1000 / 257 and 1010 / 257 round to 4
    assert (b == 255).all()


def test_a_cameras_12_bit_pixels_in_a_16_bit_file_are_read_on_their_12_bit_range(tmp_path):
    eight = np.arange(256, dtype=np.uint8).reshape(16, 16)
    twelve = np.round(eight * (4095 / 255)).astype(np.uint16)  # what a 12-bit camera saves: at most 4095
    cv2.imwrite(str(tmp_path / "twelve.png"), twelve)
    np.testing.assert_array_equal(read_image(tmp_path / "twelve.png", bits=12)[..., 0], eight)  # all 256 levels back
    assert len(np.unique(read_image(tmp_path / "twelve.png"))) == 17  # as 16-bit pixels: 0..16, 17 grey levels of 256
    over = np.full((4, 4), 5000, np.uint16)  # brighter than the set's range (a new image in predict): saturates
    cv2.imwrite(str(tmp_path / "over.png"), over)
    assert (read_image(tmp_path / "over.png", bits=12) == 255).all()


@pytest.mark.parametrize("peak, bits", [(0, 8), (255, 8), (256, 10), (1023, 10), (4095, 12), (4096, 14), (16383, 14), (16384, 16), (65535, 16)])
def test_the_significant_bits_are_the_smallest_camera_depth_that_holds_the_brightest_pixel(peak, bits):
    assert io.significant_bits([peak]) == bits
    assert io.significant_bits([0, peak]) == bits


def test_a_set_without_16_bit_images_reads_as_16_bit():
    assert io.significant_bits([]) == 16
    assert io.significant_bits([None, None]) == 16  # image_info's peak of 8-bit images
    assert io.significant_bits([None, 4095]) == 12


def test_float_images_in_unit_range_are_scaled_and_others_refused(tmp_path):
    ok = np.full((8, 8), 0.5, np.float32)
    cv2.imwrite(str(tmp_path / "ok.tiff"), ok)
    assert (read_image(tmp_path / "ok.tiff") == 128).all()
    cv2.imwrite(str(tmp_path / "hdr.tiff"), ok * 1000)
    with pytest.raises(InputError, match="hdr.tiff: pixels are float32 outside \\[0, 1\\]"):
        image_size(tmp_path / "hdr.tiff")


@pytest.mark.parametrize("sigma", [4, 8])  # 8: the blurred square peaks below 128
def test_a_blurred_mask_is_cut_at_half_its_peak_not_at_any_grey(tmp_path, sigma):
    sharp = np.zeros((64, 64), np.uint8)
    sharp[24:40, 24:40] = 255
    blurred = cv2.GaussianBlur(sharp, (0, 0), sigma)
    cv2.imwrite(str(tmp_path / "m.png"), blurred)
    m = read_mask(tmp_path / "m.png")
    assert (blurred > 0).sum() > 4 * 16 * 16  # "> 0" would make the defect 5 to 11 times too large
    assert m[32, 32] and 0.5 * 16 * 16 < m.sum() < 2 * 16 * 16


def test_binary_masks_of_any_level_keep_every_non_zero_pixel(tmp_path):
    for level in (1, 255):
        mask = np.zeros((8, 8), np.uint8)
        mask[2:4, 2:6] = level
        cv2.imwrite(str(tmp_path / "m.png"), mask)
        assert read_mask(tmp_path / "m.png").sum() == 8


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_killed_runs_are_removed_by_the_next_write(tmp_path):
    out = tmp_path / "model.pt"
    dead = _dead_pid()
    stale_file = tmp_path / f".model.pt.tmp-{dead}"
    stale_dir = tmp_path / f".model.pt.tmp-{dead}.d"
    live = tmp_path / f".model.pt.tmp-{os.getppid()}"  # a running process: maybe writing it now
    other = tmp_path / f".other.pt.tmp-{dead}"  # another output's: removed when that one is written
    stale_file.write_bytes(b"x" * 100)
    stale_dir.mkdir()
    (stale_dir / "chunk").write_bytes(b"y")
    live.write_bytes(b"z")
    other.write_bytes(b"w")
    with atomic_path(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new"
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other.exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_disk_or_read_only_folder_names_the_output_and_keeps_the_old_one(tmp_path, monkeypatch, code):
    out = tmp_path / "metrics.json"
    out.write_text("old")

    def replace(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(InputError, match=f"metrics.json: cannot write \\({os.strerror(code)}\\); "):
        io.write_json(out, {"a": 1})
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_torch_file_on_a_full_disk_is_an_error_naming_it(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    out = tmp_path / "model.pt"
    out.write_bytes(b"old")
    monkeypatch.setattr(io, "open", lambda path, mode: builtins.open("/dev/full", mode), raising=False)
    with pytest.raises(InputError, match="model.pt: cannot write \\(No space left on device\\); free some disk space"):
        io.save_torch({"w": torch.zeros(100_000)}, out)
    assert out.read_bytes() == b"old"


def _app(body) -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(body)
    return app


def test_the_stage_runner_turns_a_disk_error_into_one_line_and_exit_2(capsys, monkeypatch):
    def body() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/x.zarr.zip")

    monkeypatch.setattr(sys, "argv", ["stage"])
    with pytest.raises(SystemExit) as e:
        run(_app(body))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: /data/x.zarr.zip: cannot write (No space left on device); free some disk space and run again (the previous output is kept)\n"


def test_the_stage_runner_prints_input_warnings_as_one_line(capsys, monkeypatch):
    def body() -> None:
        warnings.warn("a.png: mask is soft; cut at 128", InputWarning)

    monkeypatch.setattr(sys, "argv", ["stage"])
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as e:
            run(_app(body))
    assert e.value.code in (0, None)
    assert capsys.readouterr().err == "warning: a.png: mask is soft; cut at 128\n"


def test_metrics_json_is_strict_json_with_null_for_non_finite_values(tmp_path):
    import json

    io.write_json(tmp_path / "m.json", {"nmi": float("nan"), "x": [1.0, np.inf, np.float32("-inf")], "a": np.array([0.5, np.nan])})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {"nmi": None, "x": [1.0, None, None], "a": [0.5, None]}

