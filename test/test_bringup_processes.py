"""`ire-vla bringup robot --processes --fake-robot`: every node of robot.launch.py in its own process,
with its YAML and overrides, talking over real DDS; a dead child is reported with its exit code;
SIGTERM stops every child cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import psutil
from rcl_interfaces.srv import GetParameters
from sensor_msgs.msg import JointState
from std_msgs.msg import String
from std_srvs.srv import SetBool

from ire_vla_ros.nodes.ros_common import RELIABLE_QOS, stamp_ns
from ros_harness import wait_for  # noqa: E402

NODES = ("fake_robot_node", "policy_node", "reward_node", "recorder_node", "trainer_node")


def _start(args, env):
    proc = subprocess.Popen([sys.executable, "-m", "ire_vla_ros.cli", "bringup", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def _node_processes(bringup_pid: int) -> dict[str, int]:
    """node name -> pid of the child process running `-m ire_vla_ros.nodes.<node>`."""
    out = {}
    for child in psutil.Process(bringup_pid).children():
        try:
            cmd = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        for i, arg in enumerate(cmd[:-1]):
            if arg == "-m" and cmd[i + 1].startswith("ire_vla_ros.nodes."):
                out[cmd[i + 1].rsplit(".", 1)[-1]] = child.pid
    return out


def _param(ros, node: str, name: str):
    resp = ros.call(GetParameters, f"/{node}/get_parameters", GetParameters.Request(names=[name]), timeout=60)
    value = resp.values[0]
    return {1: value.bool_value, 2: value.integer_value, 3: value.double_value, 4: value.string_value}.get(value.type)


def test_robot_bringup_one_process_per_node(ros, tmp_path):
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", OMP_NUM_THREADS="1")
    proc, lines = _start(["robot", "--processes", "--fake-robot", "--episodes", str(tmp_path / "ep"),
                          "--checkpoints", str(tmp_path / "ck"), "--set", "policy_node.device=cpu",
                          "--set", "fake_robot_node.joint_hz=250.0"], env)
    try:
        wait_for(lambda: set(NODES) <= set(_node_processes(proc.pid)), 60, "five node processes")
        pids = _node_processes(proc.pid)
        assert len(set(pids.values())) == len(NODES) and proc.pid not in pids.values()
        wait_for(lambda: set(NODES) <= set(ros.probe.get_node_names()), 120, f"nodes on DDS; output: {lines[-20:]}")

        # each process answers over DDS with the parameters bringup gave it (YAML + overrides)
        assert _param(ros, "trainer_node", "checkpoints_dir") == str(tmp_path / "ck")
        assert _param(ros, "recorder_node", "episodes_dir") == str(tmp_path / "ep")
        assert _param(ros, "reward_node", "backend") == "human"  # robot-mode override
        assert _param(ros, "fake_robot_node", "joint_hz") == 250.0  # --set
        assert _param(ros, "policy_node", "device") == "cpu"

        # the fake robot's data crosses processes; its own count says how much it sent
        joints = ros.collect(JointState, "/joint_states", RELIABLE_QOS)
        stats = ros.collect(String, "/fake_robot_node/stats", RELIABLE_QOS)
        wait_for(lambda: len(joints) > 50 and stats, 60, "joint states and fake robot stats")

        # the control loop across processes: fake camera + 250 Hz joints -> policy -> actions
        actions = ros.collect(JointState, "/policy_node/action", RELIABLE_QOS)
        assert not actions  # the policy starts disabled
        assert ros.call(SetBool, "/policy_node/enable", SetBool.Request(data=True), timeout=120).success
        wait_for(lambda: len(actions) >= 5, 60, "policy actions from the fake robot's data")
        first_image = json.loads(stats[-1].data)["camera"]["first_stamp_ns"]
        stamps = [stamp_ns(a.header.stamp) for a in actions[:5]]
        # each action carries the stamp of the camera frame it was computed from: the fake robot's
        assert all(s >= first_image for s in stamps) and stamps == sorted(stamps) and len(set(stamps)) == 5

        # a child that dies is reported with its exit code; the others keep running
        os.kill(pids["reward_node"], signal.SIGKILL)
        wait_for(lambda: any("reward_node exited: killed by SIGKILL" in ln for ln in lines), 30, "death reported")
        assert all(psutil.pid_exists(pids[n]) for n in NODES if n != "reward_node")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    text = "".join(lines)
    # SIGTERM -> SIGINT to each child -> their clean shutdown (run_node returns 0)
    for node in NODES:
        if node != "reward_node":
            assert f"{node} stopped: exit code 0" in text, text[-3000:]
    assert rc == 1  # a child died before the stop
    assert not [ln for ln in lines if "] Traceback" in ln], text[-3000:]
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids.values())


# -- fake_robot_node on its own ----------------------------------------------------------------
def test_fake_robot_compressed_reliable_camera(ros):
    """jpeg on <topic>/compressed decodes to the configured size; reliable_camera offers RELIABLE
    (what a stock driver offers); stamps come from the node clock and increase."""
    import io

    import numpy as np
    from PIL import Image as PILImage
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage

    from ire_vla_ros.nodes.fake_robot_node import FakeRobotNode

    frames = ros.collect(CompressedImage, "/cam/compressed", QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
    node = ros.add(FakeRobotNode, camera_topic="/cam", compressed="jpeg", reliable_camera=True, image_width=160,
                   image_height=120, joint_hz=0.0, ee_pose_hz=0.0)
    wait_for(lambda: len(frames) >= 3, 30, "compressed frames over a RELIABLE subscription")
    info = ros.probe.get_publishers_info_by_topic("/cam/compressed")
    assert [i.qos_profile.reliability for i in info] == [ReliabilityPolicy.RELIABLE]
    img = np.asarray(PILImage.open(io.BytesIO(bytes(frames[0].data))))
    assert img.shape == (120, 160, 3) and "jpeg" in frames[0].format
    stamps = [stamp_ns(f.header.stamp) for f in frames[:3]]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3
    assert node.stats()["camera"]["sent"] >= 3 and "joint_states" not in node.stats()


def test_fake_robot_refuses_a_bad_setting(ros):
    import pytest

    from ire_vla_ros.nodes.fake_robot_node import FakeRobotNode
    from ire_vla_ros.nodes.ros_common import NodeStartupError

    with pytest.raises(NodeStartupError, match="compressed"):
        ros.add(FakeRobotNode, compressed="webp")
