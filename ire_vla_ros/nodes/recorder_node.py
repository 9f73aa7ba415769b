"""recorder_node: records episodes (camera, joints, instruction, actions, rewards) to the episode store.

A step is recorded when an action message arrives on `action_topic` (the policy's
`/policy_node/action` or the teleoperator's `/teleop_node/action`). It is paired with

* the camera image whose stamp equals the action's `header.stamp` (the policy stamps its action
  with the image it acted on); when there is no such image, the newest image not after the
  action's stamp, else the newest image;
* the joint state chosen the same way;
* the reward: `reward[t]` is the newest reward received before action t+1 arrives (or before the
  episode ends), i.e. the reward that *followed* action t. The last step gets the final reward
  reward_node publishes just before `episode_end`.

The JointState action layout is `names = action names (+ "log_prob", "value")`; log_prob/value
are stored in `/policy/*` when present.

Disk I/O never happens in a callback: steps go through a bounded queue (`max_queue` steps) to a
writer thread that owns the `EpisodeWriter`. When the queue is full the step is dropped; drops
are counted, logged (throttled) and reported on `/diagnostics` and `~/status`.

Interface
  sub  <image_topic>          sensor_msgs/Image        sensor-data QoS
  sub  <joint_states_topic>   sensor_msgs/JointState
  sub  <instruction_topic>    std_msgs/String          transient local
  sub  <action_topic>         sensor_msgs/JointState   one message = one step
  sub  <reward_topic>         std_msgs/Float32
  sub  <episode_end_topic>    std_msgs/Bool            ends the episode with data as its success label
  srv  ~/start_episode        std_srvs/Trigger   calls `start_services` in order (e.g. sim reset,
                                                 reward_node start), then starts recording;
                                                 responds once recording has started
  srv  ~/stop_episode         std_srvs/Trigger   saves the episode, success = `success_on_stop`
  srv  ~/stop_episode_labeled std_srvs/SetBool   saves the episode, success = data
  srv  ~/abort_episode        std_srvs/Trigger   discards the episode
  pub  ~/episode_saved        std_msgs/String    path of every saved episode
  pub  ~/status               std_msgs/String    JSON, latched: state, counters, last path
  pub  /diagnostics           diagnostic_msgs/DiagnosticArray
"""
from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float32, String
from std_srvs.srv import SetBool, Trigger

from ire_vla_ros.nodes.ros_common import (
    LATCHED_QOS,
    RELIABLE_QOS,
    SENSOR_QOS,
    P,
    declare_params,
    run_node,
)
from ire_vla_ros.vla.action_spec import EE_DELTA_7D, METAWORLD_4D, ActionSpec

POLICY_EXTRA = ("log_prob", "value")
KNOWN_SPECS = {"metaworld_4d": METAWORLD_4D, "ee_delta_7d": EE_DELTA_7D}


# ---------------------------------------------------------------------------------------------
# Plain logic (no ROS)
# ---------------------------------------------------------------------------------------------
def stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


class StampBuffer:
    """The last `size` items keyed by timestamp (ns), for pairing an action with its observation."""

    def __init__(self, size: int = 30):
        self._items: collections.deque[tuple[int, Any]] = collections.deque(maxlen=max(1, int(size)))
        self._lock = threading.Lock()

    def add(self, t_ns: int, item: Any) -> None:
        with self._lock:
            self._items.append((int(t_ns), item))

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def prune(self, drop: Callable[[int], bool]) -> None:
        """Remove the items whose stamp satisfies `drop`."""
        with self._lock:
            kept = [(t, item) for t, item in self._items if not drop(t)]
            self._items.clear()
            self._items.extend(kept)

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, t_ns: int) -> tuple[Any, bool] | tuple[None, bool]:
        """(item, exact): the item stamped t_ns, else the newest not after t_ns, else the newest."""
        with self._lock:
            if not self._items:
                return None, False
            best = None
            for t, item in reversed(self._items):
                if t == t_ns:
                    return item, True
                if best is None and t <= t_ns:
                    best = item
            return (best if best is not None else self._items[-1][1]), False


def split_action(names, values) -> tuple[list[str], np.ndarray, float | None, float | None]:
    """JointState action layout -> (action names, action, log_prob or None, value or None)."""
    names = list(names)
    values = np.asarray(values, dtype=np.float64)
    if len(names) != len(values):
        raise ValueError(f"action message has {len(names)} names but {len(values)} positions")
    extra = {n: float(values[i]) for i, n in enumerate(names) if n in POLICY_EXTRA}
    keep = [i for i, n in enumerate(names) if n not in POLICY_EXTRA]
    if not keep:
        raise ValueError("action message has no action components")
    action = values[keep].astype(np.float32)
    return [names[i] for i in keep], action, extra.get("log_prob"), extra.get("value")


def resolve_action_spec(setting: str, names: list[str]) -> ActionSpec:
    """'auto' (match names to a known spec, else [-1, 1] bounds), a known spec name, or JSON."""
    setting = (setting or "auto").strip()
    if setting == "auto":
        for spec in KNOWN_SPECS.values():
            if list(spec.names) == list(names):
                return spec
        return ActionSpec(names=tuple(names), low=(-1.0,) * len(names), high=(1.0,) * len(names))
    spec = KNOWN_SPECS.get(setting.lower()) or ActionSpec.from_json(setting)
    if list(spec.names) != list(names):
        raise ValueError(f"action names {names} do not match action_spec {list(spec.names)}")
    return spec


def select_joints(msg_names, msg_positions, wanted: list[str]) -> np.ndarray:
    """Joint positions in `wanted` order (all of the message's joints when `wanted` is empty)."""
    if not wanted:
        return np.asarray(msg_positions, dtype=np.float32)
    index = {n: i for i, n in enumerate(msg_names)}
    missing = [n for n in wanted if n not in index]
    if missing:
        raise KeyError(f"joint state lacks {missing}")
    return np.asarray([msg_positions[index[n]] for n in wanted], dtype=np.float32)


@dataclass
class Step:
    image: Any                 # sensor_msgs/Image (decoded in the writer thread) or an RGB array
    joint_positions: np.ndarray
    action: np.ndarray
    timestamp: float
    reward: float = 0.0
    log_prob: float | None = None
    value: float | None = None
    image_exact: bool = False


@dataclass
class RecorderStats:
    episodes_saved: int = 0
    episodes_discarded: int = 0
    steps_written: int = 0
    steps_dropped: int = 0
    step_errors: int = 0
    queue_depth: int = 0
    max_queue_depth: int = 0
    last_path: str = ""
    last_error: str = ""
    write_time_s: float = 0.0


class EpisodeRecorder:
    """Writer thread + bounded step queue around an episode writer. No ROS.

    `writer_factory(meta) -> writer` creates the writer (EpisodeWriter-like: append(**kw),
    finalize(success) -> path, abort()). `decode(image) -> RGB array` runs in the writer thread.
    `on_result(kind, payload)` is called from the writer thread with ("saved", path),
    ("discarded", reason) or ("error", message); keep it short (e.g. enqueue).
    Control commands (begin/end/abort) are never dropped; only steps count against `max_queue`.
    """

    def __init__(self, writer_factory: Callable[[dict], Any], *, max_queue: int = 64,
                 decode: Callable[[Any], np.ndarray] | None = None, camera_name: str = "main",
                 on_result: Callable[[str, Any], None] | None = None):
        self._factory = writer_factory
        self._decode = decode or (lambda img: img)
        self._camera = camera_name
        self._on_result = on_result or (lambda kind, payload: None)
        self.max_queue = max(1, int(max_queue))
        self._q: collections.deque = collections.deque()
        self._pending_steps = 0
        self._cv = threading.Condition()
        self._closed = False
        self.stats = RecorderStats()
        self._thread = threading.Thread(target=self._run, name="episode-writer", daemon=True)
        self._thread.start()

    # producer side (any thread) --------------------------------------------------------
    def begin(self, meta: dict) -> None:
        self._put(("begin", meta))

    def add_step(self, step: Step) -> bool:
        """Queue one step; False (and counted) when the queue is full."""
        with self._cv:
            if self._pending_steps >= self.max_queue:
                self.stats.steps_dropped += 1
                return False
            self._q.append(("step", step))
            self._pending_steps += 1
            self.stats.queue_depth = self._pending_steps
            self.stats.max_queue_depth = max(self.stats.max_queue_depth, self._pending_steps)
            self._cv.notify()
        return True

    def end(self, success: bool, metadata: dict | None = None) -> None:
        self._put(("end", (bool(success), metadata or {})))

    def abort(self, reason: str = "aborted") -> None:
        self._put(("abort", reason))

    def _put(self, item) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("recorder is closed")
            self._q.append(item)
            self._cv.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while (self._q or self._busy) and time.monotonic() < deadline:
                self._cv.wait(0.05)
            return not self._q and not self._busy

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued work, abort an unfinished episode, stop the thread."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # writer thread ----------------------------------------------------------------------
    _busy = False

    def _run(self) -> None:
        writer = None
        broken = False  # the current episode failed to start: drop its steps
        while True:
            with self._cv:
                while not self._q and not self._closed:
                    self._cv.wait()
                if not self._q and self._closed:
                    break
                kind, payload = self._q.popleft()
                if kind == "step":
                    self._pending_steps -= 1
                    self.stats.queue_depth = self._pending_steps
                self._busy = True
            try:
                t0 = time.monotonic()
                if kind == "begin":
                    if writer is not None:
                        writer.abort()
                        self.stats.episodes_discarded += 1
                    writer, broken = None, False
                    try:
                        writer = self._factory(payload)
                    except Exception as exc:  # bad metadata, disk full, ...
                        broken = True
                        self._error(f"cannot create episode: {exc}")
                elif kind == "step":
                    if writer is not None:
                        try:
                            img = self._decode(payload.image)
                            kw = dict(images={self._camera: img}, joint_positions=payload.joint_positions,
                                      action=payload.action, reward=payload.reward, timestamp=payload.timestamp)
                            if payload.log_prob is not None and payload.value is not None:
                                kw.update(log_prob=payload.log_prob, value=payload.value)
                            writer.append(**kw)
                            self.stats.steps_written += 1
                        except Exception as exc:
                            self.stats.step_errors += 1
                            self._error(f"step not recorded: {exc}")
                    elif not broken:
                        self.stats.step_errors += 1
                elif kind == "end":
                    success, metadata = payload
                    if writer is not None:
                        w, writer = writer, None
                        try:
                            path = w.finalize(success, metadata=metadata) if metadata else w.finalize(success)
                            self.stats.episodes_saved += 1
                            self.stats.last_path = str(path)
                            self._on_result("saved", str(path))
                        except Exception as exc:
                            self.stats.episodes_discarded += 1
                            self._on_result("discarded", f"episode not saved: {exc}")
                elif kind == "abort":
                    if writer is not None:
                        writer.abort()
                        writer = None
                        self.stats.episodes_discarded += 1
                        self._on_result("discarded", payload)
                self.stats.write_time_s += time.monotonic() - t0
            except Exception as exc:  # never let the thread die
                self._error(f"writer thread: {exc}")
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
        if writer is not None:
            try:
                writer.abort()
                self.stats.episodes_discarded += 1
                self._on_result("discarded", "recorder closed before the episode ended")
            except Exception:
                pass

    def _error(self, message: str) -> None:
        self.stats.last_error = message
        self._on_result("error", message)


# ---------------------------------------------------------------------------------------------
# Node
# ---------------------------------------------------------------------------------------------
class RecorderNode(Node):
    PARAMS = {
        "episodes_dir": P("episodes", "Episode store directory (one HDF5 file per episode)", read_only=True),
        "source": P("policy", "Source tag of new episodes: teleop | policy | rl",
                    constraints="teleop, policy or rl"),
        "iteration": P(0, "iRe-VLA iteration tag of new episodes", min=0),
        "task": P("", "Task tag of new episodes (empty: the instruction)"),
        "instruction": P("", "Instruction used until one arrives on instruction_topic"),
        "camera_name": P("main", "Camera name inside the episode file", read_only=True),
        "joint_names": P([], "Joints to record, in this order (empty: all, in message order)",
                         type=Parameter.Type.STRING_ARRAY, read_only=True),
        "action_spec": P("auto", "auto | metaworld_4d | ee_delta_7d | ActionSpec JSON"),
        "action_topic": P("/policy_node/action", "Actions (JointState layout); one message = one step. "
                          "Can be changed while no episode is recorded (switch teleop <-> policy)"),
        "image_topic": P("/camera/image_raw", "Camera image (sensor-data QoS)", read_only=True),
        "joint_states_topic": P("/joint_states", "Joint states", read_only=True),
        "instruction_topic": P("/policy_node/instruction", "Task instruction (transient local)", read_only=True),
        "reward_topic": P("/reward_node/reward", "Per-step reward (empty: record 0)", read_only=True),
        "episode_end_topic": P("/reward_node/episode_end", "Ends the episode; data = success (empty: off)",
                               read_only=True),
        "start_services": P(["/reward_node/start_episode"],
                            "std_srvs/Trigger services called in order by ~/start_episode before recording",
                            read_only=True),
        "service_timeout_s": P(10.0, "Timeout of each start service call", min=0.1),
        "success_on_stop": P(False, "Success label of episodes ended with ~/stop_episode"),
        "end_grace_s": P(0.2, "After episode_end, wait this long for the final reward before saving",
                         min=0.0, max=5.0),
        "max_queue": P(64, "Steps buffered for the writer thread; more are dropped (and counted)",
                       min=1, read_only=True),
        "buffer_size": P(30, "Images / joint states kept for stamp matching", min=1, read_only=True),
        "compression": P("lzf", "Image compression: lzf | gzip | none", read_only=True),
        "prefer_cv_bridge": P(False, "Decode images with cv_bridge when it imports", read_only=True),
        "status_period_s": P(1.0, "Period of ~/status and /diagnostics", min=0.05, read_only=True),
    }

    def __init__(self, **kwargs):
        super().__init__("recorder_node", **kwargs)
        self.p = declare_params(self, self.PARAMS)
        from ire_vla_ros.episodes.store import EpisodeWriter  # h5py: only when the node starts
        from ire_vla_ros.robot.image_codec import make_decoder

        self._writer_cls = EpisodeWriter
        self._lock = threading.Lock()
        self._results: collections.deque = collections.deque()
        self.images = StampBuffer(self.p.buffer_size)
        self.joints = StampBuffer(self.p.buffer_size)
        self.recorder = EpisodeRecorder(
            self._make_writer, max_queue=self.p.max_queue,
            decode=self._decoder(make_decoder(self.p.prefer_cv_bridge)),
            camera_name=self.p.camera_name, on_result=lambda k, v: self._results.append((k, v)),
        )
        self.state = "idle"  # idle | starting | recording | ending
        self.episode = 0
        self.episode_steps = 0
        self.exact_image_steps = 0
        self.skipped_no_obs = 0
        self.skipped_stale = 0
        self._start_ns = 0  # messages stamped before this belong to the previous episode
        self._pending: Step | None = None
        self._begun = False
        self._reward = 0.0
        self._instruction = self.p.instruction
        self._last_drops = 0
        self._end_timer = None

        self.create_subscription(Image, self.p.image_topic, self._on_image, SENSOR_QOS)
        self.create_subscription(JointState, self.p.joint_states_topic, self._on_joints, SENSOR_QOS)
        self.create_subscription(String, self.p.instruction_topic, self._on_instruction, LATCHED_QOS)
        self._action_sub = self.create_subscription(JointState, self.p.action_topic, self._on_action, RELIABLE_QOS)
        if self.p.reward_topic:
            self.create_subscription(Float32, self.p.reward_topic, self._on_reward, RELIABLE_QOS)
        if self.p.episode_end_topic:
            self.create_subscription(Bool, self.p.episode_end_topic, self._on_episode_end, RELIABLE_QOS)

        self._start_group = ReentrantCallbackGroup()
        self._start_clients = [self.create_client(Trigger, name, callback_group=self._start_group)
                               for name in self.p.start_services if name]
        self.create_service(Trigger, "~/start_episode", self._on_start, callback_group=self._start_group)
        self.create_service(Trigger, "~/stop_episode", self._on_stop)
        self.create_service(SetBool, "~/stop_episode_labeled", self._on_stop_labeled)
        self.create_service(Trigger, "~/abort_episode", self._on_abort)
        self.saved_pub = self.create_publisher(String, "~/episode_saved", RELIABLE_QOS)
        self.status_pub = self.create_publisher(String, "~/status", LATCHED_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.add_on_set_parameters_callback(self._validate_params)
        self.add_post_set_parameters_callback(self._apply_params)
        self.create_timer(0.05, self._drain_results)
        self.create_timer(self.p.status_period_s, self._publish_status)
        self._publish_status()
        self.get_logger().info(
            f"recording {self.p.action_topic} + {self.p.image_topic} into {Path(self.p.episodes_dir).resolve()} "
            f"(source={self._param('source')}); call ~/start_episode"
        )

    # helpers ---------------------------------------------------------------------------
    def _param(self, name):
        return self.get_parameter(name).value

    @staticmethod
    def _decoder(decode_msg):
        def decode(image):
            return image if isinstance(image, np.ndarray) else decode_msg(image)
        return decode

    def _make_writer(self, meta: dict):
        """Runs in the writer thread."""
        return self._writer_cls(self.p.episodes_dir, compression=None if self.p.compression == "none"
                                else self.p.compression, **meta)

    def _episode_meta(self, action_names: list[str], joint_names: list[str]) -> dict:
        source = self._param("source")
        instruction = self._instruction or self._param("instruction")
        if not instruction:
            raise ValueError(f"no instruction yet (topic {self.p.instruction_topic} and parameter are empty)")
        return dict(
            instruction=instruction,
            task=self._param("task") or instruction,
            source=source,
            iteration=int(self._param("iteration")),
            action_spec=resolve_action_spec(self._param("action_spec"), action_names),
            joint_names=joint_names,
            camera_names=(self.p.camera_name,),
            metadata={"recorder": self.get_fully_qualified_name(), "action_topic": self.p.action_topic,
                      "episode_index": self.episode},
        )

    def _validate_params(self, params):
        from rcl_interfaces.msg import SetParametersResult

        from ire_vla_ros.episodes.store import SOURCES

        for prm in params:
            if prm.name == "source" and prm.value not in SOURCES:
                return SetParametersResult(successful=False, reason=f"source must be one of {SOURCES}")
            if prm.name == "action_topic" and self.state != "idle":
                return SetParametersResult(successful=False,
                                           reason=f"an episode is {self.state}: stop it before switching topics")
        return SetParametersResult(successful=True)

    def _apply_params(self, params):
        for prm in params:
            if prm.name == "action_topic" and prm.value != self._action_sub.topic_name:
                self.destroy_subscription(self._action_sub)
                self._action_sub = self.create_subscription(JointState, prm.value, self._on_action, RELIABLE_QOS)
                self.get_logger().info(f"recording actions from {prm.value}")

    # sensor callbacks: cache only -------------------------------------------------------------
    def _before_start(self, t_ns: int) -> bool:
        """Stamped before the episode began (e.g. an observation from before the sim reset)?
        Only judged when the stamp is on this node's clock (within 5 s of now): a camera stamping
        with another clock is never filtered."""
        now = self.get_clock().now().nanoseconds
        return t_ns < self._start_ns and abs(now - t_ns) < 5_000_000_000

    def _stale_at_start(self, t_ns: int) -> bool:
        """At episode start: stamped before it, or on another clock (cannot tell: dropped)."""
        now = self.get_clock().now().nanoseconds
        return t_ns < self._start_ns or abs(now - t_ns) >= 5_000_000_000

    def _on_image(self, msg: Image) -> None:
        t = stamp_ns(msg.header.stamp)
        if not self._before_start(t):
            self.images.add(t, msg)

    def _on_joints(self, msg: JointState) -> None:
        t = stamp_ns(msg.header.stamp)
        if not self._before_start(t):
            self.joints.add(t, msg)

    def _on_instruction(self, msg: String) -> None:
        self._instruction = msg.data

    def _on_reward(self, msg: Float32) -> None:
        self._reward = float(msg.data)

    def _on_action(self, msg: JointState) -> None:
        with self._lock:
            if self.state != "recording":
                return
            t = stamp_ns(msg.header.stamp)
            if self._before_start(t):
                self.skipped_stale += 1  # acted on an observation of the previous episode
                return
            image, exact = self.images.lookup(t)
            joint_msg, _ = self.joints.lookup(t)
            if image is None or joint_msg is None:
                self.skipped_no_obs += 1
                self.get_logger().warning("action before any image/joint state of this episode: step skipped",
                                          throttle_duration_sec=2.0)
                return
            try:
                names, action, log_prob, value = split_action(msg.name, msg.position)
                joints = select_joints(joint_msg.name, joint_msg.position, self.p.joint_names)
                if not self._begun:
                    joint_names = list(self.p.joint_names) or list(joint_msg.name)
                    self.recorder.begin(self._episode_meta(names, joint_names))
                    self._begun = True
            except (ValueError, KeyError) as exc:
                self.get_logger().error(f"step not recorded: {exc}", throttle_duration_sec=2.0)
                return
            self._push_pending()
            self._pending = Step(image=image, joint_positions=joints, action=action, timestamp=t * 1e-9,
                                 log_prob=log_prob, value=value, image_exact=exact)
            self.episode_steps += 1
            self.exact_image_steps += int(exact)

    def _push_pending(self) -> None:
        """Queue the held-back step with the reward that followed it (caller holds the lock)."""
        if self._pending is None:
            return
        self._pending.reward = self._reward
        if not self.recorder.add_step(self._pending):
            self.get_logger().warning(
                f"writer queue full ({self.p.max_queue}): step dropped "
                f"({self.recorder.stats.steps_dropped} dropped so far)", throttle_duration_sec=1.0)
        self._pending = None

    # episode control ---------------------------------------------------------------------------
    def _begin_recording(self) -> None:
        with self._lock:
            # observations of the previous episode go; the new episode's first one (published by a
            # reset while ~/start_episode was calling its services) stays
            self.images.prune(self._stale_at_start)
            self.joints.prune(self._stale_at_start)
            self._pending = None
            self._begun = False
            self._reward = 0.0
            self.episode += 1
            self.episode_steps = 0
            self.exact_image_steps = 0
            self.state = "recording"
        self._publish_status()
        self.get_logger().info(f"episode {self.episode}: recording")

    def _finish(self, success: bool | None, why: str) -> str:
        """Save (success given) or discard (None) the current episode."""
        with self._lock:
            if self.state not in ("recording", "ending"):
                return f"no episode is being recorded (state {self.state})"
            if success is not None:
                self._push_pending()
            else:
                self._pending = None
            steps, begun = self.episode_steps, self._begun
            self.state = "idle"
            self._begun = False
            if begun:
                if success is None:
                    self.recorder.abort(why)
                else:
                    self.recorder.end(success, {"end_reason": why, "steps_seen": steps})
        self._publish_status()
        if not begun:
            msg = f"episode {self.episode} had no steps: nothing saved"
        elif success is None:
            msg = f"episode {self.episode} discarded ({why})"
        else:
            msg = f"episode {self.episode} ({steps} steps, {'success' if success else 'failure'}) saving ({why})"
        self.get_logger().info(msg)
        return msg

    def _on_start(self, _req, resp):
        with self._lock:
            if self.state != "idle":
                resp.success = False
                resp.message = f"cannot start: an episode is {self.state} (stop or abort it first)"
                return resp
            missing = [c.srv_name for c in self._start_clients if not c.service_is_ready()]
            if missing:
                resp.success = False
                resp.message = f"cannot start: service(s) {missing} not available"
                return resp
            self.state = "starting"
            self._start_ns = self.get_clock().now().nanoseconds
        if not self._start_clients:
            self._begin_recording()
            resp.success, resp.message = True, f"episode {self.episode} recording"
            return resp
        # Call the start services one after the other without blocking: each response's done
        # callback sends the next request; recording begins after the last one (see ~/status).
        self._start_chain(0)
        resp.success = True
        resp.message = (f"episode {self.episode + 1} starting: calling "
                        f"{', '.join(c.srv_name for c in self._start_clients)}; ~/status shows 'recording' when ready")
        return resp

    def _start_chain(self, index: int) -> None:
        if index >= len(self._start_clients):
            self._begin_recording()
            return
        client = self._start_clients[index]
        future = client.call_async(Trigger.Request())
        deadline = self.create_timer(self.p.service_timeout_s, lambda: future.cancel(),
                                     callback_group=self._start_group)

        def done(fut):
            deadline.cancel()
            self.destroy_timer(deadline)
            if fut.cancelled():
                self._start_failed(f"{client.srv_name} did not answer within {self.p.service_timeout_s} s")
            elif fut.exception() is not None:
                self._start_failed(f"{client.srv_name} failed: {fut.exception()}")
            elif not fut.result().success:
                self._start_failed(f"{client.srv_name} refused: {fut.result().message}")
            else:
                self._start_chain(index + 1)

        future.add_done_callback(done)

    def _start_failed(self, why: str) -> None:
        with self._lock:
            self.state = "idle"
            self.recorder.stats.last_error = f"start failed: {why}"
        self._publish_status()
        self.get_logger().error(f"cannot start episode: {why}")

    def _on_stop(self, _req, resp):
        return self._stop_response(resp, bool(self._param("success_on_stop")), "~/stop_episode")

    def _on_stop_labeled(self, req, resp):
        return self._stop_response(resp, bool(req.data), "~/stop_episode_labeled")

    def _stop_response(self, resp, success, why):
        if self._end_timer is not None:
            self._cancel_end_timer()
        msg = self._finish(success, why)
        resp.success = not msg.startswith("no episode")
        resp.message = msg
        return resp

    def _on_abort(self, _req, resp):
        self._cancel_end_timer()
        msg = self._finish(None, "~/abort_episode")
        resp.success = not msg.startswith("no episode")
        resp.message = msg
        return resp

    def _on_episode_end(self, msg: Bool) -> None:
        with self._lock:
            if self.state != "recording":
                return
            self.state = "ending"  # no more steps; wait briefly for the final reward
        success = bool(msg.data)
        if self.p.end_grace_s <= 0:
            self._finish(success, "episode_end")
            return
        self._end_timer = self.create_timer(self.p.end_grace_s, lambda: self._end_after_grace(success))

    def _end_after_grace(self, success: bool) -> None:
        self._cancel_end_timer()
        self._finish(success, "episode_end")

    def _cancel_end_timer(self) -> None:
        if self._end_timer is not None:
            self._end_timer.cancel()
            self.destroy_timer(self._end_timer)
            self._end_timer = None

    # reporting ---------------------------------------------------------------------------------
    def _drain_results(self) -> None:
        while self._results:
            kind, payload = self._results.popleft()
            if kind == "saved":
                self.saved_pub.publish(String(data=payload))
                self.get_logger().info(f"saved {payload}")
            elif kind == "discarded":
                self.get_logger().warning(str(payload))
            else:
                self.get_logger().error(str(payload), throttle_duration_sec=1.0)
            self._publish_status()

    def status(self) -> dict:
        s = self.recorder.stats
        return dict(
            state=self.state, episode=self.episode, episode_steps=self.episode_steps,
            exact_image_steps=self.exact_image_steps, skipped_no_obs=self.skipped_no_obs,
            skipped_stale=self.skipped_stale,
            episodes_saved=s.episodes_saved, episodes_discarded=s.episodes_discarded,
            steps_written=s.steps_written, steps_dropped=s.steps_dropped, step_errors=s.step_errors,
            queue_depth=s.queue_depth, max_queue_depth=s.max_queue_depth, last_path=s.last_path,
            last_error=s.last_error, source=self._param("source"), iteration=int(self._param("iteration")),
        )

    def _publish_status(self) -> None:
        st = self.status()
        self.status_pub.publish(String(data=json.dumps(st)))
        drops = st["steps_dropped"]
        level = DiagnosticStatus.OK
        message = st["state"]
        if drops > self._last_drops:
            level, message = DiagnosticStatus.WARN, f"{drops - self._last_drops} steps dropped (writer too slow)"
        elif st["last_error"]:
            level, message = DiagnosticStatus.WARN, st["last_error"][:200]
        self._last_drops = drops
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [DiagnosticStatus(
            level=level, name=f"{self.get_name()}: episode recorder", hardware_id="episode_store",
            message=message, values=[KeyValue(key=k, value=str(v)) for k, v in st.items()],
        )]
        self.diag_pub.publish(arr)

    def destroy_node(self):
        # finish what is queued; an unfinished episode is discarded (its .partial file removed)
        if self.state in ("recording", "ending"):
            self.get_logger().warning(f"shutting down while episode {self.episode} is recording: discarded")
        self.recorder.close()
        return super().destroy_node()


def main(args=None):
    return run_node(
        RecorderNode, args, params=RecorderNode.PARAMS,
        description="Record episodes (image, joints, instruction, action, reward) into the HDF5 episode store.",
    )


if __name__ == "__main__":
    raise SystemExit(main())
