"""The online SACfD learner process without ROS: episode files in on stdin, head snapshots out,
bad input rejected and counted, versions monotonic across restarts, and the policy-side loader."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ire_vla_ros.episodes.store import EpisodeWriter
from ire_vla_ros.training.online_learner import latest_head_snapshot, snapshot_version
from ire_vla_ros.vla.action_spec import METAWORLD_4D, ActionSpec
from ire_vla_ros.vla.checkpoint import load_checkpoint
from ire_vla_ros.vla.policy import HeadSnapshotError
from ire_vla_ros.vla.testing import SAWYER_JOINTS, make_tiny_checkpoint, make_tiny_policy

ROOT = Path(__file__).resolve().parent.parent
INSTR = "press the button from the top"
FAST = ["sac.critic_pretrain_steps=2", "sac.distill_steps=2", "sac.batch_size=16", "sac.num_critics=2",
        "sac.critic_hidden=16", "sac.utd=2", "sac.buffer_bytes=1000000"]


def _episode(root: Path, source: str, steps: int, seed: int, success: bool) -> Path:
    rng = np.random.default_rng(seed)
    w = EpisodeWriter(root, instruction=INSTR, task="button-press-topdown-v3", source=source,
                      action_spec=METAWORLD_4D, joint_names=SAWYER_JOINTS)
    for t in range(steps):
        w.append(images={"main": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)},
                 joint_positions=rng.normal(size=9).astype(np.float32),
                 action=rng.uniform(-1, 1, 4).astype(np.float32), reward=0.0, timestamp=0.1 * t)
    return w.finalize(success)


class Learner:
    """The learner as a child process; stdout JSON events collected by a reader thread."""

    def __init__(self, ckpt, episodes, heads, *extra):
        args = [sys.executable, "-m", "ire_vla_ros.training.online_learner", "--checkpoint", str(ckpt),
                "--episodes", str(episodes), "--out", str(heads), "--config", str(ROOT / "config" / "iterate.yaml"),
                "--snapshot-every-episodes", "1", "--snapshot-every-s", "3600", *extra]
        for s in FAST:
            args += ["--set", s]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.events: queue.Queue = queue.Queue()
        self.seen: list[dict] = []  # events passed over while waiting for another kind
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def send(self, text: str):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def wait_event(self, kind: str, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self.events.get(timeout=1.0)
            except queue.Empty:
                assert self.proc.poll() is None, f"learner exited: {self.proc.stderr.read()[-2000:]}"
                continue
            if ev["event"] == kind:
                return ev
            self.seen.append(ev)
        raise AssertionError(f"no {kind!r} event within {timeout}s")

    def close(self) -> int:
        self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture
def store(tmp_path):
    episodes = tmp_path / "episodes"
    for k in range(2):
        _episode(episodes / "teleop", "teleop", 6, seed=k, success=True)
    ckpt = make_tiny_checkpoint(tmp_path / "ckpts")
    return ckpt, episodes, tmp_path / "heads"


def test_learner_consumes_episodes_and_publishes_versioned_heads(store, tmp_path):
    ckpt, episodes, heads = store
    policy_eps = [_episode(episodes / "policy", "policy", 5, seed=10 + k, success=k == 0) for k in range(2)]
    learner = Learner(ckpt, episodes, heads)
    try:
        ready = learner.wait_event("ready")
        assert ready["demo_transitions"] == 12 and ready["version"] == 0
        assert latest_head_snapshot(heads) is None
        learner.send(json.dumps({"path": str(policy_eps[0])}))
        ev = learner.wait_event("episode")
        assert ev["transitions"] == 5 and ev["success"] is True
        snap = learner.wait_event("snapshot")
        assert snap["version"] == 1 and latest_head_snapshot(heads) == Path(snap["path"]).resolve()
        # Bad input: each rejected with a reason and counted; the learner keeps running.
        (episodes / "policy" / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
        bad = ["this is not json", json.dumps({"path": "../../outside.h5"}),
               json.dumps({"path": str(episodes / "policy" / "corrupt.h5")}),
               json.dumps({"path": str(sorted((episodes / "teleop").glob("*.h5"))[0])}),  # teleop: not online data
               json.dumps({"path": str(policy_eps[0])})]  # already consumed
        for k, line in enumerate(bad, start=1):
            learner.send(line)
            assert learner.wait_event("rejected")["rejected"] == k
        learner.send(json.dumps(str(policy_eps[1])))  # a bare JSON string works too
        assert learner.wait_event("episode")["episodes"] == 2
        snap2 = learner.wait_event("snapshot")
        assert snap2["version"] == 2 and snap2["actor_updates"] > snap["actor_updates"]
        assert latest_head_snapshot(heads).name == "head-000002.safetensors"
        assert learner.close() == 0
        assert learner.wait_event("done")["rejected"] == 5
    finally:
        if learner.proc.poll() is None:
            learner.proc.kill()

    # The policy node's side: swap the head in, backbone untouched, tanh actions within bounds.
    policy = load_checkpoint(ckpt)
    backbone = {n: p.detach().clone() for n, p in policy.backbone.named_parameters()}
    head_before = [p.detach().clone() for p in policy.actor.parameters()]
    meta = policy.load_head_snapshot(latest_head_snapshot(heads))
    assert meta["version"] == 2 and policy.cfg.action_squash == "tanh"
    assert any(not torch.equal(a, b) for a, b in zip(policy.actor.parameters(), head_before))
    assert all(torch.equal(p, backbone[n]) for n, p in policy.backbone.named_parameters())
    out = policy.act(np.zeros((64, 64, 3), np.uint8), np.zeros(9, np.float32), INSTR, deterministic=False)
    assert np.all(np.abs(out.action) <= 1.0) and np.isfinite(out.log_prob)

    # A restarted learner continues the version sequence (the policy node never goes back).
    again = Learner(ckpt, episodes, heads, "--replay-existing")
    try:
        assert again.wait_event("ready")["version"] == 2
        assert again.wait_event("snapshot")["version"] == 3  # the 2 policy episodes on disk were re-read
        assert again.close() == 0
    finally:
        if again.proc.poll() is None:
            again.proc.kill()
    assert sorted(snapshot_version(p) for p in heads.glob("head-*.safetensors")) == [1, 2, 3]


def test_learner_refuses_to_start_without_demos(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpts")
    out = subprocess.run([sys.executable, "-m", "ire_vla_ros.training.online_learner", "--checkpoint", str(ckpt),
                          "--episodes", str(tmp_path / "empty"), "--out", str(tmp_path / "heads"),
                          "--config", str(ROOT / "config" / "iterate.yaml")],
                         input="", capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "no teleop episodes" in out.stderr


def test_head_snapshot_that_does_not_fit_leaves_the_policy_unchanged(tmp_path):
    other = make_tiny_policy(action_spec=ActionSpec(names=("x", "y"), low=(-1.0, -1.0), high=(1.0, 1.0)))
    bad = other.save_head_snapshot(tmp_path / "head-000001.safetensors")
    policy = make_tiny_policy()
    before = {k: v.clone() for k, v in policy.head_tensors().items()}
    with pytest.raises(HeadSnapshotError, match="shape"):
        policy.load_head_snapshot(bad)
    truncated = tmp_path / "head-000002.safetensors"
    truncated.write_bytes(policy.save_head_snapshot(tmp_path / "ok.safetensors").read_bytes()[:100])
    with pytest.raises(HeadSnapshotError, match="unreadable"):
        policy.load_head_snapshot(truncated)
    assert all(torch.equal(v, before[k]) for k, v in policy.head_tensors().items())
    assert policy.cfg.action_squash == "clip"
    # A good snapshot round-trips exactly, and leaves no temp files behind.
    with torch.no_grad():
        policy.actor.mlp[-1].bias.add_(0.5)
    good = policy.save_head_snapshot(tmp_path / "head-000003.safetensors", metadata={"version": 3})
    fresh = make_tiny_policy()
    assert fresh.load_head_snapshot(good) == {"version": 3}
    assert all(torch.equal(v, policy.head_tensors()[k]) for k, v in fresh.head_tensors().items())
    assert not list(tmp_path.glob(".*tmp*"))
