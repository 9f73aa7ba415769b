"""teleop_node: keyboard teleoperation, or the simulator's scripted expert, as Servo commands.

Both modes publish the same three things for every control step:

* the real command: geometry_msgs/TwistStamped on `twist_topic` (`/servo_node/delta_twist_cmds`,
  header.frame_id = `frame_id`, stamped with the node clock) and std_msgs/Float64 on
  `gripper_topic` (`/gripper/command`, -1 open .. 1 closed);
* the action it corresponds to, for the recorder: sensor_msgs/JointState on `~/action`
  (`/teleop_node/action`), `name` = action names, `position` = values (environment units).

A per-step action `a` becomes a velocity held for one control period:
`linear = a[0:3] * translation_scale_m * rate_hz`, `angular = a[3:6] * rotation_scale_rad * rate_hz`.
`rate_hz` must be the rate at which the robot/sim consumes commands (sim_node's `rate_hz`).

mode `keyboard` (stdin must be a terminal; run it with `ros2 run ire_vla_ros teleop_node`):

    w / s   +x / -x          u / o   +roll / -roll    (7-D action spec only)
    a / d   +y / -y          i / k   +pitch / -pitch
    r / f   +z / -z          j / l   +yaw / -yaw
    space   toggle gripper (open <-> closed)
    + / -   faster / slower (action magnitude 0.1 .. 1.0)
    x       stop all motion now
    Ctrl-C  quit

A terminal reports key presses, not releases: a key moves the arm for `key_hold_s` after its
last (auto-repeated) press, so holding a key moves continuously.

mode `scripted_expert` (simulation): forwards every `~/expert_action` message of sim_node (the
scripted Metaworld policy's action for that observation), plus Gaussian noise of std
`action_noise` (clipped to the action bounds). The recorded action keeps the expert message's
stamp, i.e. the stamp of the image the expert acted on.

Services: `~/enable` (std_srvs/SetBool) pauses/resumes publishing (e.g. while the policy drives);
pausing publishes one zero twist, so Servo stops at once instead of after its command timeout.

MoveIt Servo (Jazzy) accepts twists only after its command type is switched to TWIST, and forgets
the type when it restarts: at start-up and on every `~/enable true` the node calls
`servo_switch_service` (moveit_msgs/srv/ServoCommandType, retried while Servo is not up; when
moveit_msgs does not import it logs the `ros2 service call` to do by hand) and unpauses Servo
(`servo_pause_service`, std_srvs/SetBool false) in case an e-stop paused it.
"""
from __future__ import annotations

import os
import select
import sys
import threading
import time

import numpy as np
from geometry_msgs.msg import TwistStamped
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64
from std_srvs.srv import SetBool

from ire_vla_ros.nodes.motion_backends import ServoModeClient
from ire_vla_ros.nodes.ros_common import COMMAND_QOS, RELIABLE_QOS, NodeStartupError, P, declare_params, run_node
from ire_vla_ros.vla.action_spec import EE_DELTA_7D, METAWORLD_4D, ActionSpec

SPECS = {"metaworld_4d": METAWORLD_4D, "ee_delta_7d": EE_DELTA_7D}
MODES = ("keyboard", "scripted_expert")

#: key -> (action component name, sign)
MOTION_KEYS = {
    "w": ("dx", 1.0), "s": ("dx", -1.0),
    "a": ("dy", 1.0), "d": ("dy", -1.0),
    "r": ("dz", 1.0), "f": ("dz", -1.0),
    "u": ("droll", 1.0), "o": ("droll", -1.0),
    "i": ("dpitch", 1.0), "k": ("dpitch", -1.0),
    "j": ("dyaw", 1.0), "l": ("dyaw", -1.0),
}
KEY_HELP = """\
    w / s   +x / -x          u / o   +roll / -roll    (7-D action spec only)
    a / d   +y / -y          i / k   +pitch / -pitch
    r / f   +z / -z          j / l   +yaw / -yaw
    space   toggle gripper (open <-> closed)
    + / -   faster / slower (action magnitude 0.1 .. 1.0)
    x       stop all motion now
    Ctrl-C  quit"""


# ---------------------------------------------------------------------------------------------
# Plain logic (no ROS)
# ---------------------------------------------------------------------------------------------
def action_to_command(action: np.ndarray, spec: ActionSpec, rate_hz: float):
    """Per-step action -> (linear xyz m/s, angular xyz rad/s, gripper or None)."""
    a = np.asarray(action, np.float64)
    lin, ang = np.zeros(3), np.zeros(3)
    for i, n in enumerate(("dx", "dy", "dz")):
        j = spec.index(n)
        if j is not None:
            lin[i] = a[j] * spec.translation_scale_m * rate_hz
    for i, n in enumerate(("droll", "dpitch", "dyaw")):
        j = spec.index(n)
        if j is not None:
            ang[i] = a[j] * spec.rotation_scale_rad * rate_hz
    g = spec.index("gripper")
    return lin, ang, (None if g is None else float(a[g]))


class KeyboardMapper:
    """Key presses -> the current action (held for `hold_s` after the last press of each key)."""

    def __init__(self, spec: ActionSpec, *, hold_s: float = 0.25, magnitude: float = 0.5):
        self.spec = spec
        self.hold_s = float(hold_s)
        self.magnitude = float(magnitude)
        self.gripper = -1.0  # open
        self._held: dict[str, tuple[float, float]] = {}  # component -> (sign, until)

    def press(self, key: str, now: float) -> str | None:
        """Apply one key; returns a short description (for logging) or None if ignored."""
        if key in MOTION_KEYS:
            name, sign = MOTION_KEYS[key]
            if self.spec.index(name) is None:
                return None
            self._held[name] = (sign, now + self.hold_s)
            return f"{'+' if sign > 0 else '-'}{name}"
        if key == " ":
            self.gripper = 1.0 if self.gripper < 0 else -1.0
            return "gripper " + ("closed" if self.gripper > 0 else "open")
        if key in "+=":
            self.magnitude = min(1.0, round(self.magnitude + 0.1, 2))
            return f"magnitude {self.magnitude:.1f}"
        if key in "-_":
            self.magnitude = max(0.1, round(self.magnitude - 0.1, 2))
            return f"magnitude {self.magnitude:.1f}"
        if key == "x":
            self._held.clear()
            return "stop"
        return None

    def action(self, now: float) -> np.ndarray:
        a = np.zeros(self.spec.dim, np.float32)
        for name, (sign, until) in list(self._held.items()):
            if now >= until:
                del self._held[name]
                continue
            a[self.spec.index(name)] = sign * self.magnitude
        g = self.spec.index("gripper")
        if g is not None:
            a[g] = self.gripper
        return self.spec.clip(a)

    @property
    def moving(self) -> bool:
        return bool(self._held)


class NoisyForwarder:
    """Expert action + Gaussian noise, clipped to the spec's bounds."""

    def __init__(self, spec: ActionSpec, noise_std: float = 0.0, seed: int | None = None,
                 noise_gripper: bool = False):
        self.spec = spec
        self.noise_std = float(noise_std)
        self.rng = np.random.default_rng(seed)
        self.mask = np.ones(spec.dim, np.float32)
        g = spec.index("gripper")
        if g is not None and not noise_gripper:
            self.mask[g] = 0.0

    def __call__(self, action) -> np.ndarray:
        a = np.asarray(action, np.float32)
        if a.shape != (self.spec.dim,):
            raise ValueError(f"expert action has {a.size} values, the action spec {self.spec.dim}")
        if self.noise_std > 0:
            a = a + self.mask * self.rng.normal(0.0, self.noise_std, a.shape).astype(np.float32)
        return self.spec.clip(a)


class StdinKeys:
    """Reads single key presses from a terminal in cbreak mode on a thread; restores the terminal."""

    def __init__(self, on_key, stream=None):
        self.stream = stream or sys.stdin
        self.on_key = on_key
        self._stop = threading.Event()
        self._saved = None
        self._thread = None

    @staticmethod
    def available(stream=None) -> bool:
        stream = stream or sys.stdin
        try:
            return stream.isatty()
        except (AttributeError, ValueError):
            return False

    def start(self) -> None:
        import termios
        import tty

        fd = self.stream.fileno()
        self._saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)  # single keys, no echo; Ctrl-C still raises SIGINT
        self._thread = threading.Thread(target=self._run, name="teleop-keys", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = self.stream.fileno()
        while not self._stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            data = os.read(fd, 64)
            if not data:
                break
            for ch in data.decode(errors="ignore"):
                self.on_key(ch)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self._saved)
            self._saved = None


# ---------------------------------------------------------------------------------------------
# Node
# ---------------------------------------------------------------------------------------------
class TeleopNode(Node):
    PARAMS = {
        "mode": P("keyboard", "keyboard | scripted_expert", read_only=True, constraints="keyboard, scripted_expert"),
        "action_spec": P("ee_delta_7d", "Action layout: ee_delta_7d (robot) | metaworld_4d (sim)", read_only=True),
        "rate_hz": P(10.0, "Control rate of the robot/sim; keyboard publish rate; velocity = action * scale * rate",
                     min=0.5, max=500.0, read_only=True),
        "frame_id": P("base_link", "frame_id of the twist commands (Servo transforms it to its planning frame)"),
        "enabled": P(True, "Publish commands (also settable with ~/enable)"),
        "action_noise": P(0.0, "scripted_expert: std of Gaussian noise added to the expert action", min=0.0),
        "noise_gripper": P(False, "scripted_expert: add noise to the gripper too"),
        "noise_seed": P(-1, "scripted_expert: noise RNG seed (-1: random)", read_only=True),
        "key_hold_s": P(0.25, "keyboard: a key moves the arm this long after its last press", min=0.05),
        "key_magnitude": P(0.5, "keyboard: initial action magnitude (+/- change it)", min=0.1, max=1.0),
        "publish_when_idle": P(True, "keyboard: publish zero-motion steps when no key is held"),
        "twist_topic": P("/servo_node/delta_twist_cmds", "Twist command output (MoveIt Servo)", read_only=True),
        "gripper_topic": P("/gripper/command", "Gripper command output", read_only=True),
        "expert_topic": P("/sim_node/expert_action", "scripted_expert: expert action input", read_only=True),
        "servo_switch_service": P("/servo_node/switch_command_type", "moveit_msgs/srv/ServoCommandType: "
                                  "switched to TWIST at start and on ~/enable true ('' = do not call)",
                                  read_only=True),
        "servo_pause_service": P("/servo_node/pause_servo", "std_srvs/SetBool: Servo unpaused at start and on "
                                 "~/enable true ('' = do not call)", read_only=True),
        "servo_retry_period_s": P(1.0, "Retry period of the Servo calls while Servo is not up", min=0.05,
                                  max=60.0, read_only=True),
        "servo_retry_max": P(60, "Attempts per Servo request before giving up", min=1, max=100000,
                             read_only=True),
    }

    def __init__(self, *, stdin=None, **kwargs):
        super().__init__("teleop_node", **kwargs)
        self.p = declare_params(self, self.PARAMS)
        if self.p.mode not in MODES:
            raise NodeStartupError(f"mode must be one of {MODES}, got {self.p.mode!r}")
        spec = SPECS.get(self.p.action_spec)
        if spec is None:
            raise NodeStartupError(f"action_spec must be one of {sorted(SPECS)}, got {self.p.action_spec!r}")
        self.spec = spec
        self.enabled = bool(self.p.enabled)
        self.steps = 0
        self.zero_twists = 0
        self.twist_pub = self.create_publisher(TwistStamped, self.p.twist_topic, COMMAND_QOS)
        self.gripper_pub = self.create_publisher(Float64, self.p.gripper_topic, COMMAND_QOS)
        self.action_pub = self.create_publisher(JointState, "~/action", RELIABLE_QOS)
        self.create_service(SetBool, "~/enable", self._on_enable)
        self.servo = ServoModeClient(self, "TWIST", self.p.servo_switch_service, self.p.servo_pause_service,
                                     retry_period_s=self.p.servo_retry_period_s, retry_max=self.p.servo_retry_max)
        if self.enabled:
            self.servo.activate()
        self.keys = None
        self.mapper = None
        if self.p.mode == "scripted_expert":
            seed = None if self.p.noise_seed < 0 else self.p.noise_seed
            self.forward = NoisyForwarder(spec, self.get_parameter("action_noise").value, seed,
                                          noise_gripper=self.p.noise_gripper)
            self.create_subscription(JointState, self.p.expert_topic, self._on_expert, RELIABLE_QOS)
            self.get_logger().info(
                f"scripted expert: forwarding {self.p.expert_topic} (+ noise std {self.p.action_noise}) "
                f"as {self.p.twist_topic} in '{self.p.frame_id}' at an assumed {self.p.rate_hz:g} Hz")
        else:
            self.mapper = KeyboardMapper(spec, hold_s=self.p.key_hold_s, magnitude=self.p.key_magnitude)
            self._key_lock = threading.Lock()
            stream = stdin or sys.stdin
            if StdinKeys.available(stream):
                self.keys = StdinKeys(self._on_key, stream)
                self.keys.start()
                self.get_logger().info(f"keyboard teleop ({self.p.action_spec}), keys:\n{KEY_HELP}")
            else:
                self.get_logger().error(
                    "keyboard mode needs a terminal on stdin (not available under `ros2 launch`): "
                    "run `ros2 run ire_vla_ros teleop_node` in its own terminal. Publishing nothing.")
            self.create_timer(1.0 / self.p.rate_hz, self._on_tick)

    # publishing --------------------------------------------------------------------------
    def publish_action(self, action: np.ndarray, action_stamp=None) -> None:
        try:
            self._publish_action(action, action_stamp)
        except Exception:
            if self.context.ok():
                raise  # a real error; otherwise we are shutting down mid-publish

    def _publish_action(self, action: np.ndarray, action_stamp=None) -> None:
        now = self.get_clock().now().to_msg()
        lin, ang, grip = action_to_command(action, self.spec, self.p.rate_hz)
        tw = TwistStamped()
        tw.header.stamp = now
        tw.header.frame_id = self.get_parameter("frame_id").value
        tw.twist.linear.x, tw.twist.linear.y, tw.twist.linear.z = (float(v) for v in lin)
        tw.twist.angular.x, tw.twist.angular.y, tw.twist.angular.z = (float(v) for v in ang)
        self.twist_pub.publish(tw)
        if grip is not None:
            self.gripper_pub.publish(Float64(data=grip))
        js = JointState()
        js.header.stamp = action_stamp if action_stamp is not None else now
        js.name = list(self.spec.names)
        js.position = [float(v) for v in action]
        self.action_pub.publish(js)
        self.steps += 1

    # callbacks ----------------------------------------------------------------------------
    def _on_expert(self, msg: JointState) -> None:
        if not self.enabled:
            return
        if list(msg.name) != list(self.spec.names):
            self.get_logger().error(f"expert action names {list(msg.name)} != {list(self.spec.names)}",
                                    throttle_duration_sec=5.0)
            return
        self.forward.noise_std = float(self.get_parameter("action_noise").value)
        self.publish_action(self.forward(msg.position), action_stamp=msg.header.stamp)

    def _on_key(self, key: str) -> None:  # keyboard thread
        with self._key_lock:
            what = self.mapper.press(key, time.monotonic())
        if what is not None and what.split()[0] in ("gripper", "magnitude", "stop"):
            self.get_logger().info(what)

    def _on_tick(self) -> None:
        if not self.enabled or self.keys is None:
            return
        with self._key_lock:
            moving = self.mapper.moving
            action = self.mapper.action(time.monotonic())
        if moving or self.p.publish_when_idle:
            self.publish_action(action)

    def _on_enable(self, req, resp):
        was = self.enabled
        self.enabled = bool(req.data)
        if self.enabled:
            self.servo.activate()  # a restarted Servo has forgotten the type; never blocks
        elif was:
            self._publish_zero_twist()  # Servo stops now, not after its incoming_command_timeout
        resp.success = True
        resp.message = "teleop enabled" if self.enabled else "teleop paused"
        self.get_logger().info(resp.message)
        return resp

    def _publish_zero_twist(self) -> None:
        """Stop Servo now (a zero twist), without an ~/action for the recorder: no step was taken."""
        tw = TwistStamped()
        tw.header.stamp = self.get_clock().now().to_msg()
        tw.header.frame_id = self.get_parameter("frame_id").value
        self.twist_pub.publish(tw)
        self.zero_twists += 1

    def destroy_node(self):
        self.servo.close()
        if self.keys is not None:
            self.keys.stop()
        return super().destroy_node()


def main(args=None):
    return run_node(
        TeleopNode, args, params=TeleopNode.PARAMS,
        description="Keyboard teleoperation or the simulator's scripted expert, published as MoveIt Servo "
                    "twist + gripper commands and as actions for the recorder.\n\nKeys (mode keyboard):\n" + KEY_HELP,
    )


if __name__ == "__main__":
    raise SystemExit(main())
