"""Security: a run folder is shared between people ("here is my trained run, predict with it"),
so nothing in it may run code or silently change results, and no output overwrites what the
user named.

- model files are read with ``weights_only=True``: a crafted pickle is refused, naming the file,
  and its code never runs (``models/detector.pt``, ``models/mgvit.pt``, ``checkpoints/train.pt``);
- each model file carries the SHA-256 of its content: a flipped byte is refused;
- a param that becomes part of a path cannot point outside the project;
- an output path that names an existing folder never deletes it.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anomalyncd.config import DemoParams, DetectParams, load_params
from anomalyncd.detect import create_detector, load_detector
from anomalyncd.detect.base import save_detector
from anomalyncd.io import TORCH_FORMAT, InputError, atomic_path, load_torch, save_torch
from anomalyncd.model import MGViTClassifier, ModelConfig, load_model, save_model
from anomalyncd.training import train

from .conftest import ROOT
from .test_training import FAST, tiny_data, tiny_net


class _Payload:
    """Unpickling this writes ``marker``: the proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _crafted(path: Path, marker: Path, wrapped: bool) -> Path:
    """A file that runs code when unpickled; ``wrapped``: inside anomalyncd's hashed wrapper,
    with a correct hash (an attacker can compute one), so only ``weights_only`` stops it."""
    evil = {"format": "anomalyncd-mgvit-2", "config": {}, "payload": _Payload(marker)}
    if not wrapped:
        torch.save(evil, path)
        return path
    buf = io.BytesIO()
    torch.save(evil, buf)
    raw = buf.getvalue()
    torch.save(
        {"format": TORCH_FORMAT, "sha256": hashlib.sha256(raw).hexdigest(), "payload": torch.frombuffer(bytearray(raw), dtype=torch.uint8)},
        path,
    )
    return path


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "with-a-valid-hash"])
def test_a_crafted_pickle_is_refused_on_every_model_file_and_runs_no_code(tmp_path, wrapped):
    marker = tmp_path / "pwned.txt"
    f = _crafted(tmp_path / "detector.pt", marker, wrapped)
    with pytest.raises(InputError, match=r"detector\.pt: refused: .*Python objects.*rerun the detect stage"):
        load_detector(f)
    f = _crafted(tmp_path / "mgvit.pt", marker, wrapped)
    with pytest.raises(InputError, match=r"mgvit\.pt: refused: .*rerun the train stage"):
        load_model(f)
    f = _crafted(tmp_path / "train.pt", marker, wrapped)
    with pytest.raises(InputError, match=r"train\.pt: refused: .*train\.resume=false"):
        train(tiny_net(), tiny_data(), _fast(epochs=1), checkpoint=f, resume=True, fingerprint="x")
    assert not marker.exists()
    # the same pickle, loaded as torch did before, does run its code: the test's payload is real
    torch.load(f if not wrapped else _crafted(tmp_path / "bare.pt", marker, False), weights_only=False)
    assert marker.read_text() == "pwned"


def _fast(**kw):
    from anomalyncd.config import TrainParams

    return TrainParams(**FAST, **kw)


def _model(path: Path) -> Path:
    cfg = ModelConfig(model="vit_tiny_patch16_224", image_size=32, crop_pct=0.875, mask_layers=1, grad_from_block=11, n_head=1, num_unlabeled=2)
    save_model(path, MGViTClassifier(cfg), head=0)
    return path


def test_a_flipped_byte_in_a_model_file_is_refused_not_a_silent_change(tmp_path):
    f = _model(tmp_path / "mgvit.pt")
    load_model(f)  # intact: loads
    data = bytearray(f.read_bytes())
    # a byte in the middle of the weights' payload, far from the zip structure at either end
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"mgvit\.pt: damaged \(its content does not match its SHA-256\); rerun the train stage"):
        load_model(f)


def test_a_fitted_detector_round_trips_through_weights_only(tmp_path):
    det = create_detector(DetectParams(method="padim", backbone="filterbank", layers=[1, 2], image_size=32, map_size=32, device="cpu"))
    import numpy as np

    imgs = [np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8) for i in range(4)]
    det.fit(imgs)
    det.norm_min, det.norm_max = 0.5, 2.0
    save_detector(det, tmp_path / "detector.pt")
    back = load_detector(tmp_path / "detector.pt")
    assert (back.norm_min, back.norm_max) == (0.5, 2.0)
    assert np.allclose(back.predict(imgs), det.predict(imgs))


def test_files_written_by_an_older_version_without_a_hash_are_refused_with_the_fix(tmp_path):
    torch.save({"format": "anomalyncd-mgvit-2", "state_dict": {}}, tmp_path / "old.pt")
    with pytest.raises(InputError, match=r"old\.pt: not written by this version of anomalyncd .*; rerun"):
        load_torch(tmp_path / "old.pt", "rerun")


def test_save_torch_round_trips_plain_values(tmp_path):
    obj = {"a": torch.arange(3), "b": [1, 2.5, "x", (3, 4)], "c": {"d": None, "e": True}}
    save_torch(obj, tmp_path / "x.pt")
    back = load_torch(tmp_path / "x.pt", "fix")
    assert torch.equal(back["a"], obj["a"]) and back["b"] == obj["b"] and back["c"] == obj["c"]


@pytest.mark.parametrize("category", ["../../../../x", "a/b", "..", "a\\b", ""])
def test_a_param_that_becomes_a_path_component_cannot_leave_the_project(tmp_path, category):
    with pytest.raises(InputError, match="demo.category must be a folder name"):
        DemoParams(category=category)
    (tmp_path / "params.yaml").write_text(f"demo:\n  category: {category!r}\n")
    with pytest.raises(InputError, match="demo.category"):
        load_params("demo", tmp_path / "params.yaml")
    for section, body in (("demo", "types: [scratch, ../x]"), ("dataset", "categories: [tile, ../../etc]")):
        (tmp_path / "params.yaml").write_text(f"{section}:\n  {body}\n")
        with pytest.raises(InputError, match=f"{section}.(types|categories) must be"):
            load_params(section, tmp_path / "params.yaml")


def test_writing_a_file_onto_an_existing_folder_keeps_the_folder(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="results: is a folder, not a file"):
        with atomic_path(results) as tmp:
            tmp.write_text("a,b\n")
    assert (results / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no temporary left


def test_predict_options_are_checked_before_any_work_and_out_may_name_a_folder(tmp_path):
    """--out naming a folder means <folder>/predictions.csv (the folder and its files are kept);
    an unwritable --out, --batch-size < 1 and an unknown --device fail before the run is read
    (here it does not exist, so getting past the options means meeting that error)."""
    from stages.predict import main

    def predict(out="predictions.csv", batch_size=None, device="auto", report=None):
        main([tmp_path], run_dir=tmp_path / "no-run", out=Path(out), maps=None, device=device, batch_size=batch_size,
             report=report)

    results = tmp_path / "results"
    results.mkdir()
    (results / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="no-run: run directory not found"):
        predict(out=results)
    assert (results / "precious.txt").read_text() == "keep me"
    with pytest.raises(InputError, match=r"--report .*results: holds other files \(precious.txt\)"):
        predict(report=results)  # the page would replace the folder: refused, the file kept
    assert (results / "precious.txt").read_text() == "keep me"
    (tmp_path / "a_file").write_text("")
    with pytest.raises(InputError, match=r"a_file/p.csv: cannot write there \(.*a_file: not a folder\); choose another --out"):
        predict(out=tmp_path / "a_file" / "p.csv")
    with pytest.raises(InputError, match="--batch-size must be at least 1, got 0"):
        predict(batch_size=0)
    with pytest.raises(InputError, match="--device: unknown device 'banana'; use auto, cpu, cuda, cuda:N or mps"):
        predict(device="banana")


def test_output_file_is_the_named_file_or_predictions_csv_inside_a_named_folder(tmp_path):
    from anomalyncd.io import output_file

    (tmp_path / "results").mkdir()
    assert output_file(tmp_path / "results", "predictions.csv", "--out") == tmp_path / "results" / "predictions.csv"
    assert output_file(tmp_path / "new" / "p.csv", "predictions.csv", "--out") == tmp_path / "new" / "p.csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # the probe file is gone, nothing created


def test_demo_replaces_only_a_folder_it_wrote_itself(tmp_path):
    from stages import demo

    (tmp_path / "params.yaml").write_text("demo:\n  image_size: 32\n  n_train: 1\n  n_test_normal: 1\n  n_per_type: 1\n")
    mine = tmp_path / "Documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    with pytest.raises(InputError, match="Documents: a folder the demo stage did not write, which it would replace; choose a new or empty --out"):
        demo.main(params=tmp_path / "params.yaml", out=mine)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    demo.main(params=tmp_path / "params.yaml", out=tmp_path / "demo")
    demo.main(params=tmp_path / "params.yaml", out=tmp_path / "demo")  # its own output: replaced
    assert (tmp_path / "demo" / "tile" / "test" / "crack" / "000.png").is_file()


def test_a_stage_meeting_a_crafted_model_file_prints_one_error_line_and_runs_no_code(tmp_path):
    """End to end through the stage runner: ``infer`` on a run folder whose mgvit.pt was swapped."""
    from anomalyncd import paths

    from .test_training import write_tiny_crops

    write_tiny_crops(tmp_path / paths.CROPS)
    (tmp_path / "models").mkdir()
    marker = tmp_path / "pwned.txt"
    _crafted(tmp_path / paths.MODEL, marker, wrapped=True)
    (tmp_path / "params.yaml").write_text("infer:\n  device: cpu\n")
    proc = subprocess.run(
        [sys.executable, "-m", "stages.infer"], cwd=tmp_path, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: {paths.MODEL}: refused: it holds Python objects other than tensors")
    assert not marker.exists() and not (tmp_path / paths.PROBS).exists()
