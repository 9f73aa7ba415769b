"""Episodes -> MCAP files with standard ROS 2 messages (Foxglove, PlotJuggler, `ros2 bag play`).

`ire-vla episodes export --format mcap STORE --out DIR` writes one `<episode>.mcap` per episode
(or, with `--single FILE.mcap`, every selected episode one after the other in one file). The files
are rosbag2 MCAP storage written with `rosbags` (CDR payloads, `ros2msg` schemas embedded), so any
MCAP viewer decodes them without this package.

Topics (stamps = the episode's step timestamps; log time = stamp)
  /camera/<camera>/image_raw      sensor_msgs/Image rgb8          one per step
  /joint_states                   sensor_msgs/JointState          the recorded joint positions
  /servo_node/delta_twist_cmds    geometry_msgs/TwistStamped      the action as policy_node commands
                                                                  it: twist_from_delta(action_to_delta)
  /gripper/command                std_msgs/Float64                when the spec has a gripper
  /ire_vla/action                 sensor_msgs/JointState          the raw action (names = spec names,
                                                                  + log_prob, value for policy steps)
  /ire_vla/reward                 std_msgs/Float32                reward[t]
  /ire_vla/instruction            std_msgs/String                 once, at the start
  /ire_vla/episode                std_msgs/String                 once, at the start: the episode name
  /ire_vla/success                std_msgs/Bool                   once, after the last step

A selection file separates episodes by at least one second, and `/ire_vla/episode` marks each
start, so `ire-vla episodes import-bag --segment marker --marker-topic /ire_vla/episode` splits it
back. Files are written to a temporary directory and renamed into place (never half-written).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ire_vla_ros.episodes.store import Episode, read_episode, scan_episodes
from ire_vla_ros.robot.motion import twist_from_delta
from ire_vla_ros.robot.safety import action_to_delta

__all__ = ["BagWriter", "export_mcap", "episode_messages", "TOPICS"]

_NS = 1_000_000_000
TOPICS = {
    "joint_states": "/joint_states",
    "twist": "/servo_node/delta_twist_cmds",
    "gripper": "/gripper/command",
    "action": "/ire_vla/action",
    "reward": "/ire_vla/reward",
    "instruction": "/ire_vla/instruction",
    "episode": "/ire_vla/episode",
    "success": "/ire_vla/success",
}
TYPES = {
    "joint_states": "sensor_msgs/msg/JointState",
    "twist": "geometry_msgs/msg/TwistStamped",
    "gripper": "std_msgs/msg/Float64",
    "action": "sensor_msgs/msg/JointState",
    "reward": "std_msgs/msg/Float32",
    "instruction": "std_msgs/msg/String",
    "episode": "std_msgs/msg/String",
    "success": "std_msgs/msg/Bool",
}


def camera_topic(camera: str) -> str:
    return f"/camera/{camera}/image_raw"


class BagWriter:
    """A thin rosbag2 writer (rosbags) that builds standard ROS 2 messages from plain values.

    `storage` is "mcap" or "sqlite3". Used by the MCAP export, the bag-import tests and the
    import benchmark (so they write bags with the same library the importer reads them with).
    """

    def __init__(self, path: str | Path, storage: str = "mcap"):
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        plugins = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
        if storage not in plugins:
            raise ValueError(f"storage must be one of {sorted(plugins)}, got {storage!r}")
        self.ts = get_typestore(Stores.ROS2_JAZZY)
        self.path = Path(path)
        self._writer = Writer(self.path, version=Writer.VERSION_LATEST, storage_plugin=plugins[storage])
        self._writer.open()
        self._conns: dict[str, object] = {}
        self._types: dict[str, str] = {}
        T = self.ts.types
        self._Time, self._Header = T["builtin_interfaces/msg/Time"], T["std_msgs/msg/Header"]

    # ---- message builders ------------------------------------------------------------------
    def header(self, t_ns: int, frame_id: str = ""):
        return self._Header(stamp=self._Time(sec=int(t_ns // _NS), nanosec=int(t_ns % _NS)), frame_id=frame_id)

    def image(self, t_ns: int, rgb: np.ndarray, encoding: str = "rgb8", frame_id: str = "camera"):
        from ire_vla_ros.robot.image_codec import encode_rgb

        f = encode_rgb(rgb, encoding)
        return self.ts.types["sensor_msgs/msg/Image"](
            header=self.header(t_ns, frame_id), height=f["height"], width=f["width"], encoding=f["encoding"],
            is_bigendian=0, step=f["step"], data=np.frombuffer(f["data"], np.uint8))

    def raw_image(self, t_ns: int, height: int, width: int, encoding: str, step: int, data: bytes):
        return self.ts.types["sensor_msgs/msg/Image"](
            header=self.header(t_ns, "camera"), height=height, width=width, encoding=encoding, is_bigendian=0,
            step=step, data=np.frombuffer(data, np.uint8))

    def compressed_image(self, t_ns: int, rgb: np.ndarray, fmt: str = "jpeg"):
        import cv2

        ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", np.ascontiguousarray(rgb[:, :, ::-1]))
        if not ok:
            raise ValueError("cv2.imencode failed")
        return self.ts.types["sensor_msgs/msg/CompressedImage"](
            header=self.header(t_ns, "camera"), format=fmt, data=np.asarray(buf, np.uint8).reshape(-1))

    def joint_state(self, t_ns: int, names: Sequence[str], positions):
        return self.ts.types["sensor_msgs/msg/JointState"](
            header=self.header(t_ns), name=[str(n) for n in names],
            position=np.asarray(positions, np.float64), velocity=np.zeros(0), effort=np.zeros(0))

    def twist(self, t_ns: int, linear, angular, frame_id: str = "base_link"):
        T = self.ts.types
        V = T["geometry_msgs/msg/Vector3"]
        lin, ang = (np.asarray(x, np.float64) for x in (linear, angular))
        return T["geometry_msgs/msg/TwistStamped"](
            header=self.header(t_ns, frame_id),
            twist=T["geometry_msgs/msg/Twist"](linear=V(x=lin[0], y=lin[1], z=lin[2]),
                                              angular=V(x=ang[0], y=ang[1], z=ang[2])))

    def pose(self, t_ns: int, position, quat_xyzw, frame_id: str = "base_link"):
        T = self.ts.types
        p, q = np.asarray(position, np.float64), np.asarray(quat_xyzw, np.float64)
        return T["geometry_msgs/msg/PoseStamped"](
            header=self.header(t_ns, frame_id),
            pose=T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](x=p[0], y=p[1], z=p[2]),
                                            orientation=T["geometry_msgs/msg/Quaternion"](x=q[0], y=q[1], z=q[2], w=q[3])))

    def float64(self, v: float):
        return self.ts.types["std_msgs/msg/Float64"](data=float(v))

    def float32(self, v: float):
        return self.ts.types["std_msgs/msg/Float32"](data=float(v))

    def boolean(self, v: bool):
        return self.ts.types["std_msgs/msg/Bool"](data=bool(v))

    def string(self, v: str):
        return self.ts.types["std_msgs/msg/String"](data=str(v))

    # ---- writing ---------------------------------------------------------------------------
    def write(self, topic: str, t_ns: int, msg) -> None:
        msgtype = msg.__msgtype__
        conn = self._conns.get(topic)
        if conn is None:
            conn = self._conns[topic] = self._writer.add_connection(topic, msgtype, typestore=self.ts)
            self._types[topic] = msgtype
        elif self._types[topic] != msgtype:
            raise ValueError(f"topic {topic} already has type {self._types[topic]}, not {msgtype}")
        self._writer.write(conn, int(t_ns), self.ts.serialize_cdr(msg, msgtype))

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "BagWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _step_times_ns(ep: Episode, rate_hz: float, start_ns: int | None) -> np.ndarray:
    """The episode's own stamps when they increase strictly, else a uniform grid at rate_hz;
    shifted to start at start_ns when given."""
    ts = np.asarray(ep.timestamps, np.float64)
    if ts.size and np.all(np.isfinite(ts)) and ts[0] > 0 and np.all(np.diff(ts) > 0):
        t = np.round(ts * _NS).astype(np.int64)
    else:
        t = (np.arange(ep.n_steps) * (_NS / rate_hz)).astype(np.int64) + _NS
    if start_ns is not None:
        t = t - t[0] + int(start_ns)
    return t


def episode_messages(w: BagWriter, ep: Episode, rate_hz: float, start_ns: int | None = None):
    """Yield (topic, t_ns, msg) for one episode, in time order. Returns via StopIteration nothing."""
    t = _step_times_ns(ep, rate_hz, start_ns)
    spec = ep.action_spec
    has_gripper = spec.index("gripper") is not None
    yield TOPICS["episode"], int(t[0]), w.string(ep.name)
    yield TOPICS["instruction"], int(t[0]), w.string(ep.instruction)
    action_names = list(spec.names) + (["log_prob", "value"] if ep.log_probs is not None else [])
    for i in range(ep.n_steps):
        ti = int(t[i])
        for cam in ep.camera_names:
            yield camera_topic(cam), ti, w.image(ti, ep.images[cam][i])
        yield TOPICS["joint_states"], ti, w.joint_state(ti, ep.joint_names, ep.joint_positions[i])
        delta = action_to_delta(ep.actions[i], spec)
        lin, ang = twist_from_delta(delta, rate_hz)
        yield TOPICS["twist"], ti, w.twist(ti, lin, ang)
        if has_gripper:
            yield TOPICS["gripper"], ti, w.float64(delta.gripper)
        values = list(ep.actions[i].astype(np.float64))
        if ep.log_probs is not None:
            values += [float(ep.log_probs[i]), float(ep.values[i])]
        yield TOPICS["action"], ti, w.joint_state(ti, action_names, values)
        yield TOPICS["reward"], ti, w.float32(ep.rewards[i])
    yield TOPICS["success"], int(t[-1]) + 1, w.boolean(ep.success)


def _rate_of(ep: Episode, default: float) -> float:
    r = ep.metadata.get("control_rate_hz") if isinstance(ep.metadata, dict) else None
    try:
        r = float(r)
    except (TypeError, ValueError):
        return default
    return r if np.isfinite(r) and r > 0 else default


def _write_atomic(target: Path, episodes: Iterable[Path], rate_hz: float) -> Path:
    """Write the episodes into one MCAP at `target` (temp dir + rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.stem}.", dir=target.parent))
    try:
        bag_dir = tmp_dir / "bag"
        next_start = None
        with BagWriter(bag_dir, "mcap") as w:
            for p in episodes:
                ep = read_episode(p)
                rate = _rate_of(ep, rate_hz)
                t = _step_times_ns(ep, rate, None)
                start = None if next_start is None or t[0] >= next_start else next_start
                msgs = list(episode_messages(w, ep, rate, start))
                for topic, tn, msg in sorted(msgs, key=lambda m: m[1]):
                    w.write(topic, tn, msg)
                next_start = max(m[1] for m in msgs) + _NS  # >= 1 s between episodes
        produced = bag_dir / f"{bag_dir.name}.mcap"
        with open(produced, "rb") as f:
            os.fsync(f.fileno())
        os.replace(produced, target)
        return target
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def export_mcap(store: str | Path, out: str | Path, *, single: str | Path | None = None, rate_hz: float = 10.0,
                sources=None, tasks=None, successful_only: bool = False) -> list[Path]:
    """Export every valid episode under `store` (filters as scan_episodes) to MCAP. Returns the files."""
    res = scan_episodes(store, sources=sources, tasks=tasks, successful_only=successful_only)
    if not res.episodes:
        raise ValueError(f"no valid episodes under {store} match the selection")
    out = Path(out)
    if single is not None:
        target = Path(single)
        if not target.is_absolute():
            target = out / target
        return [_write_atomic(target, res.episodes, rate_hz)]
    return [_write_atomic(out / f"{info.name}.mcap", [p], rate_hz) for p, info in zip(res.episodes, res.infos)]
