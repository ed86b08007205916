import pytest
import yaml

from anomalyncd.config import SECTIONS, SMOOTHED_MAP_CORE, DatasetParams, MebinParams, from_dict, load_params
from anomalyncd.io import InputError

from .conftest import ROOT


def test_missing_keys_keep_their_defaults():
    p = from_dict(MebinParams, {"sample_rate": 8})
    assert p.sample_rate == 8 and p.min_interval_len == MebinParams().min_interval_len


def test_unknown_key_is_an_error_that_lists_known_keys():
    with pytest.raises(InputError, match="unknown key.*sample_rat"):
        from_dict(MebinParams, {"sample_rat": 8})


def test_a_key_of_an_earlier_version_says_what_replaced_it():
    from anomalyncd.config import DetectParams

    with pytest.raises(InputError, match=r"unknown key\(s\) \['score_top'\] \(score_top: replace it by score_tops"):
        from_dict(DetectParams, {"score_top": 0.01}, where="params.yaml: detect")


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
    f.write_text("mebin:\n  sample_rate: 2\nmerge: {temperature: 5.0}\n")
    assert load_params("mebin", f).sample_rate == 2


def test_load_params_names_a_missing_file(tmp_path):
    with pytest.raises(InputError, match="params file not found"):
        load_params("mebin", tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("detect", "map_size", 0),
        ("detect", "batch_size", 0),
        ("detect", "bank_size", -1),
        ("train", "batch_size", 0),
        ("train", "batch_size", 1),  # the losses compare the crops of a batch
        ("train", "n_head", 0),
        ("train", "lr", -1),
        ("train", "epochs", 0),  # would write an untrained model
        ("train", "trunk_cache_views", 1),
        ("infer", "batch_size", 0),
        ("merge", "temperature", 0),
        ("evaluate", "report_images", -1),
    ],
)
def test_values_out_of_range_are_errors_naming_the_key(tmp_path, section, key, value):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({section: {key: value}}))
    with pytest.raises(InputError) as e:
        load_params(section, f)
    message = str(e.value)
    assert message.startswith(f"params.yaml: {section}.{key} must be ") and float(message.rsplit("got ", 1)[1]) == value


def test_the_defaults_and_the_shipped_params_are_in_range():
    for section in SECTIONS:
        load_params(section, ROOT / "params.yaml")
        SECTIONS[section]()


@pytest.mark.parametrize(
    "method, sigma, core",
    [
        ("patchcore", 12.0, SMOOTHED_MAP_CORE),
        ("padim", 4.0, SMOOTHED_MAP_CORE),
        ("patchcore", 0.0, 0.0),  # unsmoothed maps: the whole region
        ("ground_truth", 12.0, 0.0),  # the masks themselves: a core would cut their edges
        ("external", 12.0, 0.0),  # imported maps: their smoothing is unknown
        ("musc", 12.0, 0.0),
    ],
)
def test_mebin_core_and_refine_auto_act_only_on_the_smoothed_maps_of_the_built_in_detectors(tmp_path, method, sigma, core):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"detect": {"method": method, "smooth_sigma": sigma}, "mebin": {"core": "auto", "refine": "auto"}}))
    assert load_params("mebin", f).core == core
    assert load_params("mebin", f).refine == ("grabcut" if core else "off")
    f.write_text(yaml.safe_dump({"detect": {"method": method, "smooth_sigma": sigma}, "mebin": {"core": 0.3}}))
    assert load_params("mebin", f).core == 0.3


def test_an_unquoted_off_is_the_word_where_a_setting_takes_it(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("detect:\n  method: patchcore\nmebin:\n  erosion: off\n  refine: off\n")  # YAML 1.1: false
    p = load_params("mebin", f)
    assert (p.erosion, p.refine) == ("off", "off")
    f.write_text("mebin:\n  fallback: off\n")  # a setting without an "off" still refuses it
    with pytest.raises(InputError, match=r"mebin.fallback: False is not one of \['own_range', 'none'\]"):
        load_params("mebin", f)


def _params(tmp_path, text: str):
    (tmp_path / "params.yaml").write_text(text)
    return tmp_path / "params.yaml"


def test_an_unknown_section_is_an_error_listing_the_known_ones(tmp_path):
    with pytest.raises(InputError, match=r"params.yaml: unknown section\(s\) \['detcet'\]; known sections: \['dataset'"):
        load_params("train", _params(tmp_path, "detcet:\n  seed: 1\n"))


@pytest.mark.parametrize(
    "text, line",
    [
        ("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n", "line 4: 'lr' is given twice \\(first on line 2\\); keep one"),
        ("train:\n  lr: 0.1\nmerge:\n  temperature: 5.0\ntrain:\n  epochs: 3\n", "line 5: 'train' is given twice"),
    ],
)
def test_a_key_or_section_given_twice_is_an_error_naming_both_lines(tmp_path, text, line):
    with pytest.raises(InputError, match=f"params.yaml: {line}"):
        load_params("train", _params(tmp_path, text))


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  lr: [0.1\n", r"params.yaml: line \d+: not valid YAML"),
        ("train:\n\tlr: 0.1\n", r"params.yaml: line 2: not valid YAML"),
        ("- train\n- detect\n", r"params.yaml: expected sections \(a mapping of section: keys\), got list"),
        ("just text\n", r"params.yaml: expected sections .*, got str"),
    ],
)
def test_a_syntax_error_or_a_file_that_is_not_a_mapping_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        load_params("train", _params(tmp_path, text))


@pytest.mark.parametrize(
    "section, key",
    [("train", "lr"), ("detect", "smooth_sigma"), ("mebin", "padding"), ("mebin", "max_merge_dist"), ("mebin", "core"), ("merge", "temperature")],
)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_floats_are_refused_everywhere(tmp_path, section, key, value):
    with pytest.raises(InputError, match=rf"{section}\.{key}: expected a finite number"):
        load_params(section, _params(tmp_path, f"{section}:\n  {key}: {value}\n"))


@pytest.mark.parametrize("section", ["demo", "detect", "mebin", "train", "evaluate"])
def test_negative_seeds_are_range_errors(tmp_path, section):
    with pytest.raises(InputError, match=rf"{section}\.seed must be >= 0, got -1"):
        load_params(section, _params(tmp_path, f"{section}:\n  seed: -1\n"))


@pytest.mark.parametrize("section", ["detect", "train", "infer"])
def test_device_names_are_checked_when_loaded(tmp_path, section):
    with pytest.raises(InputError, match=rf"{section}\.device must be auto, cpu, cuda, cuda:N or mps, got 'banana'"):
        load_params(section, _params(tmp_path, f"{section}:\n  device: banana\n"))
    assert load_params(section, _params(tmp_path, f"{section}:\n  device: cuda:1\n")).device == "cuda:1"


def test_mixed_precision_runs_products_in_bfloat16_on_the_cpu_and_changes_nothing_when_off():
    import torch

    from anomalyncd.device import autocast

    a = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    with autocast("cpu", False):
        assert (a @ a.T).dtype == torch.float32
    with autocast("cpu", True):
        assert (a @ a.T).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "section, key, value",
    [("mebin", "crop_size", 20000), ("detect", "image_size", 1), ("detect", "image_size", 20000),
     ("detect", "map_size", 20000), ("train", "image_size", 8), ("demo", "image_size", 1)],
)
def test_sizes_that_cannot_be_meant_are_range_errors(tmp_path, section, key, value):
    with pytest.raises(InputError, match=rf"{section}\.{key} must be .*got {value}"):
        load_params(section, _params(tmp_path, f"{section}:\n  {key}: {value}\n"))


def test_an_unknown_demo_type_is_an_input_error_before_any_image_is_written(tmp_path):
    from anomalyncd.config import DemoParams
    from anomalyncd.demo import generate

    with pytest.raises(InputError, match=r"demo.types \['bubble'\] unknown; choose from"):
        generate(tmp_path / "demo", DemoParams(types=["scratch", "bubble"]))
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("text, value", [("1e-3", 0.001), ("1.0e30", 1e30), ("2E+2", 200.0), (".5e1", 5.0), ("0.003", 0.003)])
def test_floats_are_read_as_yaml_1_2_and_dvc_read_them(tmp_path, text, value):
    """PyYAML (YAML 1.1) reads 1e-3 as the text '1e-3'; DVC and YAML 1.2 read a number."""
    assert load_params("train", _params(tmp_path, f"train:\n  lr: {text}\n")).lr == value
    assert load_params("train", _params(tmp_path, f"train:\n  model: '{text}'\n")).model == text  # quoted: text
