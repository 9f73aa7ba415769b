"""`ire-vla bringup sim|robot`: the launch files' nodes, in one process or one process per node.

Starts the same nodes as `launch/sim.launch.py` / `launch/robot.launch.py`, with the same YAML
files from config/ and the same per-mode overrides (`MODE_OVERRIDES`, kept equal to the launch
files by test/test_launch_files.py). Two ways:

* default: all nodes in this process on one SingleThreadedExecutor (manual composition; rclpy has
  no composable nodes, rclpy#575). Nothing DDS-related is set: ROS_DOMAIN_ID,
  ROS_AUTOMATIC_DISCOVERY_RANGE and the Fast DDS profile come from the environment as they are.
* `--processes`: each node in its own process (`python -m ire_vla_ros.nodes.<node> --ros-args
  -r __node:=<node> --params-file config/<node>.yaml --params-file <overrides>.yaml -r ...`), as
  `ros2 launch` starts them on a robot; a launcher where `ros2 launch` is absent. Each child gets
  the environment plus the launch files' Fast DDS profile (`--dds-profile`, default
  config/fastdds_shm.xml; '' keeps the environment's own) and, with the simulator or the fake
  robot and no range set, ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST; with ROS_SECURITY_ENABLE=true
  each runs in its SROS 2 enclave /ire_vla_ros/<node> (config/sros2_policy.xml). Output lines are prefixed with
  the node name. A child that exits is reported with its exit code; Ctrl-C / SIGTERM sends SIGINT
  to every child, then SIGTERM after `--stop-timeout`, then SIGKILL.

`--fake-robot` (robot mode) adds fake_robot_node: camera, /joint_states and /ee_pose at robot
rates on the real topics, for running the robot bring-up without hardware.
In sim mode a warning is printed when discovery is not confined to this machine.

    ire-vla bringup sim --teleop                 # scripted expert drives the sim, teleop episodes recorded
    ire-vla bringup sim --checkpoint ckpts       # the policy drives, policy episodes recorded
    ire-vla bringup robot --teleop --record teleop   # keyboard teleop in this terminal + recorder
    ire-vla bringup robot --checkpoint ckpts --set policy_node.command_frame=base_link
    ire-vla bringup robot --processes --fake-robot  # one process per node, fake camera/arm at robot rates
    ire-vla bringup sim --online --checkpoints ckpts --episodes eps  # online RL loop (docs/ROBOT_SETUP.md)
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ire_vla_ros.paths import config_path

MODES = ("sim", "robot")
NODE_NAMES = ("sim_node", "policy_node", "teleop_node", "reward_node", "recorder_node", "trainer_node",
              "fake_robot_node")

#: Nodes per mode (teleop_node only with --teleop), in start order.
MODE_NODES = {
    "sim": ["sim_node", "policy_node", "teleop_node", "reward_node", "recorder_node", "trainer_node"],
    "robot": ["policy_node", "teleop_node", "reward_node", "recorder_node", "trainer_node"],
}

#: Parameters that differ from config/<node>.yaml per mode. The launch files pass the same dicts.
MODE_OVERRIDES = {
    "sim": {
        "policy_node": {"command_frame": "world", "workspace_enabled": False, "servo_switch_service": "",
                    # the shipped sim model moves up to 2 cm per axis per step (action_repeat 2):
                    # a 2 cm norm clamp, right for an arm, would slow it below what it was trained on
                    "max_translation_m": 0.035},
        "teleop_node": {"mode": "scripted_expert", "action_spec": "metaworld_4d", "frame_id": "world"},
        "reward_node": {"backend": "sim"},
        "recorder_node": {"start_services": ["/sim_node/reset", "/reward_node/start_episode"]},
    },
    "robot": {
        "teleop_node": {"mode": "keyboard", "action_spec": "ee_delta_7d"},
        "reward_node": {"backend": "human", "max_episode_steps": 0, "max_episode_duration_s": 60.0},
        "recorder_node": {"start_services": ["/reward_node/start_episode"]},
    },
}

#: What `--record` sets (recorder source + the action topic recorder and reward node follow).
RECORD_SOURCES = {
    "teleop": {"recorder_node": {"source": "teleop", "action_topic": "/teleop_node/action"},
               "reward_node": {"action_topic": "/teleop_node/action"}},
    "policy": {"recorder_node": {"source": "policy", "action_topic": "/policy_node/action"},
               "reward_node": {"action_topic": "/policy_node/action"}},
    "rl": {"recorder_node": {"source": "rl", "action_topic": "/policy_node/action"},
           "reward_node": {"action_topic": "/policy_node/action"}},
}

#: Topics that the robot's drivers may publish under other names (-> remappings, as in the launch file).
REMAP_ARGS = {
    "camera_topic": "/camera/image_raw",
    "joint_states_topic": "/joint_states",
    "ee_pose_topic": "/ee_pose",
}


def node_classes():
    """Node name -> class (imported lazily: rclpy, torch, mujoco are heavy)."""
    from ire_vla_ros.nodes.fake_robot_node import FakeRobotNode
    from ire_vla_ros.nodes.policy_node import PolicyNode
    from ire_vla_ros.nodes.recorder_node import RecorderNode
    from ire_vla_ros.nodes.reward_node import RewardNode
    from ire_vla_ros.nodes.trainer_node import TrainerNode

    classes = {"policy_node": PolicyNode, "recorder_node": RecorderNode, "reward_node": RewardNode,
               "trainer_node": TrainerNode, "fake_robot_node": FakeRobotNode}
    try:
        from ire_vla_ros.nodes.teleop_node import TeleopNode

        classes["teleop_node"] = TeleopNode
    except ImportError:
        pass
    try:
        from ire_vla_ros.nodes.sim_node import SimNode

        classes["sim_node"] = SimNode
    except ImportError:
        pass
    return classes


@dataclass
class NodePlan:
    name: str
    params_file: str
    overrides: dict = field(default_factory=dict)
    remaps: dict = field(default_factory=dict)


def _merge(dst: dict, src: dict) -> None:
    for node, params in src.items():
        dst.setdefault(node, {}).update(params)


def parse_set(item: str) -> tuple[str, str, object]:
    """`node.param=value` (value parsed as YAML) -> (node, param, value)."""
    key, sep, raw = item.partition("=")
    node, dot, param = key.partition(".")
    if not sep or not dot or not node or not param:
        raise ValueError(f"--set expects NODE.PARAM=VALUE, got {item!r}")
    return node, param, yaml.safe_load(raw) if raw != "" else ""


def plan(args) -> list[NodePlan]:
    """Which nodes start, with which YAML, overrides and remappings. No ROS needed."""
    names = [n for n in MODE_NODES[args.mode] if n != "teleop_node" or args.teleop]
    if getattr(args, "fake_robot", False):
        if args.mode != "robot":
            raise ValueError("--fake-robot is for robot mode (in sim mode sim_node is the robot)")
        names.insert(0, "fake_robot_node")
    names = [n for n in names if n not in set(args.skip or [])]
    overrides: dict[str, dict] = {}
    _merge(overrides, MODE_OVERRIDES[args.mode])
    record = args.record or ("teleop" if args.teleop else "policy")
    _merge(overrides, RECORD_SOURCES[record])
    if args.mode == "sim" and args.task:
        _merge(overrides, {"sim_node": {"task": args.task}, "recorder_node": {"task": args.task}})
    elif args.task:
        _merge(overrides, {"recorder_node": {"task": args.task}})
    if getattr(args, "online", False):
        # heads and reloads apply only to the checkpoint the trainer improves: the policy runs its root
        if not args.checkpoints:
            raise ValueError("--online needs --checkpoints (the root the policy runs and the trainer improves)")
        if args.checkpoint and Path(args.checkpoint).resolve() != Path(args.checkpoints).resolve():
            raise ValueError("--online: --checkpoint must be the --checkpoints root (or left out)")
        _merge(overrides, {"policy_node": {"checkpoint": args.checkpoints}})
    if args.checkpoint:
        _merge(overrides, {"policy_node": {"checkpoint": args.checkpoint}})
    if args.episodes:
        _merge(overrides, {"recorder_node": {"episodes_dir": args.episodes},
                           "trainer_node": {"episodes_dir": args.episodes}})
    if args.checkpoints:
        _merge(overrides, {"trainer_node": {"checkpoints_dir": args.checkpoints}})
    for item in args.set or []:
        node, param, value = parse_set(item)
        if node not in NODE_NAMES:
            raise ValueError(f"--set: unknown node {node!r} (one of {', '.join(NODE_NAMES)})")
        overrides.setdefault(node, {})[param] = value
    if args.mode == "sim" and "task" not in overrides.get("recorder_node", {}):
        # episodes are tagged with the simulated task (as sim.launch.py passes `task` to both)
        task = overrides.get("sim_node", {}).get("task") or _yaml_param("sim_node", "task")
        if task:
            overrides.setdefault("recorder_node", {})["task"] = task
    remaps = {REMAP_ARGS[k]: v for k, v in ((k, getattr(args, k, None)) for k in REMAP_ARGS)
              if v and v != REMAP_ARGS[k]}
    if "fake_robot_node" in names:  # the fake robot publishes where the remapped drivers would
        fake = {"camera_topic": args.camera_topic, "joint_states_topic": args.joint_states_topic,
                "ee_pose_topic": args.ee_pose_topic, "command_frame": overrides.get("policy_node", {}).get(
                    "command_frame", _yaml_param("policy_node", "command_frame") or "base_link")}
        overrides["fake_robot_node"] = {**fake, **overrides.get("fake_robot_node", {})}
    return [NodePlan(n, str(config_path(f"{n}.yaml")), overrides.get(n, {}),
                     remaps if n in ("policy_node", "recorder_node") else {}) for n in names]


def _yaml_param(node: str, name: str):
    try:
        data = yaml.safe_load(config_path(f"{node}.yaml").read_text()) or {}
    except OSError:
        return None
    for key, value in data.items():
        if key.lstrip("/") == node:
            return (value.get("ros__parameters") or {}).get(name)
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("mode", choices=MODES, help="sim: Metaworld sim_node stands in for the robot")
    parser.add_argument("--teleop", action="store_true",
                        help="start teleop_node (sim: scripted expert; robot: keyboard in this terminal)")
    parser.add_argument("--record", choices=sorted(RECORD_SOURCES),
                        help="which actions are recorded and tagged (default: teleop with --teleop, else policy)")
    parser.add_argument("--task", help="Metaworld task (sim) / task tag of recorded episodes")
    parser.add_argument("--checkpoint", help="policy checkpoint (dir or root with `latest`)")
    parser.add_argument("--episodes", help="episode store directory (recorder and trainer)")
    parser.add_argument("--checkpoints", help="checkpoint root the trainer writes (point --checkpoint at it "
                                              "to let ~/reload pick up new checkpoints)")
    parser.add_argument("--online", action="store_true",
                        help="online RL: the policy runs the --checkpoints root, so the trainer's head snapshots "
                             "(~/start_online_rl) and reloads apply to it")
    parser.add_argument("--skip", action="append", choices=NODE_NAMES, metavar="NODE",
                        help="do not start this node (repeatable)")
    parser.add_argument("--set", action="append", metavar="NODE.PARAM=VALUE",
                        help="override a parameter, value in YAML syntax (repeatable)")
    parser.add_argument("--params-file", action="append", metavar="YAML",
                        help="extra ROS parameter file applied after config/*.yaml (repeatable)")
    for k, default in REMAP_ARGS.items():
        parser.add_argument("--" + k.replace("_", "-"), dest=k, default=default,
                            help=f"remap {default} (policy and recorder) to this topic")
    parser.add_argument("--processes", action="store_true",
                        help="each node in its own process, as ros2 launch starts them (default: one process)")
    parser.add_argument("--fake-robot", action="store_true",
                        help="robot mode: also start fake_robot_node (camera 640x480 30 Hz, /joint_states "
                             "500 Hz, /ee_pose 100 Hz) in place of the robot's drivers")
    parser.add_argument("--dds-profile", metavar="XML", default=None,
                        help="--processes: Fast DDS profile of every child (default: config/fastdds_shm.xml, "
                             "as the launch files; '' keeps the environment's own)")
    parser.add_argument("--fake-robot-no-shm", action="store_true",
                        help="--processes: the fake robot runs without the DDS profile, like a stock driver")
    parser.add_argument("--stop-timeout", type=float, default=15.0, metavar="S",
                        help="--processes: SIGINT, then SIGTERM after S seconds, then SIGKILL (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no ROS)")


def _warn_dds(mode: str) -> None:
    rng = os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE", "")
    if mode == "sim" and rng.upper() != "LOCALHOST":
        print("WARNING: ROS_AUTOMATIC_DISCOVERY_RANGE is "
              f"{rng or 'unset (SUBNET)'}: the simulated robot is visible to every ROS 2 machine on the "
              "network. For simulation: export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and a ROS_DOMAIN_ID "
              "of your own. Nothing is changed for you.", file=sys.stderr)
    if "ROS_DOMAIN_ID" not in os.environ:
        print("note: ROS_DOMAIN_ID is unset (domain 0)", file=sys.stderr)


def _to_parameters(values: dict):
    from rclpy.parameter import Parameter

    return [Parameter(k, value=v) for k, v in values.items()]


def run(args) -> int:
    try:
        plans = plan(args)
    except ValueError as exc:
        print(f"ire-vla bringup: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for p in plans:
            print(f"{p.name}: {p.params_file} overrides={p.overrides} remaps={p.remaps}")
        return 0
    _warn_dds(args.mode)
    if args.processes:
        return run_processes(args, plans)

    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.exceptions import ParameterException

    from ire_vla_ros.nodes.ros_common import NodeStartupError

    classes = node_classes()
    missing = [p.name for p in plans if p.name not in classes]
    if missing:
        print(f"ire-vla bringup: cannot import {missing}", file=sys.stderr)
        return 1
    ros_args = ["--ros-args"]
    for p in plans:
        ros_args += ["--params-file", p.params_file]
    for extra in args.params_file or []:
        ros_args += ["--params-file", extra]
    rclpy.init(args=["ire-vla-bringup"] + ros_args)
    log = rclpy.logging.get_logger("bringup")
    nodes = []
    executor = None
    code = 0
    try:
        for p in plans:
            cli_args = None
            if p.remaps:
                cli_args = ["--ros-args"] + [a for src, dst in p.remaps.items() for a in ("-r", f"{src}:={dst}")]
            try:
                nodes.append(classes[p.name](cli_args=cli_args, parameter_overrides=_to_parameters(p.overrides)))
            except (NodeStartupError, ParameterException) as exc:
                log.fatal(f"{p.name} cannot start: {exc}")
                code = 1
                return code
        # as run_node: heavy work is in the nodes' own threads, callbacks are short
        executor = SingleThreadedExecutor()
        for n in nodes:
            executor.add_node(n)
        log.info(f"{args.mode}: running {', '.join(n.get_name() for n in nodes)}; Ctrl-C stops")
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        _quiet_sigint()  # a second Ctrl-C (or a late one) must not interrupt the teardown
        _teardown(executor, nodes)
    return code


def _quiet_sigint() -> None:
    try:
        signal.signal(signal.SIGINT, lambda *_: None)
    except ValueError:  # not the main thread
        pass


def _teardown(executor, nodes) -> None:
    import rclpy

    if executor is not None:
        try:
            executor.shutdown()
        except Exception:  # noqa: BLE001 - shutting down anyway
            pass
    for n in reversed(nodes):
        try:
            n.destroy_node()
        except Exception as exc:  # noqa: BLE001 - keep destroying the others
            print(f"bringup: destroying {n.get_name()}: {exc}", file=sys.stderr)
    rclpy.try_shutdown()


# ---------------------------------------------------------------------------------------------
# --processes: one child process per node
# ---------------------------------------------------------------------------------------------
PROFILE_VARS = ("FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE")


#: SROS 2 enclave of each node (config/sros2_policy.xml): /ire_vla_ros/<node>
ENCLAVE_ROOT = "/ire_vla_ros"


def child_command(p: NodePlan, extra_params_files: list[str], overrides_file: str | None,
                  secure: bool = False) -> list[str]:
    """The command line of one node, as launch_ros builds it for `Node(executable=..., name=...,
    parameters=[yaml, {...}], remappings=[...])`: later parameter files win. With `secure`
    (ROS_SECURITY_ENABLE=true) each node runs in its own enclave of config/sros2_policy.xml."""
    cmd = [sys.executable, "-m", f"ire_vla_ros.nodes.{p.name}", "--ros-args", "-r", f"__node:={p.name}"]
    if secure:
        cmd += ["--enclave", f"{ENCLAVE_ROOT}/{p.name}"]
    if Path(p.params_file).is_file():
        cmd += ["--params-file", p.params_file]
    for extra in extra_params_files:
        cmd += ["--params-file", extra]
    if overrides_file:
        cmd += ["--params-file", overrides_file]
    for src, dst in p.remaps.items():
        cmd += ["-r", f"{src}:={dst}"]
    return cmd


def child_env(args, name: str, base: dict | None = None) -> dict:
    """The environment of one node: the caller's, the DDS profile, loopback discovery for sims."""
    env = dict(os.environ if base is None else base)
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines reach the prefixing reader as they are written
    if (args.mode == "sim" or args.fake_robot) and not env.get("ROS_AUTOMATIC_DISCOVERY_RANGE"):
        env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"  # a simulated robot stays on this machine
    profile = str(config_path("fastdds_shm.xml")) if args.dds_profile is None else args.dds_profile
    if name == "fake_robot_node" and args.fake_robot_no_shm:
        for var in PROFILE_VARS:
            env.pop(var, None)
    elif profile:  # Fast DDS 2.14 (Jazzy) reads FASTRTPS_, 3.x FASTDDS_: as the launch files, both
        for var in PROFILE_VARS:
            env[var] = profile
    return env


def write_overrides(p: NodePlan, folder: str) -> str | None:
    """The node's overrides as a ROS parameter file (what launch_ros does with a dict)."""
    if not p.overrides:
        return None
    path = Path(folder) / f"{p.name}_overrides.yaml"
    path.write_text(yaml.safe_dump({f"/{p.name}": {"ros__parameters": dict(p.overrides)}}))
    return str(path)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Child:
    """One node process; a thread copies its output to ours, each line prefixed `[name]`."""

    def __init__(self, name: str, cmd: list[str], env: dict, *, interactive: bool = False):
        self.name, self.cmd = name, cmd
        # own session: the terminal's Ctrl-C reaches only us, and we stop the children in order
        self.proc = subprocess.Popen(cmd, env=env, stdin=None if interactive else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", bufsize=1, start_new_session=True)
        self.reported = False
        self._reader = threading.Thread(target=self._copy_output, name=f"out-{name}", daemon=True)
        self._reader.start()

    def _copy_output(self) -> None:
        for line in self.proc.stdout:  # keep draining even if our stdout is gone: a full pipe blocks the node
            try:
                sys.stdout.write(f"[{self.name}] {line}")
                sys.stdout.flush()
            except (OSError, ValueError):
                pass

    def signal(self, sig) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def finish(self) -> None:
        self._reader.join(timeout=2.0)


def stop_children(children: list[Child], timeout_s: float, say) -> None:
    """SIGINT (the node's clean shutdown) to all, SIGTERM to those left after timeout_s, then SIGKILL."""
    for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        alive = [c for c in children if c.proc.poll() is None]
        if not alive:
            return
        if sig != signal.SIGINT:
            say(f"{', '.join(c.name for c in alive)} still running: {sig.name}")
        for c in reversed(alive):  # reverse start order, as ros2 launch
            c.signal(sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(c.proc.poll() is None for c in alive):
            time.sleep(0.05)


def run_processes(args, plans: list[NodePlan]) -> int:
    """Start one process per node; supervise; stop them all on Ctrl-C / SIGTERM. Exit code: 0 when
    stopped on request and every child ended cleanly, else 1."""
    stop = threading.Event()

    def say(text: str) -> None:
        print(f"[bringup] {text}", flush=True)

    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    children: list[Child] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="ire_vla_bringup_") as folder:
        try:
            for p in plans:
                secure = os.environ.get("ROS_SECURITY_ENABLE", "").lower() == "true"
                cmd = child_command(p, list(args.params_file or []), write_overrides(p, folder), secure)
                interactive = p.name == "teleop_node" and args.mode == "robot"  # keyboard on this terminal
                children.append(Child(p.name, cmd, child_env(args, p.name), interactive=interactive))
                say(f"started {p.name} (pid {children[-1].proc.pid})")
            say(f"{args.mode}: {len(children)} processes; Ctrl-C stops them")
            while not stop.wait(0.2):
                for c in children:
                    code = c.proc.poll()
                    if code is not None and not c.reported:
                        c.reported = True
                        failed = failed or code != 0
                        say(f"{c.name} exited: {describe_exit(code)}")
                if all(c.reported for c in children):
                    say("every node has exited")
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_IGN if sig == signal.SIGINT else handler)
            stop_children(children, args.stop_timeout, say)
            for c in children:
                c.finish()
                if not c.reported:
                    code = c.proc.returncode
                    clean = code in (0, -signal.SIGINT)
                    failed = failed or not clean
                    say(f"{c.name} stopped: {describe_exit(code)}")
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ire-vla bringup")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
