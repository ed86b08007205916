"""benchmarks/bench_openset.py: the leave-one-type-out split keeps photographs of one part together;
the normal/defect threshold redrawn over other held-back images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.bench_openset import loto_split, redrawn_calibration, tile_groups


def _items(names: list[str]) -> list[tuple[Path, Path]]:
    return [(Path(f"{n}.jpg"), Path(f"{n}.png")) for n in names]


def test_mtd_photographs_of_one_tile_under_rising_lightings_form_one_group():
    names = ["exp2_num_20390", "exp1_num_20362", "exp3_num_20409", "exp1_num_77531", "exp2_num_77559", "exp6_num_99999"]
    groups = sorted(sorted(names[i] for i in g) for g in tile_groups(_items(names)))
    assert groups == [["exp1_num_20362", "exp2_num_20390", "exp3_num_20409"], ["exp1_num_77531", "exp2_num_77559"], ["exp6_num_99999"]]


def test_other_names_are_one_group_each():
    assert tile_groups(_items(["000", "001", "exp1_num_5"])) == [[0], [1], [2]]


def test_no_held_back_known_image_has_a_twin_in_the_run():
    types = {
        t: _items([f"exp{e}_num_{base + 10 * e}" for base in range(1000 * k, 1000 * k + 600, 100) for e in range(1, 7)])
        for k, t in enumerate(["a", "b", "c"], start=1)
    }
    run, new, known = loto_split(types, "c", seed=0)
    assert set(run) == {"a", "b"} and all(t == "c" for t, _ in new) and len(new) == len(known)
    for t, (img, _) in known:
        group = next(g for g in tile_groups(types[t]) if img in [types[t][i][0] for i in g])
        assert not {types[t][i][0] for i in group} & {i for i, _ in run[t]}


def test_redrawn_thresholds_flag_about_the_promised_share_of_normal_images():
    rng = np.random.default_rng(0)
    held, free = rng.normal(size=150), rng.normal(size=200)
    defects = rng.normal(3.0, 1.0, size=300)
    tp, fp = redrawn_calibration(held, free, defects, 0.9, draws=300)
    assert tp.shape == fp.shape == (300,) and len(np.unique(fp)) > 5  # each draw its own threshold
    assert abs(fp.mean() - 0.1) < 0.02  # the quantile's promise, on average over draws
    assert abs(tp.mean() - np.mean(defects > 1.28)) < 0.02  # N(3, 1) above N(0, 1)'s 0.9 quantile, 1.28
