"""A ROS 2 test harness shared by the node tests: its own Context (and so its own domain id), a
MultiThreadedExecutor spinning in a thread, and a probe node that calls services and collects
messages over real DDS."""
from __future__ import annotations

import threading
import time

import rclpy
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter

from ire_vla_ros.nodes.ros_common import RELIABLE_QOS


class Harness:
    """A context, a MultiThreadedExecutor spinning in a thread, and a probe node."""

    def __init__(self, domain_id: int, num_threads: int = 0):
        """num_threads=0 (default): a SingleThreadedExecutor. rclpy 7.1's MultiThreadedExecutor busy-polls
        and starved nodes of the GIL on this 2-core machine (a 20 Hz timer ran 0-7 times a second)."""
        self.ctx = Context()
        rclpy.init(context=self.ctx, domain_id=domain_id)
        if num_threads == 0:
            self.executor = SingleThreadedExecutor(context=self.ctx)
        else:
            self.executor = MultiThreadedExecutor(num_threads=num_threads, context=self.ctx)
        self.probe = Node("probe", context=self.ctx)
        self._collectors = ReentrantCallbackGroup()
        self.executor.add_node(self.probe)
        self.nodes = [self.probe]
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def add(self, node_cls, **params):
        node = node_cls(context=self.ctx, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        self.nodes.append(node)
        self.executor.add_node(node)
        return node

    def call(self, srv_type, name, request=None, timeout=10.0):
        client = self.probe.create_client(srv_type, name)
        assert client.wait_for_service(timeout_sec=timeout), f"{name} not available"
        done = threading.Event()
        future = client.call_async(request or srv_type.Request())
        future.add_done_callback(lambda _f: done.set())
        assert done.wait(timeout), f"{name} did not answer"
        self.probe.destroy_client(client)
        return future.result()

    def collect(self, msg_type, topic, qos=RELIABLE_QOS):
        got = []
        # Reentrant (list.append is atomic): with the probe's collectors in one exclusive group,
        # rclpy 7.1's MultiThreadedExecutor re-polls the blocked ones and starves the nodes under
        # test of the GIL (measured: a 20 Hz sim timer ran 1-7 times a second).
        self.probe.create_subscription(msg_type, topic, got.append, qos, callback_group=self._collectors)
        return got

    def close(self):
        self.executor.shutdown()
        self.thread.join(timeout=5.0)  # the spin thread ends once the executor is shut down
        for n in reversed(self.nodes):
            n.destroy_node()
        rclpy.shutdown(context=self.ctx)


def wait_for(pred, timeout=10.0, what="condition"):
    """Poll `pred` until true; AssertionError after `timeout` s naming `what` (a string, or a
    callable evaluated only then, for messages that show the state at the time of failure)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
