"""The parts policy_node and recorder_node are built from, each on its own.

ROS-free first (robot/runner.py, episodes/recorder.py: the rules the nodes call), then the shared
ROS glue (ros_common diagnostics, reliability matching, start-up choices; arm_inputs e-stop and EE
pose) on a real rclpy node in the shared `ros` harness.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest

from ire_vla_ros.episodes.recorder import (
    EpisodeSession, check_recorder_params, episode_metadata, json_object,
)
from ire_vla_ros.robot.image_codec import ImageLimits
from ire_vla_ros.robot.runner import (
    LatestObservations, ModelReloader, check_policy_params, instruction_refusal, policy_health,
)
from ire_vla_ros.vla.action_spec import METAWORLD_4D
from ros_harness import wait_for

ACTION_NAMES = list(METAWORLD_4D.names)
SAFETY_DEFAULTS = {"max_translation_m": 0.02, "max_rotation_rad": 0.08, "workspace_enabled": True,
                   "workspace_min_xyz": [-0.6, -0.6, 0.0], "workspace_max_xyz": [0.6, 0.6, 0.8],
                   "stale_timeout_s": 0.5, "ee_pose_timeout_s": 0.5}


# =============================================================================================
# ROS-free: robot/runner.py
# =============================================================================================
def test_policy_health_names_the_reason_there_is_no_command():
    running = {"estop": False, "estop_link_ok": True, "enabled": True, "command_rate_hz": 9.96}
    assert policy_health(running) == (0, "running at 10.0 Hz")
    assert policy_health({**running, "enabled": False}) == (1, "disabled (call ~/enable)")
    assert policy_health({**running, "estop_link_ok": False}) == (1, "e-stop lost")
    assert policy_health({**running, "estop": True, "estop_link_ok": False, "enabled": False}) == (1, "e-stop latched")


def test_check_policy_params_refuses_what_does_not_fit_together():
    values = {**SAFETY_DEFAULTS, "default_instruction": "reach", "max_instruction_bytes": 5}
    assert check_policy_params(values) is None
    assert "workspace_min" in check_policy_params({**values, "workspace_min_xyz": [1.0, 0.0, 0.0]})
    assert check_policy_params({**values, "default_instruction": "reach!"}) == (
        "default_instruction is 6 bytes > max_instruction_bytes 5")
    assert instruction_refusal("é" * 3, 5) == "6 bytes > max_instruction_bytes 5"  # UTF-8 bytes, not characters
    assert instruction_refusal("abcde", 5) is None


def test_observation_limits_change_and_stats_report_them():
    obs = LatestObservations(ImageLimits(max_pixels=100, max_bytes=1000), max_instruction_bytes=8, instruction="go")
    assert not obs.set_instruction("a" * 9)[0]
    obs.set_limits(50, 500, 16)
    assert obs.set_instruction("a" * 9)[0]
    st = obs.stats()
    assert (st["max_image_pixels"], st["max_image_bytes"], st["max_instruction_bytes"]) == (50, 500, 16)
    assert st["instruction"] == "a" * 9 and st["oversize_instructions"] == 1 and st["last_image_refusal"] == ""


def test_reloader_stats_carry_the_last_result():
    def load():
        raise OSError("no such checkpoint")

    rl = ModelReloader(load, lambda policy, ckpt: None, lambda ok, msg: None)
    assert rl.request()[0]
    rl.join(10.0)
    st = rl.stats()
    assert st["reloads_failed"] == 1 and st["reload_running"] is False
    assert st["reload_last_result"] == "failed: OSError: no such checkpoint"


# =============================================================================================
# ROS-free: episodes/recorder.py
# =============================================================================================
RECORDER_PARAMS = {"instruction_topic": "/policy_node/instruction", "task": "", "source": "policy", "iteration": 3,
                   "action_spec": "auto", "camera_name": "main", "action_topic": "/policy_node/action",
                   "policy_params_topic": "", "instruction": "", "max_instruction_chars": 10}


def test_episode_metadata_from_the_parameters_in_force():
    with pytest.raises(ValueError, match="no instruction yet .*/policy_node/instruction"):
        episode_metadata(RECORDER_PARAMS, "", ACTION_NAMES, ["j1"], recorder="/rec", episode=1, policy_params=None)
    meta = episode_metadata(RECORDER_PARAMS, "reach", ACTION_NAMES, ["j1"], recorder="/rec", episode=2,
                            policy_params=None)
    assert (meta["instruction"], meta["task"], meta["source"], meta["iteration"], meta["camera_names"]) == (
        "reach", "reach", "policy", 3, ("main",))
    assert meta["action_spec"] is METAWORLD_4D and meta["joint_names"] == ["j1"]
    inner = meta["metadata"]
    assert (inner["recorder"], inner["episode_index"], inner["policy_params"]) == ("/rec", 2, None)
    assert inner["policy_params_note"] == "nothing received on (off)"
    assert inner["recorder_params"] == RECORDER_PARAMS and inner["recorder_params"] is not RECORDER_PARAMS
    meta = episode_metadata({**RECORDER_PARAMS, "task": "press"}, "reach", ACTION_NAMES, [], recorder="/rec",
                            episode=3, policy_params={"explore": False})
    assert meta["task"] == "press" and meta["metadata"]["policy_params_note"] == ""
    with pytest.raises(ValueError):  # a spec that does not fit the actions refuses the episode
        episode_metadata({**RECORDER_PARAMS, "action_spec": "ee_delta_7d"}, "reach", ACTION_NAMES, [],
                         recorder="/rec", episode=4, policy_params=None)


def test_check_recorder_params_and_json_object():
    assert check_recorder_params(RECORDER_PARAMS, "/policy_node/action", "recording") is None
    switched = {**RECORDER_PARAMS, "action_topic": "/teleop_node/action"}
    assert check_recorder_params(switched, "/policy_node/action", "idle") is None
    assert "stop it before switching" in check_recorder_params(switched, "/policy_node/action", "recording")
    assert check_recorder_params({**RECORDER_PARAMS, "task": "x" * 11}, "/policy_node/action", "idle") == (
        "task: longer than max_instruction_chars (10)")
    assert json_object('{"a": 1}') == {"a": 1} and json_object("{}") == {}
    assert json_object("[1]") is None and json_object("not json") is None
    assert json_object('{"a": "' + "x" * 20 + '"}', max_chars=10) is None


class _FakeRecorder:
    """What EpisodeSession needs of EpisodeRecorder, without the writer thread."""

    def __init__(self):
        self.stats = SimpleNamespace(last_error="")
        self.begun = 0

    def begin(self, meta) -> int:
        self.begun += 1
        return self.begun

    def add_step(self, step) -> bool:
        return True

    def end(self, success, meta) -> None:
        pass

    def abort(self, why) -> None:
        pass


def test_session_hands_on_writer_results_and_ends_the_episode_a_fault_aborted():
    now = 10**12
    s = EpisodeSession(_FakeRecorder(), clock_ns=lambda: now, make_meta=lambda names, joints: {})
    assert s.request_start() is None
    s.begin_recording()
    s.add_image(now, np.zeros((2, 2, 3), np.uint8))
    s.add_joints(now, ["j1"], [0.0])
    assert s.on_action(now, ACTION_NAMES, [0, 0, 0, 1]) is None  # the writer's episode 1 begins
    s.on_writer_result("saved", "/episodes/ep_0.h5")
    s.on_writer_result("failed", (7, "disk full"))   # another episode's fault: this one goes on
    results = s.writer_results()
    assert next(results) == ("saved", "/episodes/ep_0.h5", False)
    assert next(results) == ("failed", "disk full", False) and s.state == "recording"
    s.on_writer_result("failed", (1, "disk full"))
    s.on_writer_result("error", "step not recorded: bad image")
    assert list(results) == [("failed", "disk full", True), ("error", "step not recorded: bad image", False)]
    assert s.state == "idle" and list(s.writer_results()) == []


def test_session_configure_sets_every_live_setting():
    s = EpisodeSession(_FakeRecorder(), clock_ns=lambda: 0, make_meta=lambda names, joints: {})
    s.joints.add(0, ["j1"], [0.0])
    s.configure(window_s=2.5, tolerance_s=0.01, intervention_hold_s=0.5, policy_terms_on_interventions=False)
    assert (s.images.window_ns, s.joints.window_s, s.joints._by_name["j1"].window_ns) == (
        2_500_000_000, 2.5, 2_500_000_000)
    assert (s.tolerance_ns, s.intervention_hold_ns, s.policy_terms_on_interventions) == (10_000_000, 500_000_000, False)


# =============================================================================================
# ROS glue: nodes/ros_common.py, nodes/arm_inputs.py
# =============================================================================================
def _host(ros, name="parts_host"):
    from rclpy.node import Node

    return ros.add(functools.partial(Node, name))


def test_diagnostic_value_and_array(ros):
    from diagnostic_msgs.msg import DiagnosticStatus

    from ire_vla_ros.nodes.ros_common import diagnostic_array, diagnostic_value

    assert [diagnostic_value(v) for v in (1.23456, float("nan"), 3, True, "x", None)] == [
        "1.235", "nan", "3", "True", "x", "None"]
    node = _host(ros)
    arr = diagnostic_array(node, "/parts_host: test", 1, "careful", {"a": 0.5, "b": "text", "c": 2},
                           hardware_id="hw")
    (st,) = arr.status
    assert (st.level, st.name, st.message, st.hardware_id) == (DiagnosticStatus.WARN, "/parts_host: test", "careful",
                                                               "hw")
    assert [(kv.key, kv.value) for kv in st.values] == [("a", "0.500"), ("b", "text"), ("c", "2")]
    assert arr.header.stamp.sec > 0
    levels = [diagnostic_array(node, "n", k, "", {}).status[0].level for k in range(4)]
    assert levels == [DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR, DiagnosticStatus.STALE]


def test_require_choices_names_the_bad_value():
    from ire_vla_ros.nodes.ros_common import NodeStartupError, require_choices

    values = SimpleNamespace(mode="frame", transport="jpeg")
    require_choices(values, {"mode": ("frame", "timer")})
    with pytest.raises(NodeStartupError, match=r"transport 'jpeg' is not one of \('raw', 'compressed'\)"):
        require_choices(values, {"mode": ("frame", "timer"), "transport": ["raw", "compressed"]})


def test_reliability_follows_the_publishers(ros):
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String

    from ire_vla_ros.nodes.ros_common import ReliabilityMatchedSubscription, reliability_for

    R, B = ReliabilityPolicy.RELIABLE, ReliabilityPolicy.BEST_EFFORT
    assert (reliability_for([]), reliability_for([R, R]), reliability_for([R, B])) == (None, R, B)
    node, camera = _host(ros), _host(ros, "camera")
    with pytest.raises(ValueError):
        ReliabilityMatchedSubscription(node, String, "/parts/image", print, "sometimes")
    assert ReliabilityMatchedSubscription(node, String, "/parts/fixed", print, "reliable").reliability == R
    sub = ReliabilityMatchedSubscription(node, String, "/parts/image", print, "auto", recheck_s=3600.0)
    assert sub.reliability == B  # no publisher yet: best effort hears every kind

    def matched(want):
        sub.match()
        return sub.reliability == want

    camera.create_publisher(String, "/parts/image", QoSProfile(depth=1, reliability=R))
    wait_for(lambda: matched(R), 10, "a RELIABLE subscription for the one RELIABLE publisher")
    # re-created, not added (the graph shows the destroyed one for a moment: wait for it to go)
    wait_for(lambda: [i.qos_profile.reliability for i in node.get_subscriptions_info_by_topic("/parts/image")
                      if i.node_name == "parts_host"] == [R], 10, "one RELIABLE subscription in the graph")
    camera.create_publisher(String, "/parts/image", QoSProfile(depth=1, reliability=B))
    wait_for(lambda: matched(B), 10, "BEST_EFFORT once a best-effort publisher joins")


def test_estop_listener_latches_and_requires_a_live_publisher(ros):
    from std_msgs.msg import Bool

    from ire_vla_ros.nodes.arm_inputs import EstopListener
    from ire_vla_ros.nodes.ros_common import ESTOP_QOS
    from ire_vla_ros.robot.safety import SafetyConfig, SafetyFilter

    safety = SafetyFilter(SafetyConfig.from_params(SAFETY_DEFAULTS), METAWORLD_4D)
    stops = []
    node, panel = _host(ros), _host(ros, "estop_panel")
    with pytest.raises(ValueError):
        EstopListener(node, "/parts/estop", safety, stops.append, lost_action="pause")
    listener = EstopListener(node, "/parts/estop", safety, stops.append, lost_action="stop")
    assert not safety.estop_link_ok  # nobody could stop the arm yet
    pub = panel.create_publisher(Bool, "/parts/estop", ESTOP_QOS)
    pub.publish(Bool(data=False))
    wait_for(lambda: safety.estop_link_ok, 10, "the link up after the publisher's state")
    assert listener.matched == 1 and not safety.estop_active and stops == []
    pub.publish(Bool(data=True))
    wait_for(lambda: safety.estop_active, 10, "the e-stop latched")
    assert stops == ["estop"]
    panel.destroy_publisher(pub)
    wait_for(lambda: not safety.estop_link_ok, 10, "the link down when the publisher goes")
    assert stops == ["estop", "estop_lost"] and listener.matched == 0


def test_ee_pose_input_from_the_topic_checks_the_frame(ros):
    from geometry_msgs.msg import PoseStamped

    from ire_vla_ros.nodes.arm_inputs import EePoseInput
    from ire_vla_ros.nodes.ros_common import RELIABLE_QOS

    got = []
    node, arm = _host(ros), _host(ros, "arm")
    ee = EePoseInput(node, lambda *pose: got.append(pose), "base_link", "/parts/ee_pose")
    ee.poll()  # the topic's poses are stored as they arrive: nothing to look up
    pub = arm.create_publisher(PoseStamped, "/parts/ee_pose", RELIABLE_QOS)
    wait_for(lambda: pub.get_subscription_count() == 1, 10, "the pose subscription")
    for frame in ("/base_link", "tool0"):
        msg = PoseStamped()
        msg.header.frame_id = frame
        msg.pose.position.x, msg.pose.orientation.w = 0.3, 1.0
        pub.publish(msg)
    wait_for(lambda: len(got) == 2, 10, "both poses")
    (pos, quat, t, frame_ok), (_, _, _, other_ok) = got
    assert pos.tolist() == [0.3, 0.0, 0.0] and quat.tolist() == [0.0, 0.0, 0.0, 1.0] and t > 0
    assert frame_ok and not other_ok


def test_ee_pose_input_from_tf(ros):
    pytest.importorskip("tf2_ros")
    from geometry_msgs.msg import TransformStamped
    from tf2_ros import TransformBroadcaster

    from ire_vla_ros.nodes.arm_inputs import EePoseInput

    got = []
    node, robot = _host(ros), _host(ros, "robot_state")
    ee = EePoseInput(node, lambda *pose: got.append(pose), "base_link", "/unused", ee_link="tool0")
    ee.poll()
    assert got == []  # no transform yet: nothing stored (the control step counts the missing pose)
    tf = TransformStamped()
    tf.header.frame_id, tf.child_frame_id = "base_link", "tool0"
    tf.header.stamp.sec = 42
    tf.transform.translation.z, tf.transform.rotation.w = 0.5, 1.0
    broadcaster = TransformBroadcaster(robot)

    def stored():
        tf.header.stamp.nanosec += 1000  # a new stamp each time (tf2 drops repeated ones)
        broadcaster.sendTransform(tf)  # /tf is volatile: sent until the listener has it
        ee.poll()
        return got

    wait_for(stored, 10, "the pose from TF")
    pos, quat, t = got[-1]
    assert pos.tolist() == [0.0, 0.0, 0.5] and quat.tolist() == [0.0, 0.0, 0.0, 1.0] and 42.0 < t < 42.1
