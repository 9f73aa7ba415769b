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


def test_collect_train_and_eval_commands_chain(tmp_path, capsys):
    """collect -> train sft (Stage 0) -> train rl (Stage 1) -> train sft --init (Stage 2) -> eval."""
    from ire_vla_ros.vla.checkpoint import read_metadata, resolve_checkpoint

    tiny = ["--device", "cpu", "--no-progress", "--set", "torch_threads=1", "--set", "env.max_episode_steps=25",
            "--set", "sft.steps=3", "--set", "sft.batch_size=4", "--set", "ppo.total_env_steps=16",
            "--set", "ppo.num_envs=1", "--set", "ppo.rollout_len=16", "--set", "ppo.minibatch_size=8",
            "--set", "ppo.update_epochs=1", "--set", "ppo.critic_warmup_rollouts=0"]
    ep, ck = str(tmp_path / "ep"), str(tmp_path / "ck")
    task = ["--tasks", "button-press-topdown-v3"]
    assert main(["collect", "--out", ep, "--episodes", "1", *task, *tiny]) == 0
    assert main(["train", "sft", "--episodes", ep, "--checkpoints", ck, *tiny]) == 0
    assert read_metadata(ck)["iteration"] == 0
    # Stage 1 is SACfD by default: without demonstrations it refuses with one line and exit 2
    assert main(["train", "rl", "--init", ck, "--checkpoints", ck, "--episodes", ep, *task, *tiny]) == 2
    assert "--demos" in capsys.readouterr().err
    assert main(["train", "rl", "--algo", "ppo", "--init", ck, "--checkpoints", ck, "--episodes", ep, *task,
                 *tiny]) == 0
    assert read_metadata(ck)["stage"] == "rl" and read_metadata(ck)["iteration"] == 1
    assert main(["train", "sft", "--episodes", ep, "--checkpoints", ck, "--init", ck, *tiny]) == 0
    assert read_metadata(ck)["stage"] == "sft" and read_metadata(ck)["iteration"] == 1
    capsys.readouterr()
    assert main(["eval", str(resolve_checkpoint(ck)), "--episodes", "1", *task, *tiny]) == 0
    assert '"success_rate"' in capsys.readouterr().out


# -- user mistakes: one line naming the file and the reason, exit code 2, traceback only with -v ----
def _corrupt_copy(tmp_path, how: str):
    import shutil

    from ire_vla_ros.paths import models_dir

    ckpt = tmp_path / "ckpt"
    shutil.copytree(models_dir() / "metaworld_tiny", ckpt)
    heads = ckpt / "heads.safetensors"
    data = bytearray(heads.read_bytes())
    if how == "truncated":
        heads.write_bytes(bytes(data[: len(data) // 2]))
    else:  # same size, flipped bytes
        data[-100:] = bytes(255 - b for b in data[-100:])
        heads.write_bytes(bytes(data))
    return ckpt


def _one_line_error(capsys, argv, *must_contain):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "Traceback" not in err[0], err
    for text in must_contain:
        assert text in err[0], err
    return err[0]


@pytest.mark.parametrize("how,reason", [("truncated", "truncated"), ("corrupted", "sha256")])
def test_bad_checkpoint_is_one_line(tmp_path, capsys, how, reason):
    ckpt = _corrupt_copy(tmp_path, how)
    _one_line_error(capsys, ["eval", str(ckpt), "--device", "cpu", "--episodes", "1"],
                    str(ckpt), "heads.safetensors", reason)
    # with -v the traceback is shown too
    assert main(["-v", "eval", str(ckpt), "--device", "cpu", "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "CheckpointError" in err


def test_missing_paths_are_one_line(tmp_path, capsys):
    missing = tmp_path / "no_such_checkpoint"
    _one_line_error(capsys, ["eval", str(missing), "--device", "cpu"], str(missing))
    missing_cfg = tmp_path / "no_such.yaml"
    _one_line_error(capsys, ["train", "sft", "--episodes", str(tmp_path), "--checkpoints", str(tmp_path / "c"),
                             "--config", str(missing_cfg)], str(missing_cfg), "No such file")


def test_bad_config_values_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  lr_actor: fast\n")
    _one_line_error(capsys, ["eval", "x", "--config", str(bad)], str(bad), "lr_actor", "expected a number")
    bad.write_text("ppo:\n  lr_actor: [1,\n")
    _one_line_error(capsys, ["eval", "x", "--config", str(bad)], str(bad), "invalid YAML")
    bad.write_text("ppo:\n  learning_rat: 0.1\n")
    _one_line_error(capsys, ["eval", "x", "--config", str(bad)], str(bad), "unknown keys")
    _one_line_error(capsys, ["eval", "x", "--set", "sft.steps=many"], "sft.steps", "expected a number")


def test_bad_checkpoint_as_a_process_exit_code_2(tmp_path):
    ckpt = _corrupt_copy(tmp_path, "truncated")
    out = subprocess.run([sys.executable, "-m", "ire_vla_ros.cli", "eval", str(ckpt), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "truncated" in lines[0] and str(ckpt) in lines[0], out.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user mistakes are shortened: an unexpected error still raises with its traceback."""
    import ire_vla_ros.cli as cli

    def broken(_args):
        raise ZeroDivisionError("a bug")

    parser = cli.build_parser()
    args = parser.parse_args(["episodes", "list", "."])
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: (setattr(args, "func", broken), args)[1])
    with pytest.raises(ZeroDivisionError):
        cli.main(["episodes", "list", "."])
