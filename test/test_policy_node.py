"""policy_node end to end: real nodes exchanging real messages over DDS in one process.

A fake robot node (test double for hardware only) publishes camera images, joint states and the EE
pose on the real topics with the real types and listens where MoveIt Servo and the recorder would.
The policy is a real tiny checkpoint saved and loaded through ire_vla_ros.vla.checkpoint.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float64, String
from std_srvs.srv import SetBool, Trigger

from ire_vla_ros.nodes.policy_node import PARAMS, PolicyNode
from ire_vla_ros.nodes.ros_common import LATCHED_QOS, SENSOR_QOS, NodeStartupError
from ire_vla_ros.robot.image_codec import encode_rgb

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

    def __init__(self, context, rate_hz=20.0, joint_names=None):
        super().__init__("fake_robot", context=context)
        self.lock = threading.Lock()
        self.image_mode = "good"        # good | off | bad_encoding | bad_step | bad_size
        self.joints_on = True
        self.joint_names = list(joint_names or JOINTS) + ["extra_joint"]
        self.ee_position = [0.0, 0.0, 0.3]
        self.image_stamps: set[tuple[int, int]] = set()
        self.twists: list[TwistStamped] = []
        self.poses: list[PoseStamped] = []
        self.actions: list[JointState] = []
        self.grippers: list[float] = []
        self.diagnostics: list[DiagnosticArray] = []
        self.rng = np.random.default_rng(0)
        self.cam = self.create_publisher(Image, "/camera/image_raw", SENSOR_QOS)
        self.js = self.create_publisher(JointState, "/joint_states", 10)
        self.ee = self.create_publisher(PoseStamped, "/ee_pose", 10)
        self.estop = self.create_publisher(Bool, "/estop", 10)
        self.instr = self.create_publisher(String, "/policy_node/instruction", LATCHED_QOS)
        self.create_subscription(TwistStamped, "/servo_node/delta_twist_cmds", self._add("twists"), 10)
        self.create_subscription(PoseStamped, "/servo_node/pose_target_cmds", self._add("poses"), 10)
        self.create_subscription(JointState, "/policy_node/action", self._add("actions"), 10)
        self.create_subscription(Float64, "/gripper/command", lambda m: self._append("grippers", m.data), 10)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._add("diagnostics"), 10)
        self.enable_cli = self.create_client(SetBool, "/policy_node/enable")
        self.explore_cli = self.create_client(SetBool, "/policy_node/explore")
        self.reload_cli = self.create_client(Trigger, "/policy_node/reload")
        self.create_timer(1.0 / rate_hz, self._publish)

    def _append(self, name, item):
        with self.lock:
            getattr(self, name).append(item)

    def _add(self, name):
        return lambda msg: self._append(name, msg)

    def _publish(self):
        stamp = self.get_clock().now().to_msg()
        if self.image_mode != "off":
            img = self.rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)  # resized to 64x64 by the node
            f = encode_rgb(img, "bgr8", row_padding=4)
            if self.image_mode == "bad_encoding":
                f["encoding"] = "yuv422"
            elif self.image_mode == "bad_step":
                f["step"] = 80 * 3 - 1
            elif self.image_mode == "bad_size":
                f["data"] = f["data"][:-7]
            msg = Image(**{k: v for k, v in f.items()})
            msg.header.stamp, msg.header.frame_id = stamp, "camera"
            with self.lock:
                self.image_stamps.add((stamp.sec, stamp.nanosec))
            self.cam.publish(msg)
        if self.joints_on:
            js = JointState(name=self.joint_names, position=[0.1 * i for i in range(len(self.joint_names))])
            js.header.stamp = stamp
            self.js.publish(js)
        ps = PoseStamped()
        ps.header.stamp, ps.header.frame_id = stamp, "base_link"
        ps.pose.position.x, ps.pose.position.y, ps.pose.position.z = self.ee_position
        ps.pose.orientation.w = 1.0
        self.ee.publish(ps)

    def counts(self):
        with self.lock:
            return len(self.twists), len(self.actions)

    def clear(self):
        with self.lock:
            self.twists.clear(), self.poses.clear(), self.actions.clear(), self.grippers.clear()


class Rig:
    def __init__(self, domain_id: int, checkpoint, robot_joint_names=None, **params):
        self.ctx = Context()
        rclpy.init(context=self.ctx, domain_id=domain_id)
        overrides = {"checkpoint": str(checkpoint), "stale_timeout_s": 0.3, "ee_pose_timeout_s": 0.3,
                     "control_rate_hz": 20.0, "servo_switch_service": "", **params}
        self.node = None
        self.executor = SingleThreadedExecutor(context=self.ctx)  # see test/ros_harness.py
        self.robot = FakeRobot(self.ctx, joint_names=robot_joint_names)
        self.executor.add_node(self.robot)
        self.node = PolicyNode(context=self.ctx,
                               parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
        self.executor.add_node(self.node)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self):
        # spin_once loop rather than spin(): stopping it before executor.shutdown() avoids rclpy 7.1's
        # shutdown-while-waiting race (guard condition destroyed under a waiting spin()).
        while not self.stop.is_set() and self.ctx.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def call(self, client, request, timeout=15.0):
        assert client.wait_for_service(timeout_sec=timeout), f"{client.srv_name} not available"
        fut = client.call_async(request)
        done = threading.Event()
        fut.add_done_callback(lambda _: done.set())
        assert done.wait(timeout), f"{client.srv_name} did not answer"
        return fut.result()

    def enable(self, on=True):
        r = self.call(self.robot.enable_cli, SetBool.Request(data=on))
        assert r.success
        return r

    def wait_for(self, pred, timeout=10.0, what="condition"):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; stats={self.node.stats()}")

    def wait_commands(self, n=3, timeout=10.0):
        start = self.robot.counts()[0]
        self.wait_for(lambda: self.robot.counts()[0] >= start + n, timeout, f"{n} new commands")

    def quiet_for(self, seconds):
        """No command published during `seconds` (after one control period of slack)."""
        time.sleep(0.1)
        before = self.robot.counts()[0]
        time.sleep(seconds)
        return self.robot.counts()[0] == before

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5.0)
        time.sleep(0.2)  # let handlers already in the pool finish while the executor's guard exists
        self.executor.shutdown(timeout_sec=5.0)  # waits for callbacks still running in the pool
        for n in (self.node, self.robot):
            if n is not None:
                n.destroy_node()
        rclpy.try_shutdown(context=self.ctx)


@pytest.fixture
def make_rig(ros_domain_id):
    rigs = []

    def make(checkpoint, robot_joint_names=None, **params):
        rig = Rig(ros_domain_id, checkpoint, robot_joint_names, **params)
        rigs.append(rig)
        return rig

    yield make
    for r in rigs:
        r.close()


# ------------------------------------------------------------------------------ tests
def test_commands_only_after_enable(make_rig, ckpts):
    rig = make_rig(ckpts["base"])
    rig.robot.instr.publish(String(data="push the puck to the goal"))
    rig.wait_for(lambda: rig.node.stats()["instruction"] == "push the puck to the goal", what="instruction")
    assert rig.quiet_for(1.0), "commands before ~/enable"
    assert rig.robot.counts() == (0, 0)
    assert rig.node.stats()["commands_sent"] == 0

    rig.enable()
    rig.wait_commands(5)
    rig.wait_for(lambda: len(rig.robot.actions) >= 3 and len(rig.robot.grippers) >= 3, what="actions")
    with rig.robot.lock:
        tw, act, stamps = rig.robot.twists[-1], list(rig.robot.actions), set(rig.robot.image_stamps)
    now = rig.node.get_clock().now().nanoseconds
    assert tw.header.frame_id == "base_link"
    assert 0 <= now - (tw.header.stamp.sec * 10**9 + tw.header.stamp.nanosec) < 2 * 10**9  # node clock
    # recorder layout: action names + log_prob + value, stamped with the source image's stamp
    a = act[-1]
    assert list(a.name) == ["dx", "dy", "dz", "gripper", "log_prob", "value"]
    assert len(a.position) == 6 and all(np.isfinite(a.position))
    assert all((m.header.stamp.sec, m.header.stamp.nanosec) in stamps for m in act)
    # twist = action translation * translation_scale_m * control_rate (no clamping at this size)
    rig.enable(False)
    time.sleep(0.2)
    with rig.robot.lock:
        assert len(rig.robot.twists) == len(rig.robot.actions)
        pairs = list(zip(rig.robot.twists[-3:], rig.robot.actions[-3:]))
    for tw, a in pairs:
        np.testing.assert_allclose([tw.twist.linear.x, tw.twist.linear.y, tw.twist.linear.z],
                                   np.array(a.position[:3]) * 0.01 * 20.0, rtol=1e-4, atol=1e-9)
        assert (tw.twist.angular.x, tw.twist.angular.y, tw.twist.angular.z) == (0.0, 0.0, 0.0)
    assert rig.quiet_for(0.5), "commands after disable"
    st = rig.node.stats()
    assert st["commands_sent"] >= 5 and st["latency_ms_mean"] > 0 and st["inference_ms_mean"] > 0
    # /diagnostics carries the same numbers
    rig.wait_for(lambda: any(_diag(m).get("commands_sent", "0") != "0" for m in list(rig.robot.diagnostics)),
                 what="diagnostics with commands")
    d = [_diag(m) for m in rig.robot.diagnostics if _diag(m).get("commands_sent", "0") != "0"][-1]
    for key in ("latency_ms_mean", "latency_ms_p95", "inference_ms_mean", "rejected_images",
                "dropped_nan_actions", "stale_skips", "estop", "checkpoint"):
        assert key in d, key
    assert d["checkpoint"] == str(ckpts["base"]) and float(d["latency_ms_mean"]) > 0


def _diag(arr: DiagnosticArray) -> dict:
    for st in arr.status:
        if st.name.endswith("policy_node: policy"):
            return {kv.key: kv.value for kv in st.values}
    return {}


def test_stale_image_and_estop_stop_commands(make_rig, ckpts):
    rig = make_rig(ckpts["base"])
    rig.enable()
    rig.wait_commands(3)

    rig.robot.image_mode = "off"                   # camera dies -> stale image
    time.sleep(0.4)
    assert rig.quiet_for(0.6), "commands from a stale image"
    assert rig.node.stats()["reject_stale_image"] > 0
    rig.robot.image_mode = "good"
    rig.wait_commands(3)

    rig.robot.joints_on = False                    # joint states stop -> stale joints
    time.sleep(0.4)
    assert rig.quiet_for(0.5), "commands with stale joint states"
    assert rig.node.stats()["reject_stale_joints"] > 0
    rig.robot.joints_on = True
    rig.wait_commands(3)

    rig.robot.estop.publish(Bool(data=True))        # e-stop latches
    rig.wait_for(lambda: rig.node.stats()["estop"], what="estop")
    assert rig.quiet_for(0.6), "commands during e-stop"
    assert rig.node.stats()["estop_skips"] > 0
    rig.enable()                                   # re-enabling does not clear the latch
    assert rig.quiet_for(0.3)
    rig.robot.estop.publish(Bool(data=False))
    rig.wait_commands(3)
    assert rig.node.stats()["stale_skips"] > 0


def test_nan_actions_dropped(make_rig, ckpts):
    rig = make_rig(ckpts["nan"])
    rig.enable()
    rig.wait_for(lambda: rig.node.stats()["dropped_nan_actions"] >= 3, what="NaN drops")
    assert rig.robot.counts() == (0, 0)
    assert rig.node.stats()["commands_sent"] == 0


def test_missing_joints_no_command(make_rig, ckpts):
    rig = make_rig(ckpts["base"], robot_joint_names=JOINTS[:-1] + ["not_l_close"])
    rig.enable()
    rig.wait_for(lambda: rig.node.stats()["missing_joints"] >= 3, what="missing-joint rejections")
    assert rig.robot.counts()[0] == 0


def test_per_step_clamp_and_workspace_box(make_rig, ckpts):
    # big policy: action ~[0.9, -0.6, 0.8] -> 9, -6, 8 mm per step; clamp the norm to 5 mm
    rig = make_rig(ckpts["big"], max_translation_m=0.005, control_rate_hz=10.0)
    rig.enable()
    rig.wait_commands(3)
    with rig.robot.lock:
        tw = rig.robot.twists[-1]
    lin = np.array([tw.twist.linear.x, tw.twist.linear.y, tw.twist.linear.z]) / 10.0  # m per step
    assert np.linalg.norm(lin) == pytest.approx(0.005, rel=1e-4)
    np.testing.assert_allclose(lin / np.linalg.norm(lin), BIG[:3] / np.linalg.norm(BIG[:3]), atol=1e-3)
    assert rig.node.stats()["limit_translation_clamped"] >= 3

    # EE 1 mm inside the +x and -y faces, 2 mm below the top: every axis ends on the boundary
    rig.robot.ee_position = [0.599, -0.599, 0.798]
    rig.wait_for(lambda: rig.node.stats()["limit_workspace_clipped"] >= 3, what="workspace clips")
    rig.wait_commands(2)
    with rig.robot.lock:
        tw = rig.robot.twists[-1]
    step = np.array([tw.twist.linear.x, tw.twist.linear.y, tw.twist.linear.z]) / 10.0
    np.testing.assert_allclose(step, [0.001, -0.001, 0.002], atol=1e-6)


def test_workspace_box_needs_ee_pose(make_rig, ckpts):
    rig = make_rig(ckpts["base"], ee_pose_topic="/nobody_publishes_this")
    rig.enable()
    rig.wait_for(lambda: rig.node.stats()["reject_no_ee_pose"] >= 3, what="no-EE-pose rejections")
    assert rig.robot.counts()[0] == 0


def test_bad_images_rejected_node_keeps_running(make_rig, ckpts):
    rig = make_rig(ckpts["base"])
    rig.enable()
    rejected = 0
    for mode in ("bad_encoding", "bad_step", "bad_size"):
        rig.robot.image_mode = mode
        rig.wait_for(lambda: rig.node.stats()["rejected_images"] >= rejected + 2, what=f"{mode} rejected")
        rejected = rig.node.stats()["rejected_images"]
        assert rig.quiet_for(0.3), f"command from a {mode} image"
    rig.robot.image_mode = "good"
    rig.wait_commands(3)


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


def test_reload_swaps_model_and_truncated_checkpoint_keeps_old(make_rig, ckpts, tmp_path):
    from ire_vla_ros.vla.checkpoint import save_checkpoint
    from ire_vla_ros.vla.testing import make_tiny_policy

    root = tmp_path / "live"
    policy = make_tiny_policy(joint_names=JOINTS)
    first = save_checkpoint(policy, root, stage="sft", iteration=0, name="it0")
    rig = make_rig(root)
    assert rig.node.stats()["checkpoint"] == str(first)
    rig.call(rig.robot.explore_cli, SetBool.Request(data=False))
    rig.enable()
    rig.wait_commands(3)

    # the trainer writes a new checkpoint; ~/reload picks up root/latest
    second = save_checkpoint(_big_policy(), root, stage="rl", iteration=1, name="it1")
    resp = rig.call(rig.robot.reload_cli, Trigger.Request())
    assert resp.success, resp.message
    assert str(second) in resp.message
    assert rig.node.stats()["checkpoint"] == str(second)
    rig.robot.clear()
    rig.wait_for(lambda: len(rig.robot.actions) >= 2, what="actions from the new model")
    with rig.robot.lock:
        a = np.array(rig.robot.actions[-1].position[:4])
    np.testing.assert_allclose(a, BIG, atol=1e-3)

    # a truncated checkpoint: the reload fails, the running model stays
    third = save_checkpoint(make_tiny_policy(joint_names=JOINTS, seed=3), root, stage="rl", iteration=2, name="it2")
    heads = third / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[: heads.stat().st_size // 2])
    resp = rig.call(rig.robot.reload_cli, Trigger.Request())
    assert not resp.success
    assert "truncated" in resp.message or "heads.safetensors" in resp.message, resp.message
    assert rig.node.stats()["checkpoint"] == str(second)
    assert rig.node.stats()["reloads_failed"] == 1
    rig.wait_commands(3)
    with rig.robot.lock:
        a = np.array(rig.robot.actions[-1].position[:4])
    np.testing.assert_allclose(a, BIG, atol=1e-3)


def _big_policy():
    from ire_vla_ros.vla.testing import make_tiny_policy

    p = make_tiny_policy(joint_names=JOINTS, seed=1)
    p.set_normalization(BIG, np.full(len(BIG), 1e-6), np.zeros(len(JOINTS)), np.ones(len(JOINTS)))
    return p


def test_moveit_py_backend_fails_clearly(ros_domain_id, ckpts):
    try:
        import moveit.planning  # noqa: F401
        pytest.skip("moveit_py is installed here")
    except ImportError:
        pass
    ctx = Context()
    rclpy.init(context=ctx, domain_id=ros_domain_id)
    try:
        with pytest.raises(NodeStartupError, match="moveit_py"):
            PolicyNode(context=ctx, parameter_overrides=[
                Parameter("checkpoint", value=str(ckpts["base"])),
                Parameter("motion_backend", value="moveit_py"), Parameter("ee_link", value="")])
    finally:
        rclpy.try_shutdown(context=ctx)


def test_out_of_range_parameter_refused(ros_domain_id, ckpts):
    from rclpy.exceptions import InvalidParameterValueException

    ctx = Context()
    rclpy.init(context=ctx, domain_id=ros_domain_id)
    try:
        with pytest.raises(InvalidParameterValueException, match="control_rate_hz"):
            PolicyNode(context=ctx, parameter_overrides=[
                Parameter("checkpoint", value=str(ckpts["base"])), Parameter("control_rate_hz", value=1000.0)])
        with pytest.raises(NodeStartupError, match="workspace_min"):
            PolicyNode(context=ctx, parameter_overrides=[
                Parameter("checkpoint", value=str(ckpts["base"])),
                Parameter("workspace_min_xyz", value=[1.0, 0.0, 0.0]),
                Parameter("workspace_max_xyz", value=[0.0, 1.0, 1.0])])
    finally:
        rclpy.try_shutdown(context=ctx)


def test_yaml_defaults_match_declared_defaults():
    doc = yaml.safe_load((REPO / "config" / "policy_node.yaml").read_text())
    params = doc["policy_node"]["ros__parameters"]
    assert set(params) == set(PARAMS)
    for name, spec in PARAMS.items():
        assert params[name] == spec.default, name


def test_help_does_not_start_ros():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "ire_vla_ros.nodes.policy_node", "--help"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and "motion_backend" in out.stdout and "stale_timeout_s" in out.stdout
