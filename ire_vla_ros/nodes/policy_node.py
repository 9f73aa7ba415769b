"""policy_node: runs the VLA policy on camera + joint states and streams safe commands to the arm.

Interface (defaults; every topic is a parameter, see config/policy_node.yaml)
  subscribes  /camera/image_raw        sensor_msgs/Image (image_transport raw), or
              /camera/image_raw/compressed  sensor_msgs/CompressedImage jpeg/png (image_transport compressed);
                                       reliability matched to the publishers (RELIABLE only if all offer it)
              /joint_states            sensor_msgs/JointState    merged by name (split publishers ok)
              /ee_pose                 geometry_msgs/PoseStamped EE pose in `command_frame`
              /estop                   std_msgs/Bool, LATCHED (reliable + transient local): true stops
                                       until false arrives; a node started while true is held starts stopped
              ~/instruction            std_msgs/String           transient-local (latched)
  publishes   the motion backend's command (nodes/motion_backends.py: Servo twist / pose, MoveItPy) + gripper
              ~/action                 sensor_msgs/JointState    for the recorder (robot/action_msg.py layout)
              ~/params_in_force        std_msgs/String (latched) JSON of every parameter value in force
              /diagnostics             diagnostic_msgs/DiagnosticArray
  services    ~/enable  std_srvs/SetBool   the node starts DISABLED: no command until enabled
              ~/explore std_srvs/SetBool   true: sample from the policy, false: mean action
              ~/reload  std_srvs/Trigger   answers at once (accepted / already running); loads `checkpoint`
                                           (its `latest`) in a worker thread, swaps between ticks; a failed
                                           load keeps the running model. Result: log, /diagnostics, counters

Control loop: its own thread (robot/runner.py), never the executor, which waits while a step runs
(ros_common.ExecutorGate: 500 Hz joint callbacks no longer slow inference). Callbacks store the newest
messages. By default (`control_trigger: frame`) a step runs when a new camera frame arrives, on a
grid of 1/control_rate_hz (commands steady at the rate, the image fresh); `timer` steps on the grid
alone. No command from a frame whose header stamp is older than `stale_timeout_s`, however late
it arrived. Writable parameters take effect when set; paths, device and topics are read-only.
"""
from __future__ import annotations

import json
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String
from std_srvs.srv import SetBool, Trigger

from ire_vla_ros.nodes import motion_backends, online_rl
from ire_vla_ros.nodes.arm_inputs import LOST_ACTIONS, EePoseInput, EstopListener
from ire_vla_ros.nodes.ros_common import (
    LATCHED_QOS, RELIABLE_QOS, ExecutorGate, NodeStartupError, P, ReliabilityMatchedSubscription,
    bind_live_params, declare_params, diagnostic_array, params_as_dict, require_choices, run_node, stamp_ns,
)
from ire_vla_ros.robot.action_msg import pack_action
from ire_vla_ros.robot.image_codec import CompressedDecoder, ImageLimits, make_decoder
from ire_vla_ros.robot.runner import (
    ControlPacer, LatestObservations, ModelReloader, PolicyLoader, PolicyRunner, check_policy_params,
    metadata_instruction, policy_health,
)
from ire_vla_ros.robot.safety import SafetyConfig, SafetyFilter

_POLICY_PARAMS = {
    "checkpoint": P("models/metaworld_tiny",
                    "Checkpoint directory, or a root holding a `latest` pointer (followed at start and on "
                    "~/reload). A relative path not found from the working directory is taken relative to "
                    "the package share directory (models/ lives there)", read_only=True),
    "device": P("auto", "Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:N", read_only=True),
    "cuda_graphs": P(True, "On CUDA, replay the backbone from a CUDA graph (the step is launch-bound on a GPU; "
                     "vla/cuda_graph.py). Off: eager, as on CPU", read_only=True),
    "torch_num_threads": P(1, "torch.set_num_threads for CPU inference (0 = leave torch's default). 1 avoids "
                           "thread oversubscription next to the ROS executor on small machines", min=0, max=256),
    "control_rate_hz": P(10.0, "Policy / command rate. Keep 1/rate below Servo's incoming_command_timeout",
                         min=0.5, max=100.0, read_only=True),
    "control_trigger": P("frame", "frame: step when a new camera frame arrives, on the control-rate grid "
                         "(fresh image, steady rate); timer: step on the grid alone", read_only=True,
                         constraints="one of frame, timer"),
    "default_instruction": P("", "Instruction until one arrives on ~/instruction; empty = the checkpoint's "
                             "metadata `instruction` if any. Setting it replaces the current instruction"),
    "image_topic": P("/camera/image_raw", "Camera topic (raw Image; `/compressed` is appended for compressed)",
                     read_only=True),
    "image_transport": P("raw", "raw: sensor_msgs/Image on image_topic; compressed: sensor_msgs/CompressedImage "
                         "(jpeg, png) on image_topic + '/compressed'", read_only=True,
                         constraints="one of raw, compressed"),
    "image_reliability": P("auto", "auto: RELIABLE when every camera publisher offers it, else BEST_EFFORT "
                           "(re-checked as publishers come and go); reliable; best_effort", read_only=True,
                           constraints="one of auto, reliable, best_effort"),
    "joint_states_topic": P("/joint_states", "sensor_msgs/JointState input", read_only=True),
    "ee_pose_topic": P("/ee_pose", "geometry_msgs/PoseStamped EE pose in command_frame", read_only=True),
    "ee_link": P("", "If set, the EE pose comes from TF (command_frame <- ee_link, needs tf2_ros) instead "
                 "of ee_pose_topic", read_only=True),
    "estop_topic": P("/estop", "std_msgs/Bool e-stop, latched (reliable + transient local)", read_only=True),
    "estop_lost_action": P("ignore", "stop: no command unless an e-stop publisher is matched and alive and has "
                           "sent its state since it appeared; ignore: only an explicit true stops",
                           read_only=True, constraints="one of ignore, stop"),
    "estop_lease_s": P(0.0, "> 0: request liveliness AUTOMATIC with this lease on /estop (the e-stop "
                       "publisher must offer a lease <= this); 0: publisher loss = unmatched", min=0.0,
                       max=3600.0, read_only=True),
    "gripper_topic": P("/gripper/command", "std_msgs/Float64 gripper command", read_only=True),
    "command_frame": P("base_link", "frame_id of commands; the workspace box and EE pose are in it",
                       read_only=True),
    "prefer_cv_bridge": P(True, "Use cv_bridge when it converts a probe image at start-up, else the built-in "
                          "converter", read_only=True),
    "explore": P(False, "Sample actions (true) or use the mean (false); ~/explore sets it too"),
    "max_translation_m": P(0.02, "Per-step translation clamp (norm, metres)", min=0.0, max=0.5),
    "max_rotation_rad": P(0.08, "Per-step rotation clamp (norm, radians); 0.08 at 10 Hz = Servo's default "
                          "scale.rotational 0.8 rad/s", min=0.0, max=1.0),
    "workspace_enabled": P(True, "Clip steps to the workspace box (needs a fresh EE pose)"),
    "workspace_min_xyz": P([-0.6, -0.6, 0.0], "Workspace box lower corner (m, command_frame)"),
    "workspace_max_xyz": P([0.6, 0.6, 0.8], "Workspace box upper corner (m, command_frame)"),
    "stale_timeout_s": P(0.5, "No command when the image's header stamp or arrival, or the newest joint "
                         "state, is older than this", min=0.01, max=10.0),
    "ee_pose_timeout_s": P(0.5, "No command when the EE pose is older (workspace box enabled)", min=0.01, max=10.0),
    "max_image_pixels": P(4096 * 4096, "Images claiming more pixels (width x height, or a jpeg/png header's) "
                          "are refused and counted before decoding", min=1, max=2**31),
    "max_image_bytes": P(64 * 1024 * 1024, "Images with more data bytes (or a larger row step) are refused "
                         "and counted before decoding", min=1, max=2**31),
    "max_instruction_bytes": P(1024, "Instructions longer than this (UTF-8 bytes) are refused and counted",
                               min=1, max=1 << 20),
    "diagnostics_period_s": P(1.0, "Period of /diagnostics", min=0.1, max=60.0, read_only=True),
}
PARAMS = {**_POLICY_PARAMS, **motion_backends.PARAMS, **online_rl.POLICY_PARAMS}
_LIVE = {**_POLICY_PARAMS, "teleop_yield_s": online_rl.POLICY_PARAMS["teleop_yield_s"]}
DESCRIPTION = __doc__.split("\n\n")[0]
SAFETY_KEYS = ("max_translation_m", "max_rotation_rad", "workspace_enabled", "workspace_min_xyz",
               "workspace_max_xyz", "stale_timeout_s", "ee_pose_timeout_s")


class PolicyNode(Node):
    """One policy, one arm. See the module docstring for the interface."""

    def __init__(self, node_name: str = "policy_node", **kwargs):
        super().__init__(node_name, **kwargs)
        self.p = p = declare_params(self, PARAMS)
        require_choices(p, {"control_trigger": ControlPacer.MODES, "image_transport": ("raw", "compressed"),
                            "image_reliability": tuple(ReliabilityMatchedSubscription.MODES),
                            "estop_lost_action": LOST_ACTIONS})
        try:
            safety_cfg = SafetyConfig.from_params(vars(p))
        except ValueError as exc:
            raise NodeStartupError(f"safety parameters: {exc}") from exc
        group = MutuallyExclusiveCallbackGroup()
        self.backend = motion_backends.make_motion_backend(self, p, group)  # before the (slow) model load

        # ---- model ------------------------------------------------------------------------------
        try:
            self.loader = PolicyLoader(p.checkpoint, p.device, p.torch_num_threads, p.cuda_graphs)
        except RuntimeError as exc:  # no torch, or no such device
            raise NodeStartupError(str(exc)) from exc
        try:
            policy, ckpt = self.loader()
        except Exception as exc:  # CheckpointError and anything a broken checkpoint throws
            raise NodeStartupError(f"cannot load checkpoint {self.loader.root}: {exc}") from exc
        safety = SafetyFilter(safety_cfg, policy.action_spec)

        # ---- control logic (no ROS) --------------------------------------------------------------
        decoder = CompressedDecoder() if p.image_transport == "compressed" else make_decoder(p.prefer_cv_bridge)
        self.runner = PolicyRunner(policy, ckpt, safety, decoder, needs_ee_pose=self.backend.needs_ee_pose,
                                   explore=p.explore)
        self.obs = LatestObservations(ImageLimits(p.max_image_pixels, p.max_image_bytes), p.max_instruction_bytes,
                                      p.default_instruction or metadata_instruction(ckpt))
        self.reloader = ModelReloader(self.loader, self.runner.offer_model, self._reload_done)
        self._moving = False
        self.online = online_rl.PolicyOnlineHooks(self, p, self.runner, self.loader.root)  # heads, yield
        bind_live_params(self, _LIVE, p, check=check_policy_params, apply=self._apply_params)

        # ---- ROS interfaces ------------------------------------------------------------------------
        self.ee_pose = EePoseInput(self, self.obs.set_ee_pose, p.command_frame, p.ee_pose_topic, p.ee_link)
        compressed = p.image_transport == "compressed"
        self.image_sub = ReliabilityMatchedSubscription(  # KEEP_LAST 1: only the newest frame matters
            self, CompressedImage if compressed else Image,
            p.image_topic.rstrip("/") + ("/compressed" if compressed else ""), self._on_image, p.image_reliability)
        self.create_subscription(JointState, p.joint_states_topic, self._on_joints, RELIABLE_QOS)
        self.estop = EstopListener(self, p.estop_topic, safety, self._stop_motion, p.estop_lost_action,
                                   p.estop_lease_s)
        self.create_subscription(String, "~/instruction", self._on_instruction, LATCHED_QOS)
        self._action_pub = self.create_publisher(JointState, "~/action", RELIABLE_QOS)
        self._params_pub = self.create_publisher(String, "~/params_in_force", LATCHED_QOS)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_service(SetBool, "~/enable", self._srv_enable)
        self.create_service(SetBool, "~/explore", self._srv_explore)
        self.create_service(Trigger, "~/reload", self._srv_reload)
        self.create_timer(p.diagnostics_period_s, self._publish_diagnostics)
        self._publish_params()

        self._stop = threading.Event()
        self.executor_gate = ExecutorGate()  # run_node's executor waits while a step runs (ros_common)
        self._pacer = ControlPacer(1.0 / p.control_rate_hz, p.control_trigger, now=time.monotonic())
        self._thread = threading.Thread(target=self._control_loop, name="policy_control", daemon=True)
        self._thread.start()
        self.get_logger().info(
            f"loaded {ckpt} on {self.loader.device}: action {list(policy.action_spec.names)}, "
            f"{len(policy.joint_names)} joints, input {self.runner.input_size}; backend {self.backend.name}, "
            f"{p.image_transport} images ({decoder.name}"
            f"{'; ' + decoder.fallback_reason if decoder.fallback_reason else ''}), trigger {p.control_trigger} at "
            f"{p.control_rate_hz} Hz; DISABLED until ~/enable")

    @property
    def image_reliability(self):
        """The camera subscription's reliability now (it follows the publishers)."""
        return self.image_sub.reliability

    # ======================================================================== model
    def _reload_done(self, ok: bool, message: str) -> None:  # loader thread
        if ok:  # rclpy fixes a log call site's severity: one call per level
            self.get_logger().info(f"~/reload {message}")
        else:
            self.get_logger().error(f"~/reload {message}")

    # ======================================================================== parameters
    def _apply_params(self, changed: dict) -> None:
        with self.runner.lock:  # between steps: the next command uses the new values
            if set(changed) & set(SAFETY_KEYS):
                self.runner.safety.set_config(SafetyConfig.from_params(vars(self.p)))
            if "explore" in changed:
                self.runner.explore = bool(changed["explore"])
            if "torch_num_threads" in changed:
                self.loader.set_num_threads(changed["torch_num_threads"])
            self.obs.set_limits(self.p.max_image_pixels, self.p.max_image_bytes, self.p.max_instruction_bytes)
            if "default_instruction" in changed and changed["default_instruction"]:
                self.obs.set_instruction(changed["default_instruction"])
            if "teleop_yield_s" in changed:
                self.online.set_yield_s(changed["teleop_yield_s"])
        self.get_logger().info(f"parameters set: {changed}")
        self._publish_params()

    def _publish_params(self) -> None:
        values = params_as_dict(self, PARAMS)
        values["checkpoint_loaded"] = self._published_ckpt = str(self.runner.checkpoint)
        self._params_pub.publish(String(data=json.dumps(values, sort_keys=True)))

    # ======================================================================== callbacks: store only
    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _on_image(self, msg) -> None:
        now, stamp = self._now(), stamp_ns(msg.header.stamp) * 1e-9
        if stamp > 0:
            self.runner.image_delay_ms.add((now - stamp) * 1e3)
        reason = self.obs.offer_image(msg, stamp, now)
        if reason is not None:
            self.get_logger().error(f"image refused: {reason}", throttle_duration_sec=1.0)

    def _on_joints(self, msg: JointState) -> None:
        self.obs.set_joints(msg.name, msg.position, self._now())

    def _on_instruction(self, msg: String) -> None:
        old = self.obs.instruction
        ok, why = self.obs.set_instruction(msg.data)
        if not ok:
            self.get_logger().error(f"instruction refused: {why}", throttle_duration_sec=1.0)
        elif msg.data != old:
            self.get_logger().info(f"instruction: {msg.data!r}")

    # ======================================================================== services
    def _srv_enable(self, req: SetBool.Request, resp: SetBool.Response):
        # Under the runner's lock: a control step already running (the executor gate only holds
        # callbacks back between them) finishes and sends its command first, so the stop is last.
        # Without it a step could send a moving command after the disable's zero twist (seen once
        # in a CI run at load ~3: the last twist after ~/enable false was not zero).
        with self.runner.lock:
            was_enabled, self.runner.enabled = self.runner.enabled, bool(req.data)
            if req.data:
                self.backend.activate()
            elif was_enabled:  # a disable of an idle policy must not pause Servo under a teleoperator
                self._stop_motion("disabled")
        resp.success = True
        resp.message = ("enabled" if req.data else "disabled") + (
            " (e-stop latched: no commands until released)" if self.runner.safety.estop_active else "")
        self.get_logger().info(f"~/enable: {resp.message}")
        return resp

    def _srv_explore(self, req: SetBool.Request, resp: SetBool.Response):
        result = self.set_parameters([Parameter("explore", value=bool(req.data))])[0]
        resp.success, resp.message = result.successful, ("sampling actions" if req.data else "mean actions")
        return resp

    def _srv_reload(self, req: Trigger.Request, resp: Trigger.Response):
        resp.success, resp.message = self.reloader.request()
        self.get_logger().info(f"~/reload: {resp.message}")
        return resp

    # ======================================================================== control loop
    def _stop_motion(self, reason: str) -> None:
        self._moving = False
        self.backend.stop(reason)

    def _control_loop(self) -> None:
        log, pacer, runner = self.get_logger(), self._pacer, self.runner
        while not self._stop.is_set():
            got_frame = self.obs.wait_frame(pacer.timeout(time.monotonic()))
            if self._stop.is_set() or not pacer.ready(time.monotonic(), got_frame):
                continue
            try:
                self.ee_pose.poll()  # TF only
                with self.executor_gate.closed(), runner.lock:
                    out = runner.step(self.obs.snapshot(), self._now())
                    if out.command is not None:
                        self._send(out.command)
                    elif self._moving and out.reason != "disabled":
                        self._stop_motion(out.reason)
                if str(runner.checkpoint) != self._published_ckpt:  # a reload swapped the model in
                    self._publish_params()
                if out.command is None and out.reason not in ("disabled", "estop", "estop_lost"):
                    log.warning(f"no command: {out.detail or out.reason}", throttle_duration_sec=2.0)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any single failure
                log.error(f"control step failed: {type(exc).__name__}: {exc}", throttle_duration_sec=1.0)
            pacer.done(time.monotonic())

    def _send(self, cmd) -> None:
        if self.online.yielding():  # the operator is driving: no command, and no stop that would pause Servo
            self._moving = False
            self.runner.counters["yielded_to_operator"] += 1
            return
        if not self.backend.send(cmd.delta, cmd.ee_pos, cmd.ee_quat):
            return
        self._moving = True
        if self.runner.estopped:
            self._stop_motion("estop")  # latched during the step (an executor without the gate): stop last
            return
        msg = JointState()
        msg.header.stamp, msg.header.frame_id = cmd.image_msg.header.stamp, self.p.command_frame
        msg.name, msg.position = pack_action(self.runner.policy.action_spec.names, cmd.action, cmd.log_prob,
                                             cmd.value)
        self._action_pub.publish(msg)
        self.runner.sent(cmd, self._now())
        self.online.on_command(cmd.image_stamp)
        if cmd.modified:
            self.get_logger().info(f"action limited: {cmd.modified}", throttle_duration_sec=2.0)

    # ======================================================================== diagnostics
    def stats(self) -> dict:
        """Everything /diagnostics reports, as a dict (also handy in tests and benchmarks)."""
        return {**self.runner.stats(self._now()), **self.backend.stats(), **self.obs.stats(), **self.online.stats(),
                **self.reloader.stats(), "image_decoder": self.runner.decoder.name,
                "image_reliability": getattr(self.image_reliability, "name", "")}

    def _publish_diagnostics(self) -> None:
        st = self.stats()
        level, message = policy_health(st)
        self._diag_pub.publish(diagnostic_array(self, f"{self.get_fully_qualified_name()}: policy", level, message,
                                                st, hardware_id=st["checkpoint"]))

    def destroy_node(self):
        self._stop.set()
        self.obs.wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self.backend.close()
        self.online.close()
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(PolicyNode, args, description=DESCRIPTION, params=PARAMS)


if __name__ == "__main__":
    raise SystemExit(main())
