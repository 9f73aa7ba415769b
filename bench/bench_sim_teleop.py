#!/usr/bin/env python3
"""sim_node timing: the tick rate with a subscriber on every topic, and how far a held twist moves
the hand compared with what it asks for (the timed checks that used to sit in
test/test_sim_teleop_nodes.py; they depend on the machine, so they are measured here, as ratios).

One process, one SingleThreadedExecutor (as `ire-vla bringup` runs nodes), own domain id,
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST. For each rate in --rates:
  * tick_rate_ratio   = measured ticks/s / nominal rate_hz over --seconds
  * twist_track_ratio = hand travel along x / (v * time the twist was held), v = --speed m/s
  * stop_travel_m     = travel after a zero twist + pause (the motion backend's stop path), and
    timeout_travel_m  = travel when the sender just goes quiet (the twist runs until command_timeout_s),
    measured one after the other in the same run (stop_vs_timeout_travel_ratio)
Writes bench/results/sim_teleop.json with os.getloadavg() before and after.

    python bench/bench_sim_teleop.py [--rates 10 20] [--seconds 5] [--speed 0.05]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402


def run_one(rate_hz: float, seconds: float, speed: float, domain: int) -> dict:
    import numpy as np
    import rclpy
    from geometry_msgs.msg import PoseStamped, TwistStamped
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import Bool, Float32
    from std_srvs.srv import SetBool

    from ire_vla_ros.nodes.ros_common import COMMAND_QOS, RELIABLE_QOS, SENSOR_QOS
    from ire_vla_ros.nodes.sim_node import SimNode

    ctx = Context()
    rclpy.init(context=ctx, domain_id=domain)
    ex = SingleThreadedExecutor(context=ctx)
    probe = Node("bench_probe", context=ctx)
    sim = SimNode(context=ctx, parameter_overrides=[Parameter("rate_hz", value=float(rate_hz)),
                                                    Parameter("command_timeout_s", value=0.25)])
    ex.add_node(probe)
    ex.add_node(sim)
    counts = {"image": 0, "joints": 0, "expert": 0, "reward": 0, "success": 0}
    poses = []

    def counter(key):
        def cb(_msg):
            counts[key] += 1
        return cb

    probe.create_subscription(Image, "/camera/image_raw", counter("image"), SENSOR_QOS)
    probe.create_subscription(JointState, "/joint_states", counter("joints"), SENSOR_QOS)
    probe.create_subscription(JointState, "/sim_node/expert_action", counter("expert"), RELIABLE_QOS)
    probe.create_subscription(Float32, "/sim_node/reward", counter("reward"), RELIABLE_QOS)
    probe.create_subscription(Bool, "/sim_node/success", counter("success"), RELIABLE_QOS)
    probe.create_subscription(PoseStamped, "/ee_pose", poses.append, SENSOR_QOS)
    twist = probe.create_publisher(TwistStamped, "/servo_node/delta_twist_cmds", COMMAND_QOS)
    pause = probe.create_client(SetBool, "/servo_node/pause_servo")
    th = threading.Thread(target=ex.spin, daemon=True)
    th.start()

    def ee():
        p = poses[-1].pose.position
        return np.array([p.x, p.y, p.z])

    def send(vx):
        msg = TwistStamped()
        msg.header.frame_id = "world"
        msg.header.stamp = probe.get_clock().now().to_msg()
        msg.twist.linear.x = float(vx)
        twist.publish(msg)

    try:
        deadline = time.monotonic() + 60
        while (not poses or not twist.get_subscription_count()) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the hand settles after reset
        # 1. tick rate with everything subscribed
        t0, k0 = time.monotonic(), sim.ticks
        time.sleep(seconds)
        tick_rate = (sim.ticks - k0) / (time.monotonic() - t0)
        # 2. a held twist: travel / asked
        start = ee()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:
            send(speed)
            time.sleep(1.0 / rate_hz)
        held_s = time.monotonic() - t0
        time.sleep(0.5)
        travel = float(ee()[0] - start[0])
        # 3. the stop path side by side: travel after the last twist when the sender just goes
        #    quiet (Servo-style timeout) and when it sends a zero twist + pause (motion_backends stop())
        def drive_then(stop_kind: str) -> tuple[float, bool]:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 0.5:
                send(speed)
                time.sleep(1.0 / rate_hz)
            ok = True
            if stop_kind == "zero_twist_and_pause":
                send(0.0)
                fut = pause.call_async(SetBool.Request(data=True))
            at_stop = ee()
            time.sleep(1.0)
            if stop_kind == "zero_twist_and_pause":
                ok = fut.done() and fut.result().success
                resume = pause.call_async(SetBool.Request(data=False))
                time.sleep(0.3)
                ok = ok and resume.done()
            return float(np.linalg.norm(ee() - at_stop)), bool(ok)

        timeout_travel, _ = drive_then("timeout")
        stop_travel, ok = drive_then("zero_twist_and_pause")
        return {"rate_hz": rate_hz, "tick_rate_hz": round(tick_rate, 2),
                "tick_rate_ratio": round(tick_rate / rate_hz, 3),
                "twist_travel_m": round(travel, 4), "twist_asked_m": round(speed * held_s, 4),
                "twist_track_ratio": round(travel / (speed * held_s), 3),
                "stop_travel_m": round(stop_travel, 4), "timeout_travel_m": round(timeout_travel, 4),
                "stop_vs_timeout_travel_ratio": round(stop_travel / timeout_travel, 3) if timeout_travel > 0 else None,
                "pause_answered": bool(ok),
                "messages_received": dict(counts)}
    finally:
        ex.shutdown()
        sim.destroy_node()
        probe.destroy_node()
        rclpy.try_shutdown(context=ctx)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[10.0, 20.0])
    ap.add_argument("--seconds", type=float, default=5.0, help="tick-rate window per rate")
    ap.add_argument("--speed", type=float, default=0.05, help="twist speed (m/s)")
    ap.add_argument("--domain", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", random.randint(60, 90))))
    args = ap.parse_args()
    load0 = os.getloadavg()
    runs = [run_one(r, args.seconds, args.speed, args.domain) for r in args.rates]
    write_result("sim_teleop", {"machine": machine(), "loadavg_before": load0, "loadavg_after": os.getloadavg(),
                                "args": vars(args), "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
