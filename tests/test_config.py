import pytest

from anomalyncd.config import DatasetParams, MebinParams, from_dict, load_params
from anomalyncd.io import InputError


def test_missing_keys_keep_their_defaults():
    p = from_dict(MebinParams, {"sample_rate": 8})
    assert p.sample_rate == 8 and p.min_interval_len == MebinParams().min_interval_len


def test_unknown_key_is_an_error_that_lists_known_keys():
    with pytest.raises(InputError, match="unknown key.*sample_rat"):
        from_dict(MebinParams, {"sample_rat": 8})


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(InputError, match=r"mebin\.padding.*number"):
        from_dict(MebinParams, {"padding": "yes"}, where="mebin")


def test_literal_values_are_checked():
    with pytest.raises(InputError, match="not one of"):
        from_dict(DatasetParams, {"layout": "coco"})


def test_integers_are_accepted_for_float_fields():
    assert from_dict(MebinParams, {"padding": 0}).padding == 0.0


def test_load_params_reads_one_section(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("mebin:\n  sample_rate: 2\nother: {x: 1}\n")
    assert load_params("mebin", f).sample_rate == 2


def test_load_params_names_a_missing_file(tmp_path):
    with pytest.raises(InputError, match="params file not found"):
        load_params("mebin", tmp_path / "nope.yaml")
