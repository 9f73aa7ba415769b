"""The arm-side inputs of a node that commands the arm: the latched e-stop and the end-effector pose.

    self.estop = EstopListener(self, "/estop", safety, on_stop=self._stop_motion, lost_action="stop")
    self.ee_pose = EePoseInput(self, obs.set_ee_pose, "base_link", "/ee_pose")   # or ee_link= for TF

E-stop: `true` on the topic latches the e-stop in the SafetyFilter (robot/safety.py: no command) until
`false` arrives. With lost_action "stop" the e-stop link is down (no command either) until an e-stop
publisher is matched and has sent its state since it appeared, and goes down again when no publisher
is matched or, with `lease_s` > 0, when the publisher misses its liveliness lease: a node must not move
the arm while nobody could stop it. With "ignore" only an explicit true stops.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from geometry_msgs.msg import PoseStamped
from rclpy.duration import Duration
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.qos import LivelinessPolicy, QoSProfile
from std_msgs.msg import Bool

from ire_vla_ros.nodes.ros_common import ESTOP_QOS, RELIABLE_QOS, NodeStartupError, TfLookup, stamp_ns

LOST_ACTIONS = ("ignore", "stop")


def estop_qos(lease_s: float = 0.0) -> QoSProfile:
    """ESTOP_QOS; with lease_s > 0 it also requests AUTOMATIC liveliness with that lease (the e-stop
    publisher must offer a lease <= this), so a publisher that dies silently is noticed."""
    if lease_s <= 0:
        return ESTOP_QOS
    return QoSProfile(history=ESTOP_QOS.history, depth=ESTOP_QOS.depth, reliability=ESTOP_QOS.reliability,
                      durability=ESTOP_QOS.durability, liveliness=LivelinessPolicy.AUTOMATIC,
                      liveliness_lease_duration=Duration(seconds=lease_s))


class EstopListener:
    """Subscribes to the e-stop (std_msgs/Bool, latched) and keeps `safety`'s e-stop state.

    `on_stop(reason)` stops the arm ("estop" when latched, "estop_lost" when the link goes down).
    Callbacks run in the node's executor."""

    def __init__(self, node, topic: str, safety, on_stop: Callable[[str], None], lost_action: str = "ignore",
                 lease_s: float = 0.0):
        if lost_action not in LOST_ACTIONS:
            raise ValueError(f"estop_lost_action {lost_action!r} is not one of {LOST_ACTIONS}")
        self._log, self._safety, self._on_stop = node.get_logger(), safety, on_stop
        self._watch_link = lost_action == "stop"
        self.matched = 0  # e-stop publishers matched now
        safety.set_estop_link(not self._watch_link)  # "stop": stopped until a publisher speaks
        node.create_subscription(Bool, topic, self._on_estop, estop_qos(lease_s), event_callbacks=
                                 SubscriptionEventCallbacks(matched=self._on_matched, liveliness=self._on_liveliness))

    def _on_estop(self, msg: Bool) -> None:
        if self._watch_link and self._safety.set_estop_link(True):  # a message = a live publisher
            self._log.info("e-stop publisher live")
        if self._safety.set_estop(bool(msg.data)):
            if msg.data:
                self._on_stop("estop")
                self._log.error("E-STOP latched: no commands until false arrives")
            else:
                self._log.info("e-stop released")

    def _on_matched(self, info) -> None:
        self.matched = int(info.current_count)
        if self.matched == 0:
            self._lost("no e-stop publisher matched")

    def _on_liveliness(self, info) -> None:
        if int(info.alive_count) == 0:
            self._lost("the e-stop publisher lost liveliness")

    def _lost(self, why: str) -> None:
        if self._watch_link and self._safety.set_estop_link(False):
            self._on_stop("estop_lost")
            self._log.error(f"{why}: stopped until an e-stop publisher sends its state")


class EePoseInput:
    """The end-effector pose in `command_frame`, from a geometry_msgs/PoseStamped topic or, when
    `ee_link` is set, from TF (command_frame <- ee_link, looked up by `poll()` before each step).

    Each pose goes to `store(position xyz, quaternion xyzw, time s, frame_ok)`: the topic's at its
    arrival on the node clock, frame_ok False when its frame_id names another frame; TF's at its stamp."""

    def __init__(self, node, store: Callable, command_frame: str, topic: str, ee_link: str = ""):
        self._node, self._store, self.command_frame = node, store, command_frame
        self._tf = None
        if ee_link:
            try:
                self._tf = TfLookup(node, command_frame, ee_link)
            except Exception as exc:  # tf2_ros missing or broken
                raise NodeStartupError(f"ee_link is set ({ee_link!r}) but tf2_ros does not import ({exc}); "
                                       f"publish the EE pose on {topic!r} and leave ee_link empty") from exc
        else:
            node.create_subscription(PoseStamped, topic, self._on_pose, RELIABLE_QOS)

    def poll(self) -> None:
        """Store TF's newest pose (the topic's poses are stored as they arrive)."""
        tf = self._tf.latest() if self._tf is not None else None
        if tf is not None:  # none yet: the control step's precheck counts the missing pose
            t, q = tf.transform.translation, tf.transform.rotation
            self._store(np.array([t.x, t.y, t.z]), np.array([q.x, q.y, q.z, q.w]), stamp_ns(tf.header.stamp) * 1e-9)

    def _on_pose(self, msg: PoseStamped) -> None:
        frame = msg.header.frame_id
        frame_ok = not frame or frame.lstrip("/") == self.command_frame.lstrip("/")
        po, q = msg.pose.position, msg.pose.orientation
        self._store(np.array([po.x, po.y, po.z]), np.array([q.x, q.y, q.z, q.w]),
                    self._node.get_clock().now().nanoseconds * 1e-9, frame_ok)
