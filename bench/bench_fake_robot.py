#!/usr/bin/env python3
"""fake_robot_node at robot rates, in its own process: what it sends (its ~/stats) and what a
subscriber in another process receives, per stream (camera 640x480 rgb8 30 Hz best effort,
/joint_states 500 Hz, /ee_pose 100 Hz), with the node's CPU use. Configurations: the fake robot with
and without the Fast DDS SHM profile (a stock driver), raw or jpeg images. The subscriber (this
process) always loads the profile, as the launch files do for the package's nodes.

Delivery ratio = messages received whose stamp lies between two ~/stats reports / messages the node
says it sent between them (exact, no clock alignment needed). Writes bench/results/fake_robot.json.

    python bench/bench_fake_robot.py [--seconds 10] [--configs shm_raw no_shm_raw shm_jpeg]
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
sys.path[:0] = [str(HERE), str(REPO / "test")]
os.environ["FASTRTPS_DEFAULT_PROFILES_FILE"] = os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(PROFILE)
import common  # noqa: E402,F401  (DDS on loopback)

CONFIGS = {
    "shm_raw": {"profile": True, "compressed": "none"},
    "no_shm_raw": {"profile": False, "compressed": "none"},
    "shm_jpeg": {"profile": True, "compressed": "jpeg"},
    "no_shm_jpeg": {"profile": False, "compressed": "jpeg"},
}


def run_config(name: str, cfg: dict, seconds: float, domain: int) -> dict:
    import psutil
    from geometry_msgs.msg import PoseStamped
    from sensor_msgs.msg import CompressedImage, Image, JointState
    from std_msgs.msg import String

    from ire_vla_ros.nodes.ros_common import RELIABLE_QOS, SENSOR_QOS, stamp_ns
    from ros_harness import Harness, wait_for

    env = {**os.environ, "ROS_DOMAIN_ID": str(domain), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
           "OMP_NUM_THREADS": "1"}
    if not cfg["profile"]:
        env.pop("FASTRTPS_DEFAULT_PROFILES_FILE", None)
        env.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
    ros = Harness(domain)
    raw = cfg["compressed"] == "none"
    streams = {
        "camera": ros.collect(Image if raw else CompressedImage,
                              "/camera/image_raw" + ("" if raw else "/compressed"), SENSOR_QOS),
        "joint_states": ros.collect(JointState, "/joint_states", RELIABLE_QOS),
        "ee_pose": ros.collect(PoseStamped, "/ee_pose", RELIABLE_QOS),
    }
    stats = ros.collect(String, "/fake_robot_node/stats", RELIABLE_QOS)
    proc = subprocess.Popen([sys.executable, "-m", "ire_vla_ros.nodes.fake_robot_node", "--ros-args",
                             "-p", f"compressed:={cfg['compressed']}"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(stats) >= 2 and all(streams.values()), 60, "fake robot streams")
        first = len(stats)
        cpu = psutil.Process(proc.pid)
        cpu.cpu_percent()
        time.sleep(seconds)
        cpu_pct = cpu.cpu_percent()
        wait_for(lambda: len(stats) >= first + 1, 10, "a stats report")
        a, b = json.loads(stats[first - 1].data), json.loads(stats[-1].data)
    finally:
        proc.terminate()
        proc.wait(30)
        ros.close()
    out = {"config": name, "fake_robot_profile": cfg["profile"], "compressed": cfg["compressed"],
           "fake_robot_cpu_percent": cpu_pct}
    for stream, got in streams.items():
        lo, hi = a[stream]["last_stamp_ns"], b[stream]["last_stamp_ns"]
        sent = b[stream]["sent"] - a[stream]["sent"]
        received = sum(1 for m in list(got) if lo < stamp_ns(m.header.stamp) <= hi)
        window_s = (hi - lo) * 1e-9
        out[stream] = {"target_hz": b[stream]["target_hz"], "sent_hz": round(sent / window_s, 2),
                       "received_hz": round(received / window_s, 2),
                       "delivery_ratio": round(received / max(1, sent), 4), "late_ticks": b[stream]["late"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--domain-id", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", "79")))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fake_robot.json")
    args = ap.parse_args(argv)
    load_start = os.getloadavg()
    results = []
    for i, name in enumerate(args.configs):
        results.append(run_config(name, CONFIGS[name], args.seconds, 1 + (args.domain_id + i) % 101))
        print(json.dumps(results[-1]), flush=True)
    payload = {"what": "fake_robot_node rates in its own process and delivery to another process",
               "seconds": args.seconds, "cpu_count": os.cpu_count(), "loadavg_start": load_start,
               "loadavg_end": os.getloadavg(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, args.out)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
