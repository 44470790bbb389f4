"""The `visionlens` router: every command resolves to its engine's parser, and precompute routes."""

from __future__ import annotations

import importlib

import pytest

from core import cli


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_a_parser(name, capsys):
    module_name, func_name, _ = cli.COMMANDS[name]
    assert callable(getattr(importlib.import_module(module_name), func_name))
    try:
        code = cli.main([name, "--help"])
    except SystemExit as stop:  # argparse exits; some entry points return the code instead
        code = stop.code
    assert code == 0
    assert f"visionlens {name}" in capsys.readouterr().out


def test_precompute_routes_on_engine(capsys):
    with pytest.raises(SystemExit):
        cli.main(["precompute", "store.duckdb", "--engine", "serial", "--help"])
    assert "--partition-images" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["precompute", "store.duckdb", "--help"])
    assert "--explain" in capsys.readouterr().out


def test_unknown_command_and_no_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert "robustness" in capsys.readouterr().out


def test_engine_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["compact", str(tmp_path / "missing.duckdb")]) == 2
    assert "visionlens compact: error:" in capsys.readouterr().err
