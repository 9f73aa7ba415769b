"""policy_node end to end: real nodes exchanging real messages over DDS (shared `ros` harness).

A fake robot node (test double for hardware only) publishes camera images, joint states and the EE
pose on the real topics with the real types and listens where MoveIt Servo and the recorder would.
The policy is a real tiny checkpoint saved and loaded through ire_vla_ros.vla.checkpoint.
"Commands" are ~/action messages (one per command actually sent); zero twists are stops.
Every "nothing happened" window is checked against a counter that moved in the same window.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Bool, Float64, String
from std_srvs.srv import SetBool, Trigger

from ire_vla_ros.nodes.policy_node import PARAMS, PolicyNode
from ire_vla_ros.nodes.ros_common import ESTOP_QOS, LATCHED_QOS, SENSOR_QOS, NodeStartupError
from ire_vla_ros.robot.image_codec import encode_rgb
from ros_harness import wait_for

REPO = Path(__file__).resolve().parent.parent
JOINTS = ["right_j0", "right_j1", "right_j2", "right_j3", "right_j4", "right_j5", "right_j6", "r_close", "l_close"]
BIG = np.array([0.9, -0.6, 0.8, 0.5], np.float32)  # the "big" checkpoint's (deterministic) action


# ------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """base: random tiny policy; big: acts ~BIG; nan: acts NaN. All real saved checkpoints."""
    from ire_vla_ros.vla.checkpoint import load_checkpoint, save_checkpoint
    from ire_vla_ros.vla.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    base = make_tiny_checkpoint(root / "base", joint_names=JOINTS)
    policy = load_checkpoint(base)
    a = len(BIG)
    policy.set_normalization(BIG, np.full(a, 1e-6), np.zeros(len(JOINTS)), np.ones(len(JOINTS)))
    big = save_checkpoint(policy, root / "big", stage="test", iteration=1)
    policy.set_normalization(np.full(a, np.nan), np.ones(a), np.zeros(len(JOINTS)), np.ones(len(JOINTS)))
    nan = save_checkpoint(policy, root / "nan", stage="test", iteration=2)
    return {"root": root, "base": base, "big": big, "nan": nan}


# ------------------------------------------------------------------------------ rig
class FakeRobot(Node):
    """Camera + joint states + EE pose publisher, Servo / gripper / recorder listener."""

    def __init__(self, context, rate_hz=20.0, joint_names=None, compressed="", reliable_camera=False,
                 with_estop=True):
        super().__init__("fake_robot", context=context)
        self.lock = threading.Lock()
        self.image_mode = "good"        # good | off | bad_encoding | bad_step | bad_size | huge
        self.stamp_age_s = 0.0          # > 0: images carry a stamp this much older than now
        self.joints_on = True
        self.joint_names = list(joint_names or JOINTS) + ["extra_joint"]
        self.ee_position = [0.0, 0.0, 0.3]
        self.compressed = compressed
        self.image_stamps: set[tuple[int, int]] = set()
        self.twists: list[TwistStamped] = []
        self.poses: list[PoseStamped] = []
        self.actions: list[JointState] = []
        self.grippers: list[float] = []
        self.diagnostics: list[DiagnosticArray] = []
        self.rng = np.random.default_rng(0)
        cam_qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE) if reliable_camera else SENSOR_QOS
        if compressed:
            self.cam = self.create_publisher(CompressedImage, "/camera/image_raw/compressed", cam_qos)
        else:
            self.cam = self.create_publisher(Image, "/camera/image_raw", cam_qos)
        self.js = self.create_publisher(JointState, "/joint_states", 10)
        self.ee = self.create_publisher(PoseStamped, "/ee_pose", 10)
        self.estop = self.create_publisher(Bool, "/estop", ESTOP_QOS) if with_estop else None
        self.instr = self.create_publisher(String, "/policy_node/instruction", LATCHED_QOS)
        self.create_subscription(TwistStamped, "/servo_node/delta_twist_cmds", self._add("twists"), 10)
        self.create_subscription(PoseStamped, "/servo_node/pose_target_cmds", self._add("poses"), 10)
        self.create_subscription(JointState, "/policy_node/action", self._add("actions"), 10)
        self.create_subscription(Float64, "/gripper/command", lambda m: self._append("grippers", m.data), 10)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._add("diagnostics"), 10)
        self.create_timer(1.0 / rate_hz, self._publish)

    def _append(self, name, item):
        with self.lock:
            getattr(self, name).append(item)

    def _add(self, name):
        return lambda msg: self._append(name, msg)

    def _image(self, stamp):
        img = self.rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)  # resized to 64x64 by the node
        if self.compressed:
            import cv2

            ok, buf = cv2.imencode("." + self.compressed, img[:, :, ::-1])
            msg = CompressedImage(format=f"rgb8; {self.compressed} compressed bgr8", data=buf.tobytes())
        else:
            f = encode_rgb(img, "bgr8", row_padding=4)
            if self.image_mode == "bad_encoding":
                f["encoding"] = "yuv422"
            elif self.image_mode == "bad_step":
                f["step"] = 80 * 3 - 1
            elif self.image_mode == "bad_size":
                f["data"] = f["data"][:-7]
            elif self.image_mode == "huge":  # claims 100000 x 100000 with a few bytes of data
                f.update(width=100_000, height=100_000, step=300_000)
            msg = Image(**f)
        msg.header.stamp, msg.header.frame_id = stamp, "camera"
        return msg

    def _publish(self):
        now = self.get_clock().now()
        stamp = now.to_msg()
        if self.image_mode != "off":
            img_stamp = (now - _duration(self.stamp_age_s)).to_msg() if self.stamp_age_s else stamp
            with self.lock:
                self.image_stamps.add((img_stamp.sec, img_stamp.nanosec))
            self.cam.publish(self._image(img_stamp))
        if self.joints_on:
            js = JointState(name=self.joint_names, position=[0.1 * i for i in range(len(self.joint_names))])
            js.header.stamp = stamp
            self.js.publish(js)
        ps = PoseStamped()
        ps.header.stamp, ps.header.frame_id = stamp, "base_link"
        ps.pose.position.x, ps.pose.position.y, ps.pose.position.z = self.ee_position
        ps.pose.orientation.w = 1.0
        self.ee.publish(ps)

    def n_actions(self) -> int:
        with self.lock:
            return len(self.actions)

    def moving_twists(self) -> list[TwistStamped]:
        with self.lock:
            return [t for t in self.twists if any((t.twist.linear.x, t.twist.linear.y, t.twist.linear.z))]

    def clear(self):
        with self.lock:
            self.twists.clear(), self.poses.clear(), self.actions.clear(), self.grippers.clear()


def _duration(seconds: float):
    from rclpy.duration import Duration

    return Duration(nanoseconds=int(seconds * 1e9))


class Rig:
    """The shared harness plus a fake robot and one PolicyNode."""

    def __init__(self, ros, checkpoint, robot_joint_names=None, compressed="", reliable_camera=False,
                 with_estop=True, **params):
        self.ros = ros
        self.robot = FakeRobot(ros.ctx, joint_names=robot_joint_names, compressed=compressed,
                               reliable_camera=reliable_camera, with_estop=with_estop)
        ros.nodes.append(self.robot)
        ros.executor.add_node(self.robot)
        overrides = {"checkpoint": str(checkpoint), "stale_timeout_s": 0.3, "ee_pose_timeout_s": 0.3,
                     "control_rate_hz": 20.0, "servo_switch_service": "", "servo_pause_service": "", **params}
        self.node = ros.add(PolicyNode, **overrides)

    def enable(self, on=True):
        r = self.ros.call(SetBool, "/policy_node/enable", SetBool.Request(data=on))
        assert r.success
        return r

    def wait_for(self, pred, timeout=20.0, what="condition"):
        try:
            wait_for(pred, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; stats={self.node.stats()}") from None

    def wait_commands(self, n=3, timeout=20.0):
        start = self.robot.n_actions()
        self.wait_for(lambda: self.robot.n_actions() >= start + n, timeout, f"{n} new commands")

    def quiet_while(self, counter: str, moves_by: int = 3, timeout: float = 20.0) -> bool:
        """True when no command was sent while stats()[counter] grew by `moves_by` (the node was alive
        and deciding, and decided not to command). The window opens once the counter has moved (the
        condition is in effect) and commands already in flight had 0.2 s to arrive."""
        first = self.node.stats()[counter]
        self.wait_for(lambda: self.node.stats()[counter] > first, timeout, f"{counter} to start moving")
        time.sleep(0.2)
        before, start = self.robot.n_actions(), self.node.stats()[counter]
        self.wait_for(lambda: self.node.stats()[counter] >= start + moves_by, timeout, f"{counter} to move")
        time.sleep(0.1)
        return self.robot.n_actions() == before


@pytest.fixture
def make_rig(ros):
    return lambda checkpoint, **kw: Rig(ros, checkpoint, **kw)


def _diag(arr: DiagnosticArray) -> dict:
    for st in arr.status:
        if st.name.endswith("policy_node: policy"):
            return {kv.key: kv.value for kv in st.values}
    return {}


# ------------------------------------------------------------------------------ tests
def test_commands_only_after_enable(make_rig, ckpts):
    rig = make_rig(ckpts["base"])
    rig.robot.instr.publish(String(data="push the puck to the goal"))
    rig.wait_for(lambda: rig.node.stats()["instruction"] == "push the puck to the goal", what="instruction")
    rig.enable(False)   # disabling an idle policy sends no stop (it would pause Servo under a teleoperator)
    assert rig.quiet_while("disabled"), "commands before ~/enable"
    assert rig.robot.twists == [] and rig.node.stats()["commands_sent"] == 0 and rig.node.stats()["stops"] == 0

    rig.enable()
    rig.wait_commands(5)
    rig.wait_for(lambda: len(rig.robot.grippers) >= 3, what="gripper commands")
    rig.enable(False)
    assert rig.quiet_while("disabled"), "commands after disable"
    with rig.robot.lock:
        tw, act, stamps = list(rig.robot.twists), list(rig.robot.actions), set(rig.robot.image_stamps)
    moving = [t for t in tw if any((t.twist.linear.x, t.twist.linear.y, t.twist.linear.z))]
    now = rig.node.get_clock().now().nanoseconds
    assert moving[-1].header.frame_id == "base_link"
    assert 0 <= now - (moving[-1].header.stamp.sec * 10**9 + moving[-1].header.stamp.nanosec) < 30 * 10**9
    # disabling stops the arm: the last twist is a zero twist
    assert (tw[-1].twist.linear.x, tw[-1].twist.linear.y, tw[-1].twist.linear.z) == (0.0, 0.0, 0.0)
    # recorder layout: action names + log_prob + value, stamped with the source image's stamp
    a = act[-1]
    assert list(a.name) == ["dx", "dy", "dz", "gripper", "log_prob", "value"]
    assert len(a.position) == 6 and all(np.isfinite(a.position))
    assert all((m.header.stamp.sec, m.header.stamp.nanosec) in stamps for m in act)
    # twist = action translation * translation_scale_m * control_rate (no clamping at this size)
    assert len(moving) == len(act)
    for t, a in list(zip(moving, act))[-3:]:
        np.testing.assert_allclose([t.twist.linear.x, t.twist.linear.y, t.twist.linear.z],
                                   np.array(a.position[:3]) * 0.01 * 20.0, rtol=1e-4, atol=1e-9)
    st = rig.node.stats()
    assert st["commands_sent"] == len(act) and st["latency_ms_mean"] > 0 and st["inference_ms_mean"] > 0
    # /diagnostics carries the same numbers
    rig.wait_for(lambda: any(_diag(m).get("commands_sent", "0") != "0" for m in list(rig.robot.diagnostics)),
                 what="diagnostics with commands")
    d = [_diag(m) for m in list(rig.robot.diagnostics) if _diag(m).get("commands_sent", "0") != "0"][-1]
    for key in ("latency_ms_p50", "latency_ms_p95", "inference_ms_mean", "rejected_images", "oversize_images",
                "dropped_nan_actions", "stale_skips", "estop", "checkpoint", "reloads_ok", "max_image_pixels"):
        assert key in d, key
    assert d["checkpoint"] == str(ckpts["base"]) and float(d["latency_ms_mean"]) > 0


def test_stale_image_and_estop_stop_commands(make_rig, ckpts):
    rig = make_rig(ckpts["base"])
    rig.enable()
    rig.wait_commands(3)

    rig.robot.image_mode = "off"                   # camera dies -> stale image
    assert rig.quiet_while("reject_stale_image"), "commands from a stale image"
    rig.robot.image_mode = "good"
    rig.wait_commands(3)

    rig.robot.joints_on = False                    # joint states stop -> stale joints
    assert rig.quiet_while("reject_stale_joints"), "commands with stale joint states"
    rig.robot.joints_on = True
    rig.wait_commands(3)

    rig.robot.estop.publish(Bool(data=True))        # e-stop latches
    rig.wait_for(lambda: rig.node.stats()["estop"], what="estop")
    assert rig.quiet_while("reject_estop"), "commands during e-stop"
    assert rig.node.stats()["stops"] >= 1           # the backend was told to stop
    rig.enable()                                   # re-enabling does not clear the latch
    assert rig.quiet_while("reject_estop")
    rig.robot.estop.publish(Bool(data=False))
    rig.wait_commands(3)


def test_old_stamps_delivered_late_never_commanded(make_rig, ckpts):
    """Frames arrive now but carry a stamp older than stale_timeout_s (a starved executor or slow link
    delivering late): receive time is fresh, the stamp is not, and no command is computed from them."""
    rig = make_rig(ckpts["base"])
    rig.enable()
    rig.wait_commands(3)
    rig.robot.stamp_age_s = 1.0                     # > stale_timeout_s 0.3
    assert rig.quiet_while("reject_stale_image", moves_by=5), "command from a frame with an old stamp"
    assert rig.node.stats()["frames"] > 0
    rig.robot.stamp_age_s = 0.0
    rig.wait_commands(3)


def test_nan_actions_dropped(make_rig, ckpts):
    rig = make_rig(ckpts["nan"])
    rig.enable()
    assert rig.quiet_while("dropped_nan_actions", moves_by=3)
    assert rig.robot.n_actions() == 0 and rig.robot.moving_twists() == []


def test_missing_joints_no_command(make_rig, ckpts):
    rig = make_rig(ckpts["base"], robot_joint_names=JOINTS[:-1] + ["not_l_close"])
    rig.enable()
    assert rig.quiet_while("missing_joints", moves_by=3)
    assert rig.robot.n_actions() == 0


def test_per_step_clamp_and_workspace_box(make_rig, ckpts):
    # big policy: action ~[0.9, -0.6, 0.8] -> 9, -6, 8 mm per step; clamp the norm to 5 mm
    rig = make_rig(ckpts["big"], max_translation_m=0.005, control_rate_hz=10.0)
    rig.enable()
    rig.wait_commands(3)
    tw = rig.robot.moving_twists()[-1]
    lin = np.array([tw.twist.linear.x, tw.twist.linear.y, tw.twist.linear.z]) / 10.0  # m per step
    assert np.linalg.norm(lin) == pytest.approx(0.005, rel=1e-4)
    np.testing.assert_allclose(lin / np.linalg.norm(lin), BIG[:3] / np.linalg.norm(BIG[:3]), atol=1e-3)
    assert rig.node.stats()["limit_translation_clamped"] >= 3

    # EE 1 mm inside the +x and -y faces, 2 mm below the top: every axis ends on the boundary
    rig.robot.ee_position = [0.599, -0.599, 0.798]
    rig.wait_for(lambda: rig.node.stats()["limit_workspace_clipped"] >= 3, what="workspace clips")
    rig.wait_commands(2)
    tw = rig.robot.moving_twists()[-1]
    step = np.array([tw.twist.linear.x, tw.twist.linear.y, tw.twist.linear.z]) / 10.0
    np.testing.assert_allclose(step, [0.001, -0.001, 0.002], atol=1e-6)


def test_workspace_box_needs_ee_pose(make_rig, ckpts):
    rig = make_rig(ckpts["base"], ee_pose_topic="/nobody_publishes_this")
    rig.enable()
    assert rig.quiet_while("reject_no_ee_pose", moves_by=3)
    assert rig.robot.n_actions() == 0


def test_bad_and_oversize_images_rejected_node_keeps_running(make_rig, ckpts):
    rig = make_rig(ckpts["base"])
    rig.enable()
    for mode in ("bad_encoding", "bad_step", "bad_size"):
        rig.robot.image_mode = mode
        assert rig.quiet_while("rejected_images", moves_by=2), f"command from a {mode} image"
    rig.robot.image_mode = "huge"                  # refused on arrival, before any decoding
    assert rig.quiet_while("oversize_images", moves_by=2), "command from an image claiming 100000x100000"
    assert "max_image_pixels" in rig.node.stats()["last_image_refusal"]
    rig.robot.image_mode = "good"
    rig.wait_commands(3)


def test_instruction_length_bounded(make_rig, ckpts):
    rig = make_rig(ckpts["base"], max_instruction_bytes=64)
    rig.robot.instr.publish(String(data="open the drawer"))
    rig.wait_for(lambda: rig.node.stats()["instruction"] == "open the drawer", what="instruction")
    rig.robot.instr.publish(String(data="x" * 65))
    rig.wait_for(lambda: rig.node.stats()["oversize_instructions"] == 1, what="oversize instruction counted")
    assert rig.node.stats()["instruction"] == "open the drawer"


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_compressed_camera(make_rig, ckpts, fmt):
    rig = make_rig(ckpts["base"], compressed=fmt, image_transport="compressed")
    rig.enable()
    rig.wait_commands(3)
    st = rig.node.stats()
    assert st["image_decoder"] == "compressed" and st["rejected_images"] == 0


def test_image_reliability_matches_publishers(make_rig, ckpts, ros):
    """A reliable camera publisher gets a reliable link (as rosbag2 matches QoS)."""
    rig = make_rig(ckpts["base"], reliable_camera=True)
    rig.wait_for(lambda: rig.node.image_reliability == ReliabilityPolicy.RELIABLE, what="reliable subscription")
    subs = rig.node.get_subscriptions_info_by_topic("/camera/image_raw")
    assert [s.qos_profile.reliability for s in subs if s.node_name == "policy_node"] == [ReliabilityPolicy.RELIABLE]
    rig.enable()
    rig.wait_commands(3)
    # a best-effort publisher appears: a reliable subscription would not match it, so back to best effort
    extra = ros.probe.create_publisher(Image, "/camera/image_raw", SENSOR_QOS)
    rig.wait_for(lambda: rig.node.image_reliability == ReliabilityPolicy.BEST_EFFORT, what="best-effort again")
    rig.wait_commands(3)
    ros.probe.destroy_publisher(extra)


def test_servo_pose_backend(make_rig, ckpts):
    rig = make_rig(ckpts["big"], motion_backend="servo_pose", max_translation_m=0.05)
    rig.enable()
    rig.wait_for(lambda: len(rig.robot.poses) >= 3, what="pose targets")
    with rig.robot.lock:
        ps = rig.robot.poses[-1]
    assert rig.robot.twists == []
    assert ps.header.frame_id == "base_link"
    np.testing.assert_allclose([ps.pose.position.x, ps.pose.position.y, ps.pose.position.z],
                               np.array([0.0, 0.0, 0.3]) + BIG[:3] * 0.01, atol=1e-5)
    assert (ps.pose.orientation.x, ps.pose.orientation.y, ps.pose.orientation.z, ps.pose.orientation.w) \
        == (0.0, 0.0, 0.0, 1.0)


def test_reload_answers_at_once_swaps_model_failed_load_keeps_old(make_rig, ckpts, tmp_path, ros):
    from ire_vla_ros.vla.checkpoint import save_checkpoint
    from ire_vla_ros.vla.testing import make_tiny_policy

    root = tmp_path / "live"
    params_in_force = ros.collect(String, "/policy_node/params_in_force", LATCHED_QOS)
    first = save_checkpoint(make_tiny_policy(joint_names=JOINTS), root, stage="sft", iteration=0, name="it0")
    rig = make_rig(root)
    assert rig.node.stats()["checkpoint"] == str(first)
    rig.enable()
    rig.wait_commands(3)

    # the trainer writes a new checkpoint; ~/reload answers "accepted" and picks up root/latest
    second = save_checkpoint(_big_policy(), root, stage="rl", iteration=1, name="it1")
    resp = ros.call(Trigger, "/policy_node/reload")
    assert resp.success and "accepted" in resp.message, resp.message
    rig.wait_for(lambda: rig.node.stats()["checkpoint"] == str(second), what="model swapped")
    assert rig.node.stats()["reloads_ok"] == 1
    rig.wait_for(lambda: params_in_force and json.loads(params_in_force[-1].data)["checkpoint_loaded"] == str(second),
                 what="params_in_force names the new checkpoint")
    rig.robot.clear()
    rig.wait_for(lambda: rig.robot.n_actions() >= 2, what="actions from the new model")
    with rig.robot.lock:
        a = np.array(rig.robot.actions[-1].position[:4])
    np.testing.assert_allclose(a, BIG, atol=1e-3)

    # a truncated checkpoint: the reload fails (reported in diagnostics), the running model stays
    third = save_checkpoint(make_tiny_policy(joint_names=JOINTS, seed=3), root, stage="rl", iteration=2, name="it2")
    heads = third / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[: heads.stat().st_size // 2])
    assert ros.call(Trigger, "/policy_node/reload").success
    rig.wait_for(lambda: rig.node.stats()["reloads_failed"] == 1, what="failed reload counted")
    assert "heads.safetensors" in rig.node.stats()["reload_last_result"]
    assert rig.node.stats()["checkpoint"] == str(second)
    rig.wait_commands(3)
    with rig.robot.lock:
        a = np.array(rig.robot.actions[-1].position[:4])
    np.testing.assert_allclose(a, BIG, atol=1e-3)


def test_disable_waits_for_the_step_in_flight_so_its_stop_is_last(make_rig, ckpts, ros):
    """~/enable false while a control step holds the runner (decided to move, not yet sent): the
    disable waits for that step, so its zero twist comes after the step's command, never before."""
    rig = make_rig(ckpts["base"])
    rig.enable()
    rig.wait_commands(3)
    answer = {}
    with rig.node.runner.lock:  # what a control step holds from its decision to its send
        caller = threading.Thread(target=lambda: answer.update(r=ros.call(SetBool, "/policy_node/enable",
                                                                          SetBool.Request(data=False))))
        caller.start()
        time.sleep(1.0)
        assert caller.is_alive() and rig.node.runner.enabled  # the disable waits for the step
    caller.join(10.0)
    assert answer["r"].success and not rig.node.runner.enabled
    assert rig.quiet_while("disabled")
    with rig.robot.lock:
        last = rig.robot.twists[-1].twist.linear
    assert (last.x, last.y, last.z) == (0.0, 0.0, 0.0)


def test_dropped_action_stops_the_arm(make_rig, ckpts, tmp_path, ros):
    """A running arm whose next action is dropped (NaN) gets stop(): a zero twist, not the last twist."""
    from ire_vla_ros.vla.checkpoint import save_checkpoint

    root = tmp_path / "live"
    save_checkpoint(_big_policy(), root, stage="rl", iteration=0, name="it0")
    # A loose staleness limit: under load a frame gap > 0.3 s during the reload (measured in CI at
    # load ~3) stopped the arm for a stale image first, and a stopped arm needs no stop on the NaN.
    rig = make_rig(root, stale_timeout_s=2.0, ee_pose_timeout_s=2.0)
    rig.enable()
    rig.wait_commands(3)
    nan = _big_policy()
    nan.set_normalization(np.full(4, np.nan), np.ones(4), np.zeros(len(JOINTS)), np.ones(len(JOINTS)))
    save_checkpoint(nan, root, stage="rl", iteration=1, name="it1")
    assert ros.call(Trigger, "/policy_node/reload").success
    rig.wait_for(lambda: rig.node.stats().get("stop_nan_action", 0) == 1, what="stop on the dropped action")
    assert rig.quiet_while("dropped_nan_actions")
    with rig.robot.lock:
        last = rig.robot.twists[-1].twist.linear
    assert (last.x, last.y, last.z) == (0.0, 0.0, 0.0)
    assert rig.node.stats()["stop_nan_action"] == 1      # once per transition, not every tick


def _big_policy():
    from ire_vla_ros.vla.testing import make_tiny_policy

    p = make_tiny_policy(joint_names=JOINTS, seed=1)
    p.set_normalization(BIG, np.full(len(BIG), 1e-6), np.zeros(len(JOINTS)), np.ones(len(JOINTS)))
    return p


_SET_PARAM = textwrap.dedent("""
    import sys, rclpy
    from rclpy.parameter import Parameter
    from rclpy.parameter_client import AsyncParameterClient
    name, kind, raw = sys.argv[1], sys.argv[2], sys.argv[3]
    value = {"float": float, "str": str}[kind](raw)
    rclpy.init()
    node = rclpy.create_node("param_setter")
    client = AsyncParameterClient(node, "/policy_node")
    assert client.wait_for_services(timeout_sec=60.0), "parameter services not found"
    future = client.set_parameters([Parameter(name, value=value)])
    rclpy.spin_until_future_complete(node, future, timeout_sec=60.0)
    result = future.result().results[0]
    print("OK" if result.successful else "REFUSED: " + result.reason)
    node.destroy_node(); rclpy.shutdown()
""")


def _set_from_other_process(name: str, kind: str, value) -> str:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", _SET_PARAM, name, kind, str(value)], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_safety_limit_lowered_from_another_process(make_rig, ckpts, ros):
    params_in_force = ros.collect(String, "/policy_node/params_in_force", LATCHED_QOS)
    rig = make_rig(ckpts["big"], control_rate_hz=10.0)   # unclamped step ~13.4 mm
    rig.enable()
    rig.wait_commands(3)
    lin = rig.robot.moving_twists()[-1].twist.linear
    assert np.linalg.norm([lin.x, lin.y, lin.z]) / 10.0 > 0.01

    assert _set_from_other_process("max_translation_m", "float", 0.004) == "OK"
    t_set = rig.node.get_clock().now().nanoseconds
    rig.wait_for(lambda: sum(_ns(t) >= t_set for t in rig.robot.moving_twists()) >= 3, what="commands after set")
    after = [t for t in rig.robot.moving_twists() if _ns(t) >= t_set]
    for t in after:   # every command stamped after the set returned respects the new limit
        v = t.twist.linear
        assert np.linalg.norm([v.x, v.y, v.z]) / 10.0 == pytest.approx(0.004, rel=1e-4)
    rig.wait_for(lambda: any(json.loads(m.data)["max_translation_m"] == 0.004 for m in list(params_in_force)),
                 what="params_in_force updated")

    # paths are launch-time only: refused, nothing changes
    assert _set_from_other_process("checkpoint", "str", "/tmp").startswith("REFUSED")
    assert rig.node.get_parameter("checkpoint").value == str(ckpts["big"])


def test_every_writable_parameter_takes_effect(make_rig, ckpts, ros):
    from rclpy.parameter import Parameter

    from ire_vla_ros.nodes.policy_node import _LIVE

    rig = make_rig(ckpts["base"])
    node = rig.node
    writable = {n for n, spec in PARAMS.items() if not spec.read_only}
    assert writable <= set(_LIVE), f"writable but not applied when set: {writable - set(_LIVE)}"
    new = {"explore": True, "default_instruction": "close the drawer", "torch_num_threads": 2,
           "max_image_pixels": 1000, "max_image_bytes": 5000, "max_instruction_bytes": 40,
           "max_rotation_rad": 0.05, "workspace_enabled": False, "workspace_min_xyz": [-0.1, -0.1, 0.0],
           "workspace_max_xyz": [0.1, 0.1, 0.2], "stale_timeout_s": 2.0, "ee_pose_timeout_s": 3.0,
           "max_translation_m": 0.01, "teleop_yield_s": 1.5}
    assert set(new) == writable, "this test covers every writable parameter"
    results = node.set_parameters([Parameter(k, value=v) for k, v in new.items()])
    assert all(r.successful for r in results), [r.reason for r in results]
    cfg = node.runner.safety.config
    assert (node.runner.explore, node.obs.instruction, node.obs.limits.max_pixels, node.obs.limits.max_bytes,
            node.obs.max_instruction_bytes, node.online.teleop.hold_s) == (True, "close the drawer", 1000, 5000, 40, 1.5)
    assert (cfg.max_translation_m, cfg.max_rotation_rad, cfg.workspace_enabled, cfg.workspace_max,
            cfg.stale_timeout_s, cfg.ee_pose_timeout_s) == (0.01, 0.05, False, (0.1, 0.1, 0.2), 2.0, 3.0)
    import torch

    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    # refused with a reason, nothing changed: a box with min > max, an instruction over the limit
    bad = node.set_parameters_atomically([Parameter("workspace_min_xyz", value=[0.5, 0.0, 0.0]),
                                          Parameter("workspace_enabled", value=True)])
    assert not bad.successful and "workspace_min" in bad.reason
    assert not node.set_parameters([Parameter("default_instruction", value="y" * 41)])[0].successful
    assert node.runner.safety.config.workspace_enabled is False
    # ~/explore goes through the parameter, so the two never disagree
    assert ros.call(SetBool, "/policy_node/explore", SetBool.Request(data=False)).success
    assert node.get_parameter("explore").value is False and node.runner.explore is False


def _ns(msg) -> int:
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


def test_estop_held_before_start_node_starts_stopped(ros, ckpts):
    """The e-stop publisher latches true, THEN the node starts: it never commands."""
    pub = ros.probe.create_publisher(Bool, "/estop", ESTOP_QOS)
    pub.publish(Bool(data=True))
    rig = Rig(ros, ckpts["base"])
    rig.wait_for(lambda: rig.node.stats()["estop"], what="latched e-stop received")
    rig.enable()
    assert rig.quiet_while("reject_estop", moves_by=5), "command while the e-stop was held at start"
    assert rig.robot.n_actions() == 0 and rig.robot.moving_twists() == []
    pub.publish(Bool(data=False))
    rig.wait_commands(3)                            # positive control: the same node does command


def test_estop_lost_publisher_stops_when_required(ros, ckpts):
    rig = Rig(ros, ckpts["base"], with_estop=False, estop_lost_action="stop")
    rig.enable()
    assert rig.quiet_while("reject_estop_lost"), "command without any e-stop publisher"
    estop_node = Node("estop_panel", context=ros.ctx)
    ros.executor.add_node(estop_node)
    pub = estop_node.create_publisher(Bool, "/estop", ESTOP_QOS)
    pub.publish(Bool(data=False))
    rig.wait_commands(3)
    ros.executor.remove_node(estop_node)
    estop_node.destroy_node()                       # the e-stop publisher goes away
    rig.wait_for(lambda: not rig.node.stats()["estop_link_ok"], what="e-stop loss noticed")
    assert rig.quiet_while("reject_estop_lost"), "command after the e-stop publisher was lost"


def test_moveit_py_backend_fails_clearly(ros, ckpts):
    try:
        import moveit.planning  # noqa: F401
    except ImportError:
        with pytest.raises(NodeStartupError, match="moveit_py"):
            ros.add(PolicyNode, checkpoint=str(ckpts["base"]), motion_backend="moveit_py", ee_link="")
    else:
        pytest.skip("moveit_py is installed here: the start-up error path cannot be reached")


def test_out_of_range_parameter_refused(ros, ckpts):
    from rclpy.exceptions import InvalidParameterValueException

    with pytest.raises(InvalidParameterValueException, match="control_rate_hz"):
        ros.add(PolicyNode, checkpoint=str(ckpts["base"]), control_rate_hz=1000.0)
    with pytest.raises(NodeStartupError, match="workspace_min"):
        ros.add(PolicyNode, checkpoint=str(ckpts["base"]), workspace_min_xyz=[1.0, 0.0, 0.0],
                workspace_max_xyz=[0.0, 1.0, 1.0])


def test_yaml_defaults_match_declared_defaults():
    doc = yaml.safe_load((REPO / "config" / "policy_node.yaml").read_text())
    params = doc["policy_node"]["ros__parameters"]
    assert set(params) == set(PARAMS)
    for name, spec in PARAMS.items():
        assert params[name] == spec.default, name


def test_help_does_not_start_ros_and_states_limits():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "ire_vla_ros.nodes.policy_node", "--help"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    for word in ("usage:", "motion_backend", "stale_timeout_s", "max_image_pixels", "max_image_bytes",
                 "max_instruction_bytes"):
        assert word in out.stdout, word


def test_executor_gate_holds_callbacks_while_a_step_runs(ros_domain_id):
    """ros_common.spin with an ExecutorGate: no callback runs while the gate is closed (the policy
    node closes it around each control step), the backlog is served once it opens, and shutdown
    ends the loop even with the gate closed."""
    import threading
    import time

    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from ire_vla_ros.nodes.ros_common import ExecutorGate, spin

    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=ros_domain_id)
    node = rclpy.create_node("gate_test", context=ctx)
    ticks = []
    node.create_timer(0.002, lambda: ticks.append(time.monotonic()))
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    gate = ExecutorGate()
    spinner = threading.Thread(target=spin, args=(executor, gate), daemon=True)
    spinner.start()
    try:
        time.sleep(0.3)
        assert len(ticks) > 20, "the executor must run while the gate is open"
        with gate.closed():
            time.sleep(0.05)  # the callback in hand finishes
            n_closed = len(ticks)
            time.sleep(0.4)
            assert len(ticks) - n_closed <= 1, "callbacks ran while the gate was closed"
        time.sleep(0.3)
        assert len(ticks) - n_closed > 20, "the executor must resume when the gate opens"
        with gate.closed():
            rclpy.shutdown(context=ctx)
            spinner.join(timeout=3.0)
        assert not spinner.is_alive(), "spin must end on shutdown"
    finally:
        if ctx.ok():
            rclpy.shutdown(context=ctx)
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
