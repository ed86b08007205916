"""Comparing two runs (the CPU half of ``benchmarks/gpu_check.py``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from anomalyncd import paths
from anomalyncd.compare import compare_runs, map_difference, same_partition
from anomalyncd.io import InputError
from anomalyncd.store import MapSet, read_maps, read_merged, write_maps, write_merged

from .conftest import ROOT


def test_partitions_are_compared_whatever_the_label_ids():
    assert same_partition([0, 0, 1, 2], [5, 5, 3, 0])
    assert not same_partition([0, 0, 1, 2], [5, 5, 3, 3])  # two clusters merged
    assert not same_partition([0, 0, 1, 1], [0, 1, 1, 1])  # one image moved
    assert not same_partition([0, 1], [0, 1, 2])


def test_map_differences_are_in_grey_levels_without_overflow():
    a = np.array([[0, 255]], np.uint8)
    assert map_difference(a, np.array([[3, 250]], np.uint8)) == (5, 4.0)
    with pytest.raises(ValueError):
        map_difference(a, a[:, :1])


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    """A finished-run's maps, crops and merge stores (synthetic, merged by the merge stage)."""
    from stages import merge as merge_stage

    from .synthetic_run import make_project

    root = tmp_path_factory.mktemp("a")
    cs = make_project(root)["crops"]
    n = len(cs.ids)
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 250, (n, 16, 16)).astype(np.uint8)
    write_maps(root / paths.MAPS, MapSet(ids=cs.ids, maps=u8 / 255.0, maps_u8=u8, scores=np.zeros(n),
                                         image_sizes=cs.image_sizes, attrs={"norm_min": 0.0, "norm_max": 1.0}))
    with contextlib.chdir(root):
        merge_stage.main(params=Path("params.yaml"))
    return root


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_a_run_matches_itself_and_small_map_differences_within_the_tolerance(run_a, tmp_path):
    assert compare_runs(run_a, run_a).ok
    b = _copy(run_a, tmp_path / "b")
    ms = read_maps(b / paths.MAPS)
    ms.maps_u8[0, 0, 0] += 2
    write_maps(b / paths.MAPS, ms)
    c = compare_runs(run_a, b)
    assert (c.map_max, c.boxes_differ, c.same_clusters, c.ok) == (2, 0, True, True)
    ms.maps_u8[1, 3, 3] += 3
    write_maps(b / paths.MAPS, ms)
    assert not compare_runs(run_a, b).ok
    assert compare_runs(run_a, b, tolerance=3).ok


def test_relabelled_clusters_are_the_same_and_a_moved_image_is_not(run_a, tmp_path):
    b = _copy(run_a, tmp_path / "b")
    m = read_merged(b / paths.MERGED)
    k = int(m.clusters.max()) + 1
    write_merged(b / paths.MERGED, replace(m, clusters=(m.clusters + 1) % k))
    assert compare_runs(run_a, b).same_clusters
    moved = m.clusters.copy()
    moved[0] = (moved[0] + 1) % k
    write_merged(b / paths.MERGED, replace(m, clusters=moved))
    c = compare_runs(run_a, b)
    assert not c.same_clusters and not c.ok and "DIFFERENT" in c.summary()


def test_runs_of_other_images_are_an_error(run_a, tmp_path):
    b = _copy(run_a, tmp_path / "b")
    ms = read_maps(b / paths.MAPS)
    ms.ids = ms.ids[::-1]
    write_maps(b / paths.MAPS, ms)
    with pytest.raises(InputError, match="different images"):
        compare_runs(run_a, b)


def test_the_gpu_check_skips_cleanly_without_cuda():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--tiny"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("gpu_check: skipped: no CUDA device")
