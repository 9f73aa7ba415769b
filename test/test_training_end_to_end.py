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

TINY = {
    "tasks": ["button-press-topdown-v3"], "iterations": 1, "device": "cpu", "torch_threads": 1,
    "env.max_episode_steps": 40, "collect.episodes_per_task": 3, "sft.steps": 15, "sft.batch_size": 16,
    "ppo.total_env_steps": 64, "ppo.num_envs": 2, "ppo.rollout_len": 16, "ppo.minibatch_size": 16,
    "ppo.update_epochs": 2, "ppo.reward": "dense", "eval.episodes_per_task": 2,
}


def test_one_iteration_end_to_end(tmp_path):
    cfg = load_iterate_config(None, TINY)
    results = IterationRunner(cfg, tmp_path, progress=False).run()
    labels = [s["label"] for s in results["stages"]]
    assert labels == ["stage0_sft", "iter1_stage1_ppo", "iter1_stage2_sft"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert [s["label"] for s in on_disk["stages"]] == labels
    for s in on_disk["stages"]:
        rate = s["eval"]["button-press-topdown-v3"]["success_rate"]
        assert 0.0 <= rate <= 1.0 and s["eval"]["button-press-topdown-v3"]["episodes"] == 2
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


def _policy_episodes(policy, root, n=2, steps=12, succeed_first=True):
    """Episodes as the policy node + recorder would write them on a robot."""
    from ire_vla_ros.sim.metaworld_env import MetaworldTaskEnv

    env = MetaworldTaskEnv("button-press-topdown-v3", max_episode_steps=steps)
    try:
        for k in range(n):
            obs = env.reset(seed=500 + k)
            w = EpisodeWriter(root, instruction=obs.instruction, task=env.task, source="policy",
                              action_spec=env.action_spec, joint_names=env.joint_names, iteration=0)
            for t in range(steps):
                r = policy.act(obs.image, obs.state, obs.instruction, deterministic=False)
                last = t == steps - 1
                reward = 1.0 if (last and succeed_first and k == 0) else 0.0
                w.append(images={"main": obs.image}, joint_positions=obs.state, action=r.action, reward=reward,
                         timestamp=0.1 * t, log_prob=r.log_prob, value=r.value)
                obs, *_ = env.step(r.action)
            w.finalize(success=(succeed_first and k == 0))
    finally:
        env.close()


def test_offline_iteration_on_recorded_episodes(tmp_path, caplog):
    from ire_vla_ros.sim.collect import collect_expert_episodes

    episodes, ckpts = tmp_path / "episodes", tmp_path / "ckpts"
    collect_expert_episodes("button-press-topdown-v3", 2, episodes / "teleop", max_episode_steps=30, progress=False)
    # A corrupted file and a crash leftover sit in the store: skipped, never fatal.
    (episodes / "teleop" / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    (episodes / "teleop" / "crashed.h5.partial").write_bytes(b"partial")
    cfg = load_iterate_config(None, {"device": "cpu", "torch_threads": 1, "sft.steps": 5, "sft.batch_size": 8,
                                     "ppo.update_epochs": 1, "ppo.minibatch_size": 8})
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
