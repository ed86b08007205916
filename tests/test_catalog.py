"""The defect catalog (classes.yaml): what each discovered cluster becomes, and one clear
`error: classes.yaml: <key> ...` line for every kind of bad file."""

from pathlib import Path

import numpy as np
import pytest

from anomalyncd.catalog import (
    REJECTED,
    REJECTED_ID,
    Catalog,
    Entry,
    class_names,
    cluster_names,
    curated_labels,
    dump_catalog,
    from_attrs,
    load_catalog,
    parse_catalog,
    resolve,
    save_catalog,
    to_attrs,
)
from anomalyncd.io import InputError

MATCHED = {0: "crack", 1: "hole", 2: "stain"}


def test_without_a_catalog_every_cluster_is_its_own_class_named_by_its_matched_type(tmp_path):
    cat = load_catalog(tmp_path / "classes.yaml")  # no file: no curation
    assert cat.entries == {}
    classes = resolve(cat, 4, MATCHED)
    assert [c.name for c in classes] == ["crack", "hole", "stain", "cluster 3"]
    assert [c.root for c in classes] == [0, 1, 2, 3] and not any(c.rejected for c in classes)


def test_names_merges_and_rejections_resolve_each_cluster_to_its_curated_class():
    cat = parse_catalog("0: {name: fissure}\n3: {same_as: 0}\n1: {reject: true}\n4: {same_as: 1}\n")
    classes = resolve(cat, 5, MATCHED)
    assert cluster_names(classes) == {0: "fissure", 1: REJECTED, 2: "stain", 3: "fissure", 4: REJECTED}
    assert [c.label for c in classes] == [0, REJECTED_ID, 2, 0, REJECTED_ID]
    assert class_names(classes) == {REJECTED_ID: REJECTED, 0: "fissure", 2: "stain"}
    # images: a merged cluster's images join its class, -1 (no anomaly found) stays -1
    assert curated_labels(classes, np.array([3, 4, 2, -1, 0])).tolist() == [0, REJECTED_ID, 2, -1, 0]
    assert classes[3].matched is None and classes[0].matched == "crack"


def test_a_chain_of_merges_ends_at_one_class():
    classes = resolve(parse_catalog("2: {same_as: 1}\n1: {same_as: 0}\n0: {name: dent}\n"), 3)
    assert [(c.root, c.name) for c in classes] == [(0, "dent"), (0, "dent"), (0, "dent")]


def test_the_resolved_catalog_round_trips_through_the_store_attrs():
    classes = resolve(parse_catalog("1: {reject: true}\n"), 3, MATCHED)
    assert from_attrs(to_attrs(classes), "x") == classes
    with pytest.raises(InputError, match="x: damaged class catalog"):
        from_attrs([{"cluster": 0}], "x")


@pytest.mark.parametrize(
    "text, message",
    [
        ("0: {name: crack\n", "classes.yaml: line 2: not valid YAML"),
        ("- 0\n", "classes.yaml: expected <cluster>: {name: ...} lines, got a list"),
        ("0: {name: a}\n0: {name: b}\n", "classes.yaml: line 2: 0 is given twice"),
        ("crack: {name: a}\n", "classes.yaml: 'crack': not a cluster id"),
        ("-1: {name: a}\n", "classes.yaml: -1: not a cluster id"),
        ("1: crack\n", "classes.yaml: 1: expected {name: <name>}, {same_as: <cluster>} or {reject: true}"),
        ("1: {nam: crack}\n", "classes.yaml: 1: unknown key(s) ['nam']"),
        ("1: {name: crack, reject: true}\n", "classes.yaml: 1: give exactly one of ['name', 'same_as', 'reject']"),
        ("1: {name: a/b}\n", "classes.yaml: 1.name: 'a/b' cannot name a class"),
        ("1: {name: ''}\n", "classes.yaml: 1.name: '' cannot name a class"),
        ("1: {name: Not a defect}\n", "classes.yaml: 1.name: 'Not a defect' is reserved"),
        ("1: {reject: false}\n", "classes.yaml: 1.reject: expected true"),
        ("1: {same_as: x}\n", "classes.yaml: 1.same_as: expected a cluster id"),
        ("1: {same_as: 1}\n", "classes.yaml: 1.same_as: merged into itself"),
        ("1: {same_as: 2}\n2: {same_as: 1}\n", "classes.yaml: 2.same_as: merge cycle 1 -> 2 -> 1"),
        ("1: {name: crack}\n2: {name: Crack}\n", "classes.yaml: 2.name: 'Crack' is also the name of cluster 1"),
    ],
)
def test_a_bad_catalog_is_one_error_naming_the_file_and_the_key(text, message):
    with pytest.raises(InputError) as e:
        parse_catalog(text)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("7: {name: a}\n", "classes.yaml: 7: cluster 7 does not exist (the run has clusters 0..3)"),
        ("1: {same_as: 9}\n", "classes.yaml: 1.same_as: cluster 9 does not exist"),
        # the name cluster 0 has by its matched type, given to another cluster
        ("3: {name: crack}\n", "classes.yaml: 3.name: 'crack' is the name cluster 0 has by its matched true type"),
    ],
)
def test_a_catalog_that_does_not_fit_the_run_is_an_error(text, message):
    with pytest.raises(InputError) as e:
        resolve(parse_catalog(text), 4, MATCHED)
    assert str(e.value).startswith(message), str(e.value)


def test_naming_a_cluster_like_another_s_matched_type_is_fine_once_they_are_merged():
    classes = resolve(parse_catalog("3: {name: crack}\n0: {same_as: 3}\n"), 4, MATCHED)
    assert cluster_names(classes)[0] == cluster_names(classes)[3] == "crack"


def test_edits_are_checked_and_saved_atomically_with_a_header(tmp_path):
    path = tmp_path / "classes.yaml"
    cat = Catalog(where=str(path)).set(3, Entry(name="crack")).set(4, Entry(same_as=3)).set(1, Entry(reject=True))
    with pytest.raises(InputError, match="merge cycle"):
        cat.set(3, Entry(same_as=4))
    save_catalog(cat, path)
    text = path.read_text()
    assert text.startswith("# The defect catalog")
    assert text.splitlines()[-3:] == ["1: {reject: true}", "3: {name: crack}", "4: {same_as: 3}"]
    assert load_catalog(path) == cat
    assert [p.name for p in tmp_path.iterdir()] == ["classes.yaml"]  # no temporary left
    assert load_catalog(path).set(4, None).entries == {1: Entry(reject=True), 3: Entry(name="crack")}


def test_names_with_spaces_and_quotes_survive_a_save(tmp_path):
    cat = Catalog().set(0, Entry(name="scratch: deep")).set(1, Entry(name="'odd' one"))
    assert parse_catalog(dump_catalog(cat)) == cat


def test_the_project_ships_an_empty_catalog():
    root = Path(__file__).resolve().parents[1]
    assert load_catalog(root / "classes.yaml").entries == {}
