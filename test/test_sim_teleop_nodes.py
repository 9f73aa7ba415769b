"""sim_node and teleop_node: the Metaworld sim behind robot interfaces, keyboard + scripted teleop.

Real nodes, real messages. The probe node plays MoveIt Servo's clients (twist / pose commands)
and the consumers of the camera / joint states. The keyboard test drives a real teleop_node
process through a pseudo-terminal.
"""
from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import rclpy
from geometry_msgs.msg import PoseStamped, TwistStamped
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float32, Float64, String
from std_srvs.srv import SetBool, Trigger

from ire_vla_ros.nodes.ros_common import COMMAND_QOS, LATCHED_QOS, SENSOR_QOS
from ire_vla_ros.nodes.sim_node import CommandMixer, SimNode, pose_to_action, twist_to_action
from ire_vla_ros.nodes.teleop_node import (
    KeyboardMapper,
    NoisyForwarder,
    TeleopNode,
    action_to_command,
)
from ire_vla_ros.robot.image_codec import decode_image_msg
from ire_vla_ros.vla.action_spec import EE_DELTA_7D, METAWORLD_4D
from ros_harness import wait_for  # noqa: E402

TASK = "button-press-topdown-v3"


# =============================================================================================
# plain logic
# =============================================================================================
def test_teleop_action_round_trips_through_sim_conversion():
    """teleop: action -> velocity at rate r; sim at rate r: velocity -> the same action."""
    for rate in (5.0, 10.0, 20.0):
        a = np.array([0.3, -0.7, 1.0, 0.5], np.float32)
        lin, ang, grip = action_to_command(a, METAWORLD_4D, rate)
        assert grip == 0.5 and not ang.any()
        back = twist_to_action(lin, 1.0 / rate, METAWORLD_4D.translation_scale_m)
        np.testing.assert_allclose(back, a[:3], atol=1e-6)
    lin, ang, grip = action_to_command(np.array([0, 0, 0, 1, 0, -1, -1.0]), EE_DELTA_7D, 10.0)
    np.testing.assert_allclose(ang, [0.5, 0.0, -0.5])  # 0.05 rad/step * 10 Hz
    # a twist at 2x the rate the sim runs moves twice as far per sim step (clipped to 1)
    assert twist_to_action([0.2, 0, 0], 0.1, 0.01)[0] == 1.0


def test_command_mixer_stale_and_pose():
    m = CommandMixer(dt=0.1, translation_scale_m=0.01, timeout_s=0.25, gripper=-1.0)
    assert m.action(0.0, [0, 0, 0]).tolist() == [0, 0, 0, -1]
    m.set_twist([0.05, 0.0, -0.05], stamp=10.0)
    np.testing.assert_allclose(m.action(10.1, [0, 0, 0]), [0.5, 0.0, -0.5, -1.0])
    assert m.action(10.3, [0, 0, 0])[:3].tolist() == [0, 0, 0]  # stale -> zero motion, like Servo
    assert m.stale_steps == 1
    m.set_gripper(1.0)
    m.set_pose([0.1, 0.0, 0.003], stamp=10.4)  # newer than the twist: pose wins
    np.testing.assert_allclose(m.action(10.45, [0.0, 0.0, 0.0]), [1.0, 0.0, 0.09, 1.0], atol=1e-6)
    np.testing.assert_allclose(pose_to_action([0.0, 0.0, 0.0], [0.0, 0.0, 0.005], 0.01, gain=1.0), [0, 0, -0.5])
    m.reset(-1.0)
    assert m.action(10.45, [0, 0, 0]).tolist() == [0, 0, 0, -1]


def test_keyboard_mapper_and_noise():
    k = KeyboardMapper(METAWORLD_4D, hold_s=0.25, magnitude=0.5)
    assert k.press("w", 0.0) == "+dx" and k.press("f", 0.0) == "-dz"
    assert k.press("j", 0.0) is None  # yaw does not exist in the 4-D spec
    np.testing.assert_allclose(k.action(0.1), [0.5, 0.0, -0.5, -1.0])
    assert k.action(0.3).tolist() == [0.0, 0.0, 0.0, -1.0]  # released (no repeat within hold_s)
    assert k.press(" ", 0.3) == "gripper closed" and k.action(0.3)[3] == 1.0
    k.press("+", 0.3)
    k.press("s", 0.3)
    assert k.action(0.31)[0] == pytest.approx(-0.6)
    k.press("x", 0.32)
    assert not k.moving
    k7 = KeyboardMapper(EE_DELTA_7D)
    k7.press("l", 0.0)
    assert k7.action(0.0)[EE_DELTA_7D.index("dyaw")] == -0.5

    f = NoisyForwarder(METAWORLD_4D, 0.3, seed=0)
    out = np.stack([f([0.9, 0.0, 0.0, 1.0]) for _ in range(500)])
    assert out.max() <= 1.0 and out.min() >= -1.0 and (out[:, 3] == 1.0).all()  # gripper not noised
    assert 0.2 < out[:, 1].std() < 0.4
    with pytest.raises(ValueError):
        f([0.0, 0.0])


# =============================================================================================
# ROS (the shared `ros` fixture of conftest.py: own domain, single-threaded executor, probe node)
# =============================================================================================


def _ee(msgs):
    p = msgs[-1].pose.position
    return np.array([p.x, p.y, p.z])


def test_sim_node_interfaces_and_commands(ros):
    images = ros.collect(Image, "/camera/image_raw", SENSOR_QOS)
    joints = ros.collect(JointState, "/joint_states", SENSOR_QOS)
    poses = ros.collect(PoseStamped, "/ee_pose", SENSOR_QOS)
    expert = ros.collect(JointState, "/sim_node/expert_action")
    rewards = ros.collect(Float32, "/sim_node/reward")
    success = ros.collect(Bool, "/sim_node/success")
    sim = ros.add(SimNode, task=TASK, rate_hz=20.0, command_timeout_s=0.25, seed=5)
    instruction = ros.collect(String, "/policy_node/instruction", LATCHED_QOS)  # late joiner: latched
    wait_for(lambda: len(images) > 3 and poses and expert and instruction and success, 15, "sim topics")

    img = images[-1]
    assert img.encoding == "rgb8" and (img.height, img.width) == (64, 64)
    assert decode_image_msg(img).std() > 5  # a rendered scene, not a blank frame
    assert list(joints[-1].name) == list(sim.env.joint_names) and len(joints[-1].position) == 9
    # all messages of one step carry one stamp: the image of a step pairs with its joint state and pose
    wait_for(lambda: len(_stamps(images) & _stamps(joints) & _stamps(poses)) >= 3, 30, "stamps shared by a step")
    assert len(_stamps(images)) == len(images)  # one image per step, each with its own stamp
    assert list(expert[-1].name) == list(METAWORLD_4D.names)
    assert instruction[-1].data == "press the button from the top"
    assert rewards and not success[-1].data

    twist = ros.probe.create_publisher(TwistStamped, "/servo_node/delta_twist_cmds", COMMAND_QOS)
    pose_pub = ros.probe.create_publisher(PoseStamped, "/servo_node/pose_target_cmds", COMMAND_QOS)
    grip = ros.probe.create_publisher(Float64, "/gripper/command", COMMAND_QOS)
    wait_for(lambda: twist.get_subscription_count() and pose_pub.get_subscription_count()
             and grip.get_subscription_count(), 10, "sim command subscriptions")

    def send_twist(vx, vy, vz, frame="world", age=0.0):
        msg = TwistStamped()
        msg.header.frame_id = frame
        msg.header.stamp = (ros.probe.get_clock().now() - rclpy.duration.Duration(seconds=age)).to_msg()
        msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = vx, vy, vz
        twist.publish(msg)

    def after_steps(n):
        """EE position once the sim has stepped n more times (its own progress, not wall time)."""
        t0 = sim.ticks
        wait_for(lambda: sim.ticks >= t0 + n and poses, 60, f"{n} sim steps")
        return _ee(poses)

    # Speeds and distances per second depend on the machine: bench/bench_sim_teleop.py measures
    # them. Here: direction, stopping, rejection, and reaching a target, each with a deadline.
    start = after_steps(3)
    deadline = time.monotonic() + 30
    while _ee(poses)[0] - start[0] < 0.02 and time.monotonic() < deadline:  # +x at 0.05 m/s
        send_twist(0.05, 0.0, 0.0)
        time.sleep(0.05)
    moved = _ee(poses) - start
    assert moved[0] >= 0.02 and abs(moved[1]) < 0.3 * moved[0], moved
    # no new command: stale after command_timeout_s (0.25 s = 5 steps at 20 Hz), then the arm holds
    stale0 = sim.mixer.stale_steps
    a = after_steps(20)  # 5 steps to go stale, then the arm settles onto its held target (seen: 2.5 mm
    b = after_steps(10)  # still moving between steps 10 and 20 on a loaded machine)
    assert np.linalg.norm(b - a) < 0.002 and sim.mixer.stale_steps >= stale0 + 10
    # stale on arrival (stamped 1 s ago) and wrong frame: both ignored while the sim steps on
    stale0, rejected0, t0 = sim.mixer.stale_steps, sim.rejected_frames, sim.ticks
    while sim.ticks < t0 + 10 or sim.rejected_frames < rejected0 + 5:
        send_twist(0.0, 0.0, 0.1, age=1.0)
        send_twist(0.0, 0.0, 0.1, frame="base_link")
        time.sleep(0.05)
        assert sim.ticks < t0 + 1000, "wrong-frame twists never reached the sim"
    assert np.linalg.norm(after_steps(3) - b) < 0.002
    assert sim.mixer.stale_steps >= stale0 + 10  # the stale-on-arrival twists were seen as stale
    # pose target 3 cm below: the hand goes there and stays
    target = b + np.array([0.0, 0.0, -0.03])
    deadline = time.monotonic() + 60
    while np.linalg.norm(_ee(poses) - target) > 0.01 and time.monotonic() < deadline:
        msg = PoseStamped()
        msg.header.frame_id = "world"
        msg.header.stamp = ros.probe.get_clock().now().to_msg()
        msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = (float(v) for v in target)
        msg.pose.orientation.w = 1.0
        pose_pub.publish(msg)
        time.sleep(0.05)
    assert np.linalg.norm(after_steps(5) - target) < 0.01
    # gripper: closing moves the finger joints
    fingers_open = np.array(joints[-1].position[7:])
    deadline = time.monotonic() + 30
    while np.abs(np.array(joints[-1].position[7:]) - fingers_open).max() <= 0.005 and time.monotonic() < deadline:
        grip.publish(Float64(data=1.0))
        time.sleep(0.05)
    assert np.abs(np.array(joints[-1].position[7:]) - fingers_open).max() > 0.005

    # reset: next seed, instruction re-published, hand back near its start
    n_instr = len(instruction)
    resp = ros.call(Trigger, "/sim_node/reset")
    assert resp.success and "seed 6" in resp.message
    wait_for(lambda: len(instruction) > n_instr, 5, "instruction after reset")
    status = ros.collect(String, "/sim_node/status", LATCHED_QOS)
    wait_for(lambda: status, 5, "status")
    st = json.loads(status[-1].data)
    assert st["seed"] == 6 and st["episode"] == 2


def test_sim_node_pause_service_holds_the_arm(ros):
    """/servo_node/pause_servo (std_srvs/SetBool) as Jazzy Servo serves it: paused, fresh twists move
    nothing while the sim keeps stepping; resumed, the same twists move the arm."""
    poses = ros.collect(PoseStamped, "/ee_pose", SENSOR_QOS)
    sim = ros.add(SimNode, task=TASK, rate_hz=20.0, seed=4)
    twist = ros.probe.create_publisher(TwistStamped, "/servo_node/delta_twist_cmds", COMMAND_QOS)
    wait_for(lambda: poses and twist.get_subscription_count(), 30, "sim up")
    resp = ros.call(SetBool, "/servo_node/pause_servo", SetBool.Request(data=True))
    assert resp.success and resp.message == "Servoing disabled" and sim.mixer.paused

    def push(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            msg = TwistStamped()
            msg.header.frame_id = "world"
            msg.header.stamp = ros.probe.get_clock().now().to_msg()
            msg.twist.linear.y = 0.05
            twist.publish(msg)
            time.sleep(0.05)

    t0 = sim.ticks
    wait_for(lambda: sim.ticks >= t0 + 20, 60, "the hand settling after the reset")
    held, t0 = _ee(poses), sim.ticks
    push(1.0)
    wait_for(lambda: sim.ticks >= t0 + 10, 60, "sim steps while paused")  # positive control
    assert sim.mixer.paused_steps >= 10 and np.linalg.norm(_ee(poses) - held) < 0.002
    assert ros.call(SetBool, "/servo_node/pause_servo", SetBool.Request(data=False)).success
    deadline = time.monotonic() + 30
    while abs(_ee(poses)[1] - held[1]) < 0.01 and time.monotonic() < deadline:
        push(0.2)
    assert _ee(poses)[1] - held[1] >= 0.01


def _stamps(msgs):
    return {(m.header.stamp.sec, m.header.stamp.nanosec) for m in list(msgs)}


def test_scripted_expert_teleop_solves_the_task(ros):
    """sim_node -> ~/expert_action -> teleop_node (scripted, noisy) -> twist + gripper -> sim_node."""
    success = ros.collect(Bool, "/sim_node/success")
    actions = ros.collect(JointState, "/teleop_node/action")
    twists = ros.collect(TwistStamped, "/servo_node/delta_twist_cmds", COMMAND_QOS)
    ros.add(TeleopNode, mode="scripted_expert", action_spec="metaworld_4d", rate_hz=20.0, frame_id="world",
            action_noise=0.1, noise_seed=0)
    sim = ros.add(SimNode, task=TASK, rate_hz=20.0, seed=1)
    t0 = time.monotonic()
    wait_for(lambda: success and success[-1].data, 30, "task success")
    # teleop (re)activated Servo at start: the sim's /servo_node/pause_servo got an unpause (false);
    # Servo's command type cannot be switched here (no moveit_msgs), which the node logs instead
    assert sim.pause_calls >= 1 and not sim.mixer.paused
    elapsed = time.monotonic() - t0
    print(f"scripted expert solved {TASK} in {elapsed:.1f} s, {len(actions)} actions")
    a = actions[-1]
    assert list(a.name) == list(METAWORLD_4D.names) and len(a.position) == 4
    assert twists[-1].header.frame_id == "world"
    # the recorded action keeps the stamp of the observation the expert acted on
    images_stamps = {(m.header.stamp.sec, m.header.stamp.nanosec) for m in actions}
    assert len(images_stamps) == len(actions)
    # pausing teleop stops the commands at once: one zero twist, then nothing, while the sim's
    # expert actions (its input) keep arriving (positive control: the teleop was fed all along)
    expert = ros.collect(JointState, "/sim_node/expert_action")
    n_tw = len(twists)
    assert ros.call(SetBool, "/teleop_node/enable", SetBool.Request(data=False)).success
    wait_for(lambda: len(twists) > n_tw and not any(
        (twists[-1].twist.linear.x, twists[-1].twist.linear.y, twists[-1].twist.linear.z)), 10, "zero twist")
    n_expert = len(expert)
    wait_for(lambda: len(expert) >= n_expert + 5, 60, "expert actions while teleop is paused")
    n, n_expert = len(actions), len(expert)  # (an action published before the pause may land late)
    wait_for(lambda: len(expert) >= n_expert + 10, 60, "expert actions while teleop is paused")
    assert len(actions) == n


def _run_teleop_in_pty(extra_params):
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "ire_vla_ros.nodes.teleop_node", "--ros-args",
           "-p", "mode:=keyboard", "-p", "rate_hz:=20.0", "-p", "key_hold_s:=0.3"] + extra_params
    proc = subprocess.Popen(cmd, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ), start_new_session=True)
    os.close(slave)
    return proc, master


def test_keyboard_teleop_through_a_terminal(ros):
    twists = ros.collect(TwistStamped, "/servo_node/delta_twist_cmds", COMMAND_QOS)
    grips = ros.collect(Float64, "/gripper/command", COMMAND_QOS)
    actions = ros.collect(JointState, "/teleop_node/action")
    proc, master = _run_teleop_in_pty(["-p", "action_spec:=ee_delta_7d", "-p", "frame_id:=tool0"])
    try:
        wait_for(lambda: actions, 20, "teleop idle actions")
        assert not any(abs(v) > 0 for v in actions[-1].position[:6])
        for _ in range(5):  # a held key auto-repeats
            os.write(master, b"w")
            time.sleep(0.05)
        wait_for(lambda: twists and twists[-1].twist.linear.x > 0, 5, "+x twist")
        tw = twists[-1]
        assert tw.header.frame_id == "tool0"
        assert tw.twist.linear.x == pytest.approx(0.5 * 0.01 * 20.0)  # magnitude 0.5, 1 cm/unit, 20 Hz
        assert actions[-1].position[0] == pytest.approx(0.5)
        assert list(actions[-1].name) == list(EE_DELTA_7D.names)
        os.write(master, b" ")
        wait_for(lambda: grips and grips[-1].data == 1.0, 5, "gripper closed")
        # key released: after key_hold_s the idle twists (publish_when_idle) carry zero motion again;
        # new twists arriving is the positive control that the node kept running
        n = len(twists)
        wait_for(lambda: len(twists) > n + 3 and twists[-1].twist.linear.x == 0.0, 30, "idle twist after release")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        os.close(master)
    text = out.decode(errors="replace")
    assert "w / s" in text  # key help printed
    assert proc.returncode == 0, text[-2000:]


def test_keyboard_mode_without_terminal_says_so(ros):
    """Under `ros2 launch` stdin is not a terminal: the node must say what to do instead."""
    p = subprocess.Popen([sys.executable, "-m", "ire_vla_ros.nodes.teleop_node", "--ros-args",
                          "-p", "mode:=keyboard"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True)
    os.set_blocking(p.stdout.fileno(), False)
    deadline = time.monotonic() + 60  # generous: start-up is slow on a loaded 2-core machine
    buf = b""
    while time.monotonic() < deadline and b"Publishing nothing" not in buf:
        buf += p.stdout.read() or b""
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    try:
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
        buf += p.stdout.read() or b""
    assert p.returncode == 0, buf.decode()
    assert b"needs a terminal" in buf and b"ros2 run ire_vla_ros teleop_node" in buf, buf.decode()


def test_help_does_not_start_ros():
    for mod in ("sim_node", "teleop_node"):
        out = subprocess.run([sys.executable, "-m", f"ire_vla_ros.nodes.{mod}", "--help"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "Parameters" in out.stdout, out.stderr
