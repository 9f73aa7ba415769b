"""Shared rclpy glue for every ire_vla_ros node: parameters, QoS profiles, a standard main().

Kept deliberately small and stable; nodes import from here.

    from ire_vla_ros.nodes.ros_common import P, declare_params, SENSOR_QOS, LATCHED_QOS, run_node

    class MyNode(Node):
        PARAMS = {
            "rate_hz": P(10.0, "Loop rate", min=0.1, max=100.0),
            "topic": P("/x", "Input topic", read_only=True),
        }
        def __init__(self, **kwargs):
            super().__init__("my_node", **kwargs)
            self.p = declare_params(self, self.PARAMS)   # SimpleNamespace: self.p.rate_hz ...

    def main(args=None):
        return run_node(MyNode, args, description="What the node does")

`run_node` gives `--help` without starting ROS (argparse on the non-ROS arguments, rest goes to
rclpy), spins on a SingleThreadedExecutor, and shuts down cleanly on Ctrl-C / external shutdown.
A node constructor that raises `NodeStartupError` makes main() log the reason and return 1.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from rclpy.utilities import remove_ros_args

__all__ = [
    "P",
    "declare_params",
    "params_as_dict",
    "SENSOR_QOS",
    "LATCHED_QOS",
    "RELIABLE_QOS",
    "COMMAND_QOS",
    "ESTOP_QOS",
    "bind_live_params",
    "stamp_ns",
    "NodeStartupError",
    "run_node",
    "stamp_to_sec",
    "ROS_ARGS_HELP",
    "ExecutorGate",
    "spin",
    "require_choices",
    "diagnostic_value",
    "diagnostic_array",
    "reliability_for",
    "ReliabilityMatchedSubscription",
    "TfLookup",
]

# ---------------------------------------------------------------------------------------------
# QoS
# ---------------------------------------------------------------------------------------------
#: Cameras and other high-rate sensors: KEEP_LAST 5, BEST_EFFORT, VOLATILE.
SENSOR_QOS: QoSProfile = qos_profile_sensor_data
#: Latched state (instruction, e-stop, status): the last message reaches late joiners.
LATCHED_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)
#: Ordinary reliable stream (joint states, actions for the recorder, rewards).
RELIABLE_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)
#: /estop (std_msgs/Bool) is LATCHED: reliable + transient local, depth 1, so a node that starts
#: (or restarts) while an e-stop is held receives it at once. Publishers must use the same profile.
ESTOP_QOS = LATCHED_QOS
#: Motion commands: only the newest matters (MoveIt Servo uses the default reliable profile).
COMMAND_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class P:
    """One parameter: default (its type fixes the parameter type), description, optional range.

    `type` is needed only when the default is an empty list (e.g. Parameter.Type.STRING_ARRAY).
    """

    default: Any
    description: str
    min: float | int | None = None
    max: float | int | None = None
    read_only: bool = False
    constraints: str = ""
    type: Parameter.Type | None = None
    #: Extra run-time check: value -> None if fine, else the reason it is refused.
    validate: Callable[[Any], str | None] | None = None

    def descriptor(self, name: str) -> ParameterDescriptor:
        d = ParameterDescriptor(
            name=name,
            description=self.description,
            read_only=self.read_only,
            additional_constraints=self.constraints,
        )
        if self.min is not None or self.max is not None:
            if isinstance(self.default, bool):
                raise ValueError(f"parameter {name}: a bool has no range")
            lo = self.min if self.min is not None else (-1e308 if isinstance(self.default, float) else -(2**63))
            hi = self.max if self.max is not None else (1e308 if isinstance(self.default, float) else 2**63 - 1)
            if isinstance(self.default, float):
                d.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]
            elif isinstance(self.default, int):
                d.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=0)]
            else:
                raise ValueError(f"parameter {name}: range given for a non-numeric default")
        return d


def declare_params(node, specs: Mapping[str, P]) -> SimpleNamespace:
    """Declare every parameter with its descriptor; return the resulting values by name.

    Dotted names ("workspace.min_x") become attributes with "_" ("workspace_min_x").
    """
    values = {}
    for name, spec in specs.items():
        default = spec.default
        if isinstance(default, (list, tuple)) and len(default) == 0:
            if spec.type is None:
                raise ValueError(f"parameter {name}: empty list default needs P(type=...)")
            default = spec.type
        elif isinstance(default, tuple):
            default = list(default)
        param = node.declare_parameter(name, default, spec.descriptor(name))
        value = param.value
        if value is None and spec.type is not None:  # declared by type only, not overridden
            value = []
        values[name.replace(".", "_")] = value
    return SimpleNamespace(**values)


def bind_live_params(
    node,
    specs: Mapping[str, P],
    values: SimpleNamespace,
    *,
    check: Callable[[dict], str | None] | None = None,
    apply: Callable[[dict], None] | None = None,
) -> None:
    """Make the writable parameters of `specs` take effect when set at run time.

    rclpy already refuses read-only parameters and values outside a descriptor's range. On top:
    each `P.validate` runs, then `check(new_values)` (the full set of would-be values by parameter
    name, for cross-parameter rules such as min < max); a refusal returns its reason to the caller
    of SetParameters and changes nothing. After a successful set, `values` (the namespace from
    declare_params) is updated and `apply(changed)` is called with {name: value} of what changed.
    `apply` runs in the executor thread that served the SetParameters call: keep it short.
    """
    from rcl_interfaces.msg import SetParametersResult

    def current(name):
        try:
            return node.get_parameter(name).value
        except Exception:  # declared by type only and never set (ParameterUninitializedException)
            return None

    def on_set(params):
        proposed = {name: current(name) for name in specs}
        for prm in params:
            if prm.name not in specs:
                continue
            spec = specs[prm.name]
            if spec.validate is not None:
                reason = spec.validate(prm.value)
                if reason:
                    return SetParametersResult(successful=False, reason=f"{prm.name}: {reason}")
            proposed[prm.name] = prm.value
        if check is not None:
            reason = check(proposed)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def post_set(params):
        changed = {}
        for prm in params:
            if prm.name in specs:
                setattr(values, prm.name.replace(".", "_"), prm.value)
                changed[prm.name] = prm.value
        if changed and apply is not None:
            apply(changed)

    node.add_on_set_parameters_callback(on_set)
    node.add_post_set_parameters_callback(post_set)


def params_as_dict(node, specs: Mapping[str, P]) -> dict:
    """The current values of the given parameters (for logging / diagnostics)."""
    return {name: node.get_parameter(name).value for name in specs}


# ---------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------
def stamp_to_sec(stamp) -> float:
    """builtin_interfaces/Time -> float seconds."""
    return float(stamp.sec) + float(stamp.nanosec) * 1e-9


def stamp_ns(stamp) -> int:
    """builtin_interfaces/Time -> integer nanoseconds (0 for an unset stamp)."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


# ---------------------------------------------------------------------------------------------
# main()
# ---------------------------------------------------------------------------------------------
class ExecutorGate:
    """Lets a node's time-critical thread hold its executor back while that thread works.

    Python runs one thread at a time: at 500 Hz joint states the executor thread wakes every 2 ms
    and takes the interpreter from the control thread mid-inference (measured: policy.act 30 % slower
    at 500 Hz than at 20 Hz joint states). While the gate is closed the executor finishes the callback
    in hand and waits; messages queue in DDS (only the newest matters) and are handled when it opens.
    That includes the e-stop: one arriving mid-step is handled when the step ends (one step, ~10 ms
    here), and the stop follows the step's command. A node that has one sets `self.executor_gate`;
    run_node's spin loop honours it."""

    def __init__(self):
        self._open = threading.Event()
        self._open.set()

    @contextmanager
    def closed(self):
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    def wait_open(self, timeout: float) -> bool:
        return self._open.wait(timeout)


def spin(executor, gate: ExecutorGate | None = None) -> None:
    """executor.spin(), waiting at `gate` (if any) between callbacks."""
    if gate is None:
        executor.spin()
        return
    try:
        while executor.context.ok():
            if gate.wait_open(0.5):
                executor.spin_once(timeout_sec=0.5)
    except ExternalShutdownException:  # the context was shut down mid-wait: a normal stop
        pass


class NodeStartupError(RuntimeError):
    """Raised by a node constructor when it cannot start (missing dependency, bad checkpoint...)."""


ROS_ARGS_HELP = (
    "ROS arguments follow --ros-args, e.g.\n"
    "  --ros-args --params-file config/<node>.yaml -p name:=value -r __node:=new_name -r old:=new\n"
    "Parameters and their descriptions: `ros2 param describe <node> <param>` while it runs."
)


def build_parser(prog: str, description: str, params: Mapping[str, P] | None = None) -> argparse.ArgumentParser:
    epilog = ROS_ARGS_HELP
    if params:
        lines = ["", "Parameters (default):"]
        for name, spec in params.items():
            default = spec.default if spec.default != [] else "[]"
            lines.append(f"  {name} ({default!r}): {spec.description}")
        epilog += "\n" + "\n".join(lines)
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def run_node(
    node_factory: Callable[..., Any],
    args: Sequence[str] | None = None,
    *,
    description: str = "",
    params: Mapping[str, P] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    num_threads: int = 1,
) -> int:
    """Standard main(): `--help` without ROS, init, spin an executor, clean shutdown.

    Every node spins on a SingleThreadedExecutor (num_threads=1, the default): rclpy 7.1's
    MultiThreadedExecutor busy-polls and starved timers and services on 2 cores (measured: the
    policy node commanded at 0.7 Hz instead of 10 Hz). Callbacks only store messages or answer
    quickly; heavy work (inference, file writes, training) runs in the node's own threads.

    `args` follows rclpy's convention: a full argv (args[0] is the program), None = sys.argv.
    If `add_arguments` is given it extends the parser and the factory is called as
    `node_factory(cli=namespace)`; otherwise `node_factory()`.
    `params` (the node's parameter table) is listed in `--help`. Returns a process exit code.
    """
    argv = list(sys.argv if args is None else args)
    prog = argv[0].rsplit("/", 1)[-1] if argv else "node"
    parser = build_parser(prog, description, params)
    if add_arguments is not None:
        add_arguments(parser)
    try:
        non_ros = remove_ros_args(args=argv)[1:]
    except Exception as exc:  # rclpy's RCLInvalidROSArgsError: a malformed -p / -r / --params-file
        print(f"{prog}: invalid ROS arguments: {exc}", file=sys.stderr)
        return 2
    cli, unknown = parser.parse_known_args(non_ros)  # --help exits here, before rclpy.init
    if unknown:
        print(f"{prog}: ignoring unknown arguments {unknown} (ROS arguments go after --ros-args)",
              file=sys.stderr)

    rclpy.init(args=argv)
    node = None
    code = 0
    try:
        try:
            node = node_factory(cli=cli) if add_arguments is not None else node_factory()
        except (NodeStartupError, ParameterException) as exc:
            rclpy.logging.get_logger(prog).fatal(f"cannot start: {exc}")
            return 1
        executor = SingleThreadedExecutor() if num_threads == 1 else MultiThreadedExecutor(num_threads=num_threads)
        executor.add_node(node)
        try:
            spin(executor, getattr(node, "executor_gate", None))
        finally:
            executor.shutdown()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as exc:  # noqa: BLE001
        # SIGTERM shuts the context down under a spinning executor, which then raises RCLError
        # ("context is not valid"): that is a normal stop, anything while ROS is still up is not.
        if rclpy.ok():
            raise
        rclpy.logging.get_logger(prog).debug(f"executor stopped by shutdown: {exc}")
    finally:
        # A second Ctrl-C must not interrupt teardown half-way (node.destroy_node, rcl handles).
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if node is not None:
                node.destroy_node()
            rclpy.try_shutdown()
        finally:
            signal.signal(signal.SIGINT, previous)
    return code


# ---------------------------------------------------------------------------------------------
# Start-up checks
# ---------------------------------------------------------------------------------------------
def require_choices(values: SimpleNamespace, choices: Mapping[str, Sequence[str]]) -> None:
    """Start-up check of parameters that name a mode: NodeStartupError for the first value (in the
    namespace from declare_params) that is not one of its choices."""
    for name, allowed in choices.items():
        value = getattr(values, name)
        if value not in allowed:
            raise NodeStartupError(f"{name} {value!r} is not one of {tuple(allowed)}")


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------
def diagnostic_value(value: Any) -> str:
    """A /diagnostics value: a float with 3 decimals ("nan" for NaN), anything else as str()."""
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.3f}"  # NaN is the one float unequal to itself
    return str(value)


def diagnostic_array(node, name: str, level: int, message: str, values: Mapping[str, Any],
                     hardware_id: str = ""):
    """A DiagnosticArray stamped now on the node's clock, holding one DiagnosticStatus.

    `level` as an int: 0 OK, 1 WARN, 2 ERROR, 3 STALE; `values` become its KeyValues in order."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

    levels = (DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR, DiagnosticStatus.STALE)
    status = DiagnosticStatus(level=levels[level], name=name, message=message, hardware_id=hardware_id,
                              values=[KeyValue(key=str(k), value=diagnostic_value(v)) for k, v in values.items()])
    array = DiagnosticArray(status=[status])
    array.header.stamp = node.get_clock().now().to_msg()
    return array


# ---------------------------------------------------------------------------------------------
# Subscriptions
# ---------------------------------------------------------------------------------------------
def reliability_for(offered) -> ReliabilityPolicy | None:
    """As rosbag2 does: RELIABLE only if every publisher offers it; None when there is no publisher."""
    offered = list(offered)
    if not offered:
        return None
    return (ReliabilityPolicy.RELIABLE if all(r == ReliabilityPolicy.RELIABLE for r in offered)
            else ReliabilityPolicy.BEST_EFFORT)


class ReliabilityMatchedSubscription:
    """A KEEP_LAST subscription whose reliability follows the topic's publishers, as rosbag2 does.

    A RELIABLE subscription never receives from a BEST_EFFORT publisher, and a BEST_EFFORT one lets
    DDS drop a RELIABLE publisher's messages. mode "auto" subscribes RELIABLE only while every
    publisher offers it, re-checked every `recheck_s` as publishers come and go (the subscription is
    re-created when the answer changes; with no publisher it stays as it is). "reliable" and
    "best_effort" fix it."""

    MODES = {"auto": None, "reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}

    def __init__(self, node, msg_type, topic: str, callback: Callable, mode: str = "auto", depth: int = 1,
                 recheck_s: float = 1.0):
        if mode not in self.MODES:
            raise ValueError(f"reliability {mode!r} is not one of {tuple(self.MODES)}")
        self._node, self._msg_type, self._callback = node, msg_type, callback
        self.topic, self.mode, self.depth = topic, mode, int(depth)
        self.reliability: ReliabilityPolicy | None = None  # of the subscription now
        self._sub = None
        self.match()
        if mode == "auto":
            self._timer = node.create_timer(recheck_s, self.match)

    def match(self) -> None:
        want = self.MODES[self.mode]
        if want is None:
            offered = (i.qos_profile.reliability for i in self._node.get_publishers_info_by_topic(self.topic))
            want = reliability_for(offered) or self.reliability or ReliabilityPolicy.BEST_EFFORT
        if want == self.reliability:
            return
        if self._sub is not None:
            self._node.destroy_subscription(self._sub)
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=self.depth, reliability=want)
        self._sub = self._node.create_subscription(self._msg_type, self.topic, self._callback, qos)
        self.reliability = want
        self._node.get_logger().info(f"{self.topic}: {want.name} subscription")


class TfLookup:
    """The newest transform `target_frame` <- `source_frame` from TF. tf2_ros is an optional
    dependency: it is imported here (ImportError when it is missing)."""

    def __init__(self, node, target_frame: str, source_frame: str):
        from tf2_ros import Buffer, TransformListener

        self.target_frame, self.source_frame = target_frame, source_frame
        self.buffer = Buffer()
        self._listener = TransformListener(self.buffer, node)

    def latest(self):
        """The newest geometry_msgs/TransformStamped, or None while TF has none."""
        from rclpy.time import Time

        try:
            return self.buffer.lookup_transform(self.target_frame, self.source_frame, Time())
        except Exception:  # noqa: BLE001 - tf2's Lookup/Connectivity/Extrapolation errors until it arrives
            return None
