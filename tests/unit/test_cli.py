"""The command line: help text comes from the dataclass field docs; info reports the set-up."""

import json

import pytest

from deltatune.cli import main


def test_demo_help_lists_documented_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--steps" in text and "optimizer steps" in text and "--output-dir" in text


def test_info_prints_versions(capsys):
    assert main(["info"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert {"deltatune", "torch", "transformers", "default_model"} <= set(facts)


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out
