"""Motion backends of the policy node: MoveIt Servo twist, MoveIt Servo pose target, MoveItPy.

One interface (`MotionBackend`), three implementations, chosen by the `motion_backend` parameter:

    backend = make_motion_backend(node, p, callback_group)   # NodeStartupError (one line) if it cannot run
    backend.activate()                  # ~/enable true: Servo command type + unpause (retried, never blocks)
    backend.send(delta, ee_pos, ee_quat)  # one safe step (SafetyFilter output) -> command + gripper
    backend.stop("estop")               # zero twist, pause Servo / stop MoveIt execution (idempotent)
    backend.stats(); backend.close()

Servo as it behaves in MoveIt 2 Jazzy (2.12; sources cited in docs/ROBOT_SETUP.md section 3):
* `servo_node` starts unpaused but with no command type: every twist or pose is dropped with
  "Command type has not been set, cannot accept input" until `~/switch_command_type`
  (moveit_msgs/srv/ServoCommandType, JOINT_JOG=0 TWIST=1 POSE=2) is called, and a restarted Servo
  has forgotten it. So the type is switched on EVERY `activate()`, retried while Servo is not up.
* `~/pause_servo` (std_srvs/SetBool, data=true pauses): `stop()` publishes a zero twist at once
  (Servo halts on it without waiting for `incoming_command_timeout`) and pauses Servo; `activate()`
  unpauses it (Servo then re-reads the robot state and resets its smoothing).
* moveit_msgs is not installable everywhere (not here): without it the type cannot be switched from
  this process; this is logged with the `ros2 service call` that does it by hand.

MoveItPy (`moveit_py`) plans and executes one short motion per target. `plan()` and `execute()`
block (and plan() holds the GIL), so they run in one worker thread, one at a time, newest target
wins; `stop()` drops pending targets and calls the trajectory execution manager's
`stop_execution()`. MoveItPy needs the robot's MoveIt config explicitly (`moveit_config_file` or
`moveit_config_package`); velocity and acceleration are scaled down (`moveit_max_velocity_scaling`).

The retry / state logic (`ServoSession`), the newest-wins worker (`NewestTargetWorker`) and the
twist / pose conversion (robot/motion.py) are plain Python, tested without ROS or MoveIt.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from ire_vla_ros.nodes.ros_common import NodeStartupError, P
from ire_vla_ros.robot.motion import pose_after_delta, twist_from_delta

__all__ = [
    "BACKENDS", "PARAMS", "SERVO_COMMAND_TYPES", "MotionBackend", "ServiceLink", "ServoSession",
    "NewestTargetWorker", "make_motion_backend", "load_moveit_config", "servo_speed_warnings",
    "largest_motion_per_action_m", "import_servo_command_type",
]

BACKENDS = ("servo_twist", "servo_pose", "moveit_py")
#: moveit_msgs/srv/ServoCommandType constants (JOINT_JOG = 0, TWIST = 1, POSE = 2)
SERVO_COMMAND_TYPES = {"servo_twist": ("TWIST", 1), "servo_pose": ("POSE", 2)}

PARAMS = {
    "motion_backend": P("servo_twist", "servo_twist | servo_pose | moveit_py", read_only=True,
                        constraints="one of servo_twist, servo_pose, moveit_py"),
    "twist_topic": P("/servo_node/delta_twist_cmds", "TwistStamped output (servo_twist)", read_only=True),
    "pose_topic": P("/servo_node/pose_target_cmds", "PoseStamped output (servo_pose); Servo tracks its IK "
                    "tip frame, so the EE pose (ee_link or ee_pose_topic) must be that link's", read_only=True),
    "servo_switch_service": P("/servo_node/switch_command_type",
                              "moveit_msgs/srv/ServoCommandType service, called on every ~/enable "
                              "('' = do not call)", read_only=True),
    "servo_pause_service": P("/servo_node/pause_servo",
                             "std_srvs/SetBool: true on stop (e-stop, disable, dropped action), false on "
                             "~/enable ('' = do not call)", read_only=True),
    "servo_retry_period_s": P(1.0, "Retry period of the Servo service calls while Servo is not up",
                              min=0.05, max=60.0, read_only=True),
    "servo_retry_max": P(60, "Attempts per Servo request before giving up (logged, counted)",
                         min=1, max=100000, read_only=True),
    "servo_scale_linear": P(0.4, "Servo's moveit_servo.scale.linear (m/s). From MoveIt 2.12 a speed_units "
                            "twist is capped to it: a warning at start-up if max_translation_m * "
                            "control_rate_hz is above", min=0.0, read_only=True),
    "servo_scale_rotational": P(0.8, "Servo's moveit_servo.scale.rotational (rad/s), the same for "
                                "max_rotation_rad * control_rate_hz", min=0.0, read_only=True),
    "servo_command_timeout_s": P(0.25, "Servo's moveit_servo.incoming_command_timeout as launched (s); "
                                 "used for the start-up check and the largest-motion figure in the log",
                                 min=0.0, read_only=True),
    "moveit_planning_group": P("arm", "Planning group (moveit_py backend)", read_only=True),
    "moveit_pose_link": P("", "Link whose pose is commanded (moveit_py backend; '' = ee_link)", read_only=True),
    "moveit_config_file": P("", "moveit_py: YAML with MoveItPy's parameters (robot_description, "
                            "robot_description_semantic, robot_description_kinematics, planning_pipelines, "
                            "plan_request_params, ...; flat or under <node>: ros__parameters:)", read_only=True),
    "moveit_config_package": P("", "moveit_py: the robot's MoveIt config package, loaded with "
                               "moveit_configs_utils.MoveItConfigsBuilder when moveit_config_file is ''",
                               read_only=True),
    "moveit_cpp_file": P("", "moveit_py: MoveItPy's own section (planning scene monitor, pipelines, "
                         "plan_request_params); '' = the package's config/moveit_py.yaml", read_only=True),
    "moveit_robot_name": P("", "moveit_py: robot name for MoveItConfigsBuilder ('' = derived from the package)",
                           read_only=True),
    "moveit_plan_request_ns": P("plan_request_params", "moveit_py: parameter namespace of "
                                "PlanRequestParameters in the MoveIt config", read_only=True),
    "moveit_max_velocity_scaling": P(0.1, "moveit_py: max_velocity_scaling_factor of every plan "
                                     "(MoveIt's default 1.0 is full speed)", min=0.001, max=1.0, read_only=True),
    "moveit_max_acceleration_scaling": P(0.1, "moveit_py: max_acceleration_scaling_factor of every plan",
                                         min=0.001, max=1.0, read_only=True),
}


# =============================================================================================
# Plain logic (no ROS)
# =============================================================================================
def import_servo_command_type():
    """(moveit_msgs.srv.ServoCommandType, None) or (None, why it does not import)."""
    try:
        from moveit_msgs.srv import ServoCommandType  # noqa: PLC0415
    except Exception as exc:  # ImportError, or a broken install
        return None, f"moveit_msgs does not import ({type(exc).__name__}: {exc})"
    return ServoCommandType, None


def servo_speed_warnings(max_translation_m: float, max_rotation_rad: float, rate_hz: float,
                         scale_linear: float, scale_rotational: float) -> list[str]:
    """Where the policy's largest step, held for one period, is faster than Servo will move.

    MoveIt 2.12 caps a speed_units twist to scale.linear / scale.rotational (norms): a step above
    the cap is silently shortened, so the arm does less than the recorded action says.
    """
    out = []
    v, w = max_translation_m * rate_hz, max_rotation_rad * rate_hz
    if scale_linear > 0 and v > scale_linear + 1e-9:
        out.append(f"max_translation_m {max_translation_m:g} at {rate_hz:g} Hz is {v:.3g} m/s, above Servo's "
                   f"scale.linear {scale_linear:g} m/s: lower max_translation_m to "
                   f"{scale_linear / rate_hz:.3g} or raise scale.linear")
    if scale_rotational > 0 and w > scale_rotational + 1e-9:
        out.append(f"max_rotation_rad {max_rotation_rad:g} at {rate_hz:g} Hz is {w:.3g} rad/s, above Servo's "
                   f"scale.rotational {scale_rotational:g} rad/s: lower max_rotation_rad to "
                   f"{scale_rotational / rate_hz:.3g} or raise scale.rotational")
    return out


def largest_motion_per_action_m(max_translation_m: float, rate_hz: float, command_timeout_s: float,
                                scale_linear: float = 0.0) -> float:
    """Largest travel one published twist can cause if nothing follows it (no zero twist, no pause).

    The twist asks for max_translation_m per period, i.e. v = max_translation_m * rate_hz (capped at
    scale_linear when > 0), and Servo applies it until the command is `command_timeout_s` old
    (its staleness test is `now - stamp >= incoming_command_timeout`), then halts (plus its
    deceleration). With the period shorter than the timeout the step is overshot by the factor
    timeout * rate; stop() cuts it short with a zero twist and a pause.
    """
    v = max_translation_m * rate_hz
    if scale_linear > 0:
        v = min(v, scale_linear)
    return v * max(command_timeout_s, 1.0 / rate_hz)


class ServiceLink(Protocol):
    """A service client as ServoSession sees it (the ROS glue wraps an rclpy client)."""

    name: str

    def ready(self) -> bool: ...

    def call(self, value: Any, done: Callable[[bool, str], None]) -> None:
        """Send the request asynchronously; `done(ok, message)` later, from any thread."""


@dataclass
class _Step:
    what: str            # "switch" | "pause" | "unpause"
    link: ServiceLink
    value: Any


class ServoSession:
    """Brings Servo into the wanted state with bounded retries; never blocks.

    activate(): switch the command type (when a switch link exists), then unpause.
    stop():     pause. A newer activate()/stop() replaces the pending steps of an older one; an
                answer to an older request is counted but moves nothing forward.
    tick():     called periodically (retry timer) and after each answer: sends the next step when
                its service is ready, else counts an attempt; after `max_attempts` the request is
                given up (logged, counted). `busy` says whether the retry timer is still needed.
    """

    def __init__(self, *, command_type: int | None, switch: ServiceLink | None, pause: ServiceLink | None,
                 max_attempts: int = 60, call_timeout_s: float = 5.0,
                 log: Callable[[str, str], None] = lambda level, msg: None,
                 clock: Callable[[], float] = time.monotonic):
        self.command_type = command_type
        self.switch, self.pause = switch, pause
        self.max_attempts = int(max_attempts)
        self.call_timeout_s = float(call_timeout_s)
        self.log = log
        self.clock = clock
        self._lock = threading.RLock()
        self._steps: list[_Step] = []
        self._generation = 0
        self._attempts = 0
        self._in_flight: tuple[int, float] | None = None   # (generation, sent at)
        self.wanted = "stopped"
        self.state = "idle"       # idle | working | active | stopped | gave_up
        self.counters: Counter = Counter()

    # -- requests ---------------------------------------------------------------------------
    def activate(self) -> None:
        steps = []
        if self.switch is not None and self.command_type is not None:
            steps.append(_Step("switch", self.switch, int(self.command_type)))
        if self.pause is not None:
            steps.append(_Step("unpause", self.pause, False))
        self._start("active", steps)

    def stop(self) -> None:
        self._start("stopped", [_Step("pause", self.pause, True)] if self.pause is not None else [])

    def _start(self, wanted: str, steps: list[_Step]) -> None:
        with self._lock:
            self._generation += 1
            self.wanted = wanted
            self._steps = steps
            self._attempts = 0
            self._in_flight = None
            self.state = "working" if steps else wanted
        self.tick()

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._steps) and self.state == "working"

    # -- progress ---------------------------------------------------------------------------
    def tick(self) -> None:
        send = None
        with self._lock:
            if not self._steps or self.state != "working":
                return
            if self._in_flight is not None:
                gen, sent = self._in_flight
                if self.clock() - sent < self.call_timeout_s:
                    return  # waiting for the answer
                self.counters["servo_call_timeouts"] += 1
                self._in_flight = None
                self._count_attempt(f"{self._steps[0].link.name} did not answer")
                if self.state != "working":
                    return
            step = self._steps[0]
            if not step.link.ready():
                self._count_attempt(f"{step.link.name} not available")
                return
            gen = self._generation
            self._in_flight = (gen, self.clock())
            self.counters[f"servo_{step.what}_sent"] += 1
            send = step
        send.link.call(send.value, lambda ok, msg, g=gen, s=send: self._answered(g, s, ok, msg))

    def _count_attempt(self, why: str) -> None:
        """Under the lock."""
        self._attempts += 1
        what = self._steps[0].what
        if self._attempts == 1 or self._attempts % 10 == 0:
            self.log("warning", f"Servo {what}: {why} (attempt {self._attempts}/{self.max_attempts}); retrying")
        if self._attempts >= self.max_attempts:
            self.counters["servo_gave_up"] += 1
            self.log("error", f"Servo {what}: gave up after {self._attempts} attempts ({why}); "
                              f"Servo will not move until it is set by hand")
            self._steps = []
            self.state = "gave_up"

    def _answered(self, gen: int, step: _Step, ok: bool, message: str) -> None:
        with self._lock:
            if gen != self._generation or not self._steps or self._steps[0] is not step:
                self.counters["servo_stale_answers"] += 1
                return
            self._in_flight = None
            if not ok:
                self.counters[f"servo_{step.what}_refused"] += 1
                self._count_attempt(f"{step.link.name} refused ({message or 'no reason'})")
                return
            self.counters[f"servo_{step.what}_ok"] += 1
            self._steps.pop(0)
            self._attempts = 0
            if not self._steps:
                self.state = self.wanted
                level_msg = ("info", f"Servo {self.wanted}" + (
                    f" (command type {self.command_type})" if self.wanted == "active"
                    and self.command_type is not None and self.switch is not None else ""))
            else:
                level_msg = None
        if level_msg:
            self.log(*level_msg)
        self.tick()

    def snapshot(self) -> dict:
        with self._lock:
            return {"servo_state": self.state, "servo_wanted": self.wanted, **dict(self.counters)}


class NewestTargetWorker:
    """Runs `work(target)` in one thread, one target at a time; a newer target replaces a pending one.

    `stop()` drops the pending target and, while a target runs, calls `interrupt()` (e.g. stop
    trajectory execution) in a thread of its own; `work` may check `cancelled(generation)` between
    its blocking phases. Nothing here blocks the caller except `close()`.
    """

    def __init__(self, work: Callable[[Any, int], None], interrupt: Callable[[], None] = lambda: None,
                 name: str = "motion_worker"):
        self._work = work
        self._interrupt = interrupt
        self._cond = threading.Condition()
        self._pending: Any = None
        self._has_pending = False
        self._generation = 0
        self._closed = False
        self.busy = False
        self.counters: Counter = Counter({"targets_replaced": 0, "targets_run": 0, "work_errors": 0})
        self.last_error = ""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, target) -> None:
        with self._cond:
            if self._has_pending:
                self.counters["targets_replaced"] += 1
            self._pending, self._has_pending = target, True
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._generation += 1
            if self._has_pending:
                self.counters["targets_dropped_on_stop"] += 1
            self._pending, self._has_pending = None, False
            running = self.busy
        if running:  # in its own thread: stopping a trajectory may wait for the controllers
            self.counters["interrupts"] += 1
            threading.Thread(target=self._safe_interrupt, name="motion_interrupt", daemon=True).start()

    def _safe_interrupt(self) -> None:
        try:
            self._interrupt()
        except Exception as exc:  # noqa: BLE001 - reported; the worker goes on
            self.counters["interrupt_errors"] += 1
            self.last_error = f"interrupt: {type(exc).__name__}: {exc}"

    def cancelled(self, generation: int) -> bool:
        return generation != self._generation or self._closed

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._has_pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                target, gen = self._pending, self._generation
                self._pending, self._has_pending = None, False
                self.busy = True
            try:
                self._work(target, gen)
                self.counters["targets_run"] += 1
            except Exception as exc:  # noqa: BLE001 - reported, the worker goes on
                self.counters["work_errors"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                with self._cond:
                    self.busy = False
                    self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True when nothing is pending or running (tests, close)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.busy or self._has_pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 2.0) -> None:
        self.stop()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)


def _read_params_yaml(path_str: str, what: str) -> dict:
    """A YAML mapping of parameters, flat or a ROS parameter file (`<node or /**>: ros__parameters:`)."""
    import yaml

    path = Path(path_str).expanduser()
    if not path.is_file():
        raise NodeStartupError(f"{what} {path_str!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise NodeStartupError(f"{what} {path_str!r} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise NodeStartupError(f"{what} {path_str!r} must hold a mapping of parameters")
    if len(data) == 1:
        (inner,) = data.values()
        if isinstance(inner, dict) and isinstance(inner.get("ros__parameters"), dict):
            data = inner["ros__parameters"]
    return data


def default_moveit_cpp_file() -> str:
    from ire_vla_ros.paths import share_dir

    return str(share_dir() / "config" / "moveit_py.yaml")


def load_moveit_config(config_file: str = "", package: str = "", robot_name: str = "",
                       moveit_cpp_file: str = "", builder_factory: Callable | None = None) -> dict:
    """MoveItPy's config_dict. NodeStartupError (one line) if it cannot be built.

    `moveit_cpp_file` (default config/moveit_py.yaml) holds MoveItPy's own section (planning scene
    monitor, pipelines, plan_request_params); the robot comes from `config_file` (a YAML of all
    parameters, merged over it) or from the MoveIt config `package` (MoveItConfigsBuilder).
    """
    moveit_cpp_file = moveit_cpp_file or default_moveit_cpp_file()
    if config_file:
        config = {**_read_params_yaml(moveit_cpp_file, "moveit_cpp_file"),
                  **_read_params_yaml(config_file, "moveit_config_file")}
    elif package:
        if builder_factory is None:
            try:
                from moveit_configs_utils import MoveItConfigsBuilder  # noqa: PLC0415
            except Exception as exc:
                raise NodeStartupError(
                    f"moveit_config_package {package!r} needs moveit_configs_utils, which does not import "
                    f"({type(exc).__name__}); give moveit_config_file instead") from exc
            builder_factory = MoveItConfigsBuilder
        try:
            kwargs = {"package_name": package}
            builder = builder_factory(robot_name or package.removesuffix("_moveit_config"), **kwargs)
            config = builder.moveit_cpp(file_path=moveit_cpp_file).to_moveit_configs().to_dict()
        except Exception as exc:  # noqa: BLE001 - anything the builder throws is a config problem
            raise NodeStartupError(f"cannot load MoveIt config package {package!r}: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    else:
        raise NodeStartupError(
            "motion_backend 'moveit_py' needs the robot's MoveIt config: set moveit_config_file (YAML) or "
            "moveit_config_package (MoveIt config package); without it MoveItCpp finds no robot_description "
            "or planning pipelines")
    missing = [k for k in ("robot_description", "robot_description_semantic") if not config.get(k)]
    if missing:
        raise NodeStartupError(f"MoveIt config lacks {missing} (from "
                               f"{config_file or package}); MoveItPy cannot load the robot model without them")
    return config


# =============================================================================================
# Interface
# =============================================================================================
class MotionBackend:
    """What the policy node calls; see the module docstring."""

    name: str = ""
    needs_ee_pose: bool = False

    def activate(self) -> None:
        raise NotImplementedError

    def send(self, delta, ee_pos, ee_quat) -> bool:
        raise NotImplementedError

    def stop(self, reason: str) -> None:
        raise NotImplementedError

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


# =============================================================================================
# ROS glue
# =============================================================================================
class _RosLink:
    """ServiceLink over an rclpy client (call_async; the answer arrives on the node's executor)."""

    def __init__(self, node, srv_type, name: str, make_request: Callable[[Any], Any], group):
        self.name = name
        self._client = node.create_client(srv_type, name, callback_group=group)
        self._make_request = make_request

    def ready(self) -> bool:
        return self._client.service_is_ready()

    def call(self, value, done) -> None:
        future = self._client.call_async(self._make_request(value))

        def finished(fut):
            try:
                res = fut.result()
            except Exception as exc:  # noqa: BLE001 - cancelled / shutdown
                done(False, f"{type(exc).__name__}: {exc}")
                return
            if res is None:
                done(False, "no response")
                return
            done(bool(res.success), str(getattr(res, "message", "")))

        future.add_done_callback(finished)


def _node_logger(node) -> Callable[[str, str], None]:
    logger = node.get_logger()

    def log(level: str, msg: str) -> None:
        # rclpy fixes a log call site's severity on first use: one line per severity
        if level == "error":
            logger.error(msg)
        elif level == "warning":
            logger.warning(msg)
        else:
            logger.info(msg)

    return log


class _CommandMixin:
    """What the Servo and MoveItPy backends build alike: the gripper command and a pose target."""

    def _publish_gripper(self, delta) -> None:
        if getattr(delta, "gripper", None) is not None:
            from std_msgs.msg import Float64

            self._gripper_pub.publish(Float64(data=float(delta.gripper)))

    def _pose_target(self, ee_pos, ee_quat, delta):
        """PoseStamped in command_frame, stamped now: the EE pose moved by one safe delta."""
        pos, quat = pose_after_delta(ee_pos, ee_quat, delta)
        msg = self._PoseStamped()
        msg.header.stamp = self.node.get_clock().now().to_msg()
        msg.header.frame_id = self.p.command_frame
        msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = (float(v) for v in pos)
        (msg.pose.orientation.x, msg.pose.orientation.y, msg.pose.orientation.z,
         msg.pose.orientation.w) = (float(v) for v in quat)
        return msg


class ServoModeClient:
    """ServoSession over rclpy clients + a retry timer: what policy_node and teleop_node use.

    `type_name` is "TWIST" or "POSE" (ServoCommandType constant). Without moveit_msgs only the pause
    service is used and the reason is logged once, with the command that switches the type by hand.
    """

    def __init__(self, node, type_name: str, switch_service: str, pause_service: str, *,
                 retry_period_s: float = 1.0, retry_max: int = 60, callback_group=None,
                 import_command_type: Callable[[], tuple] = import_servo_command_type):
        from std_srvs.srv import SetBool

        self._log = _node_logger(node)
        type_value = dict(SERVO_COMMAND_TYPES.values())[type_name]
        switch = None
        self.switch_unavailable = ""
        if switch_service:
            srv_type, why = import_command_type()
            if srv_type is None:
                self.switch_unavailable = why
                self._log("warning",
                          f"{why}: cannot call {switch_service}; Jazzy Servo ignores every command until its "
                          f"type is set. Set it by hand after each Servo start: ros2 service call "
                          f"{switch_service} moveit_msgs/srv/ServoCommandType \"{{command_type: {type_value}}}\" "
                          f"({type_name})")
            else:
                type_value = int(getattr(srv_type.Request, type_name, type_value))

                def switch_request(value, t=srv_type):
                    req = t.Request()
                    req.command_type = int(value)
                    return req

                switch = _RosLink(node, srv_type, switch_service, switch_request, callback_group)
        pause = None
        if pause_service:
            pause = _RosLink(node, SetBool, pause_service, lambda v: SetBool.Request(data=bool(v)), callback_group)
        self.session = ServoSession(command_type=type_value, switch=switch, pause=pause,
                                    max_attempts=retry_max, log=self._log)
        self._timer = node.create_timer(retry_period_s, self._on_retry, callback_group=callback_group)
        self._timer.cancel()

    def activate(self) -> None:
        self.session.activate()
        self._arm()

    def stop(self) -> None:
        self.session.stop()
        self._arm()

    def snapshot(self) -> dict:
        out = self.session.snapshot()
        if self.switch_unavailable:
            out["servo_switch"] = "unavailable: " + self.switch_unavailable
        return out

    def close(self) -> None:
        self._timer.cancel()

    def _arm(self) -> None:
        if self.session.busy:
            self._timer.reset()

    def _on_retry(self) -> None:
        self.session.tick()
        if not self.session.busy:
            self._timer.cancel()


class ServoBackend(_CommandMixin, MotionBackend):
    """servo_twist (TwistStamped velocities) or servo_pose (PoseStamped targets of the IK tip)."""

    def __init__(self, node, p, callback_group):
        from geometry_msgs.msg import PoseStamped, TwistStamped
        from std_msgs.msg import Float64

        from ire_vla_ros.nodes.ros_common import COMMAND_QOS

        self.node, self.p = node, p
        self.name = p.motion_backend
        self.needs_ee_pose = self.name == "servo_pose"
        self._log = _node_logger(node)
        self._TwistStamped, self._PoseStamped = TwistStamped, PoseStamped
        if self.name == "servo_twist":
            self._pub = node.create_publisher(TwistStamped, p.twist_topic, COMMAND_QOS)
        else:
            self._pub = node.create_publisher(PoseStamped, p.pose_topic, COMMAND_QOS)
        self._gripper_pub = node.create_publisher(Float64, p.gripper_topic, COMMAND_QOS)
        self.counters: Counter = Counter({"commands_sent": 0, "stops": 0, "zero_twists_sent": 0})
        self._stopped = True
        self.servo = ServoModeClient(node, SERVO_COMMAND_TYPES[self.name][0], p.servo_switch_service,
                                     p.servo_pause_service, retry_period_s=p.servo_retry_period_s,
                                     retry_max=p.servo_retry_max, callback_group=callback_group)
        self.session = self.servo.session

        period = 1.0 / p.control_rate_hz
        if 0 < p.servo_command_timeout_s <= period:
            self._log("warning", f"Servo's incoming_command_timeout ({p.servo_command_timeout_s:g} s, "
                                 f"servo_command_timeout_s) is not above the command period ({period:.3g} s): "
                                 "Servo halts between commands; raise it in Servo's launch parameters")
        max_t = node.get_parameter("max_translation_m").value if node.has_parameter("max_translation_m") else 0.0
        self._log("info", f"{self.name}: one action moves at most "
                          f"{100 * largest_motion_per_action_m(max_t, p.control_rate_hz, p.servo_command_timeout_s, p.servo_scale_linear):.1f} cm "
                          f"if nothing follows it (Servo timeout {p.servo_command_timeout_s:g} s); stop() cuts it short")
        for w in servo_speed_warnings(node.get_parameter("max_translation_m").value
                                      if node.has_parameter("max_translation_m") else 0.0,
                                      node.get_parameter("max_rotation_rad").value
                                      if node.has_parameter("max_rotation_rad") else 0.0,
                                      p.control_rate_hz, p.servo_scale_linear, p.servo_scale_rotational):
            self._log("warning", w)

    # -- interface --------------------------------------------------------------------------
    def activate(self) -> None:
        self._stopped = False
        self.servo.activate()

    def send(self, delta, ee_pos, ee_quat) -> bool:
        if self._stopped:  # after a stop (e.g. a dropped action) the caller decided to move again
            self.activate()
        if self.name == "servo_twist":
            lin, ang = twist_from_delta(delta, self.p.control_rate_hz)
            self._publish_twist(lin, ang)
        else:
            if ee_pos is None or ee_quat is None:
                self.counters["no_ee_pose"] += 1
                return False
            self._pub.publish(self._pose_target(ee_pos, ee_quat, delta))
        self._publish_gripper(delta)
        self.counters["commands_sent"] += 1
        return True

    def stop(self, reason: str) -> None:
        if self.name == "servo_twist":
            # Servo halts on a zero twist at once; in POSE mode it would only log "Command type has
            # not been set" for a twist, so there the pause alone stops the pose tracking.
            self._publish_twist(np.zeros(3), np.zeros(3))
            self.counters["zero_twists_sent"] += 1
        if self._stopped and self.session.wanted == "stopped" and self.session.state in ("working", "stopped"):
            return  # idempotent: the pause is requested or done
        self._stopped = True
        self.counters["stops"] += 1
        self.counters[f"stop_{reason}"] += 1
        self.servo.stop()

    def stats(self) -> dict:
        return {"motion_backend": self.name, **dict(self.counters), **self.servo.snapshot()}

    def close(self) -> None:
        self.servo.close()

    # -- helpers ----------------------------------------------------------------------------
    def _publish_twist(self, lin, ang) -> None:
        msg = self._TwistStamped()
        msg.header.stamp = self.node.get_clock().now().to_msg()
        msg.header.frame_id = self.p.command_frame
        msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = (float(v) for v in lin)
        msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z = (float(v) for v in ang)
        self._pub.publish(msg)


def _import_moveit_py():
    try:
        from moveit.planning import MoveItPy, PlanRequestParameters  # noqa: PLC0415
    except Exception as exc:
        raise NodeStartupError(
            f"motion_backend 'moveit_py' needs MoveIt's Python bindings (package moveit_py, module "
            f"moveit.planning), which do not import here ({type(exc).__name__}: {exc}). Install "
            f"ros-jazzy-moveit-py or use motion_backend servo_twist / servo_pose") from exc
    return MoveItPy, PlanRequestParameters


class MoveItPyBackend(_CommandMixin, MotionBackend):  # the MoveIt calls need moveit_py (not here)
    """One short plan-and-execute per target in a worker thread; newest target wins."""

    name = "moveit_py"
    needs_ee_pose = True

    def __init__(self, node, p, callback_group, *, moveit_py=None):
        from geometry_msgs.msg import PoseStamped
        from std_msgs.msg import Float64

        from ire_vla_ros.nodes.ros_common import COMMAND_QOS

        self.node, self.p = node, p
        self._log = _node_logger(node)
        self._pose_link = p.moveit_pose_link or p.ee_link
        if not self._pose_link:
            raise NodeStartupError("motion_backend 'moveit_py' needs moveit_pose_link (or ee_link)")
        if moveit_py is None:
            MoveItPy, PlanRequestParameters = _import_moveit_py()
            config = load_moveit_config(p.moveit_config_file, p.moveit_config_package, p.moveit_robot_name,
                                        p.moveit_cpp_file)
            try:  # pragma: no cover - needs MoveIt
                self._moveit = MoveItPy(node_name=f"{node.get_name()}_moveit_py", config_dict=config)
                self._arm = self._moveit.get_planning_component(p.moveit_planning_group)
                self._plan_params = PlanRequestParameters(self._moveit, p.moveit_plan_request_ns)
            except Exception as exc:  # pragma: no cover - needs MoveIt
                raise NodeStartupError(f"MoveItPy did not start: {type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        else:  # tests inject (moveit, arm, plan_params)
            self._moveit, self._arm, self._plan_params = moveit_py
        self._plan_params.max_velocity_scaling_factor = float(p.moveit_max_velocity_scaling)
        self._plan_params.max_acceleration_scaling_factor = float(p.moveit_max_acceleration_scaling)
        # Jazzy's binding is spelled get_trajactory_execution_manager (fixed later)
        get_tem = (getattr(self._moveit, "get_trajectory_execution_manager", None)
                   or getattr(self._moveit, "get_trajactory_execution_manager"))
        self._tem = get_tem()
        self._PoseStamped = PoseStamped
        self._gripper_pub = node.create_publisher(Float64, p.gripper_topic, COMMAND_QOS)
        self.counters: Counter = Counter({"targets_sent": 0, "plans_ok": 0, "plans_failed": 0,
                                          "executions": 0, "stops": 0})
        self._active = False
        self._worker = NewestTargetWorker(self._plan_and_execute, self._tem.stop_execution, name="moveit_py")
        self._log("warning", "moveit_py plans and executes one short motion per target, newest target wins: "
                             "far below control_rate_hz; stream through MoveIt Servo for closed-loop control")

    def activate(self) -> None:
        self._active = True

    def send(self, delta, ee_pos, ee_quat) -> bool:
        if not self._active or ee_pos is None or ee_quat is None:
            return False
        self._worker.submit(self._pose_target(ee_pos, ee_quat, delta))
        self._publish_gripper(delta)
        self.counters["targets_sent"] += 1
        return True

    def _plan_and_execute(self, target, generation: int) -> None:  # worker thread
        arm = self._arm
        arm.set_start_state_to_current_state()
        arm.set_goal_state(pose_stamped_msg=target, pose_link=self._pose_link)
        result = arm.plan(single_plan_parameters=self._plan_params)
        if self._worker.cancelled(generation):
            self.counters["plans_discarded_after_stop"] += 1
            return
        if not result:
            self.counters["plans_failed"] += 1
            self._log("warning", "MoveItPy could not plan the step")
            return
        self.counters["plans_ok"] += 1
        self.counters["executions"] += 1
        self._moveit.execute(result.trajectory, controllers=[])

    def stop(self, reason: str) -> None:
        was_active = self._active
        self._active = False
        self._worker.stop()
        if was_active:
            self.counters["stops"] += 1
            self.counters[f"stop_{reason}"] += 1

    def stats(self) -> dict:
        return {"motion_backend": self.name, **dict(self.counters), **dict(self._worker.counters),
                "moveit_busy": self._worker.busy, "moveit_last_error": self._worker.last_error}

    def close(self) -> None:
        self._worker.close()


def make_motion_backend(node, p, callback_group) -> MotionBackend:
    """The backend named by p.motion_backend. Raises NodeStartupError (one line) if it cannot run.

    `p` is the node's parameter namespace (declare_params over PARAMS plus the policy's
    `command_frame`, `control_rate_hz`, `ee_link`, `gripper_topic`).
    """
    name = p.motion_backend
    if name not in BACKENDS:
        raise NodeStartupError(f"motion_backend {name!r} is not one of {BACKENDS}")
    if name == "moveit_py":
        return MoveItPyBackend(node, p, callback_group)
    return ServoBackend(node, p, callback_group)
