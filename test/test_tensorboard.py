"""`--tensorboard DIR`: training and evaluation scalars as TensorBoard event files (read back with
tensorboard's EventAccumulator); nothing is written without the flag."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ire_vla_ros.cli import build_parser, main
from ire_vla_ros.training import tb
from ire_vla_ros.vla.checkpoint import resolve_checkpoint

from test_bag_import import _actions, write_demo_bag

TINY = ["--device", "cpu", "--no-progress", "--set", "torch_threads=1", "--set", "sft.steps=4",
        "--set", "sft.batch_size=4", "--set", "env.max_episode_steps=25", "--set", "ppo.total_env_steps=16",
        "--set", "ppo.num_envs=1", "--set", "ppo.rollout_len=16", "--set", "ppo.minibatch_size=8",
        "--set", "ppo.update_epochs=1", "--set", "ppo.critic_warmup_rollouts=0"]


def _runs(tb_dir: Path) -> list[EventAccumulator]:
    runs = sorted(p for p in tb_dir.iterdir() if p.is_dir())
    accs = []
    for r in runs:
        acc = EventAccumulator(str(r))
        acc.Reload()
        accs.append(acc)
    return accs


def test_no_flag_no_files(tmp_path):
    tb.close()
    assert not tb.enabled()
    tb.log("sft", {"loss": 1.0})  # a no-op, not an error
    tb.log_eval({"reach": {"success_rate": 1.0}})
    assert not any(tmp_path.iterdir())


def test_sft_on_imported_bag_writes_loss_and_lr_curves(tmp_path):
    bag, ep, ck, tbdir = tmp_path / "bag", tmp_path / "ep", tmp_path / "ck", tmp_path / "tb"
    write_demo_bag(bag, _actions(12))
    assert main(["episodes", "import-bag", str(bag), "--out", str(ep), "--instruction", "pick up the cube"]) == 0
    assert main(["train", "sft", "--episodes", str(ep), "--checkpoints", str(ck), "--tensorboard", str(tbdir),
                 *TINY]) == 0
    assert not tb.enabled()  # the CLI closed its writer
    (acc,) = _runs(tbdir)
    tags = acc.Tags()["scalars"]
    assert {"sft/loss", "sft/lr_head", "sft/lr_lora"} <= set(tags)
    loss = acc.Scalars("sft/loss")
    assert [e.step for e in loss] == [0, 1, 2, 3]
    train = json.loads((resolve_checkpoint(ck) / "metadata.json").read_text())["train"]
    # the logged values are the losses the trainer saw: their mean is its loss_first (first 20 steps)
    np.testing.assert_allclose(np.mean([e.value for e in loss]), train["loss_first"], rtol=1e-4)
    if "loss_history" in train:
        np.testing.assert_allclose([e.value for e in loss], train["loss_history"], rtol=1e-4)
    lr = [e.value for e in acc.Scalars("sft/lr_head")]
    assert lr[0] > lr[-1] > 0  # the cosine schedule, as the optimizer saw it


def test_eval_scalars_and_one_run_per_process(tmp_path):
    tb.enable(tmp_path, run_name="a")
    tb.log_eval({"reach-v3": {"success_rate": 0.5, "mean_steps": 40.0}, "push-v3": {"success_rate": 0.0,
                 "mean_steps": 100.0}, "_seeds": [0, 9]}, step=2)
    tb.log("ppo", {"entropy": 1.5, "v_loss": float("nan"), "note": "text"})  # NaN / text skipped
    tb.close()
    tb.enable(tmp_path, run_name="b")
    tb.log("ppo", {"entropy": 1.0})
    tb.close()
    a, b = _runs(tmp_path)
    assert a.Scalars("eval/mean_success_rate")[0].value == 0.25 and a.Scalars("eval/mean_success_rate")[0].step == 2
    assert a.Scalars("eval/reach-v3/mean_steps")[0].value == 40.0
    assert set(a.Tags()["scalars"]) == {"eval/reach-v3/success_rate", "eval/reach-v3/mean_steps",
                                        "eval/push-v3/success_rate", "eval/push-v3/mean_steps",
                                        "eval/mean_success_rate", "ppo/entropy"}
    assert [e.value for e in b.Scalars("ppo/entropy")] == [1.0]


def _ppo_algo() -> list[str]:
    """`--algo ppo` where `train rl` offers a choice of Stage 1 algorithm (SAC is the default there)."""
    try:
        build_parser().parse_args(["train", "rl", "--init", "x", "--checkpoints", "y", "--algo", "ppo"])
    except SystemExit:
        return []
    return ["--algo", "ppo"]


def test_ppo_stage_writes_policy_and_value_scalars(tmp_path):
    ep, ck, tbdir = tmp_path / "ep", tmp_path / "ck", tmp_path / "tb"
    task = ["--tasks", "reach-v3"]
    assert main(["collect", "--out", str(ep), "--episodes", "1", *task, *TINY]) == 0
    assert main(["train", "sft", "--episodes", str(ep), "--checkpoints", str(ck), *TINY]) == 0
    assert main(["train", "rl", "--init", str(ck), "--checkpoints", str(ck), *task, "--tensorboard", str(tbdir),
                 *_ppo_algo(), *TINY]) == 0
    (acc,) = _runs(tbdir)
    tags = set(acc.Tags()["scalars"])
    assert {"ppo/pg_loss", "ppo/v_loss", "ppo/entropy", "ppo/approx_kl", "ppo/value_mean", "ppo/return_mean",
            "ppo/lr_actor", "ppo/lr_critic"} <= tags, tags
    assert all(np.isfinite(e.value) for e in acc.Scalars("ppo/entropy"))
    assert main(["eval", str(resolve_checkpoint(ck)), "--episodes", "1", *task, "--tensorboard", str(tbdir / "ev"),
                 *TINY]) == 0
    (ev,) = _runs(tbdir / "ev")
    assert 0.0 <= ev.Scalars("eval/reach-v3/success_rate")[0].value <= 1.0
    assert ev.Scalars("eval/reach-v3/mean_steps")[0].value > 0
