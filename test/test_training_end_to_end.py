"""One full iRe-VLA iteration at tiny scale (real MuJoCo, real PPO, real files), and the robot's
offline iteration on recorded episodes, including bad files in the store."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ire_vla_ros.episodes.store import EpisodeWriter, scan_episodes
from ire_vla_ros.training.config import load_iterate_config
from ire_vla_ros.training.iterate import IterationRunner, success_table
from ire_vla_ros.training.offline import NothingToTrain, run_offline_iteration
from ire_vla_ros.vla.checkpoint import load_checkpoint, read_metadata, resolve_checkpoint
from ire_vla_ros.vla.testing import make_tiny_policy

TINY = {
    "tasks": ["button-press-topdown-v3"], "iterations": 1, "device": "cpu", "torch_threads": 1,
    "env.max_episode_steps": 40, "collect.episodes_per_task": 3, "sft.steps": 15, "sft.batch_size": 16,
    "ppo.total_env_steps": 64, "ppo.num_envs": 2, "ppo.rollout_len": 16, "ppo.minibatch_size": 16,
    "ppo.update_epochs": 2, "ppo.reward": "dense", "eval.episodes_per_task": 2,
}
# SACfD at test size: few updates, a small ensemble.
TINY_SAC = {"sac.total_env_steps": 32, "sac.num_envs": 2, "sac.batch_size": 16, "sac.num_critics": 2,
            "sac.critic_hidden": 16, "sac.distill_steps": 5, "sac.critic_pretrain_steps": 5, "sac.utd": 0.25,
            "sac.offline_updates": 6}


def test_one_iteration_end_to_end(tmp_path):
    from ire_vla_ros.sim.metaworld_env import heldout_seeds
    from ire_vla_ros.training.rollout import evaluate, make_envs

    cfg = load_iterate_config(None, TINY | {"stage1.algo": "ppo"})
    results = IterationRunner(cfg, tmp_path, progress=False).run()
    labels = [s["label"] for s in results["stages"]]
    assert labels == ["stage0_sft", "iter1_stage1_ppo", "iter1_stage2_sft"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert [s["label"] for s in on_disk["stages"]] == labels
    # Each recorded evaluation is what its saved checkpoint does on the held-out seeds.
    envs = make_envs(cfg.tasks, 2, cfg.env)
    try:
        for s in on_disk["stages"]:
            recorded = s["eval"]["button-press-topdown-v3"]
            again = evaluate(load_checkpoint(s["checkpoint"]), envs, heldout_seeds(2))["button-press-topdown-v3"]
            assert recorded["episodes"] == 2 and recorded["successes"] == again["successes"]
            assert recorded["mean_steps"] == again["mean_steps"], s["label"]
    finally:
        for e in envs:
            e.close()
    assert (tmp_path / "success_rate.png").stat().st_size > 1000
    assert (tmp_path / "videos" / "stage0_sft.mp4").stat().st_size > 0
    # Every stage left a loadable checkpoint; `latest` is the last one, tagged with its stage.
    latest = resolve_checkpoint(tmp_path / "checkpoints")
    assert latest == __import__("pathlib").Path(on_disk["stages"][-1]["checkpoint"])
    meta = read_metadata(latest)
    assert meta["iteration"] == 1 and meta["stage"] == "sft"
    ppo = on_disk["stages"][1]["train"]["updates"]
    assert len(ppo) == 2 and all(np.isfinite(u["v_loss"]) for u in ppo)
    assert "stage0_sft" in success_table(results)


def test_two_iterations_end_to_end_with_sac(tmp_path):
    """Stage 1 as SACfD: the expert demos fill its demo buffer, from the second iteration on with
    the successes Stage 2 fitted; Stage 2 then fits the tanh head."""
    from ire_vla_ros.episodes.store import read_episode_info

    cfg = load_iterate_config(None, TINY | TINY_SAC | {"stage1.algo": "sac", "iterations": 2,
                                                       "sac.total_env_steps": 80})
    runner = IterationRunner(cfg, tmp_path, progress=False)
    # A success kept by an earlier run in this output dir (a tiny policy rarely succeeds by itself)
    earlier = _policy_episodes(make_tiny_policy(), tmp_path / "episodes" / "rl_iter0", n=2,
                               steps=10, source="rl")
    results = runner.run()
    assert [s["label"] for s in results["stages"]] == ["stage0_sft", "iter1_stage1_sac", "iter1_stage2_sft",
                                                       "iter2_stage1_sac", "iter2_stage2_sft"]
    s1 = results["stages"][1]["train"]
    assert s1["critic_updates"] == 5 + 20  # pre-training + 80 steps x 0.25

    def steps(paths):  # transitions: a successful episode ends in a terminal, others lose their last step
        return sum(i.n_steps - (not i.success) for i in map(read_episode_info, paths))

    expert = scan_episodes(tmp_path / "episodes", sources=["teleop"]).episodes
    kept1 = scan_episodes(tmp_path / "episodes" / "rl_iter1", sources=["rl"], successful_only=True).episodes
    assert steps(expert) > 0 and steps(earlier[:1]) == 10  # the first earlier episode succeeded, not the second
    assert s1["demo_transitions"] == steps(expert) + 10
    assert results["stages"][3]["train"]["demo_transitions"] == steps(expert) + 10 + steps(kept1)
    assert sorted(runner.kept_successes()) == sorted(
        scan_episodes(tmp_path / "episodes", sources=["rl"], successful_only=True).episodes)
    final = load_checkpoint(results["stages"][-1]["checkpoint"])
    assert final.cfg.action_squash == "tanh"  # Stage 2 kept the SAC head's action mapping


def _policy_episodes(policy, root, n=2, steps=12, succeed_first=True, source="policy") -> list:
    """Episodes as the policy node + recorder would write them on a robot; returns their paths."""
    from ire_vla_ros.sim.metaworld_env import MetaworldTaskEnv

    env = MetaworldTaskEnv("button-press-topdown-v3", max_episode_steps=steps)
    paths = []
    try:
        for k in range(n):
            obs = env.reset(seed=500 + k)
            w = EpisodeWriter(root, instruction=obs.instruction, task=env.task, source=source,
                              action_spec=env.action_spec, joint_names=env.joint_names, iteration=0)
            for t in range(steps):
                r = policy.act(obs.image, obs.state, obs.instruction, deterministic=False)
                last = t == steps - 1
                reward = 1.0 if (last and succeed_first and k == 0) else 0.0
                w.append(images={"main": obs.image}, joint_positions=obs.state, action=r.action, reward=reward,
                         timestamp=0.1 * t, log_prob=r.log_prob, value=r.value)
                obs, *_ = env.step(r.action)
            paths.append(w.finalize(success=(succeed_first and k == 0)))
    finally:
        env.close()
    return paths


def test_offline_iteration_on_recorded_episodes(tmp_path, caplog):
    from ire_vla_ros.sim.collect import collect_expert_episodes

    episodes, ckpts = tmp_path / "episodes", tmp_path / "ckpts"
    collect_expert_episodes("button-press-topdown-v3", 2, episodes / "teleop", max_episode_steps=30, progress=False)
    # A corrupted file and a crash leftover sit in the store: skipped, never fatal.
    (episodes / "teleop" / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    (episodes / "teleop" / "crashed.h5.partial").write_bytes(b"partial")
    cfg = load_iterate_config(None, {"device": "cpu", "torch_threads": 1, "sft.steps": 5, "sft.batch_size": 8,
                                     "ppo.update_epochs": 1, "ppo.minibatch_size": 8} | TINY_SAC)
    progress = []
    first = run_offline_iteration(cfg, episodes, ckpts, report=lambda *a: progress.append(a))
    assert read_metadata(first)["iteration"] == 0 and progress[0][0] == "stage0"
    assert "broken.h5" in caplog.text

    with pytest.raises(NothingToTrain, match="record new policy episodes"):
        run_offline_iteration(cfg, episodes, ckpts)

    policy = load_checkpoint(first)
    _policy_episodes(policy, episodes / "policy")
    second = run_offline_iteration(cfg, episodes, ckpts, report=lambda *a: progress.append(a))
    meta = read_metadata(second)
    assert meta["iteration"] == 1 and len(meta["consumed_online"]) == 2
    assert meta["stage1"]["algo"] == "sac"  # the default Stage 1 on the robot
    assert meta["stage1"]["online_transitions"] == 2 * 12 - 1  # the failed episode's last step has no next frame
    assert meta["stage1"]["critic_updates"] == 5 + 6
    assert {p[0] for p in progress} >= {"stage0", "stage1", "stage2"}
    assert resolve_checkpoint(ckpts) == second
    with pytest.raises(NothingToTrain):
        run_offline_iteration(cfg, episodes, ckpts)
    # Nothing already recorded was lost or modified by training.
    assert len(scan_episodes(episodes, sources=["policy"]).episodes) == 2
    assert len(scan_episodes(episodes, sources=["teleop"]).episodes) == 2


def test_train_offline_cli_prints_progress_and_checkpoint(tmp_path):
    from ire_vla_ros.sim.collect import collect_expert_episodes

    collect_expert_episodes("button-press-topdown-v3", 1, tmp_path / "ep", max_episode_steps=20, progress=False)
    out = subprocess.run(
        [sys.executable, "-m", "ire_vla_ros.cli", "train", "offline", "--episodes", str(tmp_path / "ep"),
         "--checkpoints", str(tmp_path / "ck"), "--device", "cpu", "--no-progress",
         "--set", "sft.steps=3", "--set", "sft.batch_size=4"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(l.startswith("PROGRESS {") for l in lines)
    ckpt = [l.split(" ", 1)[1] for l in lines if l.startswith("CHECKPOINT ")]
    assert ckpt and resolve_checkpoint(tmp_path / "ck") == __import__("pathlib").Path(ckpt[0])
