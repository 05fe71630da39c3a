"""Numbers in YAML config files are read in every usual spelling (YAML 1.2's, not only 1.1's).

PyYAML's SafeLoader follows YAML 1.1, where ``2e-4`` (no dot) is text; a config file with
``lr: 2e-4`` must still give ``lr == 2e-4``.
"""

import math

import pytest

from deltatune.train import ConfigError, load_config


def _config(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return load_config(str(path))


@pytest.mark.parametrize("spelling, value", [
    ("2e-4", 2e-4), ("2E-4", 2e-4), ("1e3", 1e3), ("2.0e-4", 2e-4), (".5", 0.5), ("+1e-3", 1e-3),
    ("-3", -3.0), ("1_000", 1000.0), ("5", 5.0), ("1.", 1.0), ("-.25e+1", -2.5), ("3e+00", 3.0),
])
def test_float_field_reads_every_number_spelling(tmp_path, spelling, value):
    cfg = _config(tmp_path, f"lr: {spelling}\nweight_decay: {spelling}\nlora:\n  lora_alpha: {spelling}\n")
    assert isinstance(cfg.lr, float) and cfg.lr == pytest.approx(value, rel=1e-12)
    assert cfg.weight_decay == pytest.approx(value, rel=1e-12)
    assert cfg.lora.lora_alpha == pytest.approx(value, rel=1e-12)


def test_one_file_with_many_spellings(tmp_path):
    cfg = _config(tmp_path, "lr: 2e-4\nweight_decay: .5\nmax_grad_norm: 1E0\nepochs: +2\n"
                            "data:\n  validation_fraction: 5e-2\n  max_seq_len: 1_024\n")
    assert (cfg.lr, cfg.weight_decay, cfg.max_grad_norm, cfg.epochs) == (2e-4, 0.5, 1.0, 2.0)
    assert cfg.data.validation_fraction == 0.05 and cfg.data.max_seq_len == 1024


@pytest.mark.parametrize("spelling, value", [("1e3", 1000), ("2.0", 2), ("1_000", 1000), ("-1", -1), ("4E+2", 400)])
def test_int_field_takes_a_whole_number_in_any_spelling(tmp_path, spelling, value):
    cfg = _config(tmp_path, f"max_steps: {spelling}\n")
    assert cfg.max_steps == value and type(cfg.max_steps) is int


@pytest.mark.parametrize("spelling", ["1e-3", "2.5", "1e300", ".inf", ".nan"])
def test_int_field_refuses_a_number_that_is_not_whole(tmp_path, spelling):
    with pytest.raises(ConfigError, match=r"run.yaml: max_steps: expected an integer"):
        _config(tmp_path, f"max_steps: {spelling}\n")


@pytest.mark.parametrize("spelling", [".inf", "-.inf", ".nan", ".NaN"])
def test_float_field_refuses_infinity_and_nan(tmp_path, spelling):
    with pytest.raises(ConfigError, match=r"run.yaml: lr: expected a finite number"):
        _config(tmp_path, f"lr: {spelling}\n")


@pytest.mark.parametrize("text", ["e3", "1e", "2e-", "1.2.3", "0x1p3", "1e3x", "--1"])
def test_things_that_are_not_numbers_stay_text(tmp_path, text):
    with pytest.raises(ConfigError, match=r"run.yaml: lr: expected a number, got '"):
        _config(tmp_path, f"lr: {text}\n")
    assert _config(tmp_path, f"model: {text}\n").model == text


def test_quoted_numbers_stay_text(tmp_path):
    assert _config(tmp_path, "model: '2e-4'\nquantize: \"1e3\"\n").model == "2e-4"


def test_free_form_fields_read_numbers_too(tmp_path):
    cfg = _config(tmp_path, "method: loha\nadapter: {r: 8, alpha: 1e1, rank_dropout: 5e-2}\n")
    assert cfg.adapter == {"r": 8, "alpha": 10.0, "rank_dropout": 0.05}
    assert not math.isnan(cfg.adapter["alpha"])


def test_a_setting_given_twice_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"run.yaml: line 3 not valid YAML \('lr' is given twice\)"):
        _config(tmp_path, "lr: 1e-4\nepochs: 2\nlr: 2e-4\n")
