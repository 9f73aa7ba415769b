"""Online RL over ROS 2 (issue 7 items 3, 4, 6).

Without ROS: the trainer-side learner session (a real learner child process, real episode files),
its bounded feed, crash reporting; the policy-side head swap (only between episodes, refusals keep
the old head) and the teleop yield. With real rclpy: sim_node + policy_node + recorder_node +
reward_node + trainer_node (+ teleop_node intervening): episodes flow to the learner, heads swap
between episodes, interventions are recorded, stop -> offline iteration -> reload.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ire_vla_ros.episodes.store import EpisodeWriter
from ire_vla_ros.nodes.online_rl import HeadSwapper, LearnerSession, TeleopYield, learner_command
from ire_vla_ros.vla.action_spec import METAWORLD_4D
from ire_vla_ros.vla.testing import SAWYER_JOINTS, make_tiny_checkpoint, make_tiny_policy

ROOT = Path(__file__).resolve().parent.parent
INSTR = "press the button from the top"
FAST = ["sac.critic_pretrain_steps=2", "sac.distill_steps=2", "sac.batch_size=16", "sac.num_critics=2",
        "sac.critic_hidden=16", "sac.utd=2", "sac.buffer_bytes=1000000"]


def fast_args() -> list[str]:
    out = ["--config", str(ROOT / "config" / "iterate.yaml")]
    for s in FAST:
        out += ["--set", s]
    return out


def _episode(root: Path, source: str, steps: int, seed: int, success: bool) -> Path:
    rng = np.random.default_rng(seed)
    w = EpisodeWriter(root, instruction=INSTR, task="button-press-topdown-v3", source=source,
                      action_spec=METAWORLD_4D, joint_names=SAWYER_JOINTS)
    for t in range(steps):
        w.append(images={"main": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)},
                 joint_positions=rng.normal(size=9).astype(np.float32),
                 action=rng.uniform(-1, 1, 4).astype(np.float32), reward=0.0, timestamp=0.1 * t)
    return w.finalize(success)


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# =============================================================================================
# trainer side, no ROS
# =============================================================================================
def test_learner_session_feeds_policy_episodes_and_relays_snapshots(tmp_path):
    episodes = tmp_path / "episodes"
    demos = [_episode(episodes / "teleop", "teleop", 6, seed=k, success=True) for k in range(2)]
    ckpt = make_tiny_checkpoint(tmp_path / "ckpts")
    cmd = learner_command(sys.executable, checkpoint=str(ckpt), episodes=str(episodes), heads=str(tmp_path / "heads"),
                          snapshot_every_s=3600, snapshot_every_episodes=1, extra=fast_args())
    s = LearnerSession(cmd, log_path=tmp_path / "logs" / "online.log", episodes_root=episodes)
    try:
        wait_for(lambda: s.status()["state"] in ("ready", "failed"), 300, "learner ready")
        assert s.status()["state"] == "ready", s.status()
        assert s.status()["ready"]["demo_transitions"] == 12
        ep = _episode(episodes / "policy", "policy", 5, seed=10, success=True)
        assert s.feed(str(demos[0]))               # a teleop episode: skipped before the learner
        assert s.feed(str(tmp_path / "nope.h5"))   # unreadable: skipped, counted
        assert s.feed(str(ep))
        wait_for(lambda: s.status()["snapshots"] >= 1 or s.done, 300, "a head snapshot")
        st = s.status()
        assert st["episodes"] == 1 and st["skipped_source"] == 1 and st["skipped_unreadable"] == 1, st
        assert st["success_rate_last_20"] == 1.0 and st["version"] == 1
        snap = st["last_snapshot"]
        assert Path(snap["path"]).is_file() and Path(snap["checkpoint"]) == ckpt
        kinds = [e["event"] for e in s.take_events()]
        assert kinds[0] == "ready" and "episode" in kinds and "snapshot" in kinds
        assert s.take_events() == []  # handed over once
        s.request_stop(timeout_s=120)
        assert not s.feed(str(ep))                 # stopping: nothing more goes in
        wait_for(lambda: s.done, 180, "learner exit after EOF")
        assert s.status()["state"] == "stopped" and s.returncode == 0 and s.error == ""
        assert [e["event"] for e in s.take_events()][-1] == "exit"
        assert "ire_vla_ros.training.online_learner" in (tmp_path / "logs" / "online.log").read_text()
    finally:
        s.close(5)


def test_learner_that_cannot_start_or_crashes_is_reported_and_loses_no_episode(tmp_path):
    episodes = tmp_path / "episodes"
    ckpt = make_tiny_checkpoint(tmp_path / "ckpts")
    cmd = learner_command(sys.executable, checkpoint=str(ckpt), episodes=str(episodes), heads=str(tmp_path / "heads"),
                          extra=fast_args())
    # no demonstrations: the learner refuses to start; the session says why
    s = LearnerSession(cmd, log_path=tmp_path / "a.log", episodes_root=episodes)
    wait_for(lambda: s.done, 300, "learner exit")
    st = s.status()
    assert st["state"] == "failed" and st["returncode"] == 2 and "no teleop episodes" in st["error"], st
    s.close(1)
    # a crash (SIGKILL) mid-session: failed, with the reason; a feed afterwards is refused, the file stays
    for k in range(2):
        _episode(episodes / "teleop", "teleop", 6, seed=k, success=True)
    s = LearnerSession(cmd, log_path=tmp_path / "b.log", episodes_root=episodes)
    try:
        wait_for(lambda: s.status()["state"] == "ready" or s.done, 300, "learner ready")
        s._signal(9)
        wait_for(lambda: s.done, 30, "crash noticed")
        st = s.status()
        assert st["state"] == "failed" and "killed" in st["error"] and "before it was asked to stop" in st["error"]
        ep = _episode(episodes / "policy", "policy", 5, seed=3, success=False)
        assert not s.feed(str(ep)) and ep.is_file()
    finally:
        s.close(1)


def test_feed_queue_is_bounded_and_never_blocks(tmp_path):
    ep = _episode(tmp_path / "episodes" / "policy", "policy", 2, seed=0, success=False)
    # a "learner" that never reads its stdin: the pipe fills, then the bounded queue, then drops
    s = LearnerSession([sys.executable, "-c", "import time; time.sleep(120)"], episodes_root=tmp_path / "episodes",
                       max_pending=4)
    try:
        t0 = time.monotonic()
        for _ in range(3000):
            s.feed(str(ep))
        st = s.status()
        assert st["fed"] == 3000 and st["dropped_queue_full"] > 0 and st["pending_paths"] <= 4, st
        assert st["sent"] + st["pending_paths"] + st["dropped_queue_full"] >= 3000 - 1  # one may be in the writer's hand
        print(f"\n3000 feeds in {time.monotonic() - t0:.2f} s: sent {st['sent']}, dropped {st['dropped_queue_full']}")
        s.request_stop(timeout_s=0.2, kill_after_s=2)
        wait_for(lambda: (s.enforce() or s.done), 30, "SIGTERM after the stop timeout")
        assert s.status()["state"] == "failed"  # it did not exit by itself after EOF
    finally:
        s.close(1)


# =============================================================================================
# policy side, no ROS
# =============================================================================================
def _snapshot(tmp_path: Path, version: int, shift: float, ckpt: Path | None = None) -> dict:
    other = make_tiny_policy()
    with torch.no_grad():
        other.actor.mlp[-1].bias.add_(shift)
    heads = tmp_path / "heads"
    heads.mkdir(exist_ok=True)
    path = other.save_head_snapshot(heads / f"head-{version:06d}.safetensors", metadata={"version": version})
    return {"path": str(path), "version": version, "checkpoint": str(ckpt) if ckpt else None}


def test_head_swaps_only_between_episodes_and_refusals_keep_the_old_head(tmp_path):
    policy = make_tiny_policy()
    lock = threading.RLock()
    running = tmp_path / "ckpt-a"
    logs = []
    sw = HeadSwapper(lambda: policy, lock, tmp_path / "heads", lambda: running, log=lambda m, ok: logs.append((ok, m)))
    try:
        bias = lambda: policy.actor.mlp[-1].bias.detach().clone()  # noqa: E731
        b0 = bias()
        sw.set_episode_active(True)
        sw.offer(_snapshot(tmp_path, 1, 0.5, running))
        wait_for(lambda: sw.counters["head_deferred_active"] >= 1, 10, "the swap deferred")  # positive control
        time.sleep(0.3)
        assert torch.equal(bias(), b0) and sw.version == 0  # mid-episode: untouched
        sw.offer(_snapshot(tmp_path, 2, 1.0, running))     # a newer one replaces the pending one
        assert sw.counters["head_superseded"] == 1
        sw.set_episode_active(False)
        wait_for(lambda: sw.version == 2, 10, "swap between episodes")
        assert torch.allclose(bias(), b0 + 1.0) and sw.counters["head_swaps"] == 1 and len(sw.swaps) == 1
        b2 = bias()
        # refusals: each counted, the running head stays
        bad = [
            {"path": "/etc/passwd", "version": 3},                                  # outside heads dir
            {"path": str(tmp_path / "heads" / "head-000002.safetensors"), "version": 2},  # not newer
            {**_snapshot(tmp_path, 4, 2.0), "checkpoint": str(tmp_path / "ckpt-b")},    # another checkpoint
        ]
        corrupt = tmp_path / "heads" / "head-000005.safetensors"
        corrupt.write_bytes(b"\0" * 40)
        bad.append({"path": str(corrupt), "version": 5})
        for k, notice in enumerate(bad, start=1):
            sw.offer(notice)
            wait_for(lambda: sw.counters["head_refused"] == k, 10, f"refusal {k}")
        assert torch.equal(bias(), b2) and sw.version == 2
        assert sum(not ok for ok, _ in logs) == 4 and "trained from" in logs[-2][1]
        # the swap waits for a control step in flight (the runner's lock)
        with lock:
            sw.offer(_snapshot(tmp_path, 6, 3.0, running))
            time.sleep(0.3)
            assert sw.version == 2
        wait_for(lambda: sw.version == 6, 10, "swap after the step")
    finally:
        sw.close()


def test_teleop_yield_ignores_idle_operator_messages():
    y = TeleopYield(hold_s=0.5)
    names = ["dx", "dy", "dz", "gripper"]
    assert not y.operator_action(names, [0, 0, 0, -1], now=10.0)     # idle keyboard, first message
    assert not y.operator_action(names, [0, 0, 0, -1], now=10.1)     # still idle
    assert not y.yielding(10.2) and y.counters["yielded_steps"] == 0
    assert y.operator_action(names, [0.3, 0, 0, -1], now=10.3)       # moving
    assert y.yielding(10.5) and not y.yielding(10.81)
    assert y.operator_action(names, [0, 0, 0, 1], now=11.0)          # gripper toggled
    assert y.yielding(11.2)
    assert not y.operator_action(["a"], [1.0, 2.0], now=12.0)        # malformed: ignored
    assert y.counters == {"operator_actions": 2, "yielded_steps": 2}
