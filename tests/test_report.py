from html.parser import HTMLParser

import cv2
import numpy as np
import pytest

from anomalyncd.io import write_image
from anomalyncd.report import (
    BOX_COLOR,
    STRIP_SIZE,
    ImageEntry,
    around_box,
    defect_thumbnail,
    MebinEntry,
    ReportData,
    draw_boxes,
    MEBIN_COLOR,
    TRUE_COLOR,
    outline_thumbnail,
    palette,
    region_panels,
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


def _run(tmp_path, ground_truth=True, n=6, size=48, no_anomaly=()):
    """A report of ``n`` images of two types a/b; images in ``no_anomaly`` had no anomaly found."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        p = tmp_path / "data" / f"img{i}.png"
        write_image(p, rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8))
        true = np.zeros((size, size + 8), bool)
        true[6:20, 8:18] = True
        write_image(tmp_path / "data" / f"img{i}_mask.png", true.astype(np.uint8) * 255)
        found = i not in no_anomaly
        mebin_mask = np.zeros((size, size + 8), bool)
        mebin_mask[5:18, 6:16] = found
        map_u8 = np.zeros((32, 32), np.uint8)
        map_u8[3:12, 4:10] = 220
        images.append(
            ImageEntry(
                id=f"tile/test/{'ab'[i % 2]}/{i:03d}", path=str(p), cluster=i % 2 if found else -1,
                confidence=0.5 + i / 20 if found else float("nan"), truth="ab"[i % 2] if ground_truth else "",
                boxes=np.array([[2, 3, 20, 30]] if found else [[0, 0, size + 8, size]]), crop_rows=[i],
                crop_clusters=[i % 2 if found else -1], crop_weights=[1.0], anomaly=found, mebin_mask=mebin_mask,
                map_u8=map_u8, true_mask=str(tmp_path / "data" / f"img{i}_mask.png") if ground_truth else "",
                regions=np.array([[6, 5, 16, 18]] if found else [[0, 0, 0, 0]]),
            )
        )
    metrics = {
        "ground_truth": ground_truth,
        "no_anomaly": {"images": len(no_anomaly), "fraction": len(no_anomaly) / n, "per_type": {}},
        "clusters": {"0": {"size": 3, "mean_confidence": 0.6}, "1": {"size": 3, "mean_confidence": 0.7}, "2": {"size": 0, "mean_confidence": None}},
    }
    if ground_truth:
        metrics.update(
            image={"n": n, "nmi": 1.0, "ari": 1.0, "f1": 1.0}, crop={"n": n, "nmi": 1.0, "ari": 1.0, "f1": 1.0},
            per_class={"a": {"cluster": 0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3}},
        )
    seq = np.array([5, 4, 3, 2, 2, 2, 2, 1, 1, 0])
    return ReportData(
        title="demo run", n_clusters=3, images=images,
        metrics=metrics, names={0: "a", 1: "b"} if ground_truth else {},
        confusion=(["a", "b"], [0, 1], np.array([[3, 0], [0, 3]])) if ground_truth else None,
        mebin=[MebinEntry(id=images[0].id, thresholds=np.arange(200, 0, -20), counts=seq, chosen=120)],
        detect={"method": "patchcore", "backbone": "filterbank", "weights": "none", "image_auroc": 0.9, "aupro": 0.8},
        mebin_metrics={"erosion": "keep_thin", "images_without_anomaly": len(no_anomaly), "gt_regions_found": 0.95},
        num_classes={"num_classes": 4, "estimate": 4, "auto": True, "auto_max": 4, "largest_k": 4, "method": "bic", "crops": 6,
                     "scores": {"k1": 1.0, "k2": 3.0, "k3": 3.5, "k4": 4.0}},
        curves={"loss": (np.arange(5), np.linspace(3, 1, 5)), "lr": (np.arange(5), np.geomspace(1e-2, 1e-4, 5))},
        params={"mebin": {"erosion": "keep_thin", "padding": 0.1}, "train": {"epochs": 5}},
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


def test_every_image_of_the_report_resolves_to_a_real_image_file(tmp_path):
    out = tmp_path / "reports"
    write_report(out, _run(tmp_path, no_anomaly=(3,)))
    parser = _Links()
    parser.feed((out / "index.html").read_text())
    images = [r for r in parser.refs if r.endswith((".png", ".jpg"))]
    assert {"charts/num_classes.png", "charts/training.png"} <= set(images)
    assert len([r for r in images if r.startswith("img/")]) == 6  # one gallery entry per image
    for ref in images:
        img = cv2.imread(str(out / ref))
        assert img is not None and min(img.shape[:2]) >= 32, ref


def test_images_without_anomaly_have_their_own_section_and_no_class(tmp_path):
    out = tmp_path / "reports"
    write_report(out, _run(tmp_path, no_anomaly=(3,)))
    page = (out / "index.html").read_text()
    section = page[page.index("id='no-anomaly'") :]
    assert "no anomaly found: 1 images" in section and "alt='tile/test/b/003'" in section
    assert page.count("alt='tile/test/b/003'") == 1  # not in class 1's gallery as well
    assert "class 1 (b): 2 images" in page
    assert "MEBin found no anomaly in 1 of 6 images" in page  # the warning at the top


def test_the_page_opens_with_the_summary_then_the_galleries_and_folds_the_research_below(tmp_path):
    out = tmp_path / "reports"
    write_report(out, _run(tmp_path, no_anomaly=(3,)))
    page = (out / "index.html").read_text()
    order = ["id='summary'", "id='review'", "What to do next", "class='legend'", "class='warn'", "id='class-0'",
             "id='no-anomaly'", "id='research'", "<details>", "<h2>Results</h2>", "Confusion matrix", "id='params'"]
    assert [page.index(s) for s in order] == sorted(page.index(s) for s in order)


def test_the_summary_gives_the_types_their_counts_examples_and_the_images_to_review(tmp_path):
    out = tmp_path / "reports"
    write_report(out, _run(tmp_path, no_anomaly=(3,)))
    page = (out / "index.html").read_text()
    summary = page[page.index("id='summary'") : page.index("class='legend'")]
    assert "<b>2 defect types</b> found in 6 images; no anomaly found in <a href='#no-anomaly'>1 images</a>" in summary
    # one row per type with its images and share, named by its matched true type
    assert "<a href='#class-0'>class 0 (a)</a></th><td>3</td><td>50 %</td>" in summary
    assert "<a href='#class-1'>class 1 (b)</a></th><td>2</td><td>33 %</td>" in summary
    # a strip per type, most confident first, with large thumbnails cut around the defect
    strip_a = summary[summary.index("class 0 (a)</a>: 3 images") : summary.index("class 1 (b)</a>: 2 images")]
    assert [a for a in ("tile/test/a/004", "tile/test/a/002", "tile/test/a/000") if f"alt='{a}'" in strip_a] == [
        "tile/test/a/004", "tile/test/a/002", "tile/test/a/000"]
    assert strip_a.index("alt='tile/test/a/004'") < strip_a.index("alt='tile/test/a/000'")
    img = cv2.imread(str(out / "strip" / "00000.png"))
    assert img.shape[:2] == (STRIP_SIZE, STRIP_SIZE) and STRIP_SIZE >= 200
    # the least certain images first, with their class and confidence
    review = summary[summary.index("id='review'") : summary.index("What to do next")]
    assert review.index("alt='tile/test/a/000'") < review.index("alt='tile/test/b/001'") < review.index("alt='tile/test/a/002'")
    assert "class 0 (a), 0.50" in review
    nxt = summary[summary.index("What to do next") :]
    assert "dvc exp run -S train.num_classes=4" in nxt and "href='#no-anomaly'" in nxt and "anomalyncd predict --run ." in nxt


def test_the_summary_thumbnail_is_cut_around_the_defect_box_not_the_context_crop():
    image = np.zeros((300, 500, 3), np.uint8)
    image[100:125, 200:260] = 255  # a 60 x 25 px hole
    assert around_box((200, 100, 260, 125), image.shape) == (170, 52, 290, 172)  # 60 px grown by half on each side, centred
    assert around_box((480, 290, 500, 300), image.shape) == (460, 260, 500, 300)  # 40 px, moved inside at the corner
    t = defect_thumbnail(image, (200, 100, 260, 125), size=240)
    assert t.shape == (240, 240, 3)
    white = (t > 200).all(-1)
    assert 0.08 < white.mean() < 0.2  # the hole fills about an eighth of the thumbnail, not a speck
    assert (np.abs(t.astype(int) - BOX_COLOR).sum(-1) < 60).any()  # the defect's box drawn


def test_captions_wrap_only_between_the_parts_of_an_id(tmp_path):
    data = _run(tmp_path)
    data.images[0].id = "tile/test/a/exp1_num_123456"
    write_report(tmp_path / "r", data)
    page = (tmp_path / "r" / "index.html").read_text()
    assert "<figcaption>tile/<wbr>test/<wbr>a/<wbr>exp1_<wbr>num_<wbr>123456 0.50<br>" in page  # gallery
    assert "<figcaption>tile/<wbr>test/<wbr>a/<wbr>exp1_<wbr>num_<wbr>123456<br>0.50</figcaption>" in page  # summary
    assert "word-break: break-all" not in page  # which would cut 123456 anywhere


def test_report_shows_detection_mebin_estimate_and_parameters(tmp_path):
    out = tmp_path / "reports"
    write_report(out, _run(tmp_path))
    page = (out / "index.html").read_text()
    assert "image AUROC" in page and "0.900" in page and "AUPRO" in page
    assert "true regions found (at least half inside the crops)" in page
    assert "estimated K = 4 (bic over 6 region crops" in page
    assert "the estimate 4 is the largest number considered (train.auto_max=4)" in page  # the warning
    assert "id='params'" in page and "keep_thin" in page


def test_report_top_warns_when_the_estimate_is_uncertain(tmp_path):
    data = _run(tmp_path)
    data.num_classes = {**data.num_classes, "method": "null_stability", "auto_max": 10, "largest_k": 10,
                        "runner_up": 5, "confidence": 0.3}
    write_report(tmp_path / "reports", data)
    page = (tmp_path / "reports" / "index.html").read_text()
    assert "estimated K = 4, runner-up 5, confidence 0.30 (null_stability over 6 region crops" in page
    top = page[page.index("id='summary'"):page.index("<table class='num'>")]  # the summary's first lines
    assert "estimated from the images: 4 (runner-up 5, confidence 0.30)" in top
    assert "the estimate 4 is uncertain: 30 % of the resamplings agree, the runner-up is 5" in top


def test_region_panels_outline_both_masks_and_overlay_the_map():
    image = np.full((40, 40, 3), 128, np.uint8)
    mebin_mask = np.zeros((40, 40), bool)
    mebin_mask[10:20, 10:20] = True
    true_mask = np.zeros((40, 40), bool)
    true_mask[22:30, 22:30] = True
    map_u8 = np.zeros((20, 20), np.uint8)
    map_u8[5:10, 5:10] = 255  # hot where MEBin's mask is
    p = region_panels(image, (0, 0, 40, 40), mebin_mask, true_mask, map_u8, size=80)
    assert p.shape == (80, 2 * 80 + 4, 3)
    left, right = p[:, :80].astype(int), p[:, 84:].astype(int)
    assert (np.abs(left - MEBIN_COLOR).sum(-1) < 60).any() and (np.abs(left - TRUE_COLOR).sum(-1) < 60).any()
    assert (left[2, 2] == 128).all()  # outside both masks: the image itself
    assert right[30, 30, 0] > right[30, 30, 2] and right[70, 70, 2] > right[70, 70, 0]  # red hot spot, blue elsewhere


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
    return json.loads((tmp_path / "metrics" / "evaluate_detail.json").read_text())


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
    # the DVC metric holds the headline only: no per-class column in dvc exp show
    head = __import__("json").loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert head == {"ground_truth": True, "n_images": 6, "n_clusters": 3, "no_anomaly": {"images": 0},
                    "image": {k: m["image"][k] for k in ("nmi", "ari", "f1")}, "crop": {k: m["crop"][k] for k in ("nmi", "ari", "f1")},
                    "baseline": {"image": {k: m["baseline"]["image"][k] for k in ("nmi", "ari", "f1")}},
                    # without curation (no classes.yaml) the curated classes are the clusters
                    "curated": {"n_classes": 3, "rejected_images": 0, "image": {k: m["image"][k] for k in ("nmi", "ari", "f1")}}}
    with open(tmp_path / "plots" / "confusion.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {r["actual"] for r in rows} == {"crack", "hole", "stain"}
    assert _links_resolve(tmp_path / "reports")
    assert len(list((tmp_path / "reports" / "mebin").iterdir())) == 2


def test_evaluate_counts_no_anomaly_images_apart_and_as_wrong(tmp_path, monkeypatch):
    import csv

    m = _evaluate(tmp_path, monkeypatch, no_anomaly=(0, 4))  # a crack and a stain without anomaly
    assert m["no_anomaly"] == {"images": 2, "fraction": 2 / 6, "per_type": {"crack": 1, "stain": 1}}
    assert m["clusters"]["-1"]["size"] == 2 and m["clusters"]["-1"]["mean_confidence"] is None
    assert sum(v["size"] for k, v in m["clusters"].items() if k != "-1") == 4
    with open(tmp_path / "data" / "merge" / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows].count("no anomaly found") == 2
    assert m["image"]["f1"] <= 4 / 6  # the two images count as wrong
    page = (tmp_path / "reports" / "index.html").read_text()
    assert "id='no-anomaly'" in page and "no anomaly found: 2 images" in page
    assert _links_resolve(tmp_path / "reports")


def test_evaluate_reads_merges_store_not_its_tables(tmp_path, monkeypatch):
    """predictions.csv and crops.csv are for people: evaluate gets the classes, K and the merge
    settings from data/merge/merged.zarr.zip, and refuses a store of other crops."""
    from pathlib import Path

    from anomalyncd import paths
    from anomalyncd.io import InputError
    from anomalyncd.store import read_merged, write_merged
    from stages import evaluate, merge

    from .synthetic_run import make_project

    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    merge.main(params=Path("params.yaml"))
    paths.PREDICTIONS.unlink()
    paths.CROP_PREDICTIONS.unlink()
    (tmp_path / "params.yaml").write_text("merge:\n  strategy: mean\nevaluate:\n  report_images: 4\n")
    evaluate.main(params=Path("params.yaml"))
    m = __import__("json").loads((tmp_path / "metrics" / "evaluate_detail.json").read_text())
    assert m["n_images"] == 6 and set(m["clusters"]) == {"0", "1", "2"}
    ms = read_merged(paths.MERGED)
    ms.crop_clusters, ms.crop_confidence, ms.weights = ms.crop_clusters[:-1], ms.crop_confidence[:-1], ms.weights[:-1]
    write_merged(paths.MERGED, ms)
    with pytest.raises(InputError, match="merged.zarr.zip: images or crops differ from .*crops.zarr.zip; rerun merge"):
        evaluate.main(params=Path("params.yaml"))


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
    m = json.loads(Path("metrics/evaluate_detail.json").read_text())
    assert set(m["baseline"]["image"]) == {"n", "nmi", "ari", "f1"}
    assert m["baseline"]["crop"]["nmi"] == pytest.approx(1.0) and m["baseline"]["image"]["f1"] == pytest.approx(1.0)
    # the mean over evaluate.BASELINE_SEEDS k-means seeds; separable features: no spread
    assert m["baseline"]["kmeans_seeds"] == evaluate.BASELINE_SEEDS
    assert m["baseline"]["spread"]["image"]["nmi"] == pytest.approx(0.0, abs=1e-9)
