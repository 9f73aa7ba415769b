"""fake_robot_node: a stand-in for the robot's drivers (camera, arm state) at robot rates.

A test double for hardware that cannot exist here. It speaks the real message types on the real
topics, at the rates a real arm and camera publish, so tests and benchmarks of the control loop
and the recorder run against what a robot sends:

  pub  <camera_topic>              sensor_msgs/Image           640x480 rgb8 at 30 Hz, best effort
                                                               (reliable with reliable_camera: a
                                                               stock driver's default QoS)
  pub  <camera_topic>/compressed   sensor_msgs/CompressedImage compressed: jpeg | png (image_transport's
                                                               name); replaces the raw topic
  pub  /joint_states               sensor_msgs/JointState      500 Hz, reliable (joint_names)
  pub  /ee_pose                    geometry_msgs/PoseStamped   100 Hz, in command_frame
  pub  ~/stats                     std_msgs/String             JSON once a second: messages sent per
                                                               stream, achieved rates, late ticks

Every message is stamped with the node clock at publish time. Each stream publishes from its own
thread on an absolute schedule (next = previous + period, `time.sleep` until then), not from
executor timers: an rclpy timer at 500 Hz on a loaded 2-core machine does not hold its rate, and a
camera driver does not wait for anyone's executor either. A tick that starts more than one period
late is counted in `late` and the schedule restarts from now (no burst of catch-up messages).

The images move (a bar sweeps across the frame) so consumers that compare frames see new ones.
Joint positions follow slow sines; the EE pose circles. Nothing here reacts to commands.

Shared memory: whether this process loads config/fastdds_shm.xml is decided by its environment
(FASTRTPS_DEFAULT_PROFILES_FILE, read by Fast DDS when the process starts), so a bench can run it
as "a stock camera driver without the SHM profile" by leaving the variable unset. `ire-vla bringup
--processes --fake-robot` sets it like the other nodes; `--no-shm` there leaves it out.

    python -m ire_vla_ros.nodes.fake_robot_node --ros-args -p joint_hz:=500.0 -p compressed:=jpeg
"""
from __future__ import annotations

import array
import io
import json
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from geometry_msgs.msg import PoseStamped
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String

from ire_vla_ros.nodes.ros_common import (
    RELIABLE_QOS, SENSOR_QOS, NodeStartupError, P, declare_params, run_node,
)

#: The shipped model's joints (models/metaworld_tiny/config.json), so the policy node runs on it as is.
DEFAULT_JOINTS = ["right_j0", "right_j1", "right_j2", "right_j3", "right_j4", "right_j5", "right_j6",
                  "r_close", "l_close"]
ENCODINGS = {"rgb8": 3, "bgr8": 3, "mono8": 1}
#: "none", not "off": YAML and `-p compressed:=off` read a bare off as the boolean false.
COMPRESSION = ("none", "jpeg", "png")
#: Distinct frames rendered (and compressed) once at start and then cycled: encoding a 640x480
#: JPEG per frame would cost this process more CPU than a camera driver's hardware encoder.
FRAME_CYCLE = 30


def _check_compressed(value: str) -> str | None:
    return None if value in COMPRESSION else f"must be one of {COMPRESSION}"


def _check_encoding(value: str) -> str | None:
    return None if value in ENCODINGS else f"must be one of {sorted(ENCODINGS)}"


# ---------------------------------------------------------------------------------------------
# Plain logic (no ROS)
# ---------------------------------------------------------------------------------------------
def render_frame(index: int, height: int, width: int, channels: int) -> np.ndarray:
    """A gradient background with a bright bar at a position that moves with `index`."""
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (0.5 * x + 0.5 * y).astype(np.uint8)
    img[..., 1] = (255 - x).astype(np.uint8)
    img[..., 2] = y.astype(np.uint8)
    bar = max(1, width // 16)
    x0 = (index * bar) % max(1, width - bar)
    img[:, x0:x0 + bar] = 255
    return img[..., :channels] if channels == 3 else img[..., :1].copy()


def compress_frame(img: np.ndarray, fmt: str) -> bytes:
    """JPEG / PNG bytes of an image (PIL; what image_transport's compressed plugin carries)."""
    from PIL import Image as PILImage

    mode_img = PILImage.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    buf = io.BytesIO()
    mode_img.save(buf, format="JPEG" if fmt == "jpeg" else "PNG", quality=90)
    return buf.getvalue()


@dataclass
class StreamStats:
    """What one stream sent: the benches divide what arrived by `sent` to get a delivery ratio."""

    target_hz: float
    sent: int = 0
    late: int = 0
    started: float = field(default_factory=time.monotonic)
    first_stamp_ns: int = 0
    last_stamp_ns: int = 0

    def as_dict(self) -> dict:
        elapsed = max(1e-9, time.monotonic() - self.started)
        return {"target_hz": self.target_hz, "sent": self.sent, "late": self.late,
                "achieved_hz": round(self.sent / elapsed, 2),
                "first_stamp_ns": self.first_stamp_ns, "last_stamp_ns": self.last_stamp_ns}


class PeriodicThread(threading.Thread):
    """Calls `tick()` every `period` s on an absolute schedule until `stop` is set or `alive()`
    turns false (Ctrl-C shuts the ROS context down before the node is destroyed)."""

    def __init__(self, name: str, hz: float, tick, stats: StreamStats, stop: threading.Event, alive):
        super().__init__(name=name, daemon=True)
        self.period = 1.0 / hz
        self.tick, self.stats, self.stop, self.alive = tick, stats, stop, alive

    def run(self) -> None:
        next_t = time.monotonic()
        self.stats.started = next_t
        while not self.stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - publishing into a context that is shutting down
                if self.alive():
                    raise
                return
            next_t += self.period
            delay = next_t - time.monotonic()
            if delay > 0.02:
                self.stop.wait(delay)  # long waits end early on shutdown
            elif delay > 0:
                time.sleep(delay)
            elif -delay > self.period:  # more than a whole period behind: skip, don't burst
                self.stats.late += 1
                next_t = time.monotonic()


# ---------------------------------------------------------------------------------------------
# Node
# ---------------------------------------------------------------------------------------------
class FakeRobotNode(Node):
    PARAMS = {
        "camera_topic": P("/camera/image_raw", "Raw image topic; compressed images go to <topic>/compressed",
                          read_only=True),
        "joint_states_topic": P("/joint_states", "sensor_msgs/JointState output", read_only=True),
        "ee_pose_topic": P("/ee_pose", "geometry_msgs/PoseStamped output", read_only=True),
        "camera_hz": P(30.0, "Camera frame rate (0 = no camera)", min=0.0, max=1000.0, read_only=True),
        "joint_hz": P(500.0, "Joint state rate (0 = none)", min=0.0, max=5000.0, read_only=True),
        "ee_pose_hz": P(100.0, "EE pose rate (0 = none)", min=0.0, max=5000.0, read_only=True),
        "image_width": P(640, "Image width in pixels", min=1, max=8192, read_only=True),
        "image_height": P(480, "Image height in pixels", min=1, max=8192, read_only=True),
        "encoding": P("rgb8", "Raw image encoding: rgb8 | bgr8 | mono8", read_only=True,
                      validate=_check_encoding),
        "compressed": P("none", "none = sensor_msgs/Image on camera_topic; jpeg | png = "
                        "sensor_msgs/CompressedImage on <camera_topic>/compressed", read_only=True,
                        validate=_check_compressed),
        "reliable_camera": P(False, "Publish images RELIABLE (a stock driver's default) instead of "
                             "best effort (sensor-data QoS)", read_only=True),
        "joint_names": P(DEFAULT_JOINTS, "Joint names in /joint_states (default: the shipped model's)",
                         read_only=True, type=Parameter.Type.STRING_ARRAY),
        "command_frame": P("base_link", "frame_id of /ee_pose", read_only=True),
        "camera_frame": P("camera_color_optical_frame", "frame_id of the images", read_only=True),
    }

    def __init__(self, **kwargs):
        super().__init__("fake_robot_node", **kwargs)
        p = self.p = declare_params(self, self.PARAMS)
        for name, check in (("encoding", _check_encoding), ("compressed", _check_compressed)):
            reason = check(getattr(p, name))
            if reason:
                raise NodeStartupError(f"{name}={getattr(p, name)!r}: {reason}")
        self._stop = threading.Event()
        self._stats: dict[str, StreamStats] = {}
        self._threads: list[PeriodicThread] = []
        camera_qos = (QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
                      if p.reliable_camera else SENSOR_QOS)

        if p.camera_hz > 0:
            self._frames = self._prepare_frames()
            if p.compressed == "none":
                self._image_pub = self.create_publisher(Image, p.camera_topic, camera_qos)
            else:
                self._image_pub = self.create_publisher(CompressedImage, p.camera_topic.rstrip("/") + "/compressed",
                                                        camera_qos)
            self._start("camera", p.camera_hz, self._publish_image)
        if p.joint_hz > 0:
            self._joint_msg = JointState(name=list(p.joint_names))
            self._joint_pub = self.create_publisher(JointState, p.joint_states_topic, RELIABLE_QOS)
            self._start("joint_states", p.joint_hz, self._publish_joints)
        if p.ee_pose_hz > 0:
            self._pose_pub = self.create_publisher(PoseStamped, p.ee_pose_topic, RELIABLE_QOS)
            self._start("ee_pose", p.ee_pose_hz, self._publish_pose)
        self._stats_pub = self.create_publisher(String, "~/stats", RELIABLE_QOS)
        self.create_timer(1.0, self._publish_stats)
        self.get_logger().info(
            f"fake robot: camera {p.image_width}x{p.image_height} {p.encoding} at {p.camera_hz} Hz "
            f"({'reliable' if p.reliable_camera else 'best effort'}, compressed={p.compressed}), "
            f"joints at {p.joint_hz} Hz, ee_pose at {p.ee_pose_hz} Hz")

    # -- streams ---------------------------------------------------------------------------------
    def _start(self, name: str, hz: float, tick) -> None:
        stats = self._stats[name] = StreamStats(target_hz=hz)
        thread = PeriodicThread(f"fake_robot_{name}", hz, tick, stats, self._stop, self.context.ok)
        self._threads.append(thread)
        thread.start()

    def _prepare_frames(self) -> list:
        p = self.p
        channels = ENCODINGS[p.encoding]
        frames = []
        for i in range(FRAME_CYCLE):
            img = render_frame(i, p.image_height, p.image_width, channels)
            if p.encoding == "bgr8":
                img = img[..., ::-1]
            if p.compressed == "none":
                # array('B') is taken as is by the message; bytes would be checked value by value
                frames.append(array.array("B", np.ascontiguousarray(img).tobytes()))
            else:
                frames.append(array.array("B", compress_frame(np.ascontiguousarray(img), p.compressed)))
        return frames

    def _stamp(self, stats: StreamStats):
        now = self.get_clock().now()
        ns = now.nanoseconds
        if not stats.first_stamp_ns:
            stats.first_stamp_ns = ns
        stats.last_stamp_ns = ns
        stats.sent += 1
        return now.to_msg()

    def _publish_image(self) -> None:
        p, stats = self.p, self._stats["camera"]
        data = self._frames[stats.sent % FRAME_CYCLE]
        if p.compressed == "none":
            msg = Image(height=p.image_height, width=p.image_width, encoding=p.encoding,
                        step=p.image_width * ENCODINGS[p.encoding])
        else:
            msg = CompressedImage(format=f"{p.encoding}; {p.compressed} compressed {p.encoding}")
        msg.data = data
        msg.header.frame_id = p.camera_frame
        msg.header.stamp = self._stamp(stats)
        self._image_pub.publish(msg)

    def _publish_joints(self) -> None:
        msg, stats = self._joint_msg, self._stats["joint_states"]
        t = time.monotonic()
        n = len(msg.name)
        msg.position = [0.3 * math.sin(0.5 * t + i) for i in range(n)]
        msg.velocity = [0.15 * math.cos(0.5 * t + i) for i in range(n)]
        msg.header.stamp = self._stamp(stats)
        self._joint_pub.publish(msg)

    def _publish_pose(self) -> None:
        t = time.monotonic()
        msg = PoseStamped()
        msg.header.frame_id = self.p.command_frame
        msg.pose.position.x = 0.4 + 0.05 * math.cos(0.3 * t)
        msg.pose.position.y = 0.05 * math.sin(0.3 * t)
        msg.pose.position.z = 0.3
        msg.pose.orientation.w = 1.0
        msg.header.stamp = self._stamp(self._stats["ee_pose"])
        self._pose_pub.publish(msg)

    # -- stats / shutdown ------------------------------------------------------------------------
    def stats(self) -> dict:
        """Per stream: messages sent, achieved rate, ticks more than a period late, first/last stamp."""
        return {name: s.as_dict() for name, s in self._stats.items()}

    def _publish_stats(self) -> None:
        self._stats_pub.publish(String(data=json.dumps(self.stats())))

    def destroy_node(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2.0)
        return super().destroy_node()


def main(args=None):
    return run_node(
        FakeRobotNode, args, params=FakeRobotNode.PARAMS,
        description="Test double for a robot's camera and arm drivers: images, joint states and the EE "
                    "pose at robot rates on the real topics, with counts of what was sent on ~/stats.",
    )


if __name__ == "__main__":
    raise SystemExit(main())
