"""Launch files (parsed with ast: launch/launch_ros are not installable here), config YAML, bringup.

Checks that every executable a launch file names is a console_script of setup.py, every config
file exists and is keyed by its node's name, every parameter set anywhere (YAML, launch dicts,
bringup overrides) is declared by the node with the same type, launch arguments are declared
before use, and the launch files pass the same overrides as `ire-vla bringup`. Then a real
`ire-vla bringup sim` process runs an episode and stops cleanly on Ctrl-C.
"""
from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_FILES = sorted((ROOT / "launch").glob("*.launch.py"))
MY_LAUNCH = {"robot.launch.py", "sim.launch.py", "teleop.launch.py"}


def _console_scripts() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    nodes = next(ast.literal_eval(n.value) for n in ast.walk(tree)
                 if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "NODES" for t in n.targets))
    scripts = {"ire-vla"} | set(nodes)
    # every console script must point at a module with main()
    for n in nodes:
        mod = ROOT / "ire_vla_ros" / "nodes" / f"{n}.py"
        assert mod.exists() and "def main(" in mod.read_text(), f"{n}: no main() in {mod}"
    return scripts


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


class LaunchInfo:
    def __init__(self, path: Path):
        self.path = path
        self.tree = ast.parse(path.read_text(), filename=str(path))
        self.calls = [n for n in ast.walk(self.tree) if isinstance(n, ast.Call)]
        self.nodes = [c for c in self.calls if _call_name(c) == "Node"]
        self.declared = {c.args[0].value for c in self.calls
                         if _call_name(c) == "DeclareLaunchArgument" and c.args and isinstance(c.args[0], ast.Constant)}
        self.used = {c.args[0].value for c in self.calls
                     if _call_name(c) == "LaunchConfiguration" and c.args and isinstance(c.args[0], ast.Constant)}
        self.yaml_names = {n.value for n in ast.walk(self.tree)
                           if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.endswith(".yaml")}
        self.overrides = next((ast.literal_eval(n.value) for n in self.tree.body if isinstance(n, ast.Assign)
                               and any(getattr(t, "id", "") == "OVERRIDES" for t in n.targets)), None)
        self.defaults = {}
        for c in self.calls:
            if _call_name(c) == "DeclareLaunchArgument":
                d = _kw(c, "default_value")
                if isinstance(d, ast.Constant):
                    self.defaults[c.args[0].value] = d.value

    def node_params_dicts(self, node_call) -> list[dict]:
        """Literal keys of dict parameters of a Node call (values may be substitutions)."""
        out = []
        params = _kw(node_call, "parameters")
        for el in getattr(params, "elts", []):
            if isinstance(el, ast.Dict):
                out.append({k.value: (ast.literal_eval(v) if isinstance(v, ast.Constant) else None)
                            for k, v in zip(el.keys, el.values)})
            elif isinstance(el, ast.Subscript) and getattr(el.value, "id", "") == "OVERRIDES":
                out.append(self.overrides[ast.literal_eval(el.slice)])
        return out


def _node_params():
    """node name -> {param: P} for every node class (policy's PARAMS is module level)."""
    from ire_vla_ros.nodes import policy_node, recorder_node, reward_node, sim_node, teleop_node, trainer_node

    return {"policy_node": policy_node.PARAMS, "recorder_node": recorder_node.RecorderNode.PARAMS,
            "reward_node": reward_node.RewardNode.PARAMS, "trainer_node": trainer_node.TrainerNode.PARAMS,
            "sim_node": sim_node.SimNode.PARAMS, "teleop_node": teleop_node.TeleopNode.PARAMS}


def _same_type(spec, value) -> bool:
    d = spec.default
    if isinstance(d, bool):
        return isinstance(value, bool)
    if isinstance(d, float):
        return isinstance(value, float)
    if isinstance(d, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(d, str):
        return isinstance(value, str)
    if isinstance(d, (list, tuple)):
        if not isinstance(value, list):
            return False
        if not d:
            return all(isinstance(v, str) for v in value)  # our empty-default arrays are string arrays
        return all(type(v) is type(d[0]) for v in value)
    return False


def _check_params(node: str, params: dict, where: str):
    specs = _node_params()[node]
    for k, v in params.items():
        assert k in specs, f"{where}: {node} has no parameter {k!r}"
        if v is not None:
            assert _same_type(specs[k], v), f"{where}: {node}.{k} = {v!r} has the wrong type (default {specs[k].default!r})"


# =============================================================================================
def test_launch_files_exist():
    assert MY_LAUNCH <= {p.name for p in LAUNCH_FILES}


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file_is_consistent(path):
    info = LaunchInfo(path)
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in info.tree.body)
    scripts = _console_scripts()
    assert info.nodes, "no Node actions"
    for call in info.nodes:
        pkg, exe, name = (_kw(call, k) for k in ("package", "executable", "name"))
        assert isinstance(exe, ast.Constant) and exe.value in scripts, f"executable {ast.dump(exe)} not a console_script"
        assert isinstance(name, ast.Constant) and name.value == exe.value, "node name must match its YAML key"
        assert pkg is not None
        for d in info.node_params_dicts(call):
            _check_params(name.value, d, path.name)
        yaml_keys = [n.value for n in ast.walk(_kw(call, "parameters"))
                     if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.endswith(".yaml")]
        assert yaml_keys == [f"{exe.value}.yaml"], f"{exe.value}: config {yaml_keys}"
    for name in info.yaml_names:
        assert (ROOT / "config" / name).is_file(), f"missing config/{name}"
    assert info.used <= info.declared, f"undeclared launch arguments {info.used - info.declared}"


def _is_launch_config(node, name: str) -> bool:
    return (isinstance(node, ast.Call) and _call_name(node) == "LaunchConfiguration" and node.args
            and isinstance(node.args[0], ast.Constant) and node.args[0].value == name)


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_environment_from_a_launch_argument_is_set_only_when_non_empty(path):
    """dds_profile:='' keeps the environment's own profile: SetEnvironmentVariable writes its value as
    is (launch/actions/set_environment_variable.py), so an empty value would erase the variable. Every
    SetEnvironmentVariable fed by a launch argument must carry
    condition=IfCondition(NotEqualsSubstitution(LaunchConfiguration(<that argument>), ""))."""
    info = LaunchInfo(path)
    for call in (c for c in info.calls if _call_name(c) == "SetEnvironmentVariable"):
        value = call.args[1] if len(call.args) > 1 else _kw(call, "value")
        args = [n.args[0].value for n in ast.walk(value)
                if isinstance(n, ast.Call) and _call_name(n) == "LaunchConfiguration"]
        if not args:
            continue
        cond = _kw(call, "condition")
        assert isinstance(cond, ast.Call) and _call_name(cond) == "IfCondition", \
            f"{path.name}: {ast.unparse(call)[:80]} has no IfCondition"
        test = cond.args[0]
        assert _call_name(test) == "NotEqualsSubstitution" and _is_launch_config(test.args[0], args[0]) \
            and isinstance(test.args[1], ast.Constant) and test.args[1].value == "", \
            f"{path.name}: the condition must test LaunchConfiguration({args[0]!r}) != ''"
    names = {c.args[0].value for c in info.calls if _call_name(c) == "SetEnvironmentVariable"}
    if path.name in ("robot.launch.py", "sim.launch.py"):  # the profile reaches every node they start
        assert {"FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE"} <= names


def test_configs_declare_only_known_params_with_right_types():
    for node in ("recorder_node", "reward_node", "trainer_node", "sim_node", "teleop_node", "policy_node"):
        data = yaml.safe_load((ROOT / "config" / f"{node}.yaml").read_text())
        assert len(data) == 1
        key = next(iter(data))
        assert key.lstrip("/") == node, f"config/{node}.yaml keyed {key!r}"
        _check_params(node, data[key]["ros__parameters"], f"config/{node}.yaml")


def test_launch_overrides_equal_bringup():
    from ire_vla_ros.nodes.bringup import MODE_OVERRIDES, RECORD_SOURCES

    info = {p.name: LaunchInfo(p) for p in LAUNCH_FILES}
    assert info["sim.launch.py"].overrides == MODE_OVERRIDES["sim"]
    assert info["robot.launch.py"].overrides == MODE_OVERRIDES["robot"]
    teleop = {n: dict(v) for n, v in MODE_OVERRIDES["robot"].items()}
    for n, v in RECORD_SOURCES["teleop"].items():
        teleop.setdefault(n, {}).update(v)
    assert info["teleop.launch.py"].overrides == teleop
    for mode, per_node in MODE_OVERRIDES.items():
        for node, params in per_node.items():
            _check_params(node, params, f"bringup MODE_OVERRIDES[{mode}]")
    for src, per_node in RECORD_SOURCES.items():
        for node, params in per_node.items():
            _check_params(node, params, f"bringup RECORD_SOURCES[{src}]")
    # launch defaults that mirror the YAML
    policy_yaml = yaml.safe_load((ROOT / "config/policy_node.yaml").read_text())
    ckpt = next(iter(policy_yaml.values()))["ros__parameters"]["checkpoint"]
    for name in ("sim.launch.py", "robot.launch.py"):
        assert info[name].defaults["checkpoint"] == ckpt
    sim_yaml = yaml.safe_load((ROOT / "config/sim_node.yaml").read_text())
    assert info["sim.launch.py"].defaults["task"] == next(iter(sim_yaml.values()))["ros__parameters"]["task"]


def test_config_files_load_into_real_nodes(ros_domain_id, tmp_path):
    """The YAML goes through rcl's parser (--params-file) into the nodes' declared parameters."""
    import rclpy
    from rclpy.context import Context

    from ire_vla_ros.nodes.bringup import node_classes

    classes = node_classes()
    for node in ("recorder_node", "reward_node", "trainer_node", "teleop_node"):
        f = ROOT / "config" / f"{node}.yaml"
        expected = next(iter(yaml.safe_load(f.read_text()).values()))["ros__parameters"]
        ctx = Context()
        rclpy.init(args=["x", "--ros-args", "--params-file", str(f)], context=ctx, domain_id=ros_domain_id)
        try:
            kwargs = {}
            if node in ("recorder_node", "trainer_node"):  # keep files out of the source tree
                from rclpy.parameter import Parameter

                kwargs["parameter_overrides"] = [Parameter("episodes_dir", value=str(tmp_path / "e"))]
            if node == "teleop_node":
                import io

                kwargs["stdin"] = io.StringIO()  # not a terminal
            n = classes[node](context=ctx, **kwargs)
            try:
                for k, v in expected.items():
                    if k == "episodes_dir":
                        continue
                    assert n.get_parameter(k).value == v, (node, k)
            finally:
                n.destroy_node()
        finally:
            rclpy.shutdown(context=ctx)


def test_bringup_plan_and_dds_warning(capsys, monkeypatch):
    import argparse

    from ire_vla_ros.nodes import bringup

    parser = argparse.ArgumentParser()
    bringup.add_arguments(parser)
    plans = bringup.plan(parser.parse_args(["sim", "--teleop", "--task", "reach-v3", "--set",
                                            "policy_node.explore=true", "--episodes", "/tmp/e"]))
    by = {p.name: p for p in plans}
    assert list(by) == ["sim_node", "policy_node", "teleop_node", "reward_node", "recorder_node", "trainer_node"]
    assert by["recorder_node"].overrides["source"] == "teleop"
    assert by["reward_node"].overrides["action_topic"] == "/teleop_node/action"
    assert by["sim_node"].overrides["task"] == "reach-v3" and by["policy_node"].overrides["explore"] is True
    assert by["trainer_node"].overrides["episodes_dir"] == "/tmp/e"
    assert all(Path(p.params_file).is_file() for p in plans)
    robot = bringup.plan(parser.parse_args(["robot", "--camera-topic", "/wrist/image", "--skip", "trainer_node"]))
    assert [p.name for p in robot] == ["policy_node", "reward_node", "recorder_node"]
    assert robot[0].remaps == {"/camera/image_raw": "/wrist/image"} and robot[1].remaps == {}
    with pytest.raises(ValueError):
        bringup.plan(parser.parse_args(["sim", "--set", "nonode.x=1"]))

    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "SUBNET")
    bringup._warn_dds("sim")
    assert "WARNING" in capsys.readouterr().err
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    bringup._warn_dds("sim")
    assert "WARNING" not in capsys.readouterr().err


def test_cli_bringup_help_and_dry_run():
    out = subprocess.run([sys.executable, "-m", "ire_vla_ros.cli", "bringup", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--teleop" in out.stdout, out.stderr
    out = subprocess.run([sys.executable, "-m", "ire_vla_ros.cli", "bringup", "robot", "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "recorder_node" in out.stdout and "sim_node" not in out.stdout, out.stderr


def test_bringup_sim_records_expert_episode_and_stops_on_ctrl_c(ros_domain_id, tmp_path):
    """One process: sim + scripted teleop + reward + recorder + trainer; a probe drives an episode."""
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from ire_vla_ros.episodes.store import read_episode
    from ire_vla_ros.nodes.ros_common import LATCHED_QOS, RELIABLE_QOS

    env = dict(os.environ, ROS_DOMAIN_ID=str(ros_domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ire_vla_ros.cli", "bringup", "sim", "--teleop", "--skip", "policy_node",
         "--episodes", str(tmp_path / "episodes"), "--checkpoints", str(tmp_path / "ckpt"),
         "--set", "sim_node.rate_hz=20.0", "--set", "teleop_node.rate_hz=20.0", "--set", "sim_node.seed=3"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ctx = Context()
    rclpy.init(context=ctx, domain_id=ros_domain_id)
    probe = rclpy.create_node("probe", context=ctx)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(probe)
    th = threading.Thread(target=ex.spin, daemon=True)
    th.start()
    saved, status = [], []
    probe.create_subscription(String, "/recorder_node/episode_saved", saved.append, RELIABLE_QOS)
    probe.create_subscription(String, "/recorder_node/status", status.append, LATCHED_QOS)
    try:
        client = probe.create_client(Trigger, "/recorder_node/start_episode")
        assert client.wait_for_service(timeout_sec=60), "bringup did not come up"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # sim_node/reset and reward_node may come up a bit later
            fut = client.call_async(Trigger.Request())
            call_deadline = time.monotonic() + 60  # a server that accepts and never answers must fail here
            while not fut.done() and time.monotonic() < call_deadline:
                time.sleep(0.02)
            assert fut.done(), "/recorder_node/start_episode did not answer within 60 s"
            if fut.result().success:
                break
            time.sleep(0.5)
        assert fut.result().success, fut.result().message
        t0 = time.monotonic()
        while not saved and time.monotonic() - t0 < 40:
            time.sleep(0.1)
        assert saved, f"no episode saved; recorder status: {status[-1].data if status else None}"
        ep = read_episode(saved[0].data)
        print(f"bringup sim: expert episode {ep.n_steps} steps, success={ep.success}, "
              f"{time.monotonic() - t0:.1f} s")
        assert ep.success and ep.source == "teleop" and ep.task == "button-press-topdown-v3"
        assert ep.rewards[-1] == 1.0 and ep.n_steps > 10
    finally:
        ex.shutdown()
        probe.destroy_node()
        rclpy.shutdown(context=ctx)
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert not list((tmp_path / "episodes").glob("*.partial"))
