"""Metric per-step deltas -> Servo command values (twist or absolute pose), no ROS."""
from __future__ import annotations

import numpy as np

__all__ = ["twist_from_delta", "rpy_to_quat", "quat_mul", "pose_after_delta"]


def twist_from_delta(delta, rate_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """(linear m/s, angular rad/s) that cover one step's delta in one control period.

    For small per-step angles roll/pitch/yaw deltas are treated as a rotation vector.
    """
    rate = float(rate_hz)
    return (np.asarray(delta.translation_m, np.float64) * rate,
            np.asarray(delta.rotation_rad, np.float64) * rate)


def rpy_to_quat(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Fixed-axis XYZ roll/pitch/yaw -> quaternion (x, y, z, w)."""
    cr, sr = np.cos(roll / 2), np.sin(roll / 2)
    cp, sp = np.cos(pitch / 2), np.sin(pitch / 2)
    cy, sy = np.cos(yaw / 2), np.sin(yaw / 2)
    return np.array([
        sr * cp * cy - cr * sp * sy,
        cr * sp * cy + sr * cp * sy,
        cr * cp * sy - sr * sp * cy,
        cr * cp * cy + sr * sp * sy,
    ])


def quat_mul(a, b) -> np.ndarray:
    """Hamilton product a*b, both (x, y, z, w)."""
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array([
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
        aw * bw - ax * bx - ay * by - az * bz,
    ])


def pose_after_delta(position, quat_xyzw, delta) -> tuple[np.ndarray, np.ndarray]:
    """Current pose + one step: translation added in the command frame, rotation delta applied
    in the command frame (q_new = q_delta * q_current), quaternion renormalised."""
    p = np.asarray(position, np.float64) + np.asarray(delta.translation_m, np.float64)
    q = np.asarray(quat_xyzw, np.float64)
    n = np.linalg.norm(q)
    q = np.array([0.0, 0.0, 0.0, 1.0]) if not np.isfinite(n) or n < 1e-9 else q / n
    if getattr(delta, "has_rotation", False) or np.any(np.asarray(delta.rotation_rad) != 0):
        q = quat_mul(rpy_to_quat(*np.asarray(delta.rotation_rad, np.float64)), q)
        q = q / np.linalg.norm(q)
    return p, q
