from html.parser import HTMLParser

import numpy as np
import pytest

from anomalyncd.io import write_image
from anomalyncd.report import (
    ImageEntry,
    MebinEntry,
    ReportData,
    draw_boxes,
    outline_thumbnail,
    palette,
    write_report,
)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.ids = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.refs.append(a["src"])
        if tag == "a" and not a["href"].startswith("#"):
            self.refs.append(a["href"])
        if "id" in a:
            self.ids.append(a["id"])


def _run(tmp_path, ground_truth=True, n=6, size=48, c=16):
    rng = np.random.default_rng(0)
    images, crops, masks = [], [], []
    for i in range(n):
        p = tmp_path / "data" / f"img{i}.png"
        write_image(p, rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8))
        crops.append(rng.integers(0, 255, (c, c, 3), dtype=np.uint8))
        m = np.zeros((c, c), np.uint8)
        m[4:12, 5:11] = 1
        masks.append(m)
        images.append(
            ImageEntry(
                id=f"tile/test/{'ab'[i % 2]}/{i:03d}", path=str(p), cluster=i % 2, confidence=0.5 + i / 20,
                truth="ab"[i % 2] if ground_truth else "", boxes=np.array([[2, 3, 20, 30]]),
                crop_rows=[i], crop_clusters=[i % 2], crop_weights=[1.0],
            )
        )
    metrics = {"ground_truth": ground_truth, "clusters": {"0": {"size": 3, "mean_confidence": 0.6}, "1": {"size": 3, "mean_confidence": 0.7}, "2": {"size": 0, "mean_confidence": None}}}
    if ground_truth:
        metrics.update(
            image={"n": n, "nmi": 1.0, "ari": 1.0, "f1": 1.0}, crop={"n": n, "nmi": 1.0, "ari": 1.0, "f1": 1.0},
            per_class={"a": {"cluster": 0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3}},
        )
    seq = np.array([5, 4, 3, 2, 2, 2, 2, 1, 1, 0])
    return ReportData(
        title="demo run", n_clusters=3, images=images, crops=np.stack(crops), crop_masks=np.stack(masks),
        metrics=metrics, names={0: "a", 1: "b"} if ground_truth else {},
        confusion=(["a", "b"], [0, 1], np.array([[3, 0], [0, 3]])) if ground_truth else None,
        mebin=[MebinEntry(id=images[0].id, thresholds=np.arange(200, 0, -20), counts=seq, chosen=120)],
    )


def test_report_has_a_section_per_class_and_every_link_resolves(tmp_path):
    out = tmp_path / "reports"
    write_report(out, _run(tmp_path))
    page = (out / "index.html").read_text()
    parser = _Links()
    parser.feed(page)
    assert {"class-0", "class-1", "class-2"} <= set(parser.ids)
    assert parser.refs, "the page shows images"
    for ref in parser.refs:
        assert not ref.startswith(("http", "/", "data:")), ref
        assert (out / ref).is_file(), ref
    assert "class 0 (a)" in page and "Matched true type: <b>a</b>" in page
    assert "Confusion matrix" in page and "NMI" in page
    assert any(r.startswith("mebin/") for r in parser.refs)


def test_report_without_ground_truth_says_so(tmp_path):
    out = tmp_path / "reports"
    write_report(out, _run(tmp_path, ground_truth=False))
    page = (out / "index.html").read_text()
    assert "No ground truth" in page
    assert "Confusion" not in page and "Matched true type" not in page


def test_report_escapes_image_ids(tmp_path):
    data = _run(tmp_path)
    data.images[0].id = "<script>alert(1)</script>"
    write_report(tmp_path / "r", data)
    assert "<script>" not in (tmp_path / "r" / "index.html").read_text()


def test_report_keeps_images_out_of_the_page(tmp_path):
    write_report(tmp_path / "r", _run(tmp_path))
    page = (tmp_path / "r" / "index.html").read_text()
    assert "base64" not in page and len(page) < 50_000


def test_thumbnail_outlines_the_mask_boundary_only():
    crop = np.zeros((16, 16, 3), np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 1
    t = outline_thumbnail(crop, mask, size=64, color=(255, 0, 0))
    assert t.shape == (64, 64, 3)
    red = t[..., 0] > 100
    assert red[16:48, 16].any() and red[16, 16:48].any()  # the outline
    assert not red[32, 32] and not red[2, 2]  # neither the inside nor the background


def test_draw_boxes_scales_large_images_and_colours_boxes():
    img = np.zeros((1000, 2000, 3), np.uint8)
    out = draw_boxes(img, np.array([[100, 100, 900, 800]]), ["class 0"], [(0, 255, 0)], max_side=500)
    assert out.shape == (250, 500, 3)
    assert out[..., 1].max() == 255 and img.max() == 0


def test_palette_gives_distinct_colours():
    for n in (3, 15, 40):
        assert len(set(palette(n))) == n


def test_draw_boxes_enlarges_tiny_images_for_readable_labels():
    out = draw_boxes(np.zeros((64, 32, 3), np.uint8), np.array([[0, 0, 8, 8]]), ["1"], [(255, 0, 0)], min_side=256)
    assert out.shape == (256, 128, 3)


# -- the evaluate stage ------------------------------------------------------------------------


def _evaluate(tmp_path, monkeypatch, **kw):
    import json
    from pathlib import Path

    from stages import evaluate, merge

    from .synthetic_run import make_project

    make_project(tmp_path, **kw)
    monkeypatch.chdir(tmp_path)
    merge.main(params=Path("params.yaml"))
    evaluate.main(params=Path("params.yaml"))
    return json.loads((tmp_path / "metrics" / "evaluate.json").read_text())


def _links_resolve(report):
    parser = _Links()
    parser.feed((report / "index.html").read_text())
    return parser.refs and all((report / r).is_file() for r in parser.refs)


def test_evaluate_stage_scores_writes_the_confusion_plot_and_report(tmp_path, monkeypatch):
    import csv

    m = _evaluate(tmp_path, monkeypatch)
    assert m["ground_truth"] is True and m["n_images"] == 6
    assert set(m["image"]) == {"n", "nmi", "ari", "f1"} and m["crop"]["n"] == 12
    assert set(m["per_class"]) == {"crack", "hole", "stain"}
    with open(tmp_path / "plots" / "confusion.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {r["actual"] for r in rows} == {"crack", "hole", "stain"}
    assert _links_resolve(tmp_path / "reports")
    assert len(list((tmp_path / "reports" / "mebin").iterdir())) == 2


def test_evaluate_stage_reports_each_category_and_their_mean(tmp_path, monkeypatch):
    m = _evaluate(tmp_path, monkeypatch, categories=("tile", "wood"))
    assert set(m["per_category"]) == {"tile", "wood"}
    f1s = [m["per_category"][c]["image"]["f1"] for c in ("tile", "wood")]
    assert m["mean"]["image"]["f1"] == pytest.approx(np.mean(f1s))
    assert "wood/crack" in m["per_class"]
    assert "Per category" in (tmp_path / "reports" / "index.html").read_text()


def test_evaluate_stage_without_ground_truth_says_so_and_still_reports(tmp_path, monkeypatch):
    m = _evaluate(tmp_path, monkeypatch, labelled=False)
    assert m["ground_truth"] is False
    assert sum(v["size"] for v in m["clusters"].values()) == 6
    assert all("mean_confidence" in v for v in m["clusters"].values())
    assert "image" not in m
    assert _links_resolve(tmp_path / "reports")
    assert "No ground truth" in (tmp_path / "reports" / "index.html").read_text()


def test_evaluate_stage_scores_the_frozen_feature_baseline_beside_the_model(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from anomalyncd import paths
    from anomalyncd.store import read_probs, write_probs
    from stages import evaluate, merge

    from .synthetic_run import make_project

    run = make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    ps = read_probs(paths.PROBS)
    types = sorted({r.defect_type for r in run["records"]})
    truth = np.array([types.index(r.defect_type) for r in run["records"]])[run["crops"].image_index]
    noise = np.random.default_rng(0).normal(0, 0.1, (len(truth), len(types)))
    ps.baseline_features = (np.eye(len(types))[truth] * 5 + noise).astype(np.float32)  # separates the types
    write_probs(paths.PROBS, ps)
    merge.main(params=Path("params.yaml"))
    evaluate.main(params=Path("params.yaml"))
    m = json.loads(Path("metrics/evaluate.json").read_text())
    assert set(m["baseline"]["image"]) == {"n", "nmi", "ari", "f1"}
    assert m["baseline"]["crop"]["nmi"] == pytest.approx(1.0) and m["baseline"]["image"]["f1"] == pytest.approx(1.0)
