"""Streaming stages and torchrun: detect, mebin and infer write their stores a chunk at a time,
and spread over processes give the single-process stores byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from anomalyncd import paths, shard
from anomalyncd.config import DatasetParams
from anomalyncd.datasets import build_manifest, read_dataset
from anomalyncd.detect import stream
from anomalyncd.io import InputError
from anomalyncd.store import StoreWriter, read_crops, read_maps

from .conftest import ROOT

TINY = {
    "dataset": {"layout": "mvtec", "root": "demo"},
    "detect": {"map_size": 32, "image_size": 32, "device": "cpu", "backbone": "filterbank", "layers": [1, 2, 4],
               "pretrained": False, "bank_size": 200, "batch_size": 2, "keep_aspect": False},
    "mebin": {"crop_size": 36, "workers": 1},
    "train": {"image_size": 32, "epochs": 1, "batch_size": 8, "n_head": 2, "trunk_cache_views": 0},
    "infer": {"batch_size": 4, "device": "cpu"},
}


@pytest.fixture
def project(tmp_path, tiny_demo, monkeypatch) -> Path:
    """The tiny demo (12 defect images, 2 normal test images) with its manifest and params."""
    monkeypatch.chdir(tmp_path)
    build_manifest(read_dataset(DatasetParams(layout="mvtec", root="demo")), progress=False).write(paths.MANIFEST)
    Path("params.yaml").write_text(yaml.safe_dump(TINY))
    return tmp_path


def _run(stage: str) -> None:
    from typer.testing import CliRunner

    module = __import__(f"stages.{stage}", fromlist=["app"])
    res = CliRunner().invoke(module.app, ["--params", "params.yaml"])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output


# -- which rows a rank takes ---------------------------------------------------------------


@pytest.mark.parametrize("n,world,align", [(10, 2, 1), (10, 3, 4), (3, 4, 1), (0, 2, 5), (17, 2, 16), (9, 2, 64)])
def test_blocks_cover_every_row_once_in_order_and_start_on_a_batch(n, world, align):
    blocks = [shard.block(n, r, world, align) for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(n))
    assert all(b.start % align == 0 for b in blocks if len(b))
    assert n == 0 or len(blocks[0]) > 0  # rank 0, which gathers, always has rows to set the arrays' shapes


def test_parts_read_as_one_array_in_rank_order(tmp_path):
    rows = np.arange(14, dtype=np.float32).reshape(7, 2)
    for r, (a, b) in enumerate([(0, 3), (3, 3), (3, 7)]):  # the middle rank has no rows
        with StoreWriter(shard.part_path(tmp_path / "s.zarr.zip", r, 3), "part") as w:
            w.declare("x", (2,), np.float32)
            w.append("x", rows[a:b])
    with shard.Parts(shard.part_paths(tmp_path / "s.zarr.zip", 3), "part") as parts:
        assert parts.rows("x") == 7
        np.testing.assert_array_equal(np.concatenate(list(parts.chunks("x", size=2))), rows)
        np.testing.assert_array_equal(np.concatenate(list(parts.chunks("x", stop=4, size=2))), rows[:4])
        np.testing.assert_array_equal(parts.take("x", [6, 0, 3]), rows[[6, 0, 3]])
    shard.remove_parts(tmp_path / "s.zarr.zip")
    assert list(tmp_path.iterdir()) == []


# -- streaming stages ----------------------------------------------------------------------


def test_detect_and_mebin_stores_do_not_depend_on_the_chunk_size(project, monkeypatch):
    import stages.mebin

    _run("detect")
    _run("mebin")
    maps, crops = paths.MAPS.read_bytes(), paths.CROPS.read_bytes()
    monkeypatch.setattr(stream, "IMAGES_PER_CHUNK", 1)  # rounded up to the batch size: 2 images a call
    monkeypatch.setattr(stages.mebin, "IMAGES_PER_CHUNK", 3)
    _run("detect")
    _run("mebin")
    assert paths.MAPS.read_bytes() == maps and paths.CROPS.read_bytes() == crops
    cs = read_crops(paths.CROPS)
    assert len(cs.ids) == 12 and cs.image_index.max() == 11 and len(cs.masks) == 12
    assert [p.name for p in paths.MAPS.parent.iterdir()] == ["maps.zarr.zip"]  # the parts are gone


def test_pixel_metrics_of_a_large_set_use_an_evenly_spaced_sample(project, monkeypatch):
    import json

    import stages.detect

    _run("detect")
    full = json.loads((paths.METRICS / "detect.json").read_text())
    assert "pixel_metrics_images" not in full  # 14 images: all of them
    monkeypatch.setattr(stages.detect, "METRIC_IMAGES", 5)
    _run("detect")
    sampled = json.loads((paths.METRICS / "detect.json").read_text())
    assert sampled["pixel_metrics_images"] == 5
    assert sampled["image_auroc"] == full["image_auroc"]  # the image scores of every image
    assert 0 <= sampled["pixel_auroc"] <= 1
    assert stream.metric_sample(14, 5).tolist() == [0, 3, 6, 10, 13]


def test_streamed_mebin_stage_gives_the_in_memory_crop_set(project):
    import stages.mebin
    from anomalyncd.config import load_params
    from anomalyncd.datasets import Manifest

    _run("detect")
    _run("mebin")
    mem, _ = stages.mebin.build_crops(read_maps(paths.MAPS), Manifest.read(paths.MANIFEST).by_id(),
                                      load_params("mebin", Path("params.yaml")), progress=False)
    got = read_crops(paths.CROPS)
    for name in ("image_sizes", "thresholds", "est_counts", "count_seqs", "crops", "crop_masks", "image_index",
                 "boxes", "areas", "scores"):
        np.testing.assert_array_equal(getattr(got, name), getattr(mem, name), err_msg=name)
    assert got.attrs == mem.attrs and all(np.array_equal(a, b) for a, b in zip(got.masks, mem.masks))


def test_detect_failing_mid_stream_leaves_no_maps_store(project, monkeypatch):
    from anomalyncd.detect.patchcore import PatchCore

    calls = []
    make = PatchCore.map_records

    def fail_on_the_third_chunk(self, records):
        calls.append(len(records))
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return make(self, records)

    monkeypatch.setattr(PatchCore, "map_records", fail_on_the_third_chunk)
    monkeypatch.setattr(stream, "IMAGES_PER_CHUNK", 2)
    with pytest.raises(RuntimeError, match="out of memory"):
        _run("detect")
    assert not paths.MAPS.parent.exists() or list(paths.MAPS.parent.iterdir()) == []
    assert not paths.DETECTOR.exists()
    with pytest.raises(InputError, match="maps.zarr.zip: store not found"):
        _run("mebin")


KILLED_DETECT = """
import os, signal
from anomalyncd.detect import stream
from anomalyncd.detect.patchcore import PatchCore
from stages.detect import app
make, calls = PatchCore.map_records, []
def kill_on_the_third_chunk(self, records):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return make(self, records)
PatchCore.map_records = kill_on_the_third_chunk
stream.IMAGES_PER_CHUNK = 2
app(["--params", "params.yaml"])
"""


def test_detect_killed_mid_stream_leaves_no_store_a_later_stage_would_trust(project):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLED_DETECT], cwd=project, env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not paths.MAPS.exists() and not paths.DETECTOR.exists()
    left = [p.name for p in paths.MAPS.parent.iterdir()]
    assert left and all(n.startswith("..maps.zarr.zip.part-0-of-1.tmp-") for n in left)  # temporaries only
    with pytest.raises(InputError, match="store not found"):
        _run("mebin")
    shard.remove_parts(paths.MAPS)  # what the next run does first, whatever its number of processes
    assert list(paths.MAPS.parent.iterdir()) == []
    _run("detect")
    assert [p.name for p in paths.MAPS.parent.iterdir()] == ["maps.zarr.zip"]


# -- torchrun ------------------------------------------------------------------------------


def _stage_cmd(stage: str, nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", f"stages.{stage}"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", f"stages.{stage}"]


def _subprocess(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_processes_write_the_single_process_stores_byte_for_byte(project):
    """detect, mebin and infer under ``torchrun --nproc_per_node=2`` (gloo): each store is the
    one a single process writes, and a rerun writes it again byte for byte."""
    _subprocess(_stage_cmd("detect", 1), project)
    _subprocess(_stage_cmd("mebin", 1), project)
    _subprocess([sys.executable, "-m", "stages.train"], project)
    _subprocess(_stage_cmd("infer", 1), project)
    outputs = [paths.MAPS, paths.DETECTOR, paths.CROPS, paths.PROBS, paths.METRICS / "detect.json",
               paths.METRICS / "mebin.json"]
    single = {p: p.read_bytes() for p in outputs}
    n_crops = len(read_crops(paths.CROPS, lazy=True).crops)
    for p in outputs:
        p.unlink()
    taken = {"detect": ["images 0..7 (8", "images 8..13 (6"],  # 7 batches of 2 images, 14 with the normal ones
             "mebin": ["images 0..5 (6", "images 6..11 (6"],
             "infer": ["crops 0..", f"..{n_crops - 1} ("]}  # of whole batches of 4 crops
    for stage in ("detect", "mebin", "infer"):
        out = _subprocess(_stage_cmd(stage, 2), project)
        assert f"{stage}: rank 0/2 takes {taken[stage][0]}" in out and f"{stage}: rank 1/2 takes " in out, out
        assert taken[stage][1] in out, out
    assert [p for p in outputs if p.read_bytes() != single[p]] == []
    assert sorted(p.name for p in paths.MAPS.parent.iterdir()) == ["maps.zarr.zip"]  # no part left behind
    _subprocess(_stage_cmd("detect", 1), project)  # a rerun: the same bytes, DVC sees no change
    assert paths.MAPS.read_bytes() == single[paths.MAPS]
