"""trainer_node: child process, progress on ~/status, refusal while running, cancel, async reload;
security: read-only program/path parameters (checked from another process), confined checkpoint
path, bounded flood of calls and bounded status strings.

The training command is substituted by short real Python one-liners that speak the CLI's output
protocol (`PROGRESS {json}` lines, `CHECKPOINT <path>`, exit code). The reload target is a
service on the probe node standing in for policy_node's `~/reload` (the real policy is exercised
in test_closed_loop_sim.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from rclpy.parameter import Parameter
from std_msgs.msg import String
from std_srvs.srv import Trigger

from ire_vla_ros.nodes.ros_common import LATCHED_QOS
from ire_vla_ros.nodes.trainer_node import (
    DEFAULT_COMMAND, MAX_FIELD_CHARS, TrainerNode, TrainingJob, build_command, parse_line,
)
from ros_harness import wait_for  # noqa: E402

# prints progress, a checkpoint, exits 0; `{episodes}` is checked to be substituted
SCRIPT_OK = (
    "import json, sys, time\n"
    "assert sys.argv[1].endswith('eps'), sys.argv\n"
    "for i in range(5):\n"
    "    print('PROGRESS ' + json.dumps({'stage': 'stage1', 'fraction': i / 4, 'message': f'step {i}'}), flush=True)\n"
    "    time.sleep(float(sys.argv[2]))\n"
    "print('some log line', flush=True)\n"
    "print('CHECKPOINT ' + sys.argv[3], flush=True)\n"
)
SCRIPT_FAIL = "import sys\nprint('Traceback: no teleop episodes', flush=True)\nsys.exit(3)\n"


def test_parse_and_build():
    assert parse_line('PROGRESS {"stage": "stage0", "fraction": 0.5}\n') == (
        "progress", {"stage": "stage0", "fraction": 0.5})
    assert parse_line("PROGRESS not json") == ("log", "PROGRESS not json")
    assert parse_line("CHECKPOINT /a/b\n") == ("checkpoint", "/a/b")
    cmd = build_command(DEFAULT_COMMAND, dict(python="py", episodes="E", checkpoints="C", config="", device="cpu",
                                              tensorboard="C/logs/tb", sft_processes="4", sft_launcher_args=""))
    assert cmd == ["py", "-m", "ire_vla_ros.cli", "train", "offline", "--episodes", "E", "--checkpoints", "C",
                   "--device", "cpu", "--no-progress", "--tensorboard", "C/logs/tb",
                   "--sft-processes", "4"]  # empty --config / --sft-launcher-args are left out


def test_training_job_without_ros(tmp_path):
    job = TrainingJob([sys.executable, "-c", SCRIPT_OK, "eps", "0.01", "/tmp/ckpt/iter_1"],
                      log_path=tmp_path / "log.txt")
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


def _state(status):
    return json.loads(status[-1].data) if status else {}


def test_run_refuse_reload(ros, tmp_path):
    reloads = []

    def on_reload(_req, resp):  # what policy_node's ~/reload answers
        reloads.append(time.monotonic())
        resp.success, resp.message = True, "loaded iter_1"
        return resp

    ros.probe.create_service(Trigger, "/policy_node/reload", on_reload)
    status = []
    ros.probe.create_subscription(String, "/trainer_node/status", status.append, LATCHED_QOS)
    ros.add(TrainerNode, episodes_dir=str(tmp_path / "eps"), checkpoints_dir=str(tmp_path / "ckpt"),
            command=["{python}", "-c", SCRIPT_OK, "{episodes}", "0.3", "{checkpoints}/iter_1"])
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
    assert s["state"] == "succeeded" and s["checkpoint"] == str(tmp_path / "ckpt" / "iter_1") and s["returncode"] == 0
    assert s["run"] == 1 and len(reloads) == 1 and s["reload_message"] == "loaded iter_1"
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
    # `command` is read-only: a failing run and a cancelled one need two trainer nodes
    ros.add(TrainerNode, checkpoints_dir=str(tmp_path / "ckpt"), command=["{python}", "-c", SCRIPT_FAIL])
    assert ros.call(Trigger, "/trainer_node/run_iteration").success
    wait_for(lambda: _state(status).get("state") == "failed", 15, "failed state")
    s = _state(status)
    assert s["returncode"] == 3 and "no teleop episodes" in " ".join(s["output_tail"]) and s["reload"] == ""
    assert not ros.call(Trigger, "/trainer_node/cancel").success  # nothing running

    status2 = ros.collect(String, "/sleeper/status", LATCHED_QOS)
    sleeper = TrainerNode(context=ros.ctx, cli_args=["--ros-args", "-r", "__node:=sleeper"],
                          parameter_overrides=[Parameter("checkpoints_dir", value=str(tmp_path / "ckpt2")),
                                               Parameter("command", value=["{python}", "-c", "import time; time.sleep(60)"]),
                                               Parameter("cancel_timeout_s", value=30.0)])
    ros.nodes.append(sleeper)
    ros.executor.add_node(sleeper)
    assert ros.call(Trigger, "/sleeper/run_iteration").success
    wait_for(lambda: _state(status2).get("state") == "running", 10, "running")
    resp = ros.call(Trigger, "/sleeper/cancel")
    # SIGTERM ends `sleep` long before the 30 s SIGKILL grace (timing: bench/bench_trainer_cancel.py)
    assert resp.success and "SIGTERM" in resp.message
    wait_for(lambda: _state(status2).get("state") == "cancelled", 25, "cancelled")
    assert sleeper.job.proc.returncode == -15  # ended by the SIGTERM, not the SIGKILL
    assert reloads == []  # no reload after failure or cancel


def test_missing_reload_service_is_reported(ros, tmp_path):
    status = []
    ros.probe.create_subscription(String, "/trainer_node/status", status.append, LATCHED_QOS)
    ros.add(TrainerNode, checkpoints_dir=str(tmp_path / "ckpt"), reload_wait_s=0.5,
            command=["{python}", "-c", "print('CHECKPOINT {checkpoints}/x')"])
    assert ros.call(Trigger, "/trainer_node/run_iteration").success
    wait_for(lambda: _state(status).get("reload") == "failed", 15, "reload failure")
    assert "not available" in _state(status)["reload_message"]


def test_help_without_ros():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "ire_vla_ros.nodes.trainer_node", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Run iRe-VLA" in out.stdout and "extra_args" in out.stdout
    assert "Limits:" in out.stdout and "Read-only" in out.stdout


# -- security and limits (issue 11 items 1, 2, 5; issue 10 item 11) ----------------------------
# An intruder on the DDS domain: a separate process that only speaks the standard services.
INTRUDER = r"""
import json, sys, rclpy
from rclpy.parameter import Parameter
from rcl_interfaces.srv import SetParameters
from std_srvs.srv import Trigger
marker = sys.argv[1]
rclpy.init()
node = rclpy.create_node("intruder")
def call(srv_type, name, req):
    client = node.create_client(srv_type, name)
    assert client.wait_for_service(timeout_sec=60.0), name
    future = client.call_async(req)
    rclpy.spin_until_future_complete(node, future, timeout_sec=60.0)
    return future.result()
attempts = {
    "command": ["touch", marker], "extra_args": ["-c", f"open({marker!r}, 'w')"],
    "working_dir": "/", "config": "/etc/passwd", "episodes_dir": "/", "checkpoints_dir": "/tmp",
    "log_dir": "/tmp", "reload_service": "/recorder_node/stop_episode", "device": "cpu; touch " + marker,
}
out = {}
for name, value in attempts.items():
    req = SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()])
    res = call(SetParameters, "/trainer_node/set_parameters", req).results[0]
    out[name] = [res.successful, res.reason]
run = call(Trigger, "/trainer_node/run_iteration", Trigger.Request())
out["run_iteration"] = [run.success, run.message]
print("RESULT " + json.dumps(out), flush=True)
node.destroy_node()
rclpy.shutdown()
"""


def test_program_and_path_parameters_refused_from_another_process(ros, tmp_path):
    injected = tmp_path / "pwned"
    ran = tmp_path / "configured_command_ran"
    status = ros.collect(String, "/trainer_node/status", LATCHED_QOS)
    ros.add(TrainerNode, checkpoints_dir=str(tmp_path / "ckpt"), reload_service="",
            command=["{python}", "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(ran),
                     "{device}"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", INTRUDER, str(injected)], env=env, capture_output=True,
                          text=True, timeout=180)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-2000:]
    out = json.loads(line[0][len("RESULT "):])
    for name in ("command", "extra_args", "working_dir", "config", "episodes_dir", "checkpoints_dir",
                 "log_dir", "reload_service"):
        ok, reason = out[name]
        assert not ok and "read-only" in reason, (name, reason)
    ok, reason = out["device"]
    assert not ok and "device" in reason, reason
    # the intruder's trigger ran the launch-time command (positive control), not the injected one
    assert out["run_iteration"][0], out["run_iteration"]
    wait_for(lambda: _state(status).get("state") == "succeeded", 30, "the configured run to finish")
    assert ran.read_text() == "cpu"
    assert not injected.exists()
    assert _state(status)["command"][-1] == "cpu"


def test_trigger_while_reload_pending_is_refused(ros, tmp_path):
    status = ros.collect(String, "/trainer_node/status", LATCHED_QOS)
    ros.add(TrainerNode, checkpoints_dir=str(tmp_path / "ckpt"), reload_wait_s=120.0, min_run_interval_s=0.0,
            command=["{python}", "-c", f"print('CHECKPOINT {tmp_path / 'ckpt' / 'iter_1'}')"])
    assert ros.call(Trigger, "/trainer_node/run_iteration").success
    # no /policy_node/reload yet: the reload waits for it
    wait_for(lambda: _state(status).get("reload") == "pending", 20, "reload pending")
    resp = ros.call(Trigger, "/trainer_node/run_iteration")
    assert not resp.success and "reload" in resp.message and "pending" in resp.message
    wait_for(lambda: _state(status).get("refused", {}).get("reload_pending") == 1, 10, "refusal counted")
    assert _state(status)["run"] == 1
    # the policy comes up: the pending reload is made, then a new run is accepted
    reloads = []
    ros.probe.create_service(Trigger, "/policy_node/reload",
                             lambda req, resp: (reloads.append(1), setattr(resp, "success", True), resp)[2])
    wait_for(lambda: _state(status).get("reload") == "ok", 30, "reload ok")
    assert reloads == [1]
    assert ros.call(Trigger, "/trainer_node/run_iteration").success
    wait_for(lambda: _state(status).get("run") == 2, 10, "second run")


def test_checkpoint_outside_root_is_not_reloaded(ros, tmp_path):
    reloads = []
    ros.probe.create_service(Trigger, "/policy_node/reload", lambda req, resp: (reloads.append(1), resp)[1])
    status = ros.collect(String, "/trainer_node/status", LATCHED_QOS)
    (tmp_path / "ckpt").mkdir()
    ros.add(TrainerNode, checkpoints_dir=str(tmp_path / "ckpt"),
            command=["{python}", "-c", "print('CHECKPOINT {checkpoints}/../elsewhere/iter_9')"])
    assert ros.call(Trigger, "/trainer_node/run_iteration").success
    wait_for(lambda: _state(status).get("reload") == "refused", 20, "reload refused")
    assert "outside" in _state(status)["reload_message"] and reloads == []


def test_flood_of_triggers_is_refused_counted_and_bounded(ros, tmp_path):
    status = ros.collect(String, "/trainer_node/status", LATCHED_QOS)
    # the child prints a 1 MB line without a newline, then runs until cancelled
    noisy = "import sys, time; sys.stdout.write('x' * 1000000); sys.stdout.flush(); time.sleep(60)"
    node = ros.add(TrainerNode, checkpoints_dir=str(tmp_path / "ckpt"), reload_service="",
                   command=["{python}", "-c", noisy], cancel_timeout_s=1.0)
    assert ros.call(Trigger, "/trainer_node/run_iteration").success
    client = ros.probe.create_client(Trigger, "/trainer_node/run_iteration")
    assert client.wait_for_service(timeout_sec=10)
    answers = []
    for _ in range(30):  # batches of 10: the services' default queue depth; more would be dropped by DDS
        futures = [client.call_async(Trigger.Request()) for _ in range(10)]
        wait_for(lambda: all(f.done() for f in futures), 60, "10 answers")
        answers += [f.result() for f in futures]
    assert not any(a.success for a in answers) and all("in progress" in a.message for a in answers)
    wait_for(lambda: _state(status).get("refused", {}).get("busy") == 300, 20, "300 refusals on ~/status")
    s = _state(status)
    assert s["calls"]["run_iteration"] == 301 and s["run"] == 1
    # the 1 MB line reached the status only in bounded pieces
    wait_for(lambda: len(node.job.tail) >= 2, 30, "the long line read")
    s = node.status()
    assert s["output_tail"] and all(len(t) <= MAX_FIELD_CHARS for t in s["output_tail"])
    assert len(json.dumps(s)) < 8 * MAX_FIELD_CHARS
    assert ros.call(Trigger, "/trainer_node/cancel").success
    wait_for(lambda: _state(status).get("state") == "cancelled", 30, "cancelled")
