#!/usr/bin/env python3
"""Camera transport across two processes: 640x480 rgb8 at 30 Hz, best effort, with and without
config/fastdds_shm.xml (Fast DDS SHM segment 16 MB). The profile is set through both
FASTRTPS_DEFAULT_PROFILES_FILE (the only name Fast DDS 2.14, i.e. Jazzy, reads) and
FASTDDS_DEFAULT_PROFILES_FILE (Fast DDS 3.x).

Starts a publisher process and a subscriber process per configuration (each on its own
ROS_DOMAIN_ID, ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) and reports the received rate, the
publisher's send rate, and the stamp->receive latency. Writes bench/results/camera_transport.json.

    python bench/bench_camera_transport.py [--seconds 10] [--configs default_best_effort shm_best_effort]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROFILE = REPO / "config" / "fastdds_shm.xml"

CONFIGS = {
    "default_best_effort": {"profile": False, "reliable": False},
    "shm_best_effort": {"profile": True, "reliable": False},
    "default_reliable": {"profile": False, "reliable": True},
    "shm_reliable": {"profile": True, "reliable": True},
}


def _qos(reliable: bool):
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

    if reliable:
        return QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    return qos_profile_sensor_data


def run_pub(args) -> None:
    import numpy as np
    import rclpy
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("bench_camera_pub")
    pub = node.create_publisher(Image, "/bench/image_raw", _qos(args.reliable))
    msg = Image(height=args.height, width=args.width, encoding="rgb8", step=args.width * 3)
    msg.data = np.random.default_rng(0).integers(0, 256, args.height * args.width * 3, dtype=np.uint8).tobytes()
    msg.header.frame_id = "camera"
    sent = 0
    t_end = time.monotonic() + args.duration
    period = 1.0 / args.rate
    next_t = time.monotonic()
    t0 = next_t
    while time.monotonic() < t_end:
        msg.header.stamp = node.get_clock().now().to_msg()
        pub.publish(msg)
        sent += 1
        next_t += period
        delay = next_t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(json.dumps({"sent": sent, "send_hz": sent / (time.monotonic() - t0)}), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


def run_sub(args) -> None:
    import rclpy
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("bench_camera_sub")
    times: list[float] = []
    lat: list[float] = []

    def cb(msg: Image):
        now = node.get_clock().now().nanoseconds
        times.append(time.monotonic())
        lat.append((now - (msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec)) * 1e-6)

    node.create_subscription(Image, "/bench/image_raw", cb, _qos(args.reliable))
    t_start = time.monotonic()
    first = None
    while True:
        rclpy.spin_once(node, timeout_sec=0.05)
        now = time.monotonic()
        if first is None and times:
            first = times[0]
        if first is None and now - t_start > args.discovery_timeout:
            break
        if first is not None and now - first > args.seconds:
            break
    import numpy as np

    if first is None:
        out = {"received": 0, "recv_hz": 0.0, "discovery_s": None}
    else:
        window = [t for t in times if t - first <= args.seconds]
        lat_w = np.array(lat[: len(window)])
        out = {"received": len(window), "recv_hz": (len(window) - 1) / args.seconds,
               "discovery_s": first - t_start,
               "latency_ms_mean": float(lat_w.mean()), "latency_ms_p95": float(np.percentile(lat_w, 95))}
    print(json.dumps(out), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


def _tx_bytes_off_loopback() -> int:
    total = 0
    try:
        for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
            name, data = line.split(":", 1)
            if name.strip() != "lo":
                total += int(data.split()[8])
    except OSError:
        return -1
    return total


def run_config(name: str, cfg: dict, args, domain: int) -> dict:
    env = {**os.environ, "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": str(domain),
           "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    for var in ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE", "RMW_FASTRTPS_USE_QOS_FROM_XML",
                "FASTDDS_BUILTIN_TRANSPORTS"):
        env.pop(var, None)
    if cfg["profile"]:
        # Fast DDS 2.x (Jazzy) reads FASTRTPS_DEFAULT_PROFILES_FILE; 3.x (Kilted+) FASTDDS_DEFAULT_PROFILES_FILE
        env["FASTRTPS_DEFAULT_PROFILES_FILE"] = env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(PROFILE)
    common = ["--width", str(args.width), "--height", str(args.height), "--rate", str(args.rate)]
    if cfg["reliable"]:
        common.append("--reliable")
    tx0 = _tx_bytes_off_loopback()
    sub = subprocess.Popen([sys.executable, __file__, "--role", "sub", "--seconds", str(args.seconds),
                            "--discovery-timeout", str(args.discovery_timeout)] + common,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    pub_duration = args.discovery_timeout + args.seconds + 2.0
    pub = subprocess.Popen([sys.executable, __file__, "--role", "pub", "--duration", str(pub_duration)] + common,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sub_out, sub_err = sub.communicate(timeout=pub_duration + 30)
        pub_out, pub_err = pub.communicate(timeout=pub_duration + 30)
    finally:
        for p in (sub, pub):
            if p.poll() is None:
                p.kill()
    tx1 = _tx_bytes_off_loopback()
    try:
        result = {**json.loads(sub_out.strip().splitlines()[-1]), **json.loads(pub_out.strip().splitlines()[-1])}
    except (IndexError, json.JSONDecodeError):
        result = {"error": f"sub: {sub_err[-500:]} pub: {pub_err[-500:]}"}
    result.update(config=name, fastdds_profile=str(PROFILE) if cfg["profile"] else None,
                  reliability="reliable" if cfg["reliable"] else "best_effort",
                  tx_bytes_off_loopback_during_run=(tx1 - tx0) if tx0 >= 0 else None)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["driver", "pub", "sub"], default="driver", help=argparse.SUPPRESS)
    ap.add_argument("--configs", nargs="+", default=["default_best_effort", "shm_best_effort", "default_reliable"],
                    choices=list(CONFIGS))
    ap.add_argument("--seconds", type=float, default=10.0, help="measurement window after the first image")
    ap.add_argument("--discovery-timeout", type=float, default=8.0)
    ap.add_argument("--duration", type=float, default=20.0, help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--rate", type=float, default=30.0)
    ap.add_argument("--reliable", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--domain-id", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", "77")))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "camera_transport.json")
    args = ap.parse_args(argv)
    if args.role == "pub":
        run_pub(args)
        return 0
    if args.role == "sub":
        run_sub(args)
        return 0
    results = []
    for i, name in enumerate(args.configs):
        r = run_config(name, CONFIGS[name], args, 1 + (args.domain_id + i) % 101)
        print(json.dumps(r), flush=True)
        results.append(r)
    out = {
        "image": f"{args.width}x{args.height} rgb8 ({args.width * args.height * 3} bytes)",
        "target_hz": args.rate, "seconds": args.seconds, "cpu_count": os.cpu_count(),
        "rmw": os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp (default)"),
        "discovery_range": "LOCALHOST",
        "profile_env": ["FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE"],
        "loadavg_at_end": os.getloadavg(), "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
