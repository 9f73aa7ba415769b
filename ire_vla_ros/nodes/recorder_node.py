"""recorder_node: records episodes (camera, joints, instruction, actions, rewards) to the episode store.

ROS glue around `episodes/recorder.py` (pairing by stamp, the episode session, the writer thread, the
episode metadata) and `episodes/safe_writer.py` (h5py in a child process: a full disk aborts the episode,
never the node). One action message on `action_topic` = one step; see episodes/recorder.py for the rules.

Interface
  sub  <image_topic>          sensor_msgs/Image        sensor-data QoS
  sub  <joint_states_topic>   sensor_msgs/JointState   merged by joint name (arm and gripper may publish apart)
  sub  <instruction_topic>    std_msgs/String          transient local
  sub  <action_topic>         sensor_msgs/JointState   one message = one step (robot/action_msg.py)
  sub  <intervention_topic>   sensor_msgs/JointState   operator actions in a policy episode: intervention steps
  sub  <reward_topic>         std_msgs/Float32
  sub  <episode_end_topic>    std_msgs/Bool            ends the episode with data as its success label
  sub  <policy_params_topic>  std_msgs/String          JSON, latched: policy parameters in force, for episode metadata
  srv  ~/start_episode        std_srvs/Trigger   checks free space, calls `start_services` in order
                                                 (e.g. sim reset, reward_node start), then records
  srv  ~/stop_episode         std_srvs/Trigger   saves the episode, success = `success_on_stop`
  srv  ~/stop_episode_labeled std_srvs/SetBool   saves the episode, success = data
  srv  ~/abort_episode        std_srvs/Trigger   discards the episode
  pub  ~/episode_saved        std_msgs/String    path of every saved episode
  pub  ~/status               std_msgs/String    JSON, latched: state, counters, last path / error
  pub  /diagnostics           diagnostic_msgs/DiagnosticArray

Limits (against a flood from the DDS domain), refused and counted: instructions over `max_instruction_chars`,
images over `max_image_bytes` or with size fields that disagree with their data, actions of over 64 components.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float32, String
from std_srvs.srv import SetBool, Trigger

from ire_vla_ros.diskspace import DiskSpaceError, free_mb, require_free_space
from ire_vla_ros.episodes.recorder import (
    EpisodeRecorder, EpisodeSession, check_recorder_params, episode_metadata, health, image_size_problem,
    json_object,
)
from ire_vla_ros.episodes.safe_writer import WriterProcess
from ire_vla_ros.nodes.ros_common import (
    LATCHED_QOS, RELIABLE_QOS, SENSOR_QOS, P, bind_live_params, declare_params, diagnostic_array, require_choices,
    run_node, stamp_ns,
)
from ire_vla_ros.nodes.service_chain import TriggerChain
from ire_vla_ros.robot.action_msg import check_action_spec_setting
from ire_vla_ros.robot.image_codec import make_decoder

MAX_ACTION_COMPONENTS = 64
COMPRESSIONS = ("lzf", "gzip", "none")


def _check_source(value: str) -> str | None:
    from ire_vla_ros.episodes.store import SOURCES

    return None if value in SOURCES else f"must be one of {SOURCES}"


class RecorderNode(Node):
    PARAMS = {
        "episodes_dir": P("episodes", "Episode store directory (one HDF5 file per episode)", read_only=True),
        "source": P("policy", "Source tag of new episodes: teleop | policy | rl", validate=_check_source),
        "iteration": P(0, "iRe-VLA iteration tag of new episodes", min=0),
        "task": P("", "Task tag of new episodes (empty: the instruction)"),
        "instruction": P("", "Instruction used until one arrives on instruction_topic"),
        "camera_name": P("main", "Camera name inside the episode file", read_only=True),
        "joint_names": P([], "Joints to record, in this order (empty: all, in order first seen)",
                         type=Parameter.Type.STRING_ARRAY, read_only=True),
        "action_spec": P("auto", "auto | metaworld_4d | ee_delta_7d | ActionSpec JSON (next episode)",
                         validate=check_action_spec_setting),
        "action_topic": P("/policy_node/action", "Actions (JointState layout); one message = one step. "
                          "Can be changed while no episode is recorded (switch teleop <-> policy)"),
        "intervention_topic": P("/teleop_node/action", "Operator actions that override the policy: recorded "
                                "as intervention steps while action_topic is another topic (empty: off)",
                                read_only=True),
        "intervention_hold_s": P(0.5, "After an operator action, the policy's actions are not recorded for "
                                 "this long (the robot follows the operator)", min=0.01, max=10.0),
        "image_topic": P("/camera/image_raw", "Camera image (sensor-data QoS)", read_only=True),
        "joint_states_topic": P("/joint_states", "Joint states", read_only=True),
        "instruction_topic": P("/policy_node/instruction", "Task instruction (transient local)", read_only=True),
        "reward_topic": P("/reward_node/reward", "Per-step reward (empty: record 0)", read_only=True),
        "episode_end_topic": P("/reward_node/episode_end", "Ends the episode; data = success (empty: off)",
                               read_only=True),
        "policy_params_topic": P("/policy_node/params_in_force", "Policy's parameters in force (JSON, latched; "
                                 "empty: off), recorded in episode metadata", read_only=True),
        "start_services": P(["/reward_node/start_episode"],
                            "std_srvs/Trigger services called in order by ~/start_episode before recording",
                            read_only=True),
        "service_timeout_s": P(10.0, "Timeout of each start service call", min=0.1, max=600.0),
        "success_on_stop": P(False, "Success label of episodes ended with ~/stop_episode"),
        "end_grace_s": P(0.2, "After episode_end, wait this long for the final reward before saving",
                         min=0.0, max=5.0),
        "buffer_s": P(1.0, "Seconds of images / joint states kept for pairing by stamp", min=0.05, max=30.0),
        "max_buffered_images": P(120, "At most this many images kept for pairing (memory bound: 120 x "
                                 "640x480 rgb8 = 110 MB)", min=2, max=10_000, read_only=True),
        "pairing_tolerance_s": P(0.02, "Joint-image stamp difference above which a step counts as a "
                                 "pairing mismatch", min=0.0, max=10.0),
        "min_free_mb": P(200.0, "Refuse to start, or abort, an episode when less disk is free", min=0.0),
        "max_queue": P(64, "Steps buffered for the writer thread; more are dropped (and counted)",
                       min=1, max=4096, read_only=True),
        "compression": P("lzf", "Image compression: lzf | gzip | none", read_only=True,
                         constraints="one of lzf, gzip, none"),  # read-only: checked at start-up
        "prefer_cv_bridge": P(False, "Decode images with cv_bridge when it imports", read_only=True),
        "status_period_s": P(1.0, "Period of ~/status and /diagnostics", min=0.05, read_only=True),
        "max_instruction_chars": P(2000, "Longer instructions are refused", min=1, max=100_000, read_only=True),
        "max_image_bytes": P(64 * 1024 * 1024, "Larger images are refused", min=1, read_only=True),
    }

    def __init__(self, **kwargs):
        super().__init__("recorder_node", **kwargs)
        self.p = p = declare_params(self, self.PARAMS)
        require_choices(p, {"compression": COMPRESSIONS})
        self._writer_proc = WriterProcess(min_free_mb=p.min_free_mb)
        decode_msg = make_decoder(p.prefer_cv_bridge)
        self.recorder = EpisodeRecorder(
            lambda meta: self._writer_proc.open(p.episodes_dir, meta,
                                                compression=None if p.compression == "none" else p.compression),
            max_queue=p.max_queue, camera_name=p.camera_name,
            on_result=lambda kind, payload: self.session.on_writer_result(kind, payload),  # writer thread
            decode=lambda image: decode_msg(image) if isinstance(image, Image) else image,
        )
        self.session = EpisodeSession(
            self.recorder, clock_ns=lambda: self.get_clock().now().nanoseconds, make_meta=self._episode_meta,
            joint_names=p.joint_names, max_images=p.max_buffered_images)
        self._configure_session()
        self.rejected = collections.Counter()
        self._instruction = p.instruction
        self._policy_params: dict | None = None
        self._last: dict = {}  # the counters at the last diagnostics (health() updates it)
        self._end_timer = None

        self.create_subscription(Image, p.image_topic, self._on_image, SENSOR_QOS)
        self.create_subscription(JointState, p.joint_states_topic, self._on_joints, SENSOR_QOS)
        self.create_subscription(String, p.instruction_topic, self._on_instruction, LATCHED_QOS)
        self._action_sub = self.create_subscription(JointState, p.action_topic, self._on_action, RELIABLE_QOS)
        if p.reward_topic:
            self.create_subscription(Float32, p.reward_topic, lambda m: self.session.set_reward(m.data), RELIABLE_QOS)
        if p.episode_end_topic:
            self.create_subscription(Bool, p.episode_end_topic, self._on_episode_end, RELIABLE_QOS)
        if p.policy_params_topic:
            self.create_subscription(String, p.policy_params_topic, self._on_policy_params, LATCHED_QOS)
        if p.intervention_topic:
            self.create_subscription(JointState, p.intervention_topic, self._on_intervention, RELIABLE_QOS)

        self._start_chain = TriggerChain(self, p.start_services, timeout_s=p.service_timeout_s)
        self.create_service(Trigger, "~/start_episode", self._on_start, callback_group=self._start_chain.group)
        self.create_service(Trigger, "~/stop_episode",
                            lambda _q, r: self._stop(r, bool(self.p.success_on_stop), "~/stop_episode"))
        self.create_service(SetBool, "~/stop_episode_labeled",
                            lambda q, r: self._stop(r, bool(q.data), "~/stop_episode_labeled"))
        self.create_service(Trigger, "~/abort_episode", lambda _q, r: self._stop(r, None, "~/abort_episode"))
        self.saved_pub = self.create_publisher(String, "~/episode_saved", RELIABLE_QOS)
        self.status_pub = self.create_publisher(String, "~/status", LATCHED_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        bind_live_params(self, self.PARAMS, self.p, apply=self._apply_params,
                         check=lambda values: check_recorder_params(values, self.p.action_topic, self.session.state))
        self.create_timer(0.05, self._drain_results)
        self.create_timer(p.status_period_s, self._publish_status)
        self._publish_status()
        self.get_logger().info(
            f"recording {p.action_topic} + {p.image_topic} into {Path(p.episodes_dir).resolve()} "
            f"(source={p.source}, writer pid {self._writer_proc.pid}); call ~/start_episode")

    # parameters ------------------------------------------------------------------------------
    def _apply_params(self, changed: dict) -> None:
        if "action_topic" in changed and changed["action_topic"] != self._action_sub.topic_name:
            self.destroy_subscription(self._action_sub)
            self._action_sub = self.create_subscription(JointState, changed["action_topic"], self._on_action,
                                                        RELIABLE_QOS)
        self._start_chain.timeout_s = float(self.p.service_timeout_s)
        self._writer_proc.min_free_mb = float(self.p.min_free_mb)
        self._configure_session()
        if changed.get("instruction"):
            self._instruction = changed["instruction"]
        self.get_logger().info(f"parameters set: {changed}")

    def _configure_session(self) -> None:
        p = self.p  # operator actions count as interventions while another topic (the policy's) is recorded
        intervening = bool(p.intervention_topic) and p.intervention_topic != p.action_topic
        self.session.configure(window_s=p.buffer_s, tolerance_s=p.pairing_tolerance_s,
                               intervention_hold_s=p.intervention_hold_s if intervening else 0.0,
                               policy_terms_on_interventions=p.source != "teleop")

    def _episode_meta(self, action_names: list[str], joint_names: list[str]) -> dict:
        """Writer metadata of a new episode (called at its first step)."""
        return episode_metadata(vars(self.p), self._instruction, action_names, joint_names,
                                recorder=self.get_fully_qualified_name(), episode=self.session.episode,
                                policy_params=self._policy_params)

    # inputs: cache only -------------------------------------------------------------------------
    def _on_image(self, msg: Image) -> None:
        problem = image_size_problem(msg.width, msg.height, msg.step, len(msg.data), self.p.max_image_bytes)
        if problem:
            self.rejected["images"] += 1
            self.get_logger().warning(f"image refused: {problem}", throttle_duration_sec=2.0)
            return
        self.session.add_image(stamp_ns(msg.header.stamp), msg)

    def _on_joints(self, msg: JointState) -> None:
        try:
            self.session.add_joints(stamp_ns(msg.header.stamp), msg.name, msg.position)
        except ValueError as exc:
            self.rejected["joint_states"] += 1
            self.get_logger().warning(f"joint state refused: {exc}", throttle_duration_sec=2.0)

    def _on_instruction(self, msg: String) -> None:
        if len(msg.data) > self.p.max_instruction_chars:
            self.rejected["instructions"] += 1
            self.get_logger().warning(f"instruction of {len(msg.data)} characters refused "
                                      f"(max_instruction_chars {self.p.max_instruction_chars})")
            return
        self._instruction = msg.data

    def _on_policy_params(self, msg: String) -> None:
        value = json_object(msg.data, max_chars=100_000)
        if value is None:
            self.rejected["policy_params"] += 1
        else:
            self._policy_params = value

    def _on_action(self, msg: JointState, intervention: bool = False) -> None:
        if len(msg.name) > MAX_ACTION_COMPONENTS:
            self.rejected["interventions" if intervention else "actions"] += 1
            return
        why = self.session.on_action(stamp_ns(msg.header.stamp), msg.name, msg.position, intervention=intervention)
        if why is not None and self.session.state == "recording":
            what = "intervention step" if intervention else "step"
            self.get_logger().warning(f"{what} not recorded: {why}", throttle_duration_sec=2.0)

    def _on_intervention(self, msg: JointState) -> None:
        if self.session.intervention_hold_ns:  # operator actions count only while another topic is recorded
            self._on_action(msg, intervention=True)

    # episode control ---------------------------------------------------------------------------
    def _on_start(self, _req, resp):
        try:
            require_free_space(self.p.episodes_dir, self.p.min_free_mb, what="a new episode")
        except DiskSpaceError as exc:
            resp.success, resp.message = False, f"cannot start: {exc}"
            self.recorder.stats.last_error = resp.message
            self._publish_status()
            return resp
        missing = self._start_chain.missing()
        refusal = f"cannot start: service(s) {missing} not available" if missing else self.session.request_start()
        if refusal:
            resp.success, resp.message = False, refusal
        elif not self._start_chain.clients:
            self._begin_recording()
            resp.success, resp.message = True, f"episode {self.session.episode} recording"
        else:
            self._start_chain.run(self._begin_recording, self._start_failed)  # answers before they have
            resp.success, resp.message = True, (f"episode {self.session.episode + 1} starting: calling "
                                                f"{', '.join(self._start_chain.names)}; ~/status shows 'recording' "
                                                "when ready")
        return resp

    def _begin_recording(self) -> None:
        self.session.begin_recording()
        self._publish_status()
        self.get_logger().info(f"episode {self.session.episode}: recording")

    def _start_failed(self, why: str) -> None:
        self.session.start_failed(why)
        self._publish_status()
        self.get_logger().error(f"cannot start episode: {why}")

    def _finish(self, success: bool | None, why: str) -> tuple[bool, str]:
        self._cancel_end_timer()
        ok, msg = self.session.finish(success, why)
        self._publish_status()
        self.get_logger().info(msg)
        return ok, msg

    def _stop(self, resp, success: bool | None, why: str):
        resp.success, resp.message = self._finish(success, why)
        return resp

    def _on_episode_end(self, msg: Bool) -> None:
        if not self.session.episode_end():
            return
        success = bool(msg.data)
        if self.p.end_grace_s <= 0:
            self._finish(success, "episode_end")
            return
        self._end_timer = self.create_timer(self.p.end_grace_s, lambda: self._finish(success, "episode_end"))

    def _cancel_end_timer(self) -> None:
        if self._end_timer is not None:
            self._end_timer.cancel()
            self.destroy_timer(self._end_timer)
            self._end_timer = None

    # reporting ---------------------------------------------------------------------------------
    def _drain_results(self) -> None:
        for kind, message, ended in self.session.writer_results():
            if ended:  # a write fault aborted the episode being recorded
                self._cancel_end_timer()
            if kind == "saved":
                self.saved_pub.publish(String(data=message))
                self.get_logger().info(f"saved {message}")
            elif kind == "failed":
                self.get_logger().error(f"episode aborted: {message}")
            elif kind == "discarded":
                self.get_logger().warning(message)
            else:
                self.get_logger().error(message, throttle_duration_sec=1.0)
            self._publish_status()

    def status(self) -> dict:
        """~/status, also the values of /diagnostics."""
        return {**self.session.status(), "source": self.p.source, "iteration": int(self.p.iteration),
                "free_mb": free_mb(self.p.episodes_dir), "min_free_mb": self.p.min_free_mb,
                "writer_pid": self._writer_proc.pid or 0, "writer_restarts": self._writer_proc.restarts,
                **{f"rejected_{k}": v for k, v in self.rejected.items()}}

    def _publish_status(self) -> None:
        st = self.status()
        self.status_pub.publish(String(data=json.dumps(st)))
        level, message = health(st, self._last)
        self.diag_pub.publish(diagnostic_array(self, f"{self.get_name()}: episode recorder", level, message, st,
                                               hardware_id="episode_store"))

    def destroy_node(self):
        # finish what is queued; an unfinished episode is discarded (its .partial file removed)
        if self.session.state in ("recording", "ending"):
            self.get_logger().warning(f"shutting down while episode {self.session.episode} is recording: discarded")
        self.recorder.close()
        self._writer_proc.close()
        return super().destroy_node()


def main(args=None):
    return run_node(
        RecorderNode, args, params=RecorderNode.PARAMS,
        description="Record episodes (image, joints, instruction, action, reward) into the HDF5 episode store. "
                    "Limits: instruction <= max_instruction_chars, image <= max_image_bytes, "
                    f"<= {MAX_ACTION_COMPONENTS} action components, max_queue steps in flight.",
    )


if __name__ == "__main__":
    raise SystemExit(main())
