import collections
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomalyncd.config import DatasetParams, DemoParams
from anomalyncd.datasets import READERS, Manifest, build_manifest, read_dataset
from anomalyncd.demo import DEFECTS, generate
from anomalyncd.io import InputError, InputWarning

from .conftest import MTD, requires_mtd


def _manifest(layout, root, **kw):
    return build_manifest(read_dataset(DatasetParams(layout=layout, root=str(root), **kw)), progress=False)


def test_registry_has_the_three_layouts():
    assert {"mvtec", "mtd", "folder"} <= set(READERS)


def test_mvtec_reader_finds_train_test_and_masks(tiny_demo):
    m = _manifest("mvtec", tiny_demo)
    splits = collections.Counter((r.split, r.defect_type) for r in m.records)
    assert splits[("train", "good")] == 6 and splits[("test", "good")] == 2
    assert all(splits[("test", t)] == 3 for t in DEFECTS)
    defects = [r for r in m.records if r.split == "test" and not r.is_normal]
    assert all(r.mask.endswith("_mask.png") for r in defects)
    assert all((r.height, r.width) == (64, 64) for r in m.records)
    assert defects[0].id == "tile/test/crack/000"


def test_images_to_classify_are_the_defect_test_images_unless_normal_is_included(tiny_demo):
    m = _manifest("mvtec", tiny_demo)
    assert len(m.to_classify()) == 12
    assert len(m.to_classify(include_normal=True)) == 14


def test_manifest_round_trips_through_csv(tiny_demo, tmp_path):
    m = _manifest("mvtec", tiny_demo)
    m.write(tmp_path / "manifest.csv")
    assert Manifest.read(tmp_path / "manifest.csv").records == m.records


def _to_16_bit(root, top):
    """Every image of the demo under ``root`` saved again as 16-bit PNG on ``[0, top]``."""
    for f in root.rglob("*.png"):
        if "ground_truth" not in f.parts:
            img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
            cv2.imwrite(str(f), np.round(img * (top / 255)).astype(np.uint16))


def test_a_set_of_12_bit_images_in_16_bit_files_is_read_on_their_range_by_every_stage(tiny_demo, tmp_path):
    eight = _manifest("mvtec", tiny_demo)
    assert {r.bits for r in eight.records} == {16}
    eight.write(tmp_path / "eight.csv")
    assert "bits" not in (tmp_path / "eight.csv").read_text().splitlines()[0]  # an 8-bit set's manifest as before
    before = [r.read() for r in eight.records]
    _to_16_bit(tiny_demo, 4095)
    m = _manifest("mvtec", tiny_demo)
    assert {r.bits for r in m.records} == {12}
    m.write(tmp_path / "manifest.csv")
    assert Manifest.read(tmp_path / "manifest.csv").records == m.records
    for r, img in zip(m.records, before):  # the stages read the same pixels as from the 8-bit files
        np.testing.assert_array_equal(r.read(), img)


def test_a_manifest_with_bits_outside_the_camera_depths_is_damaged(tiny_demo, tmp_path):
    m = _manifest("mvtec", tiny_demo)
    m.write(tmp_path / "manifest.csv")
    lines = (tmp_path / "manifest.csv").read_text().splitlines()
    (tmp_path / "manifest.csv").write_text("\n".join([lines[0] + ",bits"] + [line + ",11" for line in lines[1:]]) + "\n")
    with pytest.raises(InputError, match=r"manifest.csv: damaged \(line 2: bits '11'"):
        Manifest.read(tmp_path / "manifest.csv")


def test_unknown_category_is_an_error(tiny_demo):
    with pytest.raises(InputError, match=r"categories \['wood'\] not found"):
        _manifest("mvtec", tiny_demo, categories=["wood"])


def test_mask_of_another_size_names_the_mask(tiny_demo):
    mask = tiny_demo / "tile/ground_truth/hole/001_mask.png"
    cv2.imwrite(str(mask), np.zeros((10, 10), np.uint8))
    with pytest.raises(InputError, match="001_mask.png: mask is 10x10 but its image is 64x64"):
        _manifest("mvtec", tiny_demo)


def test_unreadable_image_names_the_file(tiny_demo):
    (tiny_demo / "tile/test/hole/001.png").write_bytes(b"garbage")
    with pytest.raises(InputError, match="hole/001.png: cannot read this image"):
        _manifest("mvtec", tiny_demo)


def test_a_folder_layout_takes_known_good_images_from_normal_root_for_the_detector(tiny_demo):
    root = tiny_demo / "tile" / "test"
    shutil.copytree(tiny_demo / "tile" / "train" / "good", root / "known_good")  # inside root: tracked with it
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        m = _manifest("folder", root, normal_root=str(root / "known_good"))
    assert len(m.train_normal()) == 6 and all(r.is_normal for r in m.train_normal())
    assert m.train_normal()[0].id == "test/train/good/000"
    # the known-good images are not classified; every other image is
    assert len(m.to_classify()) == 14 and not any("known_good" in r.image for r in m.to_classify())


def test_normal_root_outside_root_is_taken_with_a_warning_and_a_missing_one_is_an_error(tiny_demo):
    root = tiny_demo / "tile" / "test"
    with pytest.warns(InputWarning, match="outside dataset.root"):
        m = _manifest("folder", root, normal_root=str(tiny_demo / "tile" / "train" / "good"))
    assert len(m.train_normal()) == 6
    with pytest.raises(InputError, match="nope: dataset.normal_root folder not found"):
        _manifest("folder", root, normal_root=str(tiny_demo / "nope"))
    with pytest.raises(InputError, match="dataset.normal_root is for dataset.layout folder"):
        _manifest("mvtec", tiny_demo, normal_root=str(tiny_demo / "tile" / "train" / "good"))


def test_a_truncated_jpeg_is_refused_naming_the_file(tiny_demo):
    folder = tiny_demo / "tile" / "test"
    img = cv2.imread(str(folder / "hole" / "001.png"))
    jpg = folder / "hole" / "extra.jpg"
    cv2.imwrite(str(jpg), img)
    jpg.write_bytes(jpg.read_bytes()[:-200])
    with pytest.raises(InputError, match="hole/extra.jpg: truncated JPEG"):
        _manifest("folder", folder)


def test_soft_masks_are_named_in_one_warning_and_cut_at_half_their_peak(tiny_demo):
    gt = tiny_demo / "tile" / "ground_truth"
    soft = [gt / "crack" / "000_mask.png", gt / "hole" / "002_mask.png"]
    for f in soft:
        cv2.imwrite(str(f), cv2.GaussianBlur(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (0, 0), 3))
    with pytest.warns(InputWarning) as caught:
        _manifest("mvtec", tiny_demo)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert all(str(f) in message for f in soft) and "2 of 12 masks are not binary" in message


def test_binary_masks_give_no_warning(tiny_demo):
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        _manifest("mvtec", tiny_demo)


def test_missing_mask_names_the_image_and_the_expected_mask(tiny_demo):
    (tiny_demo / "tile/ground_truth/crack/002_mask.png").unlink()
    with pytest.raises(InputError, match="crack/002.png: no mask at .*002_mask.png"):
        _manifest("mvtec", tiny_demo)


def test_empty_defect_folder_is_an_error(tiny_demo):
    (tiny_demo / "tile/test/empty").mkdir()
    with pytest.raises(InputError, match="empty: folder has no images"):
        _manifest("mvtec", tiny_demo)


def test_wrong_layout_for_the_folder_is_an_error(tiny_demo):
    with pytest.raises(InputError, match="no MT_<Type> folders"):
        _manifest("mtd", tiny_demo)
    with pytest.raises(InputError, match="no MVTec categories"):
        _manifest("mvtec", tiny_demo / "tile" / "test")


def test_a_root_that_is_one_mvtec_category_is_an_error_naming_the_settings_that_read_it(tiny_demo):
    category = tiny_demo / "tile"
    with pytest.raises(InputError, match=rf"is one MVTec category .*dataset.root={tiny_demo} and dataset.categories=\[tile\]"):
        _manifest("mvtec", category)
    # and those settings read it
    assert len(_manifest("mvtec", tiny_demo, categories=["tile"]).records) > 0


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(InputError, match="dataset folder not found"):
        _manifest("mvtec", tmp_path / "nope")


def test_folder_reader_classifies_every_image_without_labels(tiny_demo):
    m = _manifest("folder", tiny_demo / "tile" / "test")
    assert len(m.records) == 14
    assert all(r.split == "test" and r.defect_type == "" and r.mask == "" for r in m.records)
    assert not m.has_ground_truth
    assert len(m.to_classify()) == 14


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(InputError, match="no images found"):
        _manifest("folder", tmp_path / "x")


def test_demo_is_deterministic(tmp_path):
    p = DemoParams(image_size=32, n_train=1, n_test_normal=0, n_per_type=1)
    generate(tmp_path / "a", p)
    generate(tmp_path / "b", p)
    for f in sorted((tmp_path / "a").rglob("*.png")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()


def test_every_demo_defect_image_has_a_non_empty_mask(tiny_demo):
    for mask in (tiny_demo / "tile" / "ground_truth").rglob("*_mask.png"):
        assert cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE).max() == 255


@requires_mtd()
def test_mtd_reader_finds_the_published_split():
    with pytest.warns(InputWarning, match="388 of 392 masks are not binary"):  # anti-aliased edges
        m = _manifest("mtd", MTD)
    counts = collections.Counter((r.split, r.defect_type) for r in m.records)
    assert counts[("train", "good")] == 761
    assert counts[("test", "good")] == 191
    defects = m.to_classify()
    assert len(defects) == 392
    assert collections.Counter(r.defect_type for r in defects) == {
        "blowhole": 115, "uneven": 103, "break": 85, "crack": 57, "fray": 32,
    }


@requires_mtd()
def test_mtd_rearranged_in_mvtec_layout_is_read_as_the_same_images_masks_and_split(tmp_path):
    # A user who copies MTD into MVTec's folders (train/good from the training list, test/<type>,
    # ground_truth/<type>/<name>_mask.png) gets the run of dataset.layout: mtd.
    train = set((MTD / "mtd_train_filenames.txt").read_text().split())
    base = tmp_path / "mtd"
    for folder in sorted(MTD.glob("MT_*")):
        kind = folder.name[3:].lower()
        for img in sorted((folder / "Imgs").glob("*.jpg")):
            if kind == "free":
                dst = base / ("train" if img.name in train else "test") / "good" / img.name
            else:
                dst = base / "test" / kind / img.name
                m = base / "ground_truth" / kind / f"{img.stem}_mask.png"
                m.parent.mkdir(parents=True, exist_ok=True)
                m.symlink_to(img.with_suffix(".png"))
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(img)

    def key(records):
        return sorted((r.id, r.defect_type, r.split, r.category, Path(r.image).resolve(), r.mask and Path(r.mask).resolve())
                      for r in records)

    mtd = read_dataset(DatasetParams(layout="mtd", root=str(MTD)))
    mvtec = read_dataset(DatasetParams(layout="mvtec", root=str(tmp_path)))
    assert len(mtd) == 1344
    assert key(mvtec) == key(mtd)


@requires_mtd()
def test_mtd_reader_needs_the_training_list(tmp_path):
    shutil.copytree(MTD / "MT_Fray", tmp_path / "MT_Fray")
    with pytest.raises(InputError, match="mtd_train_filenames.txt: normal training list not found"):
        _manifest("mtd", tmp_path)


def test_all_black_and_all_white_defect_masks_are_named_in_a_warning(tiny_demo):
    gt = tiny_demo / "tile" / "ground_truth"
    black, white = gt / "crack" / "001_mask.png", gt / "stain" / "002_mask.png"
    cv2.imwrite(str(black), np.zeros((64, 64), np.uint8))
    cv2.imwrite(str(white), np.full((64, 64), 255, np.uint8))
    with pytest.warns(InputWarning) as caught:
        _manifest("mvtec", tiny_demo)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert messages[0].startswith(f"{black}: 1 mask(s) of defect images are all black (they mark no defect pixel)")
    assert messages[1].startswith(f"{white}: 1 mask(s) of defect images are all white (they mark the whole image")


@pytest.mark.parametrize("layout, which", [("mvtec", "image"), ("mvtec", "mask"), ("folder", "image")])
def test_a_dangling_symlink_in_the_data_set_is_an_error_naming_it(tiny_demo, layout, which):
    f = tiny_demo / "tile" / ("test/crack/001.png" if which == "image" else "ground_truth/crack/001_mask.png")
    f.unlink()
    f.symlink_to(tiny_demo / "gone.png")
    with pytest.raises(InputError, match=rf"{f}: broken symbolic link \(to .*gone.png, which does not exist\); fix or remove it"):
        _manifest(layout, tiny_demo)
