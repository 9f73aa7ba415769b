"""The whole loop in simulation, with real nodes, real messages and the real training CLI.

sim_node (Metaworld) + teleop_node (scripted expert) -> recorder_node: teleop demonstrations;
policy_node (tiny VLA, exploring) -> recorder_node: policy episodes with log_prob/value and rewards
from reward_node (sim backend); trainer_node ~/run_iteration -> `python -m ire_vla_ros.cli train
offline` in a child process (Stage 1 SACfD on the policy episodes + Stage 2 SFT, tiny budgets) ->
new checkpoint -> /policy_node/reload (same node, no restart) -> more policy episodes recorded.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from std_msgs.msg import String
from std_srvs.srv import SetBool, Trigger

from ire_vla_ros.episodes.store import read_episode, scan_episodes
from ire_vla_ros.nodes.policy_node import PolicyNode
from ire_vla_ros.nodes.recorder_node import RecorderNode
from ire_vla_ros.nodes.reward_node import RewardNode
from ire_vla_ros.nodes.ros_common import LATCHED_QOS, RELIABLE_QOS
from ire_vla_ros.nodes.sim_node import SimNode
from ire_vla_ros.nodes.teleop_node import TeleopNode
from ire_vla_ros.nodes.trainer_node import TrainerNode
from ire_vla_ros.vla.checkpoint import read_metadata, resolve_checkpoint
from ire_vla_ros.vla.testing import make_tiny_checkpoint
from ros_harness import wait_for  # noqa: E402

TASK = "button-press-topdown-v3"
RATE = 10.0
TINY_TRAINING = ["--set", "sft.steps=10", "--set", "sft.batch_size=8", "--set", "ppo.update_epochs=1",
                 "--set", "ppo.minibatch_size=16", "--set", "ppo.critic_warmup_rollouts=1",
                 "--set", "torch_threads=1",
                 # Stage 1 is SACfD by default (issue 7 item 5): tiny budgets for it too
                 "--set", "sac.critic_pretrain_steps=2", "--set", "sac.distill_steps=2", "--set", "sac.batch_size=16",
                 "--set", "sac.num_critics=2", "--set", "sac.critic_hidden=16", "--set", "sac.utd=2",
                 "--set", "sac.buffer_bytes=1000000", "--set", "sac.demo_buffer_bytes=1000000",
                 "--set", "sac.offline_updates=20"]


class Loop:
    def __init__(self, domain_id, tmp_path):
        self.ctx = Context()
        rclpy.init(context=self.ctx, domain_id=domain_id)
        self.executor = SingleThreadedExecutor(context=self.ctx)  # see test/ros_harness.py
        self.probe = Node("probe", context=self.ctx)
        self.nodes = [self.probe]
        self.executor.add_node(self.probe)
        self.episodes = tmp_path / "episodes"
        self.ckpt_root = tmp_path / "checkpoints"
        # the zero-shot policy: a random-init tiny VLA saved as iteration 0 (root/latest points at it)
        self.ckpt0 = make_tiny_checkpoint(self.ckpt_root)

        self.sim = self.add(SimNode, task=TASK, rate_hz=RATE, seed=0)
        self.teleop = self.add(TeleopNode, mode="scripted_expert", action_spec="metaworld_4d", rate_hz=RATE,
                               frame_id="world", action_noise=0.05, noise_seed=0, enabled=False)
        self.policy = self.add(PolicyNode, checkpoint=str(self.ckpt_root), device="cpu", torch_num_threads=1,
                               control_rate_hz=RATE, command_frame="world", workspace_enabled=False,
                               servo_switch_service="", explore=True, prefer_cv_bridge=False)
        self.reward = self.add(RewardNode, backend="sim", max_episode_steps=120,
                               action_topic="/teleop_node/action")
        self.recorder = self.add(RecorderNode, episodes_dir=str(self.episodes), source="teleop", task=TASK,
                                 action_topic="/teleop_node/action",
                                 start_services=["/sim_node/reset", "/reward_node/start_episode"])
        self.trainer = self.add(TrainerNode, episodes_dir=str(self.episodes), checkpoints_dir=str(self.ckpt_root),
                                device="cpu", extra_args=TINY_TRAINING)
        self.saved, self.trainer_status, self.recorder_status = [], [], []
        self.probe.create_subscription(String, "/recorder_node/episode_saved", self.saved.append, RELIABLE_QOS)
        self.probe.create_subscription(String, "/trainer_node/status", self.trainer_status.append, LATCHED_QOS)
        self.probe.create_subscription(String, "/recorder_node/status", self.recorder_status.append, LATCHED_QOS)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def add(self, cls, **params):
        node = cls(context=self.ctx, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        self.nodes.append(node)
        self.executor.add_node(node)
        return node

    def call(self, srv_type, name, request=None, timeout=15.0):
        client = self.probe.create_client(srv_type, name)
        assert client.wait_for_service(timeout_sec=timeout), name
        done = threading.Event()
        fut = client.call_async(request or srv_type.Request())
        fut.add_done_callback(lambda _f: done.set())
        assert done.wait(timeout), f"{name} did not answer"
        self.probe.destroy_client(client)
        return fut.result()

    def record(self, source: str, n: int, max_steps: int, timeout: float) -> list[str]:
        topic = "/teleop_node/action" if source == "teleop" else "/policy_node/action"
        for node in (self.recorder, self.reward):
            assert node.set_parameters([Parameter("action_topic", value=topic)])[0].successful
        assert self.reward.set_parameters([Parameter("max_episode_steps", value=max_steps)])[0].successful
        assert self.recorder.set_parameters([Parameter("source", value=source)])[0].successful
        # the one that stops first: disabling the policy pauses Servo (its stop path); enabling either
        # one unpauses it
        first, second = (("policy_node", False), ("teleop_node", True)) if source == "teleop" else \
            (("teleop_node", False), ("policy_node", True))
        for node, on in (first, second):
            assert self.call(SetBool, f"/{node}/enable", SetBool.Request(data=on)).success
        paths = []
        for _ in range(n):
            before = len(self.saved)
            resp = self.call(Trigger, "/recorder_node/start_episode")
            assert resp.success, resp.message
            wait_for(lambda: len(self.saved) > before, timeout,
                     f"{source} episode saved (recorder: {self.recorder_status[-1].data if self.recorder_status else ''})")
            paths.append(self.saved[-1].data)
        self.call(SetBool, "/policy_node/enable", SetBool.Request(data=False))
        self.call(SetBool, "/teleop_node/enable", SetBool.Request(data=False))
        return paths

    def close(self):
        self.executor.shutdown()
        for n in reversed(self.nodes):
            n.destroy_node()
        rclpy.shutdown(context=self.ctx)


@pytest.fixture
def loop(ros_domain_id, tmp_path):
    lp = Loop(ros_domain_id, tmp_path)
    yield lp
    lp.close()


def test_closed_loop_demo_rollout_train_reload_rollout(loop):
    t_start = time.monotonic()
    # 1) scripted-expert demonstrations (the robot owner's teleop demos)
    demos = loop.record("teleop", n=2, max_steps=120, timeout=40)
    t_demos = time.monotonic() - t_start
    for p in demos:
        ep = read_episode(p)
        assert ep.source == "teleop" and ep.success and ep.rewards[-1] == 1.0 and ep.log_probs is None
        assert ep.images["main"].shape[1:] == (64, 64, 3) and ep.joint_positions.shape[1] == 9

    # 2) the zero-shot policy explores: short episodes, failures, with log_prob/value
    t0 = time.monotonic()
    rollouts = loop.record("policy", n=2, max_steps=15, timeout=30)
    t_rollouts = time.monotonic() - t0
    for p in rollouts:
        ep = read_episode(p)
        assert ep.source == "policy" and ep.log_probs is not None and ep.values is not None
        assert ep.n_steps >= 10 and np.isfinite(ep.log_probs).all() and len(ep.rewards) == ep.n_steps
    st = json.loads(loop.recorder_status[-1].data)
    assert st["steps_dropped"] == 0
    exact = st["exact_image_steps"] / max(1, st["episode_steps"])

    # 3) one iRe-VLA iteration in a child process; the node stays responsive and refuses a 2nd run
    t0 = time.monotonic()
    resp = loop.call(Trigger, "/trainer_node/run_iteration")
    assert resp.success, resp.message
    refused = loop.call(Trigger, "/trainer_node/run_iteration")
    assert not refused.success and "in progress" in refused.message

    def trainer():
        return json.loads(loop.trainer_status[-1].data) if loop.trainer_status else {}

    wait_for(lambda: trainer().get("state") in ("succeeded", "failed") and trainer().get("reload") not in ("", "pending")
             or trainer().get("state") == "failed", 150, f"training + reload ({trainer()})")
    s = trainer()
    t_train = time.monotonic() - t0
    assert s["state"] == "succeeded", f"{s.get('output_tail')} (log {s.get('log_path')})"
    assert s["reload"] == "ok", s["reload_message"]
    new_ckpt = resolve_checkpoint(loop.ckpt_root)
    assert new_ckpt != loop.ckpt0 and s["checkpoint"] == str(new_ckpt)
    assert read_metadata(new_ckpt)["iteration"] == 1
    # the same policy node now runs the new checkpoint (no restart)
    wait_for(lambda: Path(loop.policy.runner.checkpoint).resolve() == new_ckpt.resolve(), 30, "policy on the new checkpoint")

    # 4) the improved policy drives again; its episodes carry the next iteration's data
    loop.recorder.set_parameters([Parameter("iteration", value=1)])
    t0 = time.monotonic()
    after = loop.record("policy", n=1, max_steps=15, timeout=30)
    ep = read_episode(after[0])
    assert ep.source == "policy" and ep.iteration == 1 and ep.log_probs is not None and ep.n_steps >= 10
    assert len(scan_episodes(loop.episodes).episodes) == 5
    print(f"\nclosed loop: demos {t_demos:.1f} s, 2 rollouts {t_rollouts:.1f} s, training+reload {t_train:.1f} s, "
          f"rollout after reload {time.monotonic() - t0:.1f} s, exact image pairing {exact:.0%}, "
          f"total {time.monotonic() - t_start:.1f} s; stages: {s['stage']} '{s['message']}'")
