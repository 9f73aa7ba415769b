"""recorder_node + reward_node: real nodes exchanging real messages on one executor.

The probe node plays the camera driver, the joint-state publisher, the policy's action stream and
the simulator's success/reward topics (the hardware / other nodes), on the real topics with the
real message types and QoS. Plain-logic classes are tested without ROS first.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rcl_interfaces.srv import SetParameters
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float32, Header, String
from std_srvs.srv import SetBool, Trigger

from ire_vla_ros.episodes.recorder import (
    EpisodeRecorder,
    EpisodeSession,
    JointStateCache,
    StampBuffer,
    Step,
    select_joints,
)
from ire_vla_ros.episodes.store import EpisodeWriter, read_episode, scan_episodes
from ire_vla_ros.nodes.recorder_node import RecorderNode
from ire_vla_ros.nodes.reward_node import EpisodeJudge, RewardNode
from ire_vla_ros.nodes.ros_common import LATCHED_QOS, RELIABLE_QOS, SENSOR_QOS
from ire_vla_ros.robot.action_msg import pack_action, resolve_action_spec, split_action
from ire_vla_ros.robot.image_codec import encode_rgb
from ire_vla_ros.vla.action_spec import EE_DELTA_7D, METAWORLD_4D
from ros_harness import wait_for  # noqa: E402

JOINTS = ["j1", "j2", "j3"]
ACTION_NAMES = list(METAWORLD_4D.names)
MS = 1_000_000


# =============================================================================================
# plain logic
# =============================================================================================
def test_stamp_buffer_exact_then_not_after_then_oldest():
    b = StampBuffer(window_s=1.0)
    assert b.lookup(10) == (None, None, False)
    for t in (10, 20, 30):
        b.add(t, f"m{t}")
    assert b.lookup(20) == ("m20", 20, True)
    assert b.lookup(25) == ("m20", 20, False)
    assert b.lookup(5) == ("m10", 10, False)  # older than everything: the nearest kept (not the newest)
    assert b.nearest(26) == ("m30", 30) and b.nearest(24) == ("m20", 20)
    b.add(15, "m15")  # out of order: still found by stamp
    assert b.lookup(15) == ("m15", 15, True)
    b.prune(lambda t: t < 20)
    assert len(b) == 2 and b.lookup(20) == ("m20", 20, True)


def test_stamp_buffer_holds_a_time_window_at_500_hz():
    """A count-sized buffer (the old 30 items) held 60 ms of 500 Hz joint states; this one holds
    `window_s` seconds whatever the rate."""
    b = StampBuffer(window_s=1.0)
    for k in range(1500):  # 3 s at 500 Hz
        b.add(k * 2 * MS, k)
    assert 499 <= len(b) <= 501 and abs(b.span_s() - 1.0) < 0.005
    newest = 1499 * 2 * MS
    assert b.lookup(newest - 900 * MS) == (1049, newest - 900 * MS, True)  # 0.9 s back: still exact
    assert b.lookup(newest - 1500 * MS)[0] == 999  # beyond the window: the oldest kept, never the newest


def test_joint_cache_merges_split_publishers_by_name():
    c = JointStateCache(window_s=1.0)
    with pytest.raises(KeyError):
        c.lookup(0, ["a"])
    for k in range(500):  # arm at 500 Hz: a = k, b = -k
        c.add(k * 2 * MS, ["a", "b"], [float(k), float(-k)])
    for k in range(50):   # gripper on its own message at 50 Hz
        c.add(k * 20 * MS, ["g"], [float(k)])
    q, names, err = c.lookup(301 * MS, ["g", "a"])
    assert names == ["g", "a"] and q.tolist() == [15.0, 150.0]  # each joint from its own nearest sample
    assert err == 1 * MS  # the largest |sample stamp - image stamp| over the joints: a at 300 or 302 ms
    assert c.names == ["a", "b", "g"] and c.lookup(301 * MS)[1] == ["a", "b", "g"]
    with pytest.raises(KeyError, match="z"):
        c.lookup(0, ["a", "z"])
    with pytest.raises(ValueError):
        c.add(0, ["a"], [1.0, 2.0])


def test_action_msg_pack_split_and_specs():
    names, values = pack_action(ACTION_NAMES, [0.1, 0.2, 0.3, -1], -2.5, 0.7)
    assert names == ACTION_NAMES + ["log_prob", "value"]
    names, a, lp, v = split_action(names, values)
    assert names == ACTION_NAMES and a.dtype == np.float32 and lp == -2.5 and v == pytest.approx(0.7)
    assert split_action(*pack_action(ACTION_NAMES, [0, 0, 0, 1]))[2:] == (None, None)
    with pytest.raises(ValueError):
        split_action(["dx"], [1.0, 2.0])
    with pytest.raises(ValueError):
        split_action(["dx"], [float("nan")])
    with pytest.raises(ValueError):
        pack_action(ACTION_NAMES, [0, 0, 0, 1], log_prob=-1.0)  # value missing
    assert resolve_action_spec("auto", ACTION_NAMES) is METAWORLD_4D
    assert resolve_action_spec("auto", list(EE_DELTA_7D.names)) is EE_DELTA_7D
    assert resolve_action_spec("auto", ["a", "b"]).dim == 2
    with pytest.raises(ValueError):
        resolve_action_spec("ee_delta_7d", ACTION_NAMES)
    assert select_joints(["b", "a"], [2.0, 1.0], ["a", "b"]).tolist() == [1.0, 2.0]
    with pytest.raises(KeyError):
        select_joints(["a"], [1.0], ["a", "z"])


def _session(tmp_path, results, **kw):
    rec = EpisodeRecorder(lambda meta: EpisodeWriter(tmp_path, **meta), max_queue=4096,
                          on_result=lambda k, v: results.append((k, v)))
    now = {"ns": 10**12}

    def meta(action_names, joint_names):
        return dict(instruction="reach", task="reach", source="policy", action_spec=METAWORLD_4D,
                    joint_names=joint_names, camera_names=("main",))

    return rec, now, EpisodeSession(rec, clock_ns=lambda: now["ns"], make_meta=meta, **kw)


def test_saved_paths_are_absolute_when_the_store_is_relative(tmp_path, monkeypatch):
    """`~/episode_saved` goes to other processes (the online learner, run in the trainer's
    working_dir): a relative store path would name another file there. Measured: with
    `--episodes runs/ep` every policy episode was rejected by the learner."""
    from ire_vla_ros.paths import confine

    monkeypatch.chdir(tmp_path)
    results = []
    rec = EpisodeRecorder(lambda meta: EpisodeWriter(Path("runs") / "ep", **meta), max_queue=64,
                          on_result=lambda k, v: results.append((k, v)))
    s = EpisodeSession(rec, clock_ns=lambda: 10**12, joint_names=["a"], make_meta=lambda a, j: dict(
        instruction="reach", task="reach", source="policy", action_spec=METAWORLD_4D, joint_names=j,
        camera_names=("main",)))
    assert s.request_start() is None
    s.begin_recording()
    s.add_joints(10**12, ["a"], [0.0])
    s.add_image(10**12, np.zeros((4, 4, 3), np.uint8))
    assert s.on_action(10**12, ACTION_NAMES, [0.1, 0, 0, 1]) is None
    assert s.finish(True, "test")[0]
    assert rec.flush(10.0) and results[-1][0] == "saved", results
    saved = Path(results[-1][1])
    assert saved.is_absolute() and saved.is_file()
    monkeypatch.chdir("/")  # the learner's view: another working directory, the root made absolute
    assert confine(tmp_path / "runs" / "ep", str(saved)) == saved.resolve()
    rec.close()


def test_session_pairs_500_hz_joints_with_old_image_stamps(tmp_path):
    """Joints at 500 Hz, camera at 30 Hz, the policy acting on images 0.03-0.5 s old: each step gets
    the joints of its image's time (error <= 1 ms), not the newest; a step whose joints are stale
    still records, with its error, counted as a mismatch."""
    results = []
    rec, now, s = _session(tmp_path, results, joint_names=["a", "b"], window_s=1.0, tolerance_s=0.005)
    t0 = now["ns"]
    assert s.request_start() is None
    s.begin_recording()
    for k in range(1000):                      # 2 s of joints at 500 Hz: a = time in ms
        s.add_joints(t0 + k * 2 * MS, ["a", "b"], [k * 2.0, 1.0])
    images = [t0 + round(k * 1000 / 30) * MS for k in range(60)]
    for k, t in enumerate(images):
        s.add_image(t, np.full((4, 4, 3), k, np.uint8))
    now["ns"] = t0 + 2000 * MS
    acted_on = [images[45], images[50], images[55], images[59]]  # 0.5 .. 0.03 s old
    for t in acted_on:
        assert s.on_action(t, ACTION_NAMES, [0.1, 0, 0, 1]) is None
    late = t0 + 2500 * MS  # the joint publisher stalled: its newest sample is 0.502 s older than the image
    s.add_image(late, np.zeros((4, 4, 3), np.uint8))
    assert s.on_action(late, ACTION_NAMES, [0.1, 0, 0, 1]) is None  # recorded, with its error, counted
    ok, msg = s.finish(True, "test")
    assert ok, msg
    assert rec.flush(10.0) and results[-1][0] == "saved", results
    ep = read_episode(results[-1][1])
    # a = the joint sample time in ms: the nearest sample (the earlier one on a tie)
    assert ep.joint_positions[:4, 0].tolist() == [float((t - t0) // MS // 2 * 2) for t in acted_on]
    err = ep.step_info["joint_stamp_error_s"]
    assert np.all(err[:4] <= 0.001) and err[4] == pytest.approx(0.502)
    assert s.counters["pairing_mismatches"] == 1
    assert ep.metadata["pairing"]["pairing_mismatches"] == 1
    assert ep.metadata["pairing"]["joint_stamp_error_ms_max"] == pytest.approx(502.0)
    rec.close()


def test_session_refusals_and_writer_failure(tmp_path):
    results = []
    rec, now, s = _session(tmp_path, results)
    assert s.on_action(now["ns"], ACTION_NAMES, [0, 0, 0, 1]) == "not recording (idle)"
    assert s.request_start() is None
    assert "cannot start" in s.request_start()  # a second trigger
    s.begin_recording()
    assert "no image" in s.on_action(now["ns"], ACTION_NAMES, [0, 0, 0, 1])
    s.add_image(now["ns"], np.zeros((4, 4, 3), np.uint8))
    assert "no joint state" in s.on_action(now["ns"], ACTION_NAMES, [0, 0, 0, 1])
    s.add_joints(now["ns"], JOINTS, [0.0, 0.0, 0.0])
    assert "positions" in s.on_action(now["ns"], ACTION_NAMES, [0, 0, 1])
    assert s.on_action(now["ns"], ACTION_NAMES, [0, 0, 0, 1]) is None
    assert "differ" in s.on_action(now["ns"], ["x", "y"], [0, 0])
    assert s.counters["rejected_actions"] == 2 and s.counters["skipped_no_obs"] == 2
    assert not s.writer_failed(s._seq + 1)  # a failure of another episode leaves this one alone
    assert s.writer_failed(s._seq) and s.state == "idle"
    assert not s.finish(True, "late stop")[0]
    rec.close()


def test_session_records_interventions(tmp_path):
    """Operator actions during a policy episode are steps flagged as interventions (with log_prob/value
    0 to keep the policy terms on every step); the policy's actions while the operator holds the
    robot are skipped; the metadata counts the interventions."""
    results = []
    rec, now, s = _session(tmp_path, results, intervention_hold_s=0.5)
    assert s.request_start() is None
    s.begin_recording()
    t = now["ns"]
    s.add_joints(t, JOINTS, [0.0, 0.0, 0.0])
    s.add_image(t, np.zeros((4, 4, 3), np.uint8))
    policy = list(pack_action(ACTION_NAMES, [0.1, 0, 0, 1], -1.0, 0.3))
    teleop = list(pack_action(ACTION_NAMES, [0.9, 0, 0, -1]))
    idle = list(pack_action(ACTION_NAMES, [0, 0, 0, -1]))
    assert s.on_action(t, *idle, intervention=True) == "operator idle"  # zero motion: not an intervention
    assert s.on_action(t, *policy) is None
    assert s.on_action(t, *teleop, intervention=True) is None
    now["ns"] += 100 * MS
    assert s.on_action(t, *policy) == "the operator is intervening"  # within the hold
    assert s.on_action(t, *teleop, intervention=True) is None
    now["ns"] += 600 * MS
    assert s.on_action(t, *idle, intervention=True) == "operator idle"  # no motion, same gripper
    assert s.on_action(t, *policy) is None  # the operator let go
    assert s.finish(True, "test")[0]
    assert rec.flush(10.0) and results[-1][0] == "saved", results
    ep = read_episode(results[-1][1])
    assert ep.step_info["intervention"].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert ep.actions[:, 0].tolist() == pytest.approx([0.1, 0.9, 0.9, 0.1])
    assert ep.log_probs.tolist() == [-1.0, 0.0, 0.0, -1.0]
    assert ep.metadata["interventions"] == 2 and s.counters["skipped_during_intervention"] == 1
    rec.close()


def test_episode_judge_backends():
    j = EpisodeJudge("sim", max_steps=5)
    assert j.on_step(0.0) == (None, None)  # not started
    j.start(0.0)
    assert j.on_sim_success(True) is None  # before the first step: stale message of the last episode
    assert j.on_step(0.1) == (None, None)  # sim: rewards come per simulator step
    assert j.on_sim_reward(2.0) == 0.0     # sparse
    end = j.on_sim_success(True)
    assert end.success and end.final_reward == 1.0 and not j.active
    j.start(1.0)
    for _ in range(4):
        assert j.on_step(1.1)[1] is None
    end = j.on_step(1.2)[1]
    assert end is not None and not end.success and "step limit" in end.reason

    d = EpisodeJudge("sim", reward_mode="dense")
    d.start(0.0)
    assert d.on_sim_reward(3.5) == 3.5
    h0 = EpisodeJudge("timeout")
    h0.start(0.0)
    assert h0.on_step(0.0) == (0.0, None)

    h = EpisodeJudge("human", max_duration_s=2.0)
    h.start(0.0)
    assert h.on_sim_success(True) is None  # sim success ignored by the human backend
    assert h.check_timeout(1.0) is None
    assert h.mark(True).success
    assert h.mark(True) is None  # already ended
    h.start(10.0)
    end = h.check_timeout(12.5)
    assert end is not None and not end.success

    with pytest.raises(ValueError):
        EpisodeJudge("oracle")


def _writer_factory(root):
    def make(meta):
        return EpisodeWriter(root, **meta)
    return make


def _meta():
    return dict(instruction="press the button", task="button", source="teleop", action_spec=METAWORLD_4D,
                joint_names=JOINTS, camera_names=("main",), iteration=2)


def test_episode_recorder_thread_writes_and_counts_drops(tmp_path):
    results = []
    gate = threading.Event()

    class GatedWriter(EpisodeWriter):  # the real writer, held back to fill the queue deterministically
        def append(self, **kw):
            gate.wait(5.0)
            return super().append(**kw)

    rec = EpisodeRecorder(lambda meta: GatedWriter(tmp_path, **meta), max_queue=3,
                          on_result=lambda k, v: results.append((k, v)))
    rec.begin(_meta())
    img = np.zeros((8, 8, 3), np.uint8)
    accepted = sum(rec.add_step(Step(image=img, joint_positions=np.zeros(3, np.float32),
                                     action=np.zeros(4, np.float32), timestamp=float(i), reward=0.5))
                   for i in range(10))
    assert accepted < 10 and rec.stats.steps_dropped == 10 - accepted
    gate.set()
    rec.end(True)
    assert rec.flush(10.0)
    assert results and results[-1][0] == "saved"
    ep = read_episode(results[-1][1])
    assert ep.n_steps == accepted == rec.stats.steps_written and ep.success and ep.iteration == 2
    rec.begin(_meta())
    rec.add_step(Step(image=img, joint_positions=np.zeros(3, np.float32), action=np.zeros(4, np.float32),
                      timestamp=0.0))
    rec.close()  # an unfinished episode is discarded, not left half-written
    assert results[-1][0] == "discarded"
    assert not list(tmp_path.glob("*.partial"))


# =============================================================================================
# ROS harness
# =============================================================================================




def wait_matched(pub, n=1, timeout=10.0):
    wait_for(lambda: pub.get_subscription_count() >= n, timeout, f"a subscriber on {pub.topic_name}")


class FakeRobot:
    """Publishes what a camera driver / joint-state publisher / policy / simulator would."""

    def __init__(self, h, action_topic="/policy_node/action", size=8):
        p = h.probe
        self.probe = p
        self.size = size
        self.image = p.create_publisher(Image, "/camera/image_raw", SENSOR_QOS)
        self.joints = p.create_publisher(JointState, "/joint_states", SENSOR_QOS)
        self.action = p.create_publisher(JointState, action_topic, RELIABLE_QOS)
        self.instruction = p.create_publisher(String, "/policy_node/instruction", LATCHED_QOS)
        self.sim_success = p.create_publisher(Bool, "/sim_node/success", RELIABLE_QOS)
        self.sim_reward = p.create_publisher(Float32, "/sim_node/reward", RELIABLE_QOS)
        self.t0 = p.get_clock().now().nanoseconds

    def stamp(self, k):
        from builtin_interfaces.msg import Time

        ns = self.t0 + k * 100_000_000
        return Time(sec=ns // 10**9, nanosec=ns % 10**9)

    def observe(self, k):
        img = np.full((self.size, self.size, 3), k % 256, np.uint8)
        msg = Image(**encode_rgb(img))
        msg.header.stamp = self.stamp(k)
        js = JointState(name=JOINTS, position=[float(k), 0.5, -0.5])
        js.header.stamp = self.stamp(k)
        self.joints.publish(js)
        self.image.publish(msg)

    def act(self, k, policy=True):
        js = JointState()
        js.header.stamp = self.stamp(k)
        js.name = ACTION_NAMES + (["log_prob", "value"] if policy else [])
        js.position = [k / 100, 0.0, -k / 100, 1.0] + ([-1.0 - k, 0.1 * k] if policy else [])
        self.action.publish(js)


def start_episode(h, status, robot=None):
    resp = h.call(Trigger, "/recorder_node/start_episode")
    assert resp.success, resp.message
    wait_for(lambda: status and json.loads(status[-1].data)["state"] == "recording", 10, "recording state")
    if robot is not None:  # stamps from now on: earlier ones belong to the previous episode
        robot.t0 = h.probe.get_clock().now().nanoseconds


# =============================================================================================
# ROS tests
# =============================================================================================
def test_policy_episode_sim_success_pairs_by_stamp(ros, tmp_path):
    ros.add(RewardNode, backend="sim", max_episode_steps=100)
    ros.add(RecorderNode, episodes_dir=str(tmp_path), source="policy", iteration=3, task="button-press",
            start_services=["/reward_node/start_episode"])
    robot = FakeRobot(ros)
    saved = ros.collect(String, "/recorder_node/episode_saved")
    status = ros.collect(String, "/recorder_node/status", LATCHED_QOS)
    ends = ros.collect(Bool, "/reward_node/episode_end")
    robot.instruction.publish(String(data="press the button"))
    for pub in (robot.image, robot.joints, robot.action, robot.sim_success, robot.sim_reward):
        wait_matched(pub)
    start_episode(ros, status, robot)

    # an action computed from an observation of before the episode start (e.g. before the sim reset)
    robot.observe(-5)
    robot.act(-5)
    # The "policy" lags one observation behind: action k arrives after image k+1 was published.
    n = 6
    robot.observe(0)
    time.sleep(0.05)
    for k in range(n):
        robot.observe(k + 1)
        robot.sim_reward.publish(Float32(data=0.5))
        robot.sim_success.publish(Bool(data=False))
        time.sleep(0.03)
        robot.act(k)
        time.sleep(0.03)
    robot.sim_success.publish(Bool(data=True))
    wait_for(lambda: saved, 10, "episode saved")
    assert [e.data for e in ends] == [True]

    ep = read_episode(saved[0].data)
    assert ep.success and ep.source == "policy" and ep.iteration == 3 and ep.task == "button-press"
    assert ep.instruction == "press the button" and ep.joint_names == JOINTS
    assert ep.n_steps == n
    # each action is paired with the image and joints of its own stamp, not the newest ones
    assert [int(img[0, 0, 0]) for img in ep.images["main"]] == list(range(n))
    assert ep.joint_positions[:, 0].tolist() == list(range(n))
    np.testing.assert_allclose(ep.actions[:, 0], np.arange(n) / 100, atol=1e-6)
    np.testing.assert_allclose(ep.log_probs, -1.0 - np.arange(n))
    np.testing.assert_allclose(ep.values, 0.1 * np.arange(n), atol=1e-6)
    # sparse reward: 0 per step, 1 on the last (successful) step
    assert ep.rewards.tolist() == [0.0] * (n - 1) + [1.0]
    st = json.loads(status[-1].data)
    assert st["exact_image_steps"] == n and st["steps_dropped"] == 0 and st["state"] == "idle"
    assert st["skipped_stale"] == 1


def test_teleop_source_human_label_and_abort(ros, tmp_path):
    ros.add(RewardNode, backend="human", max_episode_steps=0, action_topic="/teleop_node/action")
    ros.add(RecorderNode, episodes_dir=str(tmp_path), source="teleop", action_topic="/teleop_node/action",
            instruction="open the drawer", instruction_topic="/unused/instruction")
    robot = FakeRobot(ros, action_topic="/teleop_node/action")
    saved = ros.collect(String, "/recorder_node/episode_saved")
    status = ros.collect(String, "/recorder_node/status", LATCHED_QOS)
    for pub in (robot.image, robot.joints, robot.action):
        wait_matched(pub)

    # 1) operator labels the episode a failure through reward_node
    start_episode(ros, status, robot)
    for k in range(4):
        robot.observe(k)
        time.sleep(0.02)
        robot.act(k, policy=False)
        time.sleep(0.02)
    resp = ros.call(SetBool, "/reward_node/mark_success", SetBool.Request(data=False))
    assert resp.success, resp.message
    wait_for(lambda: len(saved) == 1, 10, "first episode saved")
    ep = read_episode(saved[0].data)
    assert not ep.success and ep.n_steps == 4 and ep.source == "teleop" and ep.log_probs is None
    assert ep.instruction == "open the drawer" and ep.task == "open the drawer"

    # 2) stop through the recorder's own labeled stop
    start_episode(ros, status, robot)
    for k in range(3):
        robot.observe(k)
        time.sleep(0.02)
        robot.act(k, policy=False)
        time.sleep(0.02)
    time.sleep(0.1)
    resp = ros.call(SetBool, "/recorder_node/stop_episode_labeled", SetBool.Request(data=True))
    assert resp.success, resp.message
    wait_for(lambda: len(saved) == 2, 10, "second episode saved")
    assert read_episode(saved[1].data).success

    # 3) abort: nothing is kept
    start_episode(ros, status, robot)
    robot.observe(0)
    time.sleep(0.02)
    robot.act(0, policy=False)
    time.sleep(0.1)
    assert ros.call(Trigger, "/recorder_node/abort_episode").success
    assert not ros.call(Trigger, "/recorder_node/stop_episode").success  # nothing to stop
    wait_for(lambda: json.loads(status[-1].data)["episodes_discarded"] == 1, 10, "discard")
    assert len(scan_episodes(tmp_path).episodes) == 2
    assert not list(Path(tmp_path).glob("*.partial"))


def test_timeout_backend_and_refused_start(ros, tmp_path):
    ros.add(RewardNode, backend="timeout", max_episode_steps=3)
    ros.add(RecorderNode, episodes_dir=str(tmp_path), instruction="reach",
            start_services=["/reward_node/start_episode", "/no_such_node/reset"])
    resp = ros.call(Trigger, "/recorder_node/start_episode")
    assert not resp.success and "/no_such_node/reset" in resp.message

    rewards = ros.collect(Float32, "/reward_node/reward")
    ends = ros.collect(Bool, "/reward_node/episode_end")
    robot = FakeRobot(ros)
    wait_matched(robot.action, 2)
    assert ros.call(Trigger, "/reward_node/start_episode").success
    for k in range(5):
        robot.act(k)
        time.sleep(0.05)
    wait_for(lambda: ends, 5, "episode end")
    time.sleep(0.2)
    assert [e.data for e in ends] == [False]  # once, a failure, at the 3rd step
    assert [r.data for r in rewards] == [0.0, 0.0, 0.0]
    assert not ros.call(SetBool, "/reward_node/mark_success", SetBool.Request(data=True)).success


def test_reward_node_live_parameters(ros):
    """A step limit lowered mid-episode through SetParameters ends the episode at the new limit;
    the success reward set at run time is the one paid; start-up-only parameters are read-only."""
    ros.add(RewardNode, backend="human", max_episode_steps=100)
    rewards = ros.collect(Float32, "/reward_node/reward")
    ends = ros.collect(Bool, "/reward_node/episode_end")
    robot = FakeRobot(ros)
    wait_matched(robot.action)
    assert not _set_params(ros, "reward_node", auto_start=True)["auto_start"].successful
    assert not _set_params(ros, "reward_node", reward_mode="shaped")["reward_mode"].successful
    assert ros.call(Trigger, "/reward_node/start_episode").success
    for k in range(3):
        robot.act(k)
        wait_for(lambda: len(rewards) == k + 1, 10, f"reward {k}")
    r = _set_params(ros, "reward_node", max_episode_steps=4, success_reward=2.5)
    assert all(v.successful for v in r.values()), r
    robot.act(3)  # the 4th step: the new limit
    wait_for(lambda: ends, 10, "episode end at the lowered limit")
    assert [e.data for e in ends] == [False]
    assert ros.call(Trigger, "/reward_node/start_episode").success
    robot.act(0)
    wait_for(lambda: len(rewards) == 5, 10, "a step of the second episode")  # 3 + the final one + 1
    assert ros.call(SetBool, "/reward_node/mark_success", SetBool.Request(data=True)).success
    wait_for(lambda: len(ends) == 2, 10, "second end")
    assert ends[-1].data and rewards[-1].data == 2.5


def test_recorder_node_records_operator_interventions(ros, tmp_path):
    node = ros.add(RecorderNode, episodes_dir=str(tmp_path), instruction="reach", start_services=[""],
                   intervention_hold_s=5.0)
    robot = FakeRobot(ros)
    teleop = ros.probe.create_publisher(JointState, "/teleop_node/action", RELIABLE_QOS)
    saved = ros.collect(String, "/recorder_node/episode_saved")
    status = ros.collect(String, "/recorder_node/status", LATCHED_QOS)
    for pub in (robot.image, robot.joints, robot.action, teleop):
        wait_matched(pub)
    start_episode(ros, status, robot)
    robot.observe(0)
    wait_for(lambda: len(node.session.images) and len(node.session.joints), 10, "the observation")
    robot.act(0)
    wait_for(lambda: node.session.counters["episode_steps"] == 1, 10, "the policy's step")
    names, values = pack_action(ACTION_NAMES, [0.5, 0, 0, -1])
    teleop.publish(JointState(header=Header(stamp=robot.stamp(0)), name=names, position=values))
    wait_for(lambda: node.session.counters["interventions"] == 1, 10, "the operator's step")
    robot.act(0)  # within the hold: the robot follows the operator, not this action
    wait_for(lambda: node.session.counters["skipped_during_intervention"] == 1, 10, "the skipped policy action")
    assert ros.call(Trigger, "/recorder_node/stop_episode").success
    wait_for(lambda: saved, 20, "episode saved")
    ep = read_episode(saved[0].data)
    assert ep.step_info["intervention"].tolist() == [0.0, 1.0] and ep.metadata["interventions"] == 1
    assert ep.actions[:, 0].tolist() == pytest.approx([0.0, 0.5])


def test_pairing_with_the_fake_robot_at_500_hz(ros, tmp_path):
    """fake_robot_node publishes joints at 500 Hz (q_j = 0.3 sin(0.5 t + j), t its monotonic clock)
    and a small camera at 30 Hz; the "policy" acts on frames 0.3-0.6 s old. Each recorded step must
    hold the joints of its image's time, not the newest ones (which differ by up to 0.09 rad)."""
    import math

    from ire_vla_ros.nodes.fake_robot_node import FakeRobotNode

    ros.add(FakeRobotNode, camera_hz=30.0, joint_hz=500.0, ee_pose_hz=0.0, image_width=32, image_height=24,
            joint_names=["a", "b", "c"])
    node = ros.add(RecorderNode, episodes_dir=str(tmp_path), instruction="reach", start_services=[""])
    stamps = []
    ros.probe.create_subscription(Image, "/camera/image_raw", lambda m: stamps.append(m.header.stamp), SENSOR_QOS)
    action = ros.probe.create_publisher(JointState, "/policy_node/action", RELIABLE_QOS)
    saved = ros.collect(String, "/recorder_node/episode_saved")
    wait_matched(action)
    assert ros.call(Trigger, "/recorder_node/start_episode").success
    wait_for(lambda: node.session.state == "recording", 10, "recording")
    n0 = len(stamps)
    wait_for(lambda: len(stamps) >= n0 + 30, 30, "a second of camera frames")
    names, values = pack_action(ACTION_NAMES, [0.1, 0, 0, 1], -1.0, 0.5)
    acted = []
    deadline = time.monotonic() + 30
    while len(acted) < 8 and time.monotonic() < deadline:
        now = ros.probe.get_clock().now().nanoseconds
        old = [st for st in stamps[n0:] if 0.3e9 <= now - (st.sec * 10**9 + st.nanosec) <= 0.6e9]
        if old and old[0] not in acted:
            action.publish(JointState(header=Header(stamp=old[0]), name=names, position=values))
            acted.append(old[0])
        time.sleep(0.05)
    assert len(acted) == 8
    wait_for(lambda: node.session.counters["episode_steps"] == 8, 10, "8 steps")
    offset = time.time() - time.monotonic()  # node clock (system time) -> the fake robot's monotonic clock
    assert ros.call(Trigger, "/recorder_node/stop_episode").success
    wait_for(lambda: saved, 20, "episode saved")
    ep = read_episode(saved[0].data)
    assert ep.n_steps == 8 and ep.joint_names == ["a", "b", "c"]
    for t_img, q in zip(ep.timestamps, ep.joint_positions):
        expected = [0.3 * math.sin(0.5 * (t_img - offset) + j) for j in range(3)]
        assert np.allclose(q, expected, atol=0.01), (t_img, q, expected)


def test_full_queue_drops_are_counted_and_reported(ros, tmp_path):
    node = ros.add(RecorderNode, episodes_dir=str(tmp_path), instruction="reach", start_services=[""],
                   max_queue=2)
    # Hold the writer back (as a slow disk would) so the queue fills whatever the machine's speed.
    gate = threading.Event()
    real_factory = node.recorder.writer_factory

    class Held:
        def __init__(self, meta):
            self.w = real_factory(meta)

        def append(self, **kw):
            gate.wait(30.0)
            return self.w.append(**kw)

        def __getattr__(self, name):
            return getattr(self.w, name)

    node.recorder.writer_factory = Held
    robot = FakeRobot(ros, size=8)
    saved = ros.collect(String, "/recorder_node/episode_saved")
    status = ros.collect(String, "/recorder_node/status", LATCHED_QOS)
    diags = ros.collect(DiagnosticArray, "/diagnostics", 10)
    for pub in (robot.image, robot.joints, robot.action):
        wait_matched(pub)
    start_episode(ros, status, robot)
    robot.observe(0)
    wait_for(lambda: len(node.session.images) and len(node.session.joints), 10, "the observation")
    for k in range(20):  # one at a time: the publisher keeps the last 10
        robot.act(0)
        wait_for(lambda: node.session.counters["episode_steps"] == k + 1, 20, f"action {k} received")
    # queue (2) + the step in the writer's hands (1) + the held-back step (1) at most are kept
    assert node.recorder.stats.steps_dropped >= 16
    gate.set()
    assert ros.call(Trigger, "/recorder_node/stop_episode").success
    wait_for(lambda: saved, 30, "episode saved")
    wait_for(lambda: json.loads(status[-1].data)["queue_depth"] == 0, 10, "status update")
    st = json.loads(status[-1].data)
    assert st["steps_written"] + st["steps_dropped"] + st["step_errors"] == st["episode_steps"] == 20
    assert read_episode(saved[0].data, load_images=False).n_steps == st["steps_written"] <= 4
    wait_for(lambda: any(s.level == DiagnosticStatus.WARN and "dropped" in s.message
                         for d in diags for s in d.status), 5, "a WARN diagnostic about drops")


def _set_params(ros, node_name, **values):
    from rcl_interfaces.msg import Parameter as ParamMsg

    req = SetParameters.Request(parameters=[ParamMsg(name=k, value=Parameter(k, value=v).get_parameter_value())
                                            for k, v in values.items()])
    return {k: r for k, r in zip(values, ros.call(SetParameters, f"/{node_name}/set_parameters", req).results)}


def test_live_parameters_split_joint_publishers_and_limits(ros, tmp_path):
    """Writable parameters take effect when set through SetParameters (read-only and bad values
    are refused with a reason); the episode records the values in force and the policy's
    parameters; arm and gripper joint states from separate publishers are merged by name with the
    pairing error recorded; oversized instructions, operator actions and images claiming sizes
    their data do not have are refused and counted."""
    node = ros.add(RecorderNode, episodes_dir=str(tmp_path), instruction="reach", start_services=[""],
                   pairing_tolerance_s=0.5, joint_names=["j1", "j2", "g"])
    p = ros.probe
    image = p.create_publisher(Image, "/camera/image_raw", SENSOR_QOS)
    arm = p.create_publisher(JointState, "/joint_states", SENSOR_QOS)
    gripper = p.create_publisher(JointState, "/joint_states", SENSOR_QOS)  # a second driver, same topic
    action = p.create_publisher(JointState, "/policy_node/action", RELIABLE_QOS)
    instruction = p.create_publisher(String, "/policy_node/instruction", LATCHED_QOS)
    policy_params = p.create_publisher(String, "/policy_node/params_in_force", LATCHED_QOS)
    saved = ros.collect(String, "/recorder_node/episode_saved")
    for pub in (image, arm, gripper, action, instruction, policy_params):
        wait_matched(pub)

    r = _set_params(ros, "recorder_node", episodes_dir="/tmp/elsewhere")
    assert not r["episodes_dir"].successful  # read-only: paths are launch-time only
    r = _set_params(ros, "recorder_node", source="bogus")
    assert not r["source"].successful and "source" in r["source"].reason
    r = _set_params(ros, "recorder_node", instruction="x" * 3000)
    assert not r["instruction"].successful and "max_instruction_chars" in r["instruction"].reason
    r = _set_params(ros, "recorder_node", iteration=7, task="T", pairing_tolerance_s=0.001, buffer_s=2.0)
    assert all(v.successful for v in r.values()), r
    assert node.session.tolerance_ns == 1_000_000 and node.session.images.window_ns == 2 * 10**9

    policy_params.publish(String(data=json.dumps({"max_translation_m": 0.01})))
    instruction.publish(String(data="y" * 5000))  # refused: the parameter's instruction stays
    big = Image(height=100000, width=100000, encoding="rgb8", step=300000, data=b"\0" * 12)
    image.publish(big)
    operator = p.create_publisher(JointState, "/teleop_node/action", RELIABLE_QOS)  # the intervention topic
    wait_matched(operator)
    operator.publish(JointState(name=[f"a{k}" for k in range(65)], position=[0.0] * 65))  # > 64 components
    wait_for(lambda: node.rejected["instructions"] == 1 and node.rejected["images"] == 1
             and node.rejected["interventions"] == 1, 10, lambda: f"refusals ({dict(node.rejected)})")
    wait_for(lambda: node._policy_params is not None, 10, "policy params")

    assert ros.call(Trigger, "/recorder_node/start_episode").success
    time.sleep(0.1)  # the stamps below (down to now - 30 ms) must be after the episode's start
    now = p.get_clock().now().nanoseconds

    def stamp(ns):
        return Time(sec=ns // 10**9, nanosec=ns % 10**9)

    arm.publish(JointState(header=Header(stamp=stamp(now - 5 * MS)), name=["j1", "j2"],
                           position=[1.0, 2.0]))
    gripper.publish(JointState(header=Header(stamp=stamp(now - 30 * MS)), name=["g"],
                               position=[0.5]))
    img = Image(**encode_rgb(np.zeros((8, 8, 3), np.uint8)))
    img.header.stamp = stamp(now)
    image.publish(img)
    wait_for(lambda: node.session.images.lookup(now)[2] and len(node.session.joints.names) == 3, 10, "observation")
    names, values = pack_action(ACTION_NAMES, [0.1, 0, 0, 1], -1.0, 0.5)
    action.publish(JointState(header=img.header, name=names, position=values))
    wait_for(lambda: node.session.counters["episode_steps"] == 1, 10, "the step")
    assert ros.call(Trigger, "/recorder_node/stop_episode").success
    wait_for(lambda: saved, 20, "episode saved")

    ep = read_episode(saved[0].data)
    assert ep.iteration == 7 and ep.task == "T" and ep.instruction == "reach"
    assert ep.joint_names == ["j1", "j2", "g"] and ep.joint_positions[0].tolist() == [1.0, 2.0, 0.5]
    assert ep.step_info["joint_stamp_error_s"][0] == pytest.approx(0.030, abs=1e-6)
    assert ep.metadata["pairing"]["pairing_mismatches"] == 1  # 30 ms > the 1 ms now in force
    rp = ep.metadata["recorder_params"]
    assert rp["pairing_tolerance_s"] == 0.001 and rp["buffer_s"] == 2.0 and rp["iteration"] == 7
    assert ep.metadata["policy_params"] == {"max_translation_m": 0.01}


def test_help_does_not_start_ros():
    import subprocess
    import sys

    for mod in ("recorder_node", "reward_node"):
        out = subprocess.run([sys.executable, "-m", f"ire_vla_ros.nodes.{mod}", "--help"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "Parameters" in out.stdout and "action_topic" in out.stdout, out.stderr
        if mod == "recorder_node":  # the resource limits are stated
            assert "max_instruction_chars" in out.stdout and "max_image_bytes" in out.stdout
