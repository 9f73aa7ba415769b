"""rosbag2 recordings (MCAP or sqlite3 storage, directories or bare `.mcap`/`.db3` files) -> episodes.

`ire-vla episodes import-bag BAG... --out EPISODES` turns demonstrations a team already holds as
`ros2 bag record` output into `teleop` episodes of the HDF5 store, ready for `ire-vla train sft`.
Read with `rosbags` (pure Python, no ROS needed); messages are deserialized with the type
definitions the bag embeds (Jazzy's standard types when a bag has none).

Topics (flags or a YAML, see config/bag_import.yaml)
  camera        sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8) or sensor_msgs/CompressedImage
  joint_states  sensor_msgs/JointState (all joints in message order, or `joint_names` in that order)
  command       geometry_msgs/TwistStamped (servo_twist) or geometry_msgs/PoseStamped (servo_pose)
  gripper       std_msgs/Float64 (optional: without it the gripper action is `default_gripper`)
  success       std_msgs/Bool (optional: the last value inside an episode labels it)
  instruction   std_msgs/String (optional: else the `instruction` setting)
  ee_pose       geometry_msgs/PoseStamped (optional, PoseStamped commands: the pose the target
                was computed from; without it the previous target is the reference)
  marker        any type (segment by marker: every message starts a new episode)

Commands -> actions: the inverse of what policy_node publishes. It sends
`twist = action_to_delta(action) * control_rate_hz` (robot/motion.py `twist_from_delta`), so an
action is the motion integrated over one control period divided by the spec's scales. The
importer resamples the command stream to `control_rate_hz` on a grid that starts at the first
command of each episode: step k's action is the twist held (zero-order hold, a command expires
after `command_timeout_s` like MoveIt Servo's) integrated over [t_k, t_k + 1/rate), so a command
stream at the control rate comes back exactly and a faster teleop stream (50 Hz) is averaged into
the motion of each period. PoseStamped targets are turned into deltas against the reference pose
(inverse of `pose_after_delta`) and summed per period (window centred on the tick). The gripper
is the last Float64 sent before the period ends. Actions are clipped to the spec's bounds (counted
in the metadata as `clipped_steps`).

Pairing (the recorder's rule): step k observes the newest camera frame stamped at or before t_k
and the newest joint state stamped at or before that frame, each within `pair_tolerance_s`;
a tick without both is dropped and counted (`dropped_ticks` in the metadata). Stamps are the
messages' `header.stamp` (the bag's receive time for unstamped types, or for every topic with
`stamps: bag`).

Segmentation: `bag` (one episode per bag), `marker` (a message on `marker_topic` starts the next
episode) or `gap` (a camera silence longer than `gap_s` ends an episode).

Atomicity: a bag is imported whole or not at all. Every episode of a bag is written through
`EpisodeWriter` (`.partial` files) and only finalized after the whole bag was read and paired;
any error aborts all of them. Errors are `BagImportError`: one line `bag: topic T: reason`.

Rewards: 0 on every step, 1 on the last step of a successful episode (sparse success reward).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ire_vla_ros.episodes.store import EpisodeWriter
from ire_vla_ros.robot.image_codec import ImageDecodeError, decode_image, resize_rgb
from ire_vla_ros.robot.motion import quat_mul
from ire_vla_ros.vla.action_spec import ActionSpec

__all__ = [
    "BagImportError",
    "BagImportConfig",
    "BagImportResult",
    "import_bag",
    "import_bags",
    "action_from_twist",
    "action_from_pose",
    "quat_to_rpy",
    "read_bag_messages",
]

log = logging.getLogger(__name__)

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
COMMAND_TYPES = ("geometry_msgs/msg/TwistStamped", "geometry_msgs/msg/PoseStamped")
SEGMENT_MODES = ("bag", "marker", "gap")
_NS = 1_000_000_000


class BagImportError(Exception):
    """A bag cannot be imported; str() is one line naming the bag, the topic and the reason."""

    def __init__(self, bag: str | Path, topic: str | None, reason: str):
        self.bag, self.topic, self.reason = str(bag), topic or "-", reason
        super().__init__(f"{self.bag}: topic {self.topic}: {reason}")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass
class BagImportConfig:
    camera_topic: str = "/camera/image_raw"
    joint_states_topic: str = "/joint_states"
    command_topic: str = "/servo_node/delta_twist_cmds"
    gripper_topic: str = "/gripper/command"      # "" : no gripper topic (default_gripper)
    success_topic: str = ""
    instruction_topic: str = ""
    ee_pose_topic: str = ""
    marker_topic: str = ""
    segment: str = "bag"                          # bag | marker | gap
    gap_s: float = 1.0
    control_rate_hz: float = 10.0
    pair_tolerance_s: float = 0.1
    command_timeout_s: float = 0.25
    action_spec: str = "ee_delta_7d"              # a named spec, ActionSpec JSON (or from --checkpoint)
    joint_names: list[str] = field(default_factory=list)
    camera_name: str = "main"
    instruction: str = ""
    task: str = ""
    default_success: bool = True                  # teleop demonstrations, unless a success topic says no
    default_gripper: float = -1.0
    min_steps: int = 2
    image_size: list[int] | None = None           # [H, W]: resize (INTER_AREA); None keeps the size
    stamps: str = "header"                        # header | bag
    compression: str | None = "lzf"

    def __post_init__(self):
        if self.segment not in SEGMENT_MODES:
            raise ValueError(f"segment must be one of {SEGMENT_MODES}, got {self.segment!r}")
        if self.segment == "marker" and not self.marker_topic:
            raise ValueError("segment 'marker' needs marker_topic")
        if isinstance(self.compression, str) and self.compression.lower() == "none":
            self.compression = None
        if self.compression not in ("lzf", "gzip", None):
            raise ValueError(f"compression must be lzf, gzip or none, got {self.compression!r}")
        if self.stamps not in ("header", "bag"):
            raise ValueError(f"stamps must be 'header' or 'bag', got {self.stamps!r}")
        for name in ("control_rate_hz", "pair_tolerance_s", "command_timeout_s", "gap_s"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        if self.image_size is not None:
            if len(self.image_size) != 2 or min(int(x) for x in self.image_size) <= 0:
                raise ValueError(f"image_size must be [height, width], got {self.image_size}")
            self.image_size = [int(x) for x in self.image_size]
        if not self.camera_topic or not self.joint_states_topic or not self.command_topic:
            raise ValueError("camera_topic, joint_states_topic and command_topic are required")

    @classmethod
    def from_dict(cls, d: dict) -> "BagImportConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown bag import setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "BagImportConfig":
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        data.update(overrides or {})
        return cls.from_dict(data)

    def resolve_action_spec(self) -> ActionSpec:
        s = (self.action_spec or "").strip()
        if s.startswith("{"):
            return ActionSpec.from_json(s)
        from ire_vla_ros.robot.action_msg import spec_by_name

        return spec_by_name(s)


@dataclass
class BagImportResult:
    bag: Path
    episodes: list[Path]
    n_steps: int
    dropped_ticks: dict[str, int]
    seconds: float


# --------------------------------------------------------------------------------------------
# the inverse of the policy node's command conversion (pure functions, tested by round trip)
# --------------------------------------------------------------------------------------------
def quat_to_rpy(q_xyzw) -> np.ndarray:
    """Inverse of motion.rpy_to_quat (fixed-axis XYZ): quaternion (x, y, z, w) -> roll, pitch, yaw."""
    x, y, z, w = (float(v) for v in q_xyzw)
    roll = math.atan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
    pitch = math.asin(max(-1.0, min(1.0, 2 * (w * y - z * x))))
    yaw = math.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
    return np.array([roll, pitch, yaw])


def _action_from_metric(translation_m, rotation_rad, gripper: float | None, spec: ActionSpec) -> np.ndarray:
    """Inverse of safety.action_to_delta: metres / radians per step (+ gripper) -> env-unit action."""
    t = np.asarray(translation_m, np.float64) / float(spec.translation_scale_m)
    r = np.asarray(rotation_rad, np.float64) / float(spec.rotation_scale_rad)
    out = np.zeros(spec.dim, np.float64)
    for names, values in ((("dx", "dy", "dz"), t), (("droll", "dpitch", "dyaw"), r)):
        for n, v in zip(names, values):
            j = spec.index(n)
            if j is not None:
                out[j] = v
    g = spec.index("gripper")
    if g is not None:
        out[g] = float(gripper) if gripper is not None else 0.0
    return out


def action_from_twist(linear, angular, rate_hz: float, spec: ActionSpec, gripper: float | None = None) -> np.ndarray:
    """Inverse of `twist_from_delta(action_to_delta(action, spec), rate_hz)` (+ the gripper command)."""
    rate = float(rate_hz)
    return _action_from_metric(np.asarray(linear, np.float64) / rate, np.asarray(angular, np.float64) / rate,
                               gripper, spec)


def delta_from_pose(ref_pos, ref_quat, target_pos, target_quat) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `pose_after_delta`: (translation m, roll/pitch/yaw rad) taking ref to target."""
    t = np.asarray(target_pos, np.float64) - np.asarray(ref_pos, np.float64)
    qr = np.asarray(ref_quat, np.float64)
    qr = qr / np.linalg.norm(qr)
    qt = np.asarray(target_quat, np.float64)
    qt = qt / np.linalg.norm(qt)
    q_delta = quat_mul(qt, np.array([-qr[0], -qr[1], -qr[2], qr[3]]))  # target * ref^-1
    return t, quat_to_rpy(q_delta)


def action_from_pose(ref_pos, ref_quat, target_pos, target_quat, spec: ActionSpec,
                     gripper: float | None = None) -> np.ndarray:
    """Inverse of `pose_after_delta(ref, action_to_delta(action, spec))` (+ the gripper command)."""
    t, r = delta_from_pose(ref_pos, ref_quat, target_pos, target_quat)
    return _action_from_metric(t, r, gripper, spec)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_JAZZY)


def _open_reader(bag: Path):
    from rosbags.highlevel import AnyReader

    if not bag.exists():
        raise BagImportError(bag, None, "no such file or directory")
    try:
        reader = AnyReader([bag], default_typestore=_typestore())
        reader.open()
    except Exception as e:  # AnyReaderError, ReaderError, sqlite/mcap decode errors, yaml errors
        raise BagImportError(bag, None, f"unreadable bag ({type(e).__name__}: {e})") from e
    return reader


def read_bag_messages(bag: str | Path, topics: Sequence[str] | None = None,
                      deserialize: bool = True) -> Iterable[tuple[str, str, int, Any]]:
    """(topic, msgtype, log time ns, message or raw bytes) for every message, in log-time order.

    Plain reading of a bag (used by the tests and the benchmark's 'read only' column).
    """
    bag = Path(bag)
    reader = _open_reader(bag)
    try:
        conns = [c for c in reader.connections if topics is None or c.topic in topics]
        for conn, t, raw in reader.messages(connections=conns):
            yield conn.topic, conn.msgtype, t, (reader.deserialize(raw, conn.msgtype) if deserialize else raw)
    finally:
        reader.close()


def _stamp_ns(stamp) -> int:
    return int(stamp.sec) * _NS + int(stamp.nanosec)


def _cdr_header_stamp(raw) -> int:
    """header.stamp of a CDR-serialized message whose first field is a std_msgs/Header (Image,
    CompressedImage): read straight from the bytes so pass 1 never deserializes image payloads."""
    little = raw[1] == 1  # encapsulation kind: CDR_LE = 0x0001
    sec, nanosec = struct.unpack_from("<iI" if little else ">iI", raw, 4)
    return sec * _NS + nanosec


@dataclass
class _Stream:
    t: list[int] = field(default_factory=list)
    v: list[Any] = field(default_factory=list)

    def arrays(self) -> tuple[np.ndarray, list[Any]]:
        order = np.argsort(np.asarray(self.t, np.int64), kind="stable")
        return np.asarray(self.t, np.int64)[order], [self.v[i] for i in order]


@dataclass
class _BagData:
    camera_type: str = ""
    command_type: str = ""
    camera_t: np.ndarray | None = None   # stamps in camera-stream order
    streams: dict[str, _Stream] = field(default_factory=dict)
    t_min: int = 0
    t_max: int = 0
    n_messages: int = 0


def _check_topics(bag: Path, reader, cfg: BagImportConfig) -> dict[str, Any]:
    by_topic = {c.topic: c for c in reader.connections}
    available = ", ".join(sorted(by_topic)) or "none"
    wanted = {
        "camera": (cfg.camera_topic, IMAGE_TYPES),
        "joints": (cfg.joint_states_topic, ("sensor_msgs/msg/JointState",)),
        "command": (cfg.command_topic, COMMAND_TYPES),
    }
    if cfg.gripper_topic:
        wanted["gripper"] = (cfg.gripper_topic, ("std_msgs/msg/Float64", "std_msgs/msg/Float32"))
    if cfg.success_topic:
        wanted["success"] = (cfg.success_topic, ("std_msgs/msg/Bool",))
    if cfg.instruction_topic:
        wanted["instruction"] = (cfg.instruction_topic, ("std_msgs/msg/String",))
    if cfg.ee_pose_topic:
        wanted["ee_pose"] = (cfg.ee_pose_topic, ("geometry_msgs/msg/PoseStamped",))
    if cfg.segment == "marker":
        wanted["marker"] = (cfg.marker_topic, None)
    conns = {}
    for role, (topic, types) in wanted.items():
        conn = by_topic.get(topic)
        if conn is None:
            raise BagImportError(bag, topic, f"mapped as {role} but not in the bag (topics: {available})")
        if types is not None and conn.msgtype not in types:
            raise BagImportError(bag, topic, f"{role} has type {conn.msgtype}, expected {' or '.join(types)}")
        conns[role] = conn
    return conns


def _pass1(bag: Path, reader, cfg: BagImportConfig, conns: dict) -> _BagData:
    """Every mapped topic except the image payloads: stamps and the small messages."""
    data = _BagData(camera_type=conns["camera"].msgtype, command_type=conns["command"].msgtype)
    role_of = {c.id: r for r, c in conns.items()}
    streams = {r: _Stream() for r in conns}
    use_header = cfg.stamps == "header"
    cam_t: list[int] = []
    t_min, t_max, n = None, None, 0
    topic = None
    try:
        for conn, t_log, raw in reader.messages(connections=list(conns.values())):
            role = role_of[conn.id]
            topic = conn.topic
            n += 1
            t_min = t_log if t_min is None else min(t_min, t_log)
            t_max = t_log if t_max is None else max(t_max, t_log)
            if role == "camera":
                t = _cdr_header_stamp(raw) if use_header else t_log
                cam_t.append(t if t > 0 else t_log)
                continue
            if role == "marker":
                streams[role].t.append(t_log)
                streams[role].v.append(None)
                continue
            msg = reader.deserialize(raw, conn.msgtype)
            header = getattr(msg, "header", None)
            t = _stamp_ns(header.stamp) if (use_header and header is not None) else t_log
            if t <= 0:
                t = t_log
            s = streams[role]
            if role == "joints":
                s.t.append(t)
                s.v.append((list(msg.name), np.asarray(msg.position, np.float64)))
            elif role == "command":
                if conn.msgtype.endswith("TwistStamped"):
                    tw = msg.twist
                    v = np.array([tw.linear.x, tw.linear.y, tw.linear.z, tw.angular.x, tw.angular.y, tw.angular.z])
                else:
                    p, o = msg.pose.position, msg.pose.orientation
                    v = np.array([p.x, p.y, p.z, o.x, o.y, o.z, o.w])
                if not np.all(np.isfinite(v)):
                    raise BagImportError(bag, conn.topic, f"non-finite command at {t * 1e-9:.3f} s: {v.tolist()}")
                s.t.append(t)
                s.v.append(v)
            elif role == "ee_pose":
                p, o = msg.pose.position, msg.pose.orientation
                s.t.append(t)
                s.v.append(np.array([p.x, p.y, p.z, o.x, o.y, o.z, o.w]))
            elif role == "gripper":
                s.t.append(t)
                s.v.append(float(msg.data))
            elif role == "success":
                s.t.append(t)
                s.v.append(bool(msg.data))
            elif role == "instruction":
                s.t.append(t)
                s.v.append(str(msg.data))
    except BagImportError:
        raise
    except Exception as e:  # truncated chunk, bad CRC, undecodable message...
        raise BagImportError(bag, topic, f"corrupt or truncated bag ({type(e).__name__}: {e})") from e
    data.camera_t = np.asarray(cam_t, np.int64)
    data.streams = streams
    data.t_min, data.t_max, data.n_messages = t_min or 0, t_max or 0, n
    for role in ("camera", "joints", "command"):
        count = len(cam_t) if role == "camera" else len(streams[role].t)
        if count == 0:
            raise BagImportError(bag, conns[role].topic, f"no {role} messages in the bag")
    return data


# --------------------------------------------------------------------------------------------
# segmentation, resampling, pairing (no I/O)
# --------------------------------------------------------------------------------------------
def _segments(data: _BagData, cfg: BagImportConfig) -> list[tuple[int, int]]:
    """[start, end) in stamp time; end is exclusive."""
    cmd_t, _ = data.streams["command"].arrays()
    begin = int(min(data.t_min, cmd_t[0], data.camera_t.min()))
    end = int(max(data.t_max, cmd_t[-1], data.camera_t.max())) + 1
    if cfg.segment == "bag":
        return [(begin, end)]
    if cfg.segment == "marker":
        marks = sorted(set(int(t) for t in data.streams["marker"].t))
        bounds = [begin] + [m for m in marks if begin < m < end] + [end]
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    cam = np.sort(data.camera_t)
    cuts = np.flatnonzero(np.diff(cam) > int(cfg.gap_s * _NS))
    starts = [begin] + [int(cam[i + 1]) for i in cuts]  # an episode runs until the next one's first frame
    return list(zip(starts, starts[1:] + [end]))


def _at_or_before(times: np.ndarray, t: int) -> int:
    """Index of the newest entry stamped <= t, or -1."""
    return int(np.searchsorted(times, t, side="right")) - 1


def _twist_displacement(cmd_t: np.ndarray, cmd_v: list, t0: int, t1: int, timeout_ns: int) -> np.ndarray:
    """Integral over [t0, t1) of the zero-order-held twist (a command lapses after timeout_ns)."""
    out = np.zeros(6)
    i = _at_or_before(cmd_t, t0)
    j = _at_or_before(cmd_t, t1 - 1)
    for k in range(max(i, 0), j + 1):
        start = max(int(cmd_t[k]), t0)
        stop = min(t1, int(cmd_t[k + 1]) if k + 1 < len(cmd_t) else t1, int(cmd_t[k]) + timeout_ns)
        if stop > start:
            out += cmd_v[k] * ((stop - start) * 1e-9)
    return out


@dataclass
class _Row:
    segment: int
    image_index: int
    t_ns: int
    joints: np.ndarray
    action: np.ndarray


def _plan(bag: Path, data: _BagData, cfg: BagImportConfig, spec: ActionSpec, conns: dict):
    """Resample to the control grid and pair; returns (rows, per-segment info, dropped counts)."""
    period = int(round(_NS / cfg.control_rate_hz))
    tol = int(cfg.pair_tolerance_s * _NS)
    timeout = int(cfg.command_timeout_s * _NS)
    cmd_t, cmd_v = data.streams["command"].arrays()
    jt, jv = data.streams["joints"].arrays()
    cam_order = np.argsort(data.camera_t, kind="stable")
    cam_sorted = data.camera_t[cam_order]
    grip_t, grip_v = data.streams["gripper"].arrays() if "gripper" in data.streams else (np.zeros(0, np.int64), [])
    twist = data.command_type.endswith("TwistStamped")
    if not twist:
        if "ee_pose" in data.streams:
            ref_t, ref_v = data.streams["ee_pose"].arrays()
        else:
            ref_t, ref_v = cmd_t, cmd_v  # previous target is the reference (first command skipped)
    joint_index: dict[tuple, list[int] | None] = {}
    dropped = {"no_image": 0, "no_joint_state": 0, "joint_names": 0}
    rows: list[_Row] = []
    segs = []
    clipped = 0
    for si, (a, b) in enumerate(_segments(data, cfg)):
        in_seg = np.flatnonzero((cmd_t >= a) & (cmd_t < b))
        if in_seg.size == 0:
            segs.append({"range": (a, b), "rows": 0})
            continue
        first, last = int(cmd_t[in_seg[0]]), int(cmd_t[in_seg[-1]])
        n_ticks = (last - first) // period + 1
        seg_rows = 0
        for k in range(n_ticks):
            tk = first + k * period
            ci = _at_or_before(cam_sorted, tk)
            if ci < 0 or tk - int(cam_sorted[ci]) > tol or int(cam_sorted[ci]) < a:
                dropped["no_image"] += 1
                continue
            t_img = int(cam_sorted[ci])
            ji = _at_or_before(jt, t_img)
            if ji < 0 or t_img - int(jt[ji]) > tol:
                dropped["no_joint_state"] += 1
                continue
            names, pos = jv[ji]
            key = tuple(names)
            if key not in joint_index:
                if cfg.joint_names:
                    idx = {n: i for i, n in enumerate(names)}
                    joint_index[key] = [idx[n] for n in cfg.joint_names] if all(n in idx for n in cfg.joint_names) else None
                else:
                    joint_index[key] = list(range(len(names)))
            sel = joint_index[key]
            if sel is None or len(pos) < len(names):
                dropped["joint_names"] += 1
                continue
            joints = np.asarray(pos[sel], np.float32)
            gi = _at_or_before(grip_t, tk + period - 1)
            gripper = grip_v[gi] if gi >= 0 else (grip_v[0] if grip_v else cfg.default_gripper)
            if twist:
                disp = _twist_displacement(cmd_t, cmd_v, tk, tk + period, timeout)
                action = _action_from_metric(disp[:3], disp[3:], gripper, spec)
            else:
                t_sum, r_sum = np.zeros(3), np.zeros(3)
                for c in np.flatnonzero((cmd_t >= tk - period // 2) & (cmd_t < tk + period - period // 2)):
                    ri = _at_or_before(ref_t, int(cmd_t[c]) - (0 if "ee_pose" in data.streams else 1))
                    if ri < 0:
                        continue
                    tr, rr = delta_from_pose(ref_v[ri][:3], ref_v[ri][3:], cmd_v[c][:3], cmd_v[c][3:])
                    t_sum += tr
                    r_sum += rr
                action = _action_from_metric(t_sum, r_sum, gripper, spec)
            if not np.all(np.isfinite(action)) or not np.all(np.isfinite(joints)):
                raise BagImportError(bag, conns["command"].topic, f"non-finite action/joints at {tk * 1e-9:.3f} s")
            clipped_action = spec.clip(action.astype(np.float32))
            if not np.allclose(clipped_action, action, rtol=0, atol=1e-6):
                clipped += 1
            rows.append(_Row(si, int(cam_order[ci]), tk, joints, clipped_action))
            seg_rows += 1
        segs.append({"range": (a, b), "rows": seg_rows, "first_cmd": first, "last_cmd": last})
    return rows, segs, dropped, clipped


def _last_in(times: np.ndarray, values: list, a: int, b: int):
    """The last value stamped in (a, b] (success, instruction), or None."""
    i = _at_or_before(times, b)
    if i >= 0 and int(times[i]) > a:
        return values[i]
    return None


def _decode_camera(msg, msgtype: str) -> np.ndarray:
    if msgtype.endswith("CompressedImage"):
        import cv2

        buf = np.frombuffer(bytes(msg.data), np.uint8)
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
        if img is None:
            raise ImageDecodeError(f"cannot decode CompressedImage (format {msg.format!r}, {buf.size} bytes)")
        return np.ascontiguousarray(img[:, :, ::-1])
    return decode_image(msg.encoding, msg.height, msg.width, msg.step, msg.data, msg.is_bigendian)


# --------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------
def import_bag(bag: str | Path, out: str | Path, cfg: BagImportConfig, *, spec: ActionSpec | None = None,
               iteration: int = 0) -> BagImportResult:
    """Import one bag into the store `out`; all of its episodes or none (BagImportError)."""
    t_start = time.monotonic()
    bag = Path(bag)
    spec = spec or cfg.resolve_action_spec()
    reader = _open_reader(bag)
    try:
        conns = _check_topics(bag, reader, cfg)
        data = _pass1(bag, reader, cfg, conns)
        rows, segs, dropped, clipped = _plan(bag, data, cfg, spec, conns)
        # per-segment labels
        succ = data.streams.get("success")
        succ_t, succ_v = succ.arrays() if succ is not None else (np.zeros(0, np.int64), [])
        instr = data.streams.get("instruction")
        instr_t, instr_v = instr.arrays() if instr is not None else (np.zeros(0, np.int64), [])
        per_seg: dict[int, list[_Row]] = {}
        for r in rows:
            per_seg.setdefault(r.segment, []).append(r)
        keep = {si: rs for si, rs in per_seg.items() if len(rs) >= max(1, cfg.min_steps)}
        short = sum(1 for si, rs in per_seg.items() if si not in keep)
        if not keep:
            raise BagImportError(bag, cfg.command_topic, (
                f"no episode with >= {cfg.min_steps} paired steps (dropped ticks {dropped}; "
                f"check pair_tolerance_s={cfg.pair_tolerance_s} and the topics' header stamps; --stamps bag uses "
                f"receive times)"))
        labels = {}
        for si in keep:
            a, b = segs[si]["range"]
            s = _last_in(succ_t, succ_v, a - 1, b - 1) if succ is not None else None
            ins = cfg.instruction or (_last_in(instr_t, instr_v, -1, b - 1) if instr is not None else None) or ""
            if not ins.strip():
                raise BagImportError(bag, cfg.instruction_topic or None,
                                     "no instruction: give --instruction or map an instruction topic")
            labels[si] = (cfg.default_success if s is None else bool(s), ins)
        # pass 2: the camera frames the rows use, in stream order, into one writer per episode
        wanted: dict[int, list[_Row]] = {}
        for si, rs in keep.items():
            for r in rs:
                wanted.setdefault(r.image_index, []).append(r)
        writers: dict[int, EpisodeWriter] = {}
        joint_names = list(cfg.joint_names) or None
        finalized: list[Path] = []
        try:
            cam_conn = conns["camera"]
            idx = -1
            try:
                messages = reader.messages(connections=[cam_conn])
                for _, _, raw in messages:
                    idx += 1
                    if idx not in wanted:
                        continue
                    msg = reader.deserialize(raw, cam_conn.msgtype)
                    try:
                        img = _decode_camera(msg, cam_conn.msgtype)
                    except ImageDecodeError as e:
                        raise BagImportError(bag, cam_conn.topic, f"frame {idx}: {e}") from e
                    if cfg.image_size is not None:
                        img = resize_rgb(img, tuple(cfg.image_size))
                    for r in wanted[idx]:
                        w = writers.get(r.segment)
                        if w is None:
                            w = writers[r.segment] = _new_writer(out, bag, cfg, spec, data, segs[r.segment],
                                                                 r, labels[r.segment][1], iteration, joint_names)
                        last = w.n_steps == len(keep[r.segment]) - 1
                        reward = 1.0 if (last and labels[r.segment][0]) else 0.0  # sparse success reward
                        try:
                            w.append(images={cfg.camera_name: img}, joint_positions=r.joints, action=r.action,
                                     reward=reward, timestamp=r.t_ns * 1e-9)
                        except ValueError as e:
                            raise BagImportError(bag, cam_conn.topic, f"step at {r.t_ns * 1e-9:.3f} s: {e}") from e
            except BagImportError:
                raise
            except Exception as e:
                raise BagImportError(bag, cam_conn.topic, f"corrupt or truncated bag ({type(e).__name__}: {e})") from e
            if set(writers) != set(keep) or any(writers[si].n_steps != len(rs) for si, rs in keep.items()):
                raise BagImportError(bag, cam_conn.topic, "camera stream changed between passes (bag modified?)")
            for si in sorted(writers):
                w = writers[si]
                success, _ = labels[si]
                meta = {"dropped_ticks_bag": dropped, "clipped_steps_bag": clipped,
                        "short_segments_skipped": short}
                finalized.append(w.finalize(success, metadata=meta))
        except BaseException:
            for w in writers.values():
                w.abort()
            for p in finalized:  # a later finalize failed: take the bag's earlier episodes back too
                try:
                    p.unlink()
                except OSError:
                    pass
            raise
    finally:
        reader.close()
    return BagImportResult(bag=bag, episodes=finalized, n_steps=sum(len(rs) for rs in keep.values()),
                           dropped_ticks=dropped, seconds=time.monotonic() - t_start)


def _new_writer(out, bag: Path, cfg: BagImportConfig, spec: ActionSpec, data: _BagData, seg: dict, row: _Row,
                instruction: str, iteration: int, joint_names):
    if joint_names is None:  # all joints, named as in the joint state the first step used
        jt, jv = data.streams["joints"].arrays()
        joint_names = list(jv[max(_at_or_before(jt, row.t_ns), 0)][0])
    meta = {
        "importer": "ire_vla_ros.episodes.bag_import",
        "bag": bag.name,
        "bag_path": str(bag.resolve()),
        "topics": {"camera": cfg.camera_topic, "joint_states": cfg.joint_states_topic,
                   "command": cfg.command_topic, "gripper": cfg.gripper_topic or None,
                   "success": cfg.success_topic or None, "instruction": cfg.instruction_topic or None,
                   "ee_pose": cfg.ee_pose_topic or None, "marker": cfg.marker_topic or None},
        "camera_type": data.camera_type,
        "command_type": data.command_type,
        "segmentation": cfg.segment,
        "time_range_ns": [int(seg["first_cmd"]), int(seg["last_cmd"])],
        "time_range_s": [seg["first_cmd"] * 1e-9, seg["last_cmd"] * 1e-9],
        "control_rate_hz": cfg.control_rate_hz,
        "pair_tolerance_s": cfg.pair_tolerance_s,
        "stamps": cfg.stamps,
    }
    return EpisodeWriter(out, instruction=instruction, task=cfg.task or instruction, source="teleop",
                         action_spec=spec, joint_names=joint_names, camera_names=(cfg.camera_name,),
                         iteration=iteration, metadata=meta, compression=cfg.compression)


def import_bags(bags: Sequence[str | Path], out: str | Path, cfg: BagImportConfig, *,
                spec: ActionSpec | None = None,
                on_error: Callable[[BagImportError], None] | None = None) -> tuple[list[BagImportResult], list[BagImportError]]:
    """Import several bags; a failing bag is reported (on_error) and skipped, the others go on."""
    spec = spec or cfg.resolve_action_spec()
    results, errors = [], []
    for bag in bags:
        try:
            results.append(import_bag(bag, out, cfg, spec=spec))
        except BagImportError as e:
            errors.append(e)
            if on_error is not None:
                on_error(e)
    return results, errors


# --------------------------------------------------------------------------------------------
# CLI (`ire-vla episodes import-bag`)
# --------------------------------------------------------------------------------------------
_FLAG_FIELDS = {
    "camera_topic": str, "joint_states_topic": str, "command_topic": str, "gripper_topic": str,
    "success_topic": str, "instruction_topic": str, "ee_pose_topic": str, "marker_topic": str,
    "segment": str, "gap_s": float, "control_rate_hz": float, "pair_tolerance_s": float,
    "command_timeout_s": float, "action_spec": str, "camera_name": str, "instruction": str, "task": str,
    "stamps": str, "min_steps": int, "compression": str,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Import rosbag2 recordings (directories, .mcap or .db3; MCAP or sqlite3 storage) as teleop "
                     "episodes: commands inverted to actions and resampled to the control rate, paired with the "
                     "newest frame and joint state at or before each step. Settings: config/bag_import.yaml "
                     "(--config) and the flags below (flags win). A failing bag prints one line "
                     "'BAG: topic T: reason' and leaves nothing behind; exit 2 if any bag failed.")
    p.add_argument("bags", nargs="+", type=Path, help="rosbag2 directories or .mcap/.db3 files")
    p.add_argument("--out", type=Path, required=True, help="episode store root")
    p.add_argument("--config", type=Path, help="YAML topic mapping and settings (see config/bag_import.yaml)")
    for name, typ in _FLAG_FIELDS.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, type=typ, default=None, help=f"overrides the config's {name}")
    p.add_argument("--joint-names", nargs="+", help="joints to keep, in this order (default: all)")
    p.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), help="resize frames (INTER_AREA)")
    p.add_argument("--failed-label", dest="default_success", action="store_false", default=None,
                   help="label episodes without a success message as failed (default: successful)")
    p.add_argument("--checkpoint", type=Path, help="take the action spec (and joint names) from this checkpoint")


def config_from_args(args) -> tuple[BagImportConfig, ActionSpec | None]:
    overrides = {k: getattr(args, k) for k in _FLAG_FIELDS if getattr(args, k, None) is not None}
    if args.joint_names:
        overrides["joint_names"] = list(args.joint_names)
    if args.image_size:
        overrides["image_size"] = list(args.image_size)
    if args.default_success is not None:
        overrides["default_success"] = args.default_success
    spec = None
    if args.checkpoint:
        import json

        from ire_vla_ros.vla.checkpoint import resolve_checkpoint

        ck = json.loads((resolve_checkpoint(args.checkpoint) / "config.json").read_text())
        spec = ActionSpec.from_dict(ck["action_spec"])
        if "joint_names" not in overrides and ck.get("joint_names"):
            overrides["joint_names"] = list(ck["joint_names"])
    cfg = (BagImportConfig.from_yaml(args.config, overrides) if args.config
           else BagImportConfig.from_dict(overrides))
    return cfg, spec


def run(args) -> int:
    import sys

    try:
        cfg, spec = config_from_args(args)
        spec = spec or cfg.resolve_action_spec()
    except Exception as e:  # bad YAML / flag values / checkpoint
        print(f"import-bag: {e}", file=sys.stderr)
        return 2
    results, errors = import_bags(args.bags, args.out, cfg, spec=spec,
                                  on_error=lambda e: print(f"import-bag: {e}", file=sys.stderr))
    for r in results:
        print(f"{r.bag}: {len(r.episodes)} episode(s), {r.n_steps} steps in {r.seconds:.1f} s "
              f"(dropped ticks {r.dropped_ticks})")
    return 2 if errors else 0
