"""``anomalyncd predict --report DIR``: the page of a prediction, unknown-type images first."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from anomalyncd.io import InputError, write_image
from anomalyncd.calibrate import Calibration
from anomalyncd.predict_report import check_report_folder, gallery_order, parse_boxes, summary_rows, write_predict_report


def _row(tmp: Path, id_: str, status: str = "anomaly found", name: str = "crack", open_set: str = "known type",
         confidence: str = "0.9", unknown: str = "0.1", image_score: str = "0.5", cluster: int = 0) -> dict:
    path = tmp / f"{id_}.png"
    write_image(path, np.full((40, 60, 3), 120, np.uint8))
    found = status == "anomaly found"
    return {"id": id_, "image": str(path), "cluster": cluster if found else -1, "name": name if found else "", "status": status,
            "open_set": open_set if found else "", "image_score": image_score, "unknown_score": unknown if found else "",
            "confidence": confidence if found else "", "n_crops": 1 if found else 0,
            "boxes": "10 5 20 15" if found else "", "crop_boxes": "0 0 40 40" if found else "", "crop_clusters": str(cluster) if found else ""}


@pytest.fixture
def rows(tmp_path) -> list[dict]:
    return [
        _row(tmp_path, "a", confidence="0.95"),
        _row(tmp_path, "b", confidence="0.55"),
        _row(tmp_path, "c", open_set="unknown type", unknown="0.7"),
        _row(tmp_path, "d", open_set="unknown type", unknown="0.9", name="stain", cluster=1),
        _row(tmp_path, "e", name="not a defect", cluster=2),
        _row(tmp_path, "f", status="normal", image_score="0.2"),
        _row(tmp_path, "g", status="normal", image_score="0.3"),
        _row(tmp_path, "h", status="no anomaly found"),
    ]


def test_unknown_types_come_first_most_unusual_first_then_classes_least_confident_first(rows):
    order = [(title, [r["id"] for r in members]) for title, _, members in gallery_order(rows)]
    assert order == [
        ("Unknown type", ["d", "c"]),
        ("crack", ["b", "a"]),
        ("not a defect", ["e"]),
        ("Normal", ["g", "f"]),  # the closest calls first
        ("no anomaly found", ["h"]),
    ]


def test_the_summary_counts_each_decision_once(rows):
    table = dict((label, n) for label, n in summary_rows(rows))
    assert table == {"crack (known type)": 2, "not a defect": 1, "unknown type": 2, "normal": 2, "no anomaly found": 1, "all images": 8}


def test_box_cells_are_parsed_with_empty_boxes_kept_in_place():
    assert parse_boxes("") == []
    assert parse_boxes("1 2 3 4;;5 6 7 8") == [(1, 2, 3, 4), None, (5, 6, 7, 8)]


def test_the_page_shows_the_unknown_types_with_nearest_class_and_scores_and_links_every_thumbnail(rows, tmp_path):
    out = tmp_path / "page"
    # one score per distribution: the thresholds are those scores at any quantile
    cal = Calibration({}, np.array([0.25]), np.zeros((1, 2)), np.array([0.6]), normal_quantile=0.9, unknown_quantile=0.99)
    write_predict_report(out, rows, cal, run="my-run", failed=["x.png: unreadable"])
    page = (out / "index.html").read_text()
    unknown = page[page.index("id='unknown'"):page.index("<h2>crack")]
    assert "Unknown type (2)" in unknown and unknown.index(">d<") < unknown.index(">c<")
    assert "nearest class: stain; unknown score 0.9 (limit 0.6)" in unknown
    assert "above 0.25 (quantile 0.9" in page and "above 0.6 (quantile 0.99" in page and "x.png: unreadable" in page
    for src in re.findall(r"(?:src|href)='([^']+)'", page):
        assert (out / src).is_file(), src
    assert len(list((out / "img").iterdir())) == len(rows)


def test_the_page_folder_must_be_new_or_a_previous_page(rows, tmp_path):
    page = tmp_path / "page"
    assert check_report_folder(page) == page
    write_predict_report(page, rows[:2], None)
    write_predict_report(check_report_folder(page), rows, None)  # a previous page is replaced
    assert len(list((page / "img").iterdir())) == len(rows)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "predictions.csv").write_text("id\n")
    with pytest.raises(InputError, match=r"--report .*results: holds other files \(predictions.csv\)"):
        check_report_folder(tmp_path / "results")
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="is a file"):
        check_report_folder(tmp_path / "file")
