"""policy_node: runs the VLA policy on camera + joint states and streams safe commands to the arm.

Interface (defaults; every topic is a parameter, see config/policy_node.yaml)
  subscribes  /camera/image_raw        sensor_msgs/Image         sensor-data QoS (best effort)
              /joint_states            sensor_msgs/JointState    merged by name (split publishers ok)
              /ee_pose                 geometry_msgs/PoseStamped EE pose in `command_frame`
              /estop                   std_msgs/Bool             true latches a stop until false
              ~/instruction            std_msgs/String           transient-local (latched)
  publishes   /servo_node/delta_twist_cmds  geometry_msgs/TwistStamped   (motion_backend servo_twist)
              /servo_node/pose_target_cmds  geometry_msgs/PoseStamped    (motion_backend servo_pose)
              /gripper/command         std_msgs/Float64          gripper action in [-1 open, 1 closed]
              ~/action                 sensor_msgs/JointState    for the recorder, layout below
              /diagnostics             diagnostic_msgs/DiagnosticArray  ~1 Hz
  services    ~/enable  std_srvs/SetBool   the node starts DISABLED: no command until enabled
              ~/explore std_srvs/SetBool   true: sample from the policy, false: mean action
              ~/reload  std_srvs/Trigger   load the newest checkpoint in the background; a failed
                                           load keeps the running model and the response says why
  client      /servo_node/switch_command_type  moveit_msgs/ServoCommandType (when moveit_msgs imports)

`~/action` layout (one message per command actually sent):
  header.stamp = the stamp of the camera image the action was computed from
  name     = action_spec.names + ["log_prob", "value"]   e.g. [dx, dy, dz, gripper, log_prob, value]
  position = the policy's action in environment units (as sampled, before the safety filter)
             + [log_prob of that action, critic value]
The recorder pairs it with the image by stamp; log_prob refers to the recorded (unfiltered) action,
which is what PPO needs. The safety filter is part of the environment from the policy's view.

Control loop (timer, own callback group): e-stop / freshness checks -> joint lookup by the
checkpoint's joint names -> image decode (cv_bridge if it imports, else the built-in converter) and
resize to the model input (cv2.INTER_AREA) -> policy.act -> SafetyFilter -> command + gripper +
~/action. Sensor callbacks only cache the newest message. Run `policy_node --help` for parameters.
"""
from __future__ import annotations

import math
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.time import Time
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float64, String
from std_srvs.srv import SetBool, Trigger

from ire_vla_ros.nodes.ros_common import (
    COMMAND_QOS,
    LATCHED_QOS,
    RELIABLE_QOS,
    SENSOR_QOS,
    NodeStartupError,
    P,
    declare_params,
    run_node,
)
from ire_vla_ros.robot.image_codec import ImageDecodeError, make_decoder, resize_rgb
from ire_vla_ros.robot.motion import pose_after_delta, twist_from_delta
from ire_vla_ros.robot.safety import Reason, SafetyConfig, SafetyFilter
from ire_vla_ros.robot.stats import RateMeter, RollingStats

BACKENDS = ("servo_twist", "servo_pose", "moveit_py")

PARAMS = {
    "checkpoint": P("models/metaworld_tiny",
                    "Checkpoint directory, or a root holding a `latest` pointer (followed at start and on "
                    "~/reload). A relative path not found from the working directory is taken relative to "
                    "the package share directory (models/ lives there)."),
    "device": P("auto", "Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:N"),
    "torch_num_threads": P(1, "torch.set_num_threads for CPU inference (0 = torch default). 1 avoids "
                           "thread oversubscription next to the ROS executor on small machines", min=0, max=256),
    "control_rate_hz": P(10.0, "Policy / command rate. Keep 1/rate below Servo's incoming_command_timeout "
                         "(0.1 s default) or raise that timeout", min=0.5, max=100.0, read_only=True),
    "default_instruction": P("", "Instruction until one arrives on ~/instruction; empty = the checkpoint's "
                             "metadata `instruction` if any"),
    "image_topic": P("/camera/image_raw", "sensor_msgs/Image input (sensor-data QoS)", read_only=True),
    "joint_states_topic": P("/joint_states", "sensor_msgs/JointState input", read_only=True),
    "ee_pose_topic": P("/ee_pose", "geometry_msgs/PoseStamped EE pose in command_frame", read_only=True),
    "ee_link": P("", "If set, the EE pose comes from TF (command_frame <- ee_link, needs tf2_ros) instead "
                 "of ee_pose_topic", read_only=True),
    "estop_topic": P("/estop", "std_msgs/Bool e-stop: true stops commands until false arrives", read_only=True),
    "gripper_topic": P("/gripper/command", "std_msgs/Float64 gripper command", read_only=True),
    "motion_backend": P("servo_twist", "servo_twist | servo_pose | moveit_py", read_only=True,
                        constraints="one of servo_twist, servo_pose, moveit_py"),
    "command_frame": P("base_link", "frame_id of commands; the workspace box and EE pose are in it"),
    "twist_topic": P("/servo_node/delta_twist_cmds", "TwistStamped output (servo_twist)", read_only=True),
    "pose_topic": P("/servo_node/pose_target_cmds", "PoseStamped output (servo_pose)", read_only=True),
    "servo_switch_service": P("/servo_node/switch_command_type",
                              "moveit_msgs/srv/ServoCommandType service ('' = do not call)", read_only=True),
    "moveit_planning_group": P("arm", "Planning group (moveit_py backend)", read_only=True),
    "moveit_pose_link": P("", "Link whose pose is commanded (moveit_py backend; '' = ee_link)", read_only=True),
    "prefer_cv_bridge": P(True, "Use cv_bridge when it imports (falls back to the built-in converter)",
                          read_only=True),
    "explore": P(False, "Initial exploration state (sample instead of mean action); see ~/explore"),
    "max_translation_m": P(0.02, "Per-step translation clamp (norm, metres)", min=0.0, max=0.5),
    "max_rotation_rad": P(0.1, "Per-step rotation clamp (norm, radians)", min=0.0, max=1.0),
    "workspace_enabled": P(True, "Clip steps to the workspace box (needs a fresh EE pose)"),
    "workspace_min_xyz": P([-0.6, -0.6, 0.0], "Workspace box lower corner (m, command_frame)"),
    "workspace_max_xyz": P([0.6, 0.6, 0.8], "Workspace box upper corner (m, command_frame)"),
    "stale_timeout_s": P(0.5, "No command when the newest image or joint state is older (receive time)",
                         min=0.01, max=10.0),
    "ee_pose_timeout_s": P(0.5, "No command when the EE pose is older (workspace box enabled)",
                           min=0.01, max=10.0),
    "diagnostics_period_s": P(1.0, "Period of /diagnostics", min=0.1, max=60.0, read_only=True),
}

DESCRIPTION = __doc__.split("\n\n")[0]


def _now_s(node: Node) -> float:
    return node.get_clock().now().nanoseconds * 1e-9


def _stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


class PolicyNode(Node):
    """One policy, one arm. See the module docstring for the interface."""

    def __init__(self, node_name: str = "policy_node", **kwargs):
        super().__init__(node_name, **kwargs)
        self.p = declare_params(self, PARAMS)
        p = self.p
        log = self.get_logger()
        if p.motion_backend not in BACKENDS:
            raise NodeStartupError(f"motion_backend {p.motion_backend!r} is not one of {BACKENDS}")
        self._MoveItPy = self._import_moveit_py() if p.motion_backend == "moveit_py" else None

        # ---- model ------------------------------------------------------------------------
        try:
            import torch

            from ire_vla_ros.vla.checkpoint import load_checkpoint, resolve_checkpoint
        except ImportError as exc:
            raise NodeStartupError(f"the policy needs torch and ire_vla_ros.vla: {exc}") from exc
        self._torch = torch
        self._load_checkpoint = load_checkpoint
        self._resolve_checkpoint = resolve_checkpoint
        if p.torch_num_threads > 0:
            torch.set_num_threads(int(p.torch_num_threads))
        self._device = self._resolve_device(p.device)
        self._checkpoint_arg = self._checkpoint_location(p.checkpoint)
        try:
            policy, ckpt = self._load(self._checkpoint_arg)
        except Exception as exc:  # CheckpointError and anything a broken checkpoint throws
            raise NodeStartupError(f"cannot load checkpoint {self._checkpoint_arg}: {exc}") from exc
        self._model_lock = threading.Lock()
        self._policy = policy
        self._checkpoint_path = ckpt
        self._input_size = self._model_input_size(policy)

        # ---- state --------------------------------------------------------------------------
        self._lock = threading.Lock()
        self._image_msg: Image | None = None
        self._image_rx: float | None = None
        self._joints: dict[str, tuple[float, float]] = {}   # name -> (position, rx time)
        self._joints_rx: float | None = None
        self._ee_pose: PoseStamped | None = None
        self._ee_rx: float | None = None
        self._instruction = p.default_instruction or self._metadata_instruction(ckpt)
        self._enabled = False
        self._explore = bool(p.explore)
        self._decoded_for = None      # the Image message the cached decode belongs to
        self._decoded = None          # its resized RGB array or the ImageDecodeError
        self._reload_lock = threading.Lock()

        try:
            safety_cfg = SafetyConfig(
                max_translation_m=p.max_translation_m, max_rotation_rad=p.max_rotation_rad,
                workspace_enabled=p.workspace_enabled, workspace_min=tuple(p.workspace_min_xyz),
                workspace_max=tuple(p.workspace_max_xyz), stale_timeout_s=p.stale_timeout_s,
                ee_pose_timeout_s=p.ee_pose_timeout_s,
            )
        except ValueError as exc:
            raise NodeStartupError(f"safety parameters: {exc}") from exc
        self._safety = SafetyFilter(safety_cfg, policy.action_spec)
        self.counters: Counter = Counter(
            {"commands_sent": 0, "rejected_images": 0, "missing_joints": 0, "inference_errors": 0,
             "ee_frame_mismatch": 0, "reloads_ok": 0, "reloads_failed": 0}
        )
        self.latency_ms = RollingStats(200)      # image stamp -> command publish
        self.inference_ms = RollingStats(200)
        self.image_delay_ms = RollingStats(200)  # image stamp -> received by this node (transport)
        self.image_age_ms = RollingStats(200)    # image stamp -> picked up by a control tick
        self._cmd_rate = RateMeter(5.0)
        self._decoder = make_decoder(p.prefer_cv_bridge)

        # ---- EE pose from TF (optional) --------------------------------------------------------
        self._tf_buffer = None
        if p.ee_link:
            try:
                from tf2_ros import Buffer, TransformListener  # noqa: PLC0415
            except Exception as exc:
                raise NodeStartupError(f"ee_link is set ({p.ee_link!r}) but tf2_ros does not import ({exc}); "
                                       f"publish the EE pose on {p.ee_pose_topic!r} and leave ee_link empty") from exc
            self._tf_buffer = Buffer()
            self._tf_listener = TransformListener(self._tf_buffer, self)

        # ---- motion backend ---------------------------------------------------------------------
        self._moveit = None
        if p.motion_backend == "moveit_py":
            self._setup_moveit_py()

        # ---- ROS interfaces -----------------------------------------------------------------------
        self._sensor_group = ReentrantCallbackGroup()
        self._control_group = MutuallyExclusiveCallbackGroup()
        self._service_group = ReentrantCallbackGroup()
        self._diag_group = MutuallyExclusiveCallbackGroup()

        self.create_subscription(Image, p.image_topic, self._on_image, SENSOR_QOS,
                                 callback_group=self._sensor_group)
        self.create_subscription(JointState, p.joint_states_topic, self._on_joints, SENSOR_QOS,
                                 callback_group=self._sensor_group)
        if not p.ee_link:
            self.create_subscription(PoseStamped, p.ee_pose_topic, self._on_ee_pose, SENSOR_QOS,
                                     callback_group=self._sensor_group)
        self.create_subscription(Bool, p.estop_topic, self._on_estop, RELIABLE_QOS,
                                 callback_group=self._sensor_group)
        self.create_subscription(String, "~/instruction", self._on_instruction, LATCHED_QOS,
                                 callback_group=self._sensor_group)

        self._twist_pub = (self.create_publisher(TwistStamped, p.twist_topic, COMMAND_QOS)
                           if p.motion_backend == "servo_twist" else None)
        self._pose_pub = (self.create_publisher(PoseStamped, p.pose_topic, COMMAND_QOS)
                          if p.motion_backend == "servo_pose" else None)
        self._gripper_pub = self.create_publisher(Float64, p.gripper_topic, COMMAND_QOS)
        self._action_pub = self.create_publisher(JointState, "~/action", RELIABLE_QOS)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

        self.create_service(SetBool, "~/enable", self._srv_enable, callback_group=self._service_group)
        self.create_service(SetBool, "~/explore", self._srv_explore, callback_group=self._service_group)
        self.create_service(Trigger, "~/reload", self._srv_reload, callback_group=self._service_group)

        self._period = 1.0 / p.control_rate_hz
        self._timer = self.create_timer(self._period, self._tick, callback_group=self._control_group)
        self._diag_timer = self.create_timer(p.diagnostics_period_s, self._publish_diagnostics,
                                             callback_group=self._diag_group)

        self._servo_client = None
        self._servo_switch_timer = None
        if p.motion_backend in ("servo_twist", "servo_pose") and p.servo_switch_service:
            self._setup_servo_switch()

        if self._period >= 0.1:
            log.warning(f"control_rate_hz={p.control_rate_hz}: a command period of {self._period:.3f} s is not "
                        "below MoveIt Servo's default incoming_command_timeout (0.1 s); Servo will halt "
                        "between commands unless that timeout is raised (see config/policy_node.yaml)")
        log.info(f"loaded {ckpt} on {self._device}: action {list(policy.action_spec.names)}, "
                 f"{len(policy.joint_names)} joints, input {self._input_size}; backend {p.motion_backend}, "
                 f"image decoder {self._decoder.name}; DISABLED until ~/enable")

    # ======================================================================== model loading
    def _resolve_device(self, device: str) -> str:
        torch = self._torch
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise NodeStartupError(f"device {device!r} requested but CUDA is not available")
        return device

    @staticmethod
    def _checkpoint_location(arg: str) -> Path:
        path = Path(arg).expanduser()
        if path.is_absolute() or path.exists():
            return path
        from ire_vla_ros.paths import share_dir

        return share_dir() / path

    def _load(self, location: Path):
        ckpt = self._resolve_checkpoint(location)
        policy = self._load_checkpoint(ckpt, device=self._device)
        policy.eval()
        return policy, ckpt

    @staticmethod
    def _model_input_size(policy):
        size = getattr(getattr(policy, "backbone", None), "image_size", None)
        if size is None:
            size = getattr(getattr(getattr(policy, "cfg", None), "backbone", None), "image_size", None)
        return int(size) if size else None

    def _metadata_instruction(self, ckpt: Path) -> str:
        try:
            import json

            meta = json.loads((Path(ckpt) / "metadata.json").read_text())
            return str(meta.get("instruction", "") or "")
        except Exception:
            return ""

    # ======================================================================== backends
    def _import_moveit_py(self):
        """Imported only when motion_backend is moveit_py; checked before the model loads."""
        try:
            from moveit.planning import MoveItPy  # noqa: PLC0415
        except Exception as exc:
            raise NodeStartupError(
                f"motion_backend 'moveit_py' needs MoveIt's Python bindings (package moveit_py, module "
                f"moveit.planning), which do not import here ({type(exc).__name__}: {exc}). Install "
                f"ros-jazzy-moveit-py or use motion_backend servo_twist / servo_pose") from exc
        if not (self.p.moveit_pose_link or self.p.ee_link):
            raise NodeStartupError("motion_backend 'moveit_py' needs moveit_pose_link (or ee_link)")
        return MoveItPy

    def _setup_moveit_py(self) -> None:  # pragma: no cover - needs MoveIt
        self._moveit = self._MoveItPy(node_name=f"{self.get_name()}_moveit_py")
        self._moveit_arm = self._moveit.get_planning_component(self.p.moveit_planning_group)
        self.get_logger().warning("moveit_py backend plans and executes every step: expect far less than "
                                  "control_rate_hz; stream through MoveIt Servo for closed-loop control")

    def _setup_servo_switch(self) -> None:
        try:
            from moveit_msgs.srv import ServoCommandType  # noqa: PLC0415
        except Exception as exc:
            self.get_logger().warning(
                f"moveit_msgs does not import ({type(exc).__name__}); could not call "
                f"{self.p.servo_switch_service}: set Servo's command type to "
                f"{'TWIST' if self.p.motion_backend == 'servo_twist' else 'POSE'} yourself")
            return
        self._servo_srv_type = ServoCommandType
        self._servo_client = self.create_client(ServoCommandType, self.p.servo_switch_service,
                                                callback_group=self._service_group)
        self._servo_switch_tries = 0
        self._servo_switch_timer = self.create_timer(1.0, self._try_servo_switch,
                                                     callback_group=self._service_group)

    def _try_servo_switch(self) -> None:
        self._servo_switch_tries += 1
        if not self._servo_client.service_is_ready():
            if self._servo_switch_tries in (5, 30):
                self.get_logger().warning(f"{self.p.servo_switch_service} not available yet")
            if self._servo_switch_tries >= 60:
                self.get_logger().error(f"gave up calling {self.p.servo_switch_service} after 60 s")
                self._servo_switch_timer.cancel()
            return
        self._servo_switch_timer.cancel()
        req = self._servo_srv_type.Request()
        name = "TWIST" if self.p.motion_backend == "servo_twist" else "POSE"
        req.command_type = int(getattr(self._servo_srv_type.Request, name, 1 if name == "TWIST" else 2))
        future = self._servo_client.call_async(req)

        def done(fut):
            try:
                ok = bool(fut.result().success)
            except Exception as exc:  # pragma: no cover - depends on Servo
                self.get_logger().error(f"switch_command_type failed: {exc}")
                return
            if ok:
                self.get_logger().info(f"Servo command type -> {name}")
            else:
                self.get_logger().error(f"Servo refused command type {name}")

        future.add_done_callback(done)

    # ======================================================================== callbacks: cache only
    def _on_image(self, msg: Image) -> None:
        now_ns = self.get_clock().now().nanoseconds
        with self._lock:
            self._image_msg, self._image_rx = msg, now_ns * 1e-9
        stamp_ns = _stamp_ns(msg.header.stamp)
        if stamp_ns > 0:
            self.image_delay_ms.add((now_ns - stamp_ns) * 1e-6)

    def _on_joints(self, msg: JointState) -> None:
        now = _now_s(self)
        with self._lock:
            for name, pos in zip(msg.name, msg.position):
                self._joints[name] = (pos, now)
            self._joints_rx = now

    def _on_ee_pose(self, msg: PoseStamped) -> None:
        now = _now_s(self)
        with self._lock:
            self._ee_pose, self._ee_rx = msg, now

    def _on_estop(self, msg: Bool) -> None:
        if self._safety.set_estop(bool(msg.data)):
            if msg.data:
                self.get_logger().error("E-STOP latched: no commands until false arrives")
            else:
                self.get_logger().info("e-stop released")

    def _on_instruction(self, msg: String) -> None:
        with self._lock:
            changed = msg.data != self._instruction
            self._instruction = msg.data
        if changed:
            self.get_logger().info(f"instruction: {msg.data!r}")

    # ======================================================================== services
    def _srv_enable(self, req: SetBool.Request, resp: SetBool.Response):
        self._enabled = bool(req.data)
        resp.success = True
        resp.message = ("enabled" if self._enabled else "disabled") + (
            " (e-stop latched: no commands until released)" if self._safety.estop_active else "")
        self.get_logger().info(f"~/enable: {resp.message}")
        return resp

    def _srv_explore(self, req: SetBool.Request, resp: SetBool.Response):
        self._explore = bool(req.data)
        resp.success = True
        resp.message = "sampling actions" if self._explore else "mean actions"
        self.get_logger().info(f"~/explore: {resp.message}")
        return resp

    def _srv_reload(self, req: Trigger.Request, resp: Trigger.Response):
        """Loads in a worker thread; this callback (own group) waits for it, control ticks go on."""
        if not self._reload_lock.acquire(blocking=False):
            resp.success, resp.message = False, "a reload is already running"
            return resp
        try:
            result: dict = {}

            def work():
                try:
                    result["policy"], result["ckpt"] = self._load(self._checkpoint_arg)
                except Exception as exc:
                    result["error"] = f"{type(exc).__name__}: {exc}"

            t = threading.Thread(target=work, name="policy_reload", daemon=True)
            t.start()
            t.join()
            if "error" in result:
                self.counters["reloads_failed"] += 1
                resp.success = False
                resp.message = f"kept {self._checkpoint_path}: {result['error']}"
                self.get_logger().error(f"~/reload failed, {resp.message}")
                return resp
            new, ckpt = result["policy"], result["ckpt"]
            with self._model_lock:  # between ticks
                old = self._checkpoint_path
                self._policy, self._checkpoint_path = new, ckpt
                self._input_size = self._model_input_size(new)
                self._safety.set_action_spec(new.action_spec)
                self._decoded_for = None
            self.counters["reloads_ok"] += 1
            resp.success = True
            resp.message = f"loaded {ckpt} (was {old})"
            self.get_logger().info(f"~/reload: {resp.message}")
            return resp
        finally:
            self._reload_lock.release()

    # ======================================================================== control loop
    # rclpy fixes a log call site's severity and throttle state: every reason logs from its own line.

    def _ee_state(self, now: float):
        """(position (3,), quaternion xyzw (4,), receive/stamp time) or (None, None, None)."""
        if self._tf_buffer is not None:
            try:
                tf = self._tf_buffer.lookup_transform(self.p.command_frame, self.p.ee_link, Time())
            except Exception:
                return None, None, None
            t, q = tf.transform.translation, tf.transform.rotation
            stamp = _stamp_ns(tf.header.stamp) * 1e-9
            return np.array([t.x, t.y, t.z]), np.array([q.x, q.y, q.z, q.w]), stamp
        with self._lock:
            msg, rx = self._ee_pose, self._ee_rx
        if msg is None:
            return None, None, None
        if msg.header.frame_id and msg.header.frame_id.lstrip("/") != self.p.command_frame.lstrip("/"):
            self.counters["ee_frame_mismatch"] += 1
            self.get_logger().error(
                f"EE pose is in {msg.header.frame_id!r}, commands in {self.p.command_frame!r}: publish the "
                "pose in command_frame (or set ee_link to use TF); no command", throttle_duration_sec=1.0)
            return None, None, None
        po, q = msg.pose.position, msg.pose.orientation
        return np.array([po.x, po.y, po.z]), np.array([q.x, q.y, q.z, q.w]), rx

    def _tick(self) -> None:
        if not self._enabled:
            return
        now = _now_s(self)
        with self._model_lock:
            policy = self._policy
            joint_names = policy.joint_names
            with self._lock:
                image_msg, image_rx = self._image_msg, self._image_rx
                present = [self._joints[n] for n in joint_names if n in self._joints]
                missing = [n for n in joint_names if n not in self._joints]
                joints_rx = min((rx for _, rx in present), default=self._joints_rx)
                instruction = self._instruction
            ee_pos, ee_quat, ee_time = self._ee_state(now)
            pre = self._safety.precheck(now, image_rx, joints_rx, ee_time)
            if not pre.ok:
                if pre.reason != Reason.ESTOP:
                    self.get_logger().warning(f"no command: {pre.reason}", throttle_duration_sec=2.0)
                return
            if self.p.motion_backend != "servo_twist" and (
                    ee_time is None or now - ee_time > self._safety.config.ee_pose_timeout_s):
                self.counters["ee_pose_unknown"] += 1
                self.get_logger().warning(f"{self.p.motion_backend} needs a fresh EE pose; no command",
                                          throttle_duration_sec=1.0)
                return
            if missing:
                self.counters["missing_joints"] += 1
                self.get_logger().error(f"joint_states lacks {missing} (policy joints {joint_names}); "
                                        "no command", throttle_duration_sec=1.0)
                return
            state = np.array([pos for pos, _ in present], dtype=np.float32)
            if not np.all(np.isfinite(state)):
                self.counters["missing_joints"] += 1
                self.get_logger().error("non-finite joint positions; no command", throttle_duration_sec=1.0)
                return
            img_ns = _stamp_ns(image_msg.header.stamp)
            if img_ns > 0:
                self.image_age_ms.add(now * 1e3 - img_ns * 1e-6)
            image = self._decode(image_msg)
            if image is None:
                return
            t0 = time.perf_counter()
            try:
                res = policy.act(image, state, instruction, deterministic=not self._explore)
            except Exception as exc:
                self.counters["inference_errors"] += 1
                self.get_logger().error(f"policy.act failed: {type(exc).__name__}: {exc}",
                                        throttle_duration_sec=1.0)
                return
            self.inference_ms.add((time.perf_counter() - t0) * 1e3)
            action = np.asarray(res.action, dtype=np.float32).reshape(-1)
            out = self._safety.apply(action, ee_pos)
            if not out.ok:
                self.get_logger().warning(f"action dropped: {out.reason} ({action.tolist()})",
                                          throttle_duration_sec=1.0)
                return
            if out.modified:
                self.get_logger().info(f"action limited: {out.modified}", throttle_duration_sec=2.0)
            if not self._publish_command(out.delta, ee_pos, ee_quat):
                return
            pub_time = self.get_clock().now()
            self._publish_action(image_msg, policy.action_spec, action, res.log_prob, res.value)
        self.counters["commands_sent"] += 1
        self._cmd_rate.tick(pub_time.nanoseconds * 1e-9)
        if img_ns > 0:
            self.latency_ms.add((pub_time.nanoseconds - img_ns) * 1e-6)

    def _decode(self, msg: Image):
        """Resized RGB for msg (decoded once per message) or None after a counted rejection."""
        if msg is not self._decoded_for:
            try:
                img = self._decoder(msg)
                self._decoded = resize_rgb(img, self._input_size)
            except ImageDecodeError as exc:
                self._decoded = exc
                self.counters["rejected_images"] += 1
            except Exception as exc:  # anything else a malformed message triggers
                self._decoded = ImageDecodeError(f"{type(exc).__name__}: {exc}")
                self.counters["rejected_images"] += 1
            self._decoded_for = msg
        if isinstance(self._decoded, Exception):
            self.get_logger().error(f"image rejected ({msg.encoding} {msg.width}x{msg.height} step {msg.step}, "
                                    f"{len(msg.data)} bytes): {self._decoded}; no command",
                                    throttle_duration_sec=1.0)
            return None
        return self._decoded

    def _publish_command(self, delta, ee_pos, ee_quat) -> bool:
        """Twist / pose target / MoveItPy step + gripper, stamped with the node clock."""
        p = self.p
        stamp = self.get_clock().now().to_msg()
        if p.motion_backend == "servo_twist":
            lin, ang = twist_from_delta(delta, p.control_rate_hz)
            msg = TwistStamped()
            msg.header.stamp, msg.header.frame_id = stamp, p.command_frame
            msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = (float(v) for v in lin)
            msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z = (float(v) for v in ang)
            self._twist_pub.publish(msg)
        else:
            pos, quat = pose_after_delta(ee_pos, ee_quat, delta)
            msg = PoseStamped()
            msg.header.stamp, msg.header.frame_id = stamp, p.command_frame
            msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = (float(v) for v in pos)
            (msg.pose.orientation.x, msg.pose.orientation.y, msg.pose.orientation.z,
             msg.pose.orientation.w) = (float(v) for v in quat)
            if p.motion_backend == "servo_pose":
                self._pose_pub.publish(msg)
            else:
                self._moveit_step(msg)
        if delta.gripper is not None:
            self._gripper_pub.publish(Float64(data=float(delta.gripper)))
        return True

    def _moveit_step(self, target: PoseStamped) -> None:  # pragma: no cover - needs MoveIt
        arm = self._moveit_arm
        arm.set_start_state_to_current_state()
        arm.set_goal_state(pose_stamped_msg=target, pose_link=self.p.moveit_pose_link or self.p.ee_link)
        plan = arm.plan()
        if plan:
            self._moveit.execute(plan.trajectory, controllers=[])
        else:
            self.counters["moveit_plan_failed"] += 1
            self.get_logger().warning("MoveItPy could not plan the step", throttle_duration_sec=1.0)

    def _publish_action(self, image_msg: Image, spec, action, log_prob, value) -> None:
        msg = JointState()
        msg.header.stamp = image_msg.header.stamp
        msg.header.frame_id = self.p.command_frame
        msg.name = list(spec.names) + ["log_prob", "value"]
        msg.position = [float(v) for v in action] + [float(log_prob), float(value)]
        self._action_pub.publish(msg)

    # ======================================================================== diagnostics
    def stats(self) -> dict:
        """Everything /diagnostics reports, as a dict (also handy in tests and benchmarks)."""
        s = self._safety.snapshot()
        rej = s["rejections"]
        lat, inf = self.latency_ms.summary(), self.inference_ms.summary()
        return {
            "enabled": self._enabled, "explore": self._explore, "estop": s["estop"],
            "checkpoint": str(self._checkpoint_path), "motion_backend": self.p.motion_backend,
            "image_decoder": self._decoder.name, "instruction": self._instruction,
            "latency_ms_mean": lat["mean"], "latency_ms_p95": lat["p95"],
            "inference_ms_mean": inf["mean"], "inference_ms_p95": inf["p95"],
            "image_delay_ms_mean": self.image_delay_ms.summary()["mean"],
            "image_age_at_tick_ms_mean": self.image_age_ms.summary()["mean"],
            "command_rate_hz": self._cmd_rate.rate(_now_s(self)),
            "commands_sent": self.counters["commands_sent"],
            "rejected_images": self.counters["rejected_images"],
            "dropped_nan_actions": rej[Reason.NAN_ACTION],
            "stale_skips": sum(rej[r] for r in Reason.STALE),
            "estop_skips": rej[Reason.ESTOP],
            **{f"reject_{k}": v for k, v in rej.items()},
            **{f"limit_{k}": v for k, v in s["modifications"].items()},
            **{k: v for k, v in self.counters.items() if k not in ("commands_sent", "rejected_images")},
        }

    def _publish_diagnostics(self) -> None:
        st = self.stats()
        status = DiagnosticStatus()
        status.name = f"{self.get_fully_qualified_name()}: policy"
        status.hardware_id = st["checkpoint"]
        if st["estop"]:
            status.level, status.message = DiagnosticStatus.WARN, "e-stop latched"
        elif not st["enabled"]:
            status.level, status.message = DiagnosticStatus.WARN, "disabled (call ~/enable)"
        else:
            status.level, status.message = DiagnosticStatus.OK, f"running at {st['command_rate_hz']:.1f} Hz"

        def fmt(v):
            if isinstance(v, float):
                return "nan" if math.isnan(v) else f"{v:.3f}"
            return str(v)

        status.values = [KeyValue(key=k, value=fmt(v)) for k, v in st.items()]
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [status]
        self._diag_pub.publish(arr)


def main(args=None) -> int:
    return run_node(PolicyNode, args, description=DESCRIPTION, params=PARAMS, num_threads=4)


if __name__ == "__main__":
    import sys

    sys.exit(main())
