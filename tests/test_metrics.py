import numpy as np
import pytest
from sklearn.metrics import (
    adjusted_rand_score,
    f1_score,
    normalized_mutual_info_score,
    precision_score,
    recall_score,
)

from anomalyncd.metrics import (
    cluster_summary,
    contingency,
    evaluate_predictions,
    hungarian_match,
    mean_scores,
    score_clustering,
)


def _random_case(seed, n=200, n_classes=4, n_clusters=5):
    rng = np.random.default_rng(seed)
    names = np.array(["crack", "hole", "scratch", "stain", "blowhole"][:n_classes])
    y_true = names[rng.integers(0, n_classes, n)]
    # predictions correlated with the truth, under a random permutation of cluster ids
    noise = rng.integers(0, n_clusters, n)
    agree = rng.random(n) < 0.6
    perm = rng.permutation(n_clusters)
    truth_idx = np.array([list(names).index(t) for t in y_true])
    y_pred = np.where(agree, perm[truth_idx % n_clusters], noise)
    return y_true.tolist(), y_pred.tolist()


def test_contingency_counts_pairs():
    ct = contingency(["a", "a", "b", "b", "b"], [1, 0, 0, 0, 2])
    assert ct.classes == ["a", "b"] and ct.clusters == [0, 1, 2]
    assert ct.table.tolist() == [[1, 1, 0], [2, 0, 1]]


def test_hungarian_beats_greedy_on_hand_case():
    # Greedy takes 5 then is left with 0 (total 5); the optimum pairs the two 4s (total 8).
    assert hungarian_match(np.array([[5, 4], [4, 0]])) == [(0, 1), (1, 0)]


def test_hungarian_with_more_clusters_than_classes():
    table = np.array([[0, 3, 9], [7, 8, 0]])
    # 9 + 8 = 17 beats 9 + 7; the third cluster stays unmatched
    assert hungarian_match(table) == [(0, 2), (1, 1)]


def test_hungarian_with_more_classes_than_clusters():
    table = np.array([[2, 1], [6, 0], [1, 5]])
    assert hungarian_match(table) == [(1, 0), (2, 1)]


def test_hand_computed_f1_and_per_class():
    # truth: a a a b b c ; clusters: 7 7 3 3 3 3
    # table rows a,b,c / cols 3,7: a=[1,2], b=[2,0], c=[1,0] -> match 7->a, 3->b
    s = score_clustering(list("aaabbc"), [7, 7, 3, 3, 3, 3])
    assert s.matching == {7: "a", 3: "b"}
    assert s.f1 == pytest.approx(4 / 6)
    assert s.per_class["a"] == {"cluster": 7, "precision": 1.0, "recall": pytest.approx(2 / 3),
                                "f1": pytest.approx(0.8), "support": 3}
    assert s.per_class["b"]["precision"] == pytest.approx(0.5) and s.per_class["b"]["recall"] == 1.0
    assert s.per_class["c"] == {"cluster": None, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_perfect_clustering_under_relabelling_scores_one():
    s = score_clustering(["x", "y", "z", "x", "y"], [2, 0, 1, 2, 0])
    assert (s.nmi, s.ari, s.f1) == (pytest.approx(1.0), pytest.approx(1.0), 1.0)
    assert s.matching == {2: "x", 0: "y", 1: "z"}


@pytest.mark.parametrize("seed,n_classes,n_clusters", [(0, 4, 4), (1, 4, 6), (2, 5, 3)])
def test_scores_agree_with_sklearn(seed, n_classes, n_clusters):
    y_true, y_pred = _random_case(seed, n_classes=n_classes, n_clusters=n_clusters)
    s = score_clustering(y_true, y_pred)
    assert s.nmi == pytest.approx(normalized_mutual_info_score(y_true, y_pred))
    assert s.ari == pytest.approx(adjusted_rand_score(y_true, y_pred))
    mapped = [s.matching.get(q, f"unmatched-{q}") for q in y_pred]
    assert s.f1 == pytest.approx(f1_score(y_true, mapped, average="micro"))
    labels = s.classes
    prec = precision_score(y_true, mapped, labels=labels, average=None, zero_division=0)
    rec = recall_score(y_true, mapped, labels=labels, average=None, zero_division=0)
    for name, p, r in zip(labels, prec, rec):
        assert s.per_class[name]["precision"] == pytest.approx(p)
        assert s.per_class[name]["recall"] == pytest.approx(r)


def test_matching_is_optimal_among_all_permutations():
    from itertools import permutations

    y_true, y_pred = _random_case(3, n=60, n_classes=4, n_clusters=4)
    s = score_clustering(y_true, y_pred)
    classes = sorted(set(y_true))
    best = max(
        sum(t == dict(zip(range(4), perm)).get(q) for t, q in zip(y_true, y_pred))
        for perm in permutations(classes)
    )
    assert s.f1 == pytest.approx(best / len(y_true))


def test_missing_predictions_count_as_errors_and_are_never_matched():
    s = score_clustering(["a", "a", "b", "b"], [0, -1, -1, -1])
    assert -1 not in s.matching
    assert s.f1 == pytest.approx(0.25)
    assert s.per_class["b"]["cluster"] is None


def test_confusion_puts_matched_clusters_on_the_diagonal():
    s = score_clustering(list("aabbbc"), [5, 5, 2, 2, 9, 9])
    # matching: 5->a, 2->b, 9->c
    assert s.confusion_clusters == [5, 2, 9]
    assert np.trace(s.confusion) == 5
    assert s.confusion.sum() == 6


def test_cluster_summary_reports_sizes_and_mean_confidence():
    out = cluster_summary(np.array([0, 0, 2, -1]), np.array([0.5, 0.7, 0.9, np.nan]), 3)
    assert out[0] == {"size": 2, "mean_confidence": pytest.approx(0.6)}
    assert out[1] == {"size": 0, "mean_confidence": None}
    assert out[-1]["size"] == 1


def test_mean_scores_average_over_categories():
    m = mean_scores({"a": {"nmi": 0.2, "ari": 0.4, "f1": 0.5}, "b": {"nmi": 0.6, "ari": 0.0, "f1": 1.0}})
    assert m == {"nmi": pytest.approx(0.4), "ari": pytest.approx(0.2), "f1": pytest.approx(0.75)}


def test_evaluation_without_ground_truth_reports_clusters_only():
    ev = evaluate_predictions(["", "", ""], [0, 1, 1], [0.9, 0.6, 0.8], ["t"] * 3, ["", ""], [0, 1], ["t"] * 2, 3)
    assert ev.metrics["ground_truth"] is False and ev.image_scores is None
    assert "image" not in ev.metrics
    assert ev.metrics["clusters"]["1"] == {"size": 2, "mean_confidence": pytest.approx(0.7)}
    assert ev.metrics["clusters"]["2"]["size"] == 0


def test_evaluation_scores_images_and_crops():
    ev = evaluate_predictions(
        ["a", "a", "b"], [1, 1, 0], [0.9, 0.8, 0.7], ["t"] * 3,
        ["a", "a", "a", "b"], [1, 0, 1, 0], ["t"] * 4, 2,
    )
    m = ev.metrics
    assert m["ground_truth"] is True
    assert m["image"]["f1"] == 1.0 and m["crop"]["f1"] == pytest.approx(0.75)
    assert m["clusters"]["1"]["matched"] == "a" and m["clusters"]["0"]["matched"] == "b"
    assert "per_category" not in m


def test_images_of_unknown_type_are_left_out_of_the_scores():
    ev = evaluate_predictions(["a", "", "b"], [0, 0, 1], [1.0] * 3, ["t"] * 3, ["a", "", "b"], [0, 0, 1], ["t"] * 3, 2)
    assert ev.metrics["image"]["n"] == 2 and ev.metrics["n_unlabelled_images"] == 1
    assert ev.metrics["clusters"]["0"]["size"] == 2


def test_several_categories_get_their_own_scores_and_a_mean():
    truth = ["crack", "crack", "hole", "crack", "scratch", "scratch"]
    cats = ["tile", "tile", "tile", "wood", "wood", "wood"]
    pred = [0, 0, 1, 0, 0, 1]
    ev = evaluate_predictions(truth, pred, [1.0] * 6, cats, truth, pred, cats, 2)
    m = ev.metrics
    assert set(m["per_category"]) == {"tile", "wood"}
    assert m["per_category"]["tile"]["image"]["f1"] == 1.0
    assert m["per_category"]["wood"]["image"]["f1"] == pytest.approx(2 / 3)
    assert m["mean"]["image"]["f1"] == pytest.approx(5 / 6)
    # run-wide classes are qualified by category, so the tile crack is not the wood crack
    assert set(m["per_class"]) == {"tile/crack", "tile/hole", "wood/crack", "wood/scratch"}


def test_images_without_anomaly_are_counted_apart_and_out_of_the_class_confidences():
    # image 2 had no anomaly found: label -1, no confidence
    ev = evaluate_predictions(
        ["a", "a", "b", "b"], [0, 0, -1, 1], [0.6, 0.8, float("nan"), 0.7], ["t"] * 4,
        ["a", "a", "b", "b"], [0, 0, -1, 1], ["t"] * 4, 2, image_anomaly=[True, True, False, True],
    )
    m = ev.metrics
    assert m["no_anomaly"] == {"images": 1, "fraction": 0.25, "per_type": {"b": 1}}
    assert m["clusters"]["1"] == {"size": 1, "mean_confidence": 0.7, "matched": "b"}
    assert m["clusters"]["-1"]["size"] == 1 and m["clusters"]["-1"]["mean_confidence"] is None
    assert m["image"]["f1"] == 0.75  # counted as wrong
