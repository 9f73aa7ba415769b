"""Every CLI answers --help; bad configs fail with a clear message."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ire_vla_ros.cli import build_parser, main
from ire_vla_ros.training.config import load_iterate_config

SUBCOMMANDS = [["collect"], ["train", "sft"], ["train", "rl"], ["train", "offline"], ["iterate"], ["demo"],
               ["eval"], ["episodes", "list"], ["episodes", "show"], ["episodes", "validate"], ["bringup"]]


@pytest.mark.parametrize("cmd", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    assert "usage: ire-vla" in capsys.readouterr().out


def test_console_script_help_runs_as_a_process():
    out = subprocess.run([sys.executable, "-m", "ire_vla_ros.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "train" in out.stdout and "episodes" in out.stdout


def test_unknown_config_key_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="unknown keys.*learning_rat"):
        load_iterate_config(bad)


def test_shipped_configs_parse():
    from ire_vla_ros.paths import config_path

    for name in ("iterate.yaml", "demo.yaml", "trainer.yaml"):
        cfg = load_iterate_config(config_path(name))
        assert cfg.ppo.freeze_backbone, f"{name}: Stage 1 must keep the VLM frozen"


def test_episodes_validate_exit_code(tmp_path, capsys):
    (tmp_path / "x.h5").write_bytes(b"not hdf5")
    assert main(["episodes", "validate", str(tmp_path)]) == 1
    assert "x.h5" in capsys.readouterr().out


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  lr_actor: 3e-4\n  total_env_steps: 1e3\n")
    cfg = load_iterate_config(f)
    assert cfg.ppo.lr_actor == 3e-4 and cfg.ppo.total_env_steps == 1000
    f.write_text("ppo:\n  lr_actor: fast\n")
    with pytest.raises(ValueError, match="expected a number"):
        load_iterate_config(f)
