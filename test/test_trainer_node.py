"""trainer_node: child process, progress on ~/status, refusal while running, cancel, async reload.

The training command is substituted by short real Python one-liners that speak the CLI's output
protocol (`PROGRESS {json}` lines, `CHECKPOINT <path>`, exit code). The reload target is a
service on the probe node standing in for policy_node's `~/reload` (the real policy is exercised
in test_closed_loop_sim.py).
"""
from __future__ import annotations

import json
import sys
import threading
import time

import pytest
import rclpy
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from std_msgs.msg import String
from std_srvs.srv import Trigger

from ire_vla_ros.nodes.ros_common import LATCHED_QOS
from ire_vla_ros.nodes.trainer_node import DEFAULT_COMMAND, TrainerNode, TrainingJob, build_command, parse_line
from ros_harness import Harness, wait_for  # noqa: E402

# prints progress, a checkpoint, exits 0; `{episodes}` is checked to be substituted
SCRIPT_OK = (
    "import json, sys, time\n"
    "assert sys.argv[1].endswith('eps'), sys.argv\n"
    "for i in range(5):\n"
    "    print('PROGRESS ' + json.dumps({'stage': 'stage1', 'fraction': i / 4, 'message': f'step {i}'}), flush=True)\n"
    "    time.sleep(float(sys.argv[2]))\n"
    "print('some log line', flush=True)\n"
    "print('CHECKPOINT /tmp/ckpt/iter_1', flush=True)\n"
)
SCRIPT_FAIL = "import sys\nprint('Traceback: no teleop episodes', flush=True)\nsys.exit(3)\n"


def test_parse_and_build():
    assert parse_line('PROGRESS {"stage": "stage0", "fraction": 0.5}\n') == (
        "progress", {"stage": "stage0", "fraction": 0.5})
    assert parse_line("PROGRESS not json") == ("log", "PROGRESS not json")
    assert parse_line("CHECKPOINT /a/b\n") == ("checkpoint", "/a/b")
    cmd = build_command(DEFAULT_COMMAND, dict(python="py", episodes="E", checkpoints="C", config="", device="cpu"))
    assert cmd == ["py", "-m", "ire_vla_ros.cli", "train", "offline", "--episodes", "E", "--checkpoints", "C",
                   "--device", "cpu", "--no-progress"]  # empty --config is left out (CLI default)


def test_training_job_without_ros(tmp_path):
    job = TrainingJob([sys.executable, "-c", SCRIPT_OK, "eps", "0.01"], log_path=tmp_path / "log.txt")
    deadline = time.monotonic() + 20
    while not job.done and time.monotonic() < deadline:
        time.sleep(0.02)
    s = job.snapshot()
    assert s["state"] == "succeeded" and s["checkpoint"] == "/tmp/ckpt/iter_1" and s["fraction"] == 1.0
    assert s["output_tail"] == ["some log line"]
    assert "PROGRESS" in (tmp_path / "log.txt").read_text()
    job = TrainingJob([sys.executable, "-c", "import time; time.sleep(60)"])
    job.request_cancel(timeout_s=5.0)
    job.proc.wait(10)
    time.sleep(0.1)
    assert job.state() == "cancelled"



@pytest.fixture
def ros(ros_domain_id):
    h = Harness(ros_domain_id)
    yield h
    h.close()





def _state(status):
    return json.loads(status[-1].data) if status else {}


def test_run_refuse_reload(ros, tmp_path):
    reloads = []

    def on_reload(_req, resp):  # what policy_node's ~/reload answers
        reloads.append(time.monotonic())
        resp.success, resp.message = True, "loaded /tmp/ckpt/iter_1"
        return resp

    ros.probe.create_service(Trigger, "/policy_node/reload", on_reload)
    status = []
    ros.probe.create_subscription(String, "/trainer_node/status", status.append, LATCHED_QOS)
    ros.add(TrainerNode, episodes_dir=str(tmp_path / "eps"), checkpoints_dir=str(tmp_path / "ckpt"),
            command=["{python}", "-c", SCRIPT_OK, "{episodes}", "0.3"])
    wait_for(lambda: _state(status).get("state") == "idle", 10, "idle status")

    t0 = time.monotonic()
    first = ros.call(Trigger, "/trainer_node/run_iteration")
    call_ms = (time.monotonic() - t0) * 1000
    assert first.success, first.message
    second = ros.call(Trigger, "/trainer_node/run_iteration")
    assert not second.success and "still in progress" in second.message and "~/cancel" in second.message
    # the node stays responsive while the child runs: progress arrives on ~/status
    wait_for(lambda: 0 < _state(status).get("fraction", 0) < 1 and _state(status)["state"] == "running", 10,
             "intermediate progress")
    assert _state(status)["stage"] == "stage1"
    wait_for(lambda: _state(status).get("reload") == "ok", 20, "reload after success")
    s = _state(status)
    assert s["state"] == "succeeded" and s["checkpoint"] == "/tmp/ckpt/iter_1" and s["returncode"] == 0
    assert s["run"] == 1 and len(reloads) == 1 and s["reload_message"] == "loaded /tmp/ckpt/iter_1"
    assert (tmp_path / "ckpt" / "logs").is_dir() and "CHECKPOINT" in open(s["log_path"]).read()
    print(f"run_iteration answered in {call_ms:.1f} ms; run took {s['elapsed_s']} s")
    # after completion a new run is accepted
    assert ros.call(Trigger, "/trainer_node/run_iteration").success
    wait_for(lambda: _state(status).get("run") == 2 and _state(status).get("reload") == "ok", 20, "second run")
    assert len(reloads) == 2


def test_failure_and_cancel(ros, tmp_path):
    reloads = []
    ros.probe.create_service(Trigger, "/policy_node/reload",
                             lambda req, resp: (reloads.append(1), resp)[1])
    status = []
    ros.probe.create_subscription(String, "/trainer_node/status", status.append, LATCHED_QOS)
    trainer = ros.add(TrainerNode, checkpoints_dir=str(tmp_path / "ckpt"),
                      command=["{python}", "-c", SCRIPT_FAIL])
    assert ros.call(Trigger, "/trainer_node/run_iteration").success
    wait_for(lambda: _state(status).get("state") == "failed", 15, "failed state")
    s = _state(status)
    assert s["returncode"] == 3 and "no teleop episodes" in " ".join(s["output_tail"]) and s["reload"] == ""
    assert not ros.call(Trigger, "/trainer_node/cancel").success  # nothing running

    trainer.set_parameters([Parameter("command", value=["{python}", "-c", "import time; time.sleep(60)"])])
    assert ros.call(Trigger, "/trainer_node/run_iteration").success
    wait_for(lambda: _state(status).get("state") == "running", 10, "running")
    t0 = time.monotonic()
    resp = ros.call(Trigger, "/trainer_node/cancel")
    assert resp.success and time.monotonic() - t0 < 2.0
    wait_for(lambda: _state(status).get("state") == "cancelled", 15, "cancelled")
    time.sleep(0.3)
    assert reloads == []  # no reload after failure or cancel


def test_missing_reload_service_is_reported(ros, tmp_path):
    status = []
    ros.probe.create_subscription(String, "/trainer_node/status", status.append, LATCHED_QOS)
    ros.add(TrainerNode, checkpoints_dir=str(tmp_path / "ckpt"), reload_wait_s=0.5,
            command=["{python}", "-c", "print('CHECKPOINT /x')"])
    assert ros.call(Trigger, "/trainer_node/run_iteration").success
    wait_for(lambda: _state(status).get("reload") == "failed", 15, "reload failure")
    assert "not available" in _state(status)["reload_message"]


def test_help_without_ros():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "ire_vla_ros.nodes.trainer_node", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Run iRe-VLA" in out.stdout and "extra_args" in out.stdout
