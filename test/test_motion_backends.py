"""Motion backends (ire_vla_ros/nodes/motion_backends.py).

Plain logic first (Servo request retries, newest-target worker, MoveIt config loading, speed
checks), then the Servo backend over real DDS against sim_node, which serves Servo's
`/servo_node/pause_servo` the way Jazzy Servo does: the stop path (zero twist + pause) must leave
the sim arm still while the sim keeps stepping. MoveIt and moveit_msgs cannot be installed here:
MoveItPy appears only as a test double (a fake planning component / execution manager), and the
`switch_command_type` client only through the ROS-free ServoSession with injected service links.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from std_msgs.msg import Float64

from ire_vla_ros.nodes import motion_backends as mb
from ire_vla_ros.nodes.ros_common import COMMAND_QOS, SENSOR_QOS, NodeStartupError, P, declare_params
from ire_vla_ros.robot.safety import MotionDelta
from ros_harness import wait_for  # noqa: E402

TASK = "button-press-topdown-v3"


# =============================================================================================
# ServoSession: retries, order, stale answers (no ROS)
# =============================================================================================
class FakeLink:
    """A service client double: `up` says whether the server exists; answers are released by hand."""

    def __init__(self, name, up=False, answer=True):
        self.name, self.up, self.answer = name, up, answer
        self.calls = []       # values sent
        self.pending = []     # done callbacks not answered yet
        self.auto = True

    def ready(self):
        return self.up

    def call(self, value, done):
        self.calls.append(value)
        if self.auto:
            done(self.answer, "ok" if self.answer else "refused")
        else:
            self.pending.append(done)


def _session(switch, pause, **kw):
    logs = []
    s = mb.ServoSession(command_type=1, switch=switch, pause=pause, log=lambda lvl, m: logs.append((lvl, m)), **kw)
    return s, logs


def test_servo_session_retries_until_servo_is_up_then_switches_and_unpauses():
    switch, pause = FakeLink("/servo_node/switch_command_type"), FakeLink("/servo_node/pause_servo")
    s, logs = _session(switch, pause, max_attempts=10)
    s.activate()
    assert s.busy and switch.calls == [] and s.state == "working"
    for _ in range(3):  # Servo not up: each retry tick counts an attempt, sends nothing
        s.tick()
    assert switch.calls == [] and logs and "not available" in logs[0][1]
    switch.up = pause.up = True
    s.tick()
    assert switch.calls == [1] and pause.calls == [False]  # TWIST, then unpause
    assert s.state == "active" and not s.busy
    assert s.snapshot()["servo_switch_ok"] == 1 and s.snapshot()["servo_unpause_ok"] == 1
    # every activate() switches again: a restarted Servo has forgotten the type
    s.activate()
    assert switch.calls == [1, 1] and pause.calls == [False, False]


def test_servo_session_gives_up_after_max_attempts_and_logs_it():
    switch = FakeLink("/servo_node/switch_command_type")
    s, logs = _session(switch, None, max_attempts=4)
    s.activate()
    for _ in range(10):
        s.tick()
    assert s.state == "gave_up" and not s.busy and switch.calls == []
    assert s.snapshot()["servo_gave_up"] == 1
    assert logs[-1][0] == "error" and "gave up after 4 attempts" in logs[-1][1]


def test_servo_session_refusal_retries_and_stop_supersedes_a_pending_activate():
    switch, pause = FakeLink("/sw", up=True, answer=False), FakeLink("/pause", up=True)
    s, _ = _session(switch, pause, max_attempts=5)
    s.activate()  # refused -> counted as an attempt, retried on the next tick
    assert switch.calls == [1] and s.state == "working"
    s.tick()
    assert switch.calls == [1, 1] and s.snapshot()["servo_switch_refused"] == 2
    # an answer that arrives after stop() belongs to the old request: it must not unpause anything
    switch.answer, switch.auto = True, False
    s.tick()
    assert len(switch.pending) == 1
    pause.auto = False
    s.stop()
    assert pause.calls == [True] and s.state == "working"  # the pause is in flight
    switch.pending.pop()(True, "late")  # must not count as the pause's answer, nor unpause
    assert pause.calls == [True] and s.state == "working" and s.snapshot()["servo_stale_answers"] == 1
    pause.pending.pop()(True, "Servoing disabled")
    assert s.state == "stopped" and s.snapshot()["servo_pause_ok"] == 1


def test_servo_session_unanswered_call_times_out_and_is_resent():
    now = [0.0]
    pause = FakeLink("/pause", up=True)
    pause.auto = False
    s, _ = _session(None, pause, call_timeout_s=2.0, clock=lambda: now[0])
    s.stop()
    assert pause.calls == [True]
    now[0] = 1.0
    s.tick()
    assert pause.calls == [True]  # still waiting
    now[0] = 2.5
    s.tick()  # timed out: counted, and the next tick resends
    s.tick()
    assert pause.calls == [True, True] and s.snapshot()["servo_call_timeouts"] == 1


# =============================================================================================
# NewestTargetWorker (the MoveItPy worker): off the caller's thread, newest wins, stop interrupts
# =============================================================================================
def test_newest_target_worker_runs_one_at_a_time_newest_wins_and_stop_interrupts():
    release = threading.Event()
    started = threading.Event()
    ran, interrupted = [], []

    def work(target, gen):
        ran.append(target)
        started.set()
        release.wait(30)

    gate, interrupt_done = threading.Event(), threading.Event()

    def interrupt():  # like stop_execution waiting for the controllers
        interrupted.append(1)
        gate.wait(5)
        release.set()
        interrupt_done.set()

    w = mb.NewestTargetWorker(work, interrupt=interrupt)
    try:
        w.submit("a")
        assert started.wait(30)
        w.submit("b")
        w.submit("c")  # replaces b while a still runs
        assert ran == ["a"] and w.counters["targets_replaced"] == 1
        release.set()
        assert w.wait_idle(30)
        assert ran == ["a", "c"]
        # stop while running: interrupt is called, the pending target is dropped
        release.clear()
        started.clear()
        w.submit("d")
        assert started.wait(30)
        w.submit("e")
        w.stop()
        assert not interrupt_done.is_set()  # stop() returned while the interrupt still waits
        wait_for(lambda: interrupted == [1], 30, "interrupt (in its own thread)")
        gate.set()
        assert w.wait_idle(30) and ran == ["a", "c", "d"]
        assert w.counters["targets_dropped_on_stop"] == 1
    finally:
        gate.set()
        release.set()
        w.close()


# =============================================================================================
# MoveItPy: start-up errors (moveit_py is absent here) and the backend on a MoveIt test double
# =============================================================================================
def test_load_moveit_config_errors_and_formats(tmp_path):
    with pytest.raises(NodeStartupError, match="moveit_config_file .* or moveit_config_package"):
        mb.load_moveit_config()
    with pytest.raises(NodeStartupError, match="does not exist"):
        mb.load_moveit_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(NodeStartupError, match="not valid YAML"):
        mb.load_moveit_config(str(bad))
    partial = tmp_path / "partial.yaml"
    partial.write_text("robot_description: '<robot/>'\n")
    with pytest.raises(NodeStartupError, match="robot_description_semantic"):
        mb.load_moveit_config(str(partial))
    wrapped = tmp_path / "moveit_py.yaml"
    wrapped.write_text("/**:\n  ros__parameters:\n    robot_description: '<robot/>'\n"
                       "    robot_description_semantic: '<robot/>'\n    planning_pipelines: [ompl]\n")
    cfg = mb.load_moveit_config(str(wrapped))
    assert cfg["planning_pipelines"] == ["ompl"] and cfg["robot_description"] == "<robot/>"
    # the shipped MoveItPy section is merged under the robot's file: scaled-down plan requests
    assert cfg["plan_request_params"]["max_velocity_scaling_factor"] == 0.1

    class Builder:  # moveit_configs_utils.MoveItConfigsBuilder's call chain
        def __init__(self, robot_name, package_name):
            self.args = (robot_name, package_name)

        def moveit_cpp(self, file_path):
            self.args += (Path(file_path).name,)
            return self

        def to_moveit_configs(self):
            return SimpleNamespace(to_dict=lambda: {"robot_description": "u", "robot_description_semantic": "s",
                                                    "built_from": self.args})

    assert mb.load_moveit_config(package="panda_moveit_config", builder_factory=Builder)["built_from"] == (
        "panda", "panda_moveit_config", "moveit_py.yaml")  # our MoveItPy section (scaled-down plans)
    try:
        import moveit_configs_utils  # noqa: F401
    except ImportError:
        with pytest.raises(NodeStartupError, match="needs moveit_configs_utils"):
            mb.load_moveit_config(package="panda_moveit_config")


def _moveit_available() -> bool:
    try:
        import moveit.planning  # noqa: F401
    except Exception:
        return False
    return True


class BackendHost(Node):
    """A bare node with the backend's parameters and the policy parameters the backends read."""

    POLICY = {
        "command_frame": P("world", ""), "control_rate_hz": P(10.0, ""), "ee_link": P("", ""),
        "gripper_topic": P("/gripper/command", ""), "max_translation_m": P(0.02, ""),
        "max_rotation_rad": P(0.08, ""),
    }

    def __init__(self, **kwargs):
        super().__init__("policy_node", **kwargs)
        self.p = declare_params(self, {**mb.PARAMS, **self.POLICY})
        self.group = ReentrantCallbackGroup()


def test_moveit_py_start_up_error_is_one_clean_line(ros):
    """Without moveit_py: the import error; with it but without a config: the config error. Either way a
    NodeStartupError whose message is one line, before any MoveIt object exists."""
    host = ros.add(BackendHost, motion_backend="moveit_py", ee_link="tool0")
    with pytest.raises(NodeStartupError) as err:
        mb.make_motion_backend(host, host.p, host.group)
    msg = str(err.value)
    assert "\n" not in msg
    if _moveit_available():
        assert "moveit_config_file" in msg
    else:
        assert "moveit_py" in msg and "servo_twist" in msg
    host.p.ee_link = ""
    with pytest.raises(NodeStartupError, match="moveit_pose_link"):
        mb.make_motion_backend(host, host.p, host.group)
    host.p.motion_backend = "joystick"
    with pytest.raises(NodeStartupError, match="not one of"):
        mb.make_motion_backend(host, host.p, host.group)


def test_policy_node_process_with_moveit_py_exits_with_one_line(ros_domain_id, tmp_path):
    """The real start-up path (run_node -> PolicyNode -> make_motion_backend) in its own process:
    exit code 1 and one FATAL line naming the cause, no traceback (issue: MoveItCpp threw instead)."""
    import os
    import subprocess
    import sys

    args = ["-p", "motion_backend:=moveit_py", "-p", "moveit_pose_link:=tool0"]
    if _moveit_available():  # then the missing config is the error to see
        args += ["-p", "moveit_config_file:=" + str(tmp_path / "missing.yaml")]
    out = subprocess.run([sys.executable, "-m", "ire_vla_ros.nodes.policy_node", "--ros-args", *args],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, ROS_DOMAIN_ID=str(ros_domain_id)))
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-2000:]
    assert "Traceback" not in text, text[-2000:]
    fatal = [line for line in text.splitlines() if "cannot start" in line]
    assert len(fatal) == 1 and ("moveit_py" in fatal[0] or "moveit_config_file" in fatal[0]), text[-2000:]


class FakeMoveIt:
    """MoveItPy test double: a planning component whose plan() blocks until released, an execution manager."""

    def __init__(self):
        self.plan_gate = threading.Event()
        self.planned, self.executed, self.stops = [], [], 0
        self.plan_thread = None
        outer = self

        class Arm:
            def set_start_state_to_current_state(self):
                pass

            def set_goal_state(self, pose_stamped_msg, pose_link):
                self.goal = (pose_stamped_msg, pose_link)

            def plan(self, single_plan_parameters):
                outer.plan_thread = threading.current_thread()
                outer.plan_gate.wait(30)
                outer.planned.append((self.goal, single_plan_parameters.max_velocity_scaling_factor,
                                      single_plan_parameters.max_acceleration_scaling_factor))
                return SimpleNamespace(trajectory=f"traj{len(outer.planned)}")

        class Tem:
            def stop_execution(self):
                outer.stops += 1
                outer.plan_gate.set()

        self.arm, self.tem = Arm(), Tem()

    def get_trajactory_execution_manager(self):  # Jazzy's spelling
        return self.tem

    def execute(self, trajectory, controllers):
        self.executed.append(trajectory)


def test_moveit_py_backend_plans_off_the_caller_thread_scaled_down_and_stops(ros):
    host = ros.add(BackendHost, motion_backend="moveit_py", ee_link="tool0")
    fake = FakeMoveIt()
    backend = mb.MoveItPyBackend(host, host.p, host.group,
                                 moveit_py=(fake, fake.arm, SimpleNamespace(max_velocity_scaling_factor=1.0,
                                                                            max_acceleration_scaling_factor=1.0)))
    try:
        delta = MotionDelta(np.array([0.01, 0.0, 0.0]), np.zeros(3), gripper=1.0)
        assert not backend.send(delta, [0.3, 0.0, 0.4], [0, 0, 0, 1])  # not activated: nothing
        backend.activate()
        t0 = time.monotonic()
        assert backend.send(delta, [0.3, 0.0, 0.4], [0, 0, 0, 1])  # returns while plan() blocks
        wait_for(lambda: fake.plan_thread is not None, 30, "plan() started")
        assert fake.plan_thread is not threading.current_thread() and not fake.planned
        assert backend.send(MotionDelta(np.array([0.0, 0.02, 0.0]), np.zeros(3)), [0.3, 0.0, 0.4], [0, 0, 0, 1])
        assert backend.send(MotionDelta(np.array([0.0, 0.0, 0.01]), np.zeros(3)), [0.3, 0.0, 0.4], [0, 0, 0, 1])
        assert time.monotonic() - t0 < 30  # (sanity only: send() did not wait for the plan)
        fake.plan_gate.set()
        wait_for(lambda: len(fake.executed) == 2, 30, "two executions (first and newest target)")
        (goal, link), vel, acc = fake.planned[-1]
        assert link == "tool0" and vel == pytest.approx(0.1) and acc == pytest.approx(0.1)
        assert goal.pose.position.z == pytest.approx(0.41) and goal.header.frame_id == "world"
        assert backend.stats()["targets_replaced"] == 1
        # stop while a plan runs: execution manager's stop, later targets refused until activate()
        fake.plan_gate.clear()
        fake.plan_thread = None
        backend.send(delta, [0.3, 0.0, 0.4], [0, 0, 0, 1])
        wait_for(lambda: fake.plan_thread is not None, 30, "plan() started")
        backend.stop("estop")
        wait_for(lambda: fake.stops == 1, 30, "stop_execution")
        wait_for(lambda: backend.stats().get("plans_discarded_after_stop") == 1, 30, "plan discarded")
        assert len(fake.executed) == 2  # the plan finished after the stop was not executed
        assert not backend.send(delta, [0.3, 0.0, 0.4], [0, 0, 0, 1])
        assert backend.stats()["stop_estop"] == 1
    finally:
        fake.plan_gate.set()
        backend.close()


# =============================================================================================
# speeds and the largest motion of one action
# =============================================================================================
def test_servo_speed_warnings_and_largest_motion():
    # the policy defaults: 2 cm and 0.1 rad per step at 10 Hz = 0.2 m/s (fine) and 1.0 rad/s (> 0.8)
    w = mb.servo_speed_warnings(0.02, 0.1, 10.0, 0.4, 0.8)
    assert len(w) == 1 and "max_rotation_rad" in w[0] and "0.08" in w[0]
    assert mb.servo_speed_warnings(0.02, 0.08, 10.0, 0.4, 0.8) == []
    assert len(mb.servo_speed_warnings(0.05, 0.08, 10.0, 0.4, 0.8)) == 1  # 0.5 m/s > 0.4
    # 2 cm per 0.1 s step held until a 0.25 s timeout: 5 cm; a timeout below the period: one step
    assert mb.largest_motion_per_action_m(0.02, 10.0, 0.25) == pytest.approx(0.05)
    assert mb.largest_motion_per_action_m(0.02, 10.0, 0.05) == pytest.approx(0.02)
    assert mb.largest_motion_per_action_m(0.05, 10.0, 0.25, scale_linear=0.4) == pytest.approx(0.1)


# =============================================================================================
# Servo backend over real DDS: sim_node serves /servo_node/pause_servo like Jazzy Servo
# =============================================================================================
def _ee(poses):
    p = poses[-1].pose.position
    return np.array([p.x, p.y, p.z])


def test_moveit_msgs_missing_is_logged_with_the_manual_command(ros):
    host = ros.add(BackendHost, motion_backend="servo_twist")
    logged = []

    class Rec:
        def __getattr__(self, level):
            return lambda msg, **kw: logged.append((level, msg))

    host.get_logger = lambda: Rec()
    client = mb.ServoModeClient(host, "TWIST", "/servo_node/switch_command_type", "",
                                import_command_type=lambda: (None, "moveit_msgs does not import (ImportError)"))
    try:
        warn = [m for lvl, m in logged if lvl == "warning"]
        assert warn and "ros2 service call /servo_node/switch_command_type moveit_msgs/srv/ServoCommandType" \
            in warn[0] and "command_type: 1" in warn[0]
        assert client.snapshot()["servo_switch"].startswith("unavailable: moveit_msgs")
        client.activate()  # nothing to call: no switch link, no pause link -> active at once
        assert client.session.state == "active"
    finally:
        client.close()
    if mb.import_servo_command_type()[0] is None:  # the real import path on this machine
        backend = mb.make_motion_backend(host, host.p, host.group)
        assert "unavailable" in backend.stats()["servo_switch"]
        backend.close()


def test_servo_stop_pauses_and_the_sim_arm_holds_still(ros):
    """activate() unpauses (retried until the sim's pause service is up), send() moves the sim arm,
    stop() sends a zero twist + pause: then even fresh twists from elsewhere move nothing, while the
    sim keeps stepping (positive control), and activate() makes it move again."""
    from ire_vla_ros.nodes.sim_node import SimNode

    host = ros.add(BackendHost, motion_backend="servo_twist", servo_switch_service="",
                   servo_retry_period_s=0.2, servo_retry_max=1000, control_rate_hz=10.0)
    backend = mb.make_motion_backend(host, host.p, host.group)
    twists = ros.collect(TwistStamped, "/servo_node/delta_twist_cmds", COMMAND_QOS)
    grips = ros.collect(Float64, "/gripper/command", COMMAND_QOS)
    poses = ros.collect(PoseStamped, "/ee_pose", SENSOR_QOS)
    try:
        backend.activate()  # the "Servo" (sim) is not up yet: retried
        wait_for(lambda: backend.stats().get("servo_state") == "working", 10, "activation pending")
        sim = ros.add(SimNode, task=TASK, rate_hz=20.0, command_timeout_s=0.3, seed=2)
        sim.mixer.paused = True  # as if an earlier e-stop had paused Servo
        wait_for(lambda: backend.stats().get("servo_state") == "active", 60, "unpause after Servo came up")
        assert not sim.mixer.paused and sim.pause_calls == 1
        wait_for(lambda: len(poses) > 2, 30, "sim EE pose")

        step = MotionDelta(np.array([0.004, 0.0, 0.0]), np.zeros(3), gripper=-1.0)

        def drive(seconds, d=step):
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                backend.send(d, None, None)
                time.sleep(0.1)

        start = _ee(poses)
        drive(1.5)
        wait_for(lambda: _ee(poses)[0] - start[0] > 0.01, 30, "the arm moving along +x")  # positive control
        assert twists[-1].twist.linear.x == pytest.approx(0.04) and grips[-1].data == -1.0

        n_twists = len(twists)
        backend.stop("estop")
        wait_for(lambda: len(twists) > n_twists and sim.mixer.paused, 30, "zero twist and pause")
        zero = twists[n_twists]
        assert (zero.twist.linear.x, zero.twist.linear.y, zero.twist.linear.z) == (0.0, 0.0, 0.0)
        assert zero.header.frame_id == "world"
        backend.stop("estop")  # idempotent: no second pause request
        assert backend.stats()["stops"] == 1 and sim.pause_calls == 2

        # someone else keeps publishing fresh twists: a paused Servo does not move
        other = ros.probe.create_publisher(TwistStamped, "/servo_node/delta_twist_cmds", COMMAND_QOS)
        t0 = sim.ticks
        wait_for(lambda: sim.ticks >= t0 + 10, 60, "the hand settling from the last step")
        held, ticks0 = _ee(poses), sim.ticks
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            msg = TwistStamped()
            msg.header.frame_id = "world"
            msg.header.stamp = ros.probe.get_clock().now().to_msg()
            msg.twist.linear.z = 0.05
            other.publish(msg)
            time.sleep(0.05)
        wait_for(lambda: sim.ticks >= ticks0 + 10, 60, "sim stepping while paused")  # the node was alive
        assert sim.mixer.paused_steps >= 10
        assert np.linalg.norm(_ee(poses) - held) < 0.002

        # activate again (e.g. ~/enable true): unpaused, moves
        backend.activate()
        wait_for(lambda: not sim.mixer.paused, 30, "unpaused")
        before = _ee(poses)
        drive(1.5)
        wait_for(lambda: _ee(poses)[0] - before[0] > 0.01, 30, "moving again")
    finally:
        backend.close()


def test_servo_pose_backend_targets_from_the_ee_pose(ros):
    host = ros.add(BackendHost, motion_backend="servo_pose", servo_switch_service="", servo_pause_service="")
    backend = mb.make_motion_backend(host, host.p, host.group)
    targets = ros.collect(PoseStamped, "/servo_node/pose_target_cmds", COMMAND_QOS)
    try:
        assert backend.needs_ee_pose
        assert not backend.send(MotionDelta(np.zeros(3), np.zeros(3)), None, None)  # no EE pose: nothing
        backend.activate()
        assert backend.send(MotionDelta(np.array([0.01, 0.0, -0.02]), np.zeros(3)), [0.3, 0.1, 0.5], [0, 0, 0, 1])
        wait_for(lambda: targets, 30, "pose target")
        p = targets[-1].pose.position
        assert (p.x, p.y, p.z) == pytest.approx((0.31, 0.1, 0.48))
        assert targets[-1].header.frame_id == "world" and backend.stats()["no_ee_pose"] == 1
    finally:
        backend.close()


# =============================================================================================
# shipped configs agree with each other (Servo example, policy defaults, backend defaults)
# =============================================================================================
REPO = Path(__file__).resolve().parent.parent


def _yaml(name):
    import yaml

    return yaml.safe_load((REPO / "config" / name).read_text())


def test_servo_example_config_matches_the_backend_defaults():
    ms = _yaml("servo_example.yaml")["servo_node"]["ros__parameters"]["moveit_servo"]
    assert "ee_frame" not in ms and "planning_frame" not in ms  # not parameters in 2.10-2.12
    assert ms["command_in_type"] == "speed_units"
    assert ms["apply_twist_commands_about_ee_frame"] is True  # rotations about the EE, as pose_after_delta
    assert ms["scale"]["linear"] == mb.PARAMS["servo_scale_linear"].default
    assert ms["scale"]["rotational"] == mb.PARAMS["servo_scale_rotational"].default
    assert ms["incoming_command_timeout"] == mb.PARAMS["servo_command_timeout_s"].default
    policy = next(iter(_yaml("policy_node.yaml").values()))["ros__parameters"]
    assert ms["incoming_command_timeout"] >= 2.0 / policy["control_rate_hz"]  # no stop-and-go at 10 Hz
    cpp = _yaml("moveit_py.yaml")["plan_request_params"]
    assert cpp["max_velocity_scaling_factor"] == mb.PARAMS["moveit_max_velocity_scaling"].default <= 0.1


def test_policy_defaults_fit_servo_speed_caps():
    """The policy's largest step at its rate must not exceed Servo's speed_units caps (0.4 m/s, 0.8 rad/s):
    config/policy_node.yaml's max_translation_m / max_rotation_rad at control_rate_hz."""
    policy = next(iter(_yaml("policy_node.yaml").values()))["ros__parameters"]
    ms = _yaml("servo_example.yaml")["servo_node"]["ros__parameters"]["moveit_servo"]
    assert mb.servo_speed_warnings(policy["max_translation_m"], policy["max_rotation_rad"],
                                   policy["control_rate_hz"], ms["scale"]["linear"], ms["scale"]["rotational"]) == []
