"""`ire-vla bringup sim|robot`: the launch files' nodes in one process (manual composition).

rclpy has no composable nodes (rclpy#575), so this starts the same nodes as
`launch/sim.launch.py` / `launch/robot.launch.py`, with the same YAML files from config/ and the
same per-mode overrides (`MODE_OVERRIDES`, kept equal to the launch files by
test/test_launch_files.py), on one MultiThreadedExecutor. Ctrl-C shuts everything down cleanly.

Nothing DDS-related is set here: ROS_DOMAIN_ID, ROS_AUTOMATIC_DISCOVERY_RANGE and
FASTDDS_DEFAULT_PROFILES_FILE are taken from the environment as they are. In sim mode a warning
is printed when discovery is not confined to this machine.

    ire-vla bringup sim --teleop                 # scripted expert drives the sim, teleop episodes recorded
    ire-vla bringup sim --checkpoint ckpts       # the policy drives, policy episodes recorded
    ire-vla bringup robot --teleop --record teleop   # keyboard teleop in this terminal + recorder
    ire-vla bringup robot --checkpoint ckpts --set policy_node.command_frame=base_link
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass, field

import yaml

from ire_vla_ros.paths import config_path

MODES = ("sim", "robot")
NODE_NAMES = ("sim_node", "policy_node", "teleop_node", "reward_node", "recorder_node", "trainer_node")

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
    from ire_vla_ros.nodes.policy_node import PolicyNode
    from ire_vla_ros.nodes.recorder_node import RecorderNode
    from ire_vla_ros.nodes.reward_node import RewardNode
    from ire_vla_ros.nodes.trainer_node import TrainerNode

    classes = {"policy_node": PolicyNode, "recorder_node": RecorderNode, "reward_node": RewardNode,
               "trainer_node": TrainerNode}
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
    names = [n for n in names if n not in set(args.skip or [])]
    overrides: dict[str, dict] = {}
    _merge(overrides, MODE_OVERRIDES[args.mode])
    record = args.record or ("teleop" if args.teleop else "policy")
    _merge(overrides, RECORD_SOURCES[record])
    if args.mode == "sim" and args.task:
        _merge(overrides, {"sim_node": {"task": args.task}, "recorder_node": {"task": args.task}})
    elif args.task:
        _merge(overrides, {"recorder_node": {"task": args.task}})
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
    parser.add_argument("--skip", action="append", choices=NODE_NAMES, metavar="NODE",
                        help="do not start this node (repeatable)")
    parser.add_argument("--set", action="append", metavar="NODE.PARAM=VALUE",
                        help="override a parameter, value in YAML syntax (repeatable)")
    parser.add_argument("--params-file", action="append", metavar="YAML",
                        help="extra ROS parameter file applied after config/*.yaml (repeatable)")
    for k, default in REMAP_ARGS.items():
        parser.add_argument("--" + k.replace("_", "-"), dest=k, default=default,
                            help=f"remap {default} (policy and recorder) to this topic")
    parser.add_argument("--threads", type=int, default=1,
                        help="executor threads; 1 = SingleThreadedExecutor (default: %(default)s)")
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

    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
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
        # One thread by default: rclpy 7.1's MultiThreadedExecutor starved the sim's tick here
        # (busy polling vs the GIL on 2 cores); every callback is short and nothing blocks on a future.
        executor = (SingleThreadedExecutor() if args.threads <= 1
                    else MultiThreadedExecutor(num_threads=args.threads))
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ire-vla bringup")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
