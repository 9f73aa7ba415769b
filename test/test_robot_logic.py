"""Robot-side logic without ROS: image decoding, safety filter, motion maths, statistics."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from ire_vla_ros.robot.image_codec import (
    ImageDecodeError,
    decode_image,
    decode_image_msg,
    encode_rgb,
    make_decoder,
    resize_rgb,
)
from ire_vla_ros.robot.motion import pose_after_delta, quat_mul, rpy_to_quat, twist_from_delta
from ire_vla_ros.robot.safety import (
    ROTATION_CLAMPED,
    TRANSLATION_CLAMPED,
    WORKSPACE_CLIPPED,
    Reason,
    SafetyConfig,
    SafetyFilter,
    action_to_delta,
)
from ire_vla_ros.robot.stats import RateMeter, RollingStats
from ire_vla_ros.vla.action_spec import EE_DELTA_7D, METAWORLD_4D


def _rgb(h=6, w=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------ image codec
@pytest.mark.parametrize("enc", ["rgb8", "bgr8", "rgba8", "bgra8"])
@pytest.mark.parametrize("pad", [0, 3])
def test_decode_roundtrip_colour(enc, pad):
    img = _rgb()
    f = encode_rgb(img, enc, row_padding=pad)
    out = decode_image(f["encoding"], f["height"], f["width"], f["step"], f["data"])
    assert out.dtype == np.uint8 and out.shape == img.shape and out.flags.c_contiguous
    np.testing.assert_array_equal(out, img)


def test_decode_mono8_with_padding():
    mono = np.arange(4 * 3, dtype=np.uint8).reshape(4, 3)
    step = 5
    data = np.concatenate([mono, np.full((4, 2), 99, np.uint8)], axis=1).tobytes()
    out = decode_image("mono8", 4, 3, step, data)
    assert out.shape == (4, 3, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], mono)


def test_decode_accepts_array_array_and_message_like():
    import array

    img = _rgb()
    f = encode_rgb(img, "bgr8")
    msg = SimpleNamespace(**{**f, "data": array.array("B", f["data"])})
    np.testing.assert_array_equal(decode_image_msg(msg), img)


def test_decode_returns_copy_not_view():
    f = encode_rgb(_rgb(), "rgb8")
    buf = bytearray(f["data"])
    out = decode_image("rgb8", f["height"], f["width"], f["step"], buf)
    buf[0] = (buf[0] + 1) % 256
    assert out[0, 0, 0] != buf[0]


@pytest.mark.parametrize(
    "enc,h,w,step,n,match",
    [
        ("yuv422", 2, 2, 4, 8, "unsupported encoding"),
        ("16UC1", 2, 2, 4, 8, "unsupported encoding"),
        ("", 2, 2, 6, 12, "unsupported encoding"),
        ("rgb8", 2, 2, 5, 10, "step 5 < width"),
        ("rgb8", 2, 2, 6, 11, "data length 11"),
        ("rgb8", 2, 2, 6, 13, "data length 13"),
        ("mono8", 0, 2, 2, 0, "empty image"),
    ],
)
def test_decode_rejects(enc, h, w, step, n, match):
    with pytest.raises(ImageDecodeError, match=match):
        decode_image(enc, h, w, step, bytes(n))


def test_resize_inter_area_and_noop():
    import cv2

    img = _rgb(48, 64)
    out = resize_rgb(img, 32)
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out, cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA))
    assert resize_rgb(img, (48, 64)) is img
    assert resize_rgb(img, None) is img


def test_make_decoder_falls_back_without_cv_bridge():
    dec = make_decoder(prefer_cv_bridge=True)
    try:
        import cv_bridge  # noqa: F401
    except Exception:
        assert dec.name == "builtin"
    assert make_decoder(prefer_cv_bridge=False).name == "builtin"
    img = _rgb()
    np.testing.assert_array_equal(dec(SimpleNamespace(**encode_rgb(img, "rgba8"))), img)


# ------------------------------------------------------------------------------ safety filter
def _filter(**kw):
    spec = kw.pop("spec", METAWORLD_4D)
    cfg = dict(max_translation_m=0.02, max_rotation_rad=0.1, workspace_enabled=True,
               workspace_min=(-0.5, -0.5, 0.0), workspace_max=(0.5, 0.5, 0.5), stale_timeout_s=0.5,
               ee_pose_timeout_s=0.5)
    cfg.update(kw)
    return SafetyFilter(SafetyConfig(**cfg), spec)


def test_precheck_ok_and_each_stale_reason():
    f = _filter()
    assert f.precheck(10.0, 9.9, 9.9, 9.9).ok
    cases = [
        ((10.0, None, 9.9, 9.9), Reason.NO_IMAGE),
        ((10.0, 9.4, 9.9, 9.9), Reason.STALE_IMAGE),
        ((10.0, 9.9, None, 9.9), Reason.NO_JOINTS),
        ((10.0, 9.9, 9.0, 9.9), Reason.STALE_JOINTS),
        ((10.0, 9.9, 9.9, None), Reason.NO_EE_POSE),
        ((10.0, 9.9, 9.9, 8.0), Reason.STALE_EE_POSE),
    ]
    for args, reason in cases:
        r = f.precheck(*args)
        assert not r.ok and r.reason == reason
        assert f.rejections[reason] == 1


def test_precheck_ignores_ee_pose_when_box_disabled():
    f = _filter(workspace_enabled=False)
    assert f.precheck(10.0, 9.9, 9.9, None).ok
    assert f.apply(np.zeros(4, np.float32), None).ok


def test_estop_latches_until_released():
    f = _filter()
    assert f.set_estop(True)
    assert not f.set_estop(True)  # unchanged
    for _ in range(3):
        r = f.precheck(10.0, 9.9, 9.9, 9.9)
        assert r.reason == Reason.ESTOP
    assert f.apply(np.zeros(4), (0, 0, 0.2)).reason == Reason.ESTOP
    assert f.set_estop(False)
    assert f.precheck(10.0, 9.9, 9.9, 9.9).ok
    assert f.rejections[Reason.ESTOP] == 4


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_action_dropped_and_counted(bad):
    f = _filter()
    a = np.array([0.1, bad, 0.0, 0.0], np.float32)
    r = f.apply(a, (0.0, 0.0, 0.2))
    assert not r.ok and r.reason == Reason.NAN_ACTION and r.delta is None
    assert f.rejections[Reason.NAN_ACTION] == 1


def test_wrong_action_shape_rejected():
    f = _filter()
    assert f.apply(np.zeros(7), (0, 0, 0.2)).reason == Reason.BAD_ACTION_SHAPE


def test_action_to_delta_units_4d_and_7d():
    d = action_to_delta(np.array([1.0, -0.5, 0.25, 0.7]), METAWORLD_4D)
    np.testing.assert_allclose(d.translation_m, [0.01, -0.005, 0.0025])
    np.testing.assert_allclose(d.rotation_rad, 0.0)
    assert d.gripper == pytest.approx(0.7) and not d.has_rotation
    d7 = action_to_delta(np.array([0, 0, 0, 1.0, -1.0, 0.5, -1.0]), EE_DELTA_7D)
    np.testing.assert_allclose(d7.rotation_rad, [0.05, -0.05, 0.025])
    assert d7.has_rotation and d7.gripper == -1.0


def test_small_step_passes_unchanged():
    f = _filter()
    r = f.apply(np.array([0.5, -0.5, 0.5, 1.0], np.float32), (0.0, 0.0, 0.2))
    assert r.ok and r.modified == []
    np.testing.assert_allclose(r.delta.translation_m, [0.005, -0.005, 0.005], rtol=1e-6)


def test_action_clipped_to_spec_bounds():
    f = _filter(max_translation_m=1.0)
    r = f.apply(np.array([5.0, 0, 0, 3.0]), (0.0, 0.0, 0.2))
    assert r.ok and "action_clipped_to_spec" in r.modified
    np.testing.assert_allclose(r.delta.translation_m, [0.01, 0, 0])
    assert r.delta.gripper == 1.0


def test_per_step_translation_clamp_keeps_direction():
    spec = METAWORLD_4D.__class__.from_dict({**METAWORLD_4D.to_dict(), "translation_scale_m": 0.1})
    f = SafetyFilter(SafetyConfig(max_translation_m=0.02, workspace_enabled=False), spec)
    r = f.apply(np.array([0.6, 0.8, 0.0, 0.0]), None)  # 0.1 m step
    assert r.ok and TRANSLATION_CLAMPED in r.modified
    np.testing.assert_allclose(r.delta.translation_m, [0.012, 0.016, 0.0], atol=1e-9)
    assert np.linalg.norm(r.delta.translation_m) == pytest.approx(0.02)
    assert f.modifications[TRANSLATION_CLAMPED] == 1


def test_per_step_rotation_clamp():
    f = SafetyFilter(SafetyConfig(max_rotation_rad=0.03, workspace_enabled=False), EE_DELTA_7D)
    r = f.apply(np.array([0, 0, 0, 1.0, 0, 0, 0]), None)  # 0.05 rad roll
    assert r.ok and ROTATION_CLAMPED in r.modified
    np.testing.assert_allclose(r.delta.rotation_rad, [0.03, 0, 0])


def test_workspace_step_clipped_to_boundary():
    f = _filter()
    # EE 4 mm below the top face, step +10 mm in z and +10 mm in x
    r = f.apply(np.array([1.0, 0.0, 1.0, 0.0]), (0.0, 0.0, 0.496))
    assert r.ok and WORKSPACE_CLIPPED in r.modified
    np.testing.assert_allclose(np.array([0.0, 0.0, 0.496]) + r.delta.translation_m, [0.01, 0.0, 0.5], atol=1e-9)
    # on the boundary, pushing outward: zero motion in that axis
    r = f.apply(np.array([0.0, 0.0, 1.0, 0.0]), (0.0, 0.0, 0.5))
    np.testing.assert_allclose(r.delta.translation_m, 0.0, atol=1e-12)


def test_workspace_outside_box_moves_back_but_clamped():
    f = _filter()
    r = f.apply(np.zeros(4), (0.0, 0.0, 0.7))  # 0.2 m above the box
    assert r.ok and WORKSPACE_CLIPPED in r.modified and TRANSLATION_CLAMPED in r.modified
    np.testing.assert_allclose(r.delta.translation_m, [0.0, 0.0, -0.02], atol=1e-9)


def test_workspace_needs_ee_position():
    f = _filter()
    assert f.apply(np.zeros(4), None).reason == Reason.NO_EE_POSE
    assert f.apply(np.zeros(4), (np.nan, 0, 0)).reason == Reason.NO_EE_POSE


def test_config_validation():
    with pytest.raises(ValueError):
        SafetyConfig(workspace_min=(1, 0, 0), workspace_max=(0, 1, 1))
    with pytest.raises(ValueError):
        SafetyConfig(stale_timeout_s=0)
    with pytest.raises(ValueError):
        SafetyConfig(workspace_min=(0, 0))


def test_estop_thread_safety_smoke():
    f = _filter()
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            f.set_estop(True)
            f.set_estop(False)

    t = threading.Thread(target=flip)
    t.start()
    for _ in range(500):
        f.precheck(10.0, 9.9, 9.9, 9.9)
    stop.set()
    t.join()
    f.set_estop(True)
    assert f.precheck(10.0, 9.9, 9.9, 9.9).reason == Reason.ESTOP


# ------------------------------------------------------------------------------ motion maths
def test_twist_from_delta():
    d = action_to_delta(np.array([1.0, 0, -1.0, 0]), METAWORLD_4D)
    lin, ang = twist_from_delta(d, 10.0)
    np.testing.assert_allclose(lin, [0.1, 0, -0.1])
    np.testing.assert_allclose(ang, 0)


def test_quaternions():
    q = rpy_to_quat(0.0, 0.0, np.pi / 2)
    np.testing.assert_allclose(q, [0, 0, np.sqrt(0.5), np.sqrt(0.5)], atol=1e-12)
    np.testing.assert_allclose(quat_mul(q, q), [0, 0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(quat_mul([0, 0, 0, 1], q), q)


def test_pose_after_delta():
    d = action_to_delta(np.array([1.0, 0, 0, 0, 0, 1.0, 0]), EE_DELTA_7D)
    p, q = pose_after_delta([0.1, 0.2, 0.3], [0, 0, 0, 1], d)
    np.testing.assert_allclose(p, [0.11, 0.2, 0.3])
    np.testing.assert_allclose(q, rpy_to_quat(0, 0, 0.05), atol=1e-12)
    assert np.linalg.norm(q) == pytest.approx(1.0)
    # 4-D action: orientation unchanged (normalised)
    d4 = action_to_delta(np.array([0, 0, 1.0, 0]), METAWORLD_4D)
    p, q = pose_after_delta([0, 0, 0], [0, 0, 0, 2.0], d4)
    np.testing.assert_allclose(q, [0, 0, 0, 1])
    np.testing.assert_allclose(p, [0, 0, 0.01])


# ------------------------------------------------------------------------------ stats
def test_rolling_stats():
    s = RollingStats(window=10)
    assert s.summary()["n"] == 0
    for v in range(100):
        s.add(v)
    sm = s.summary()
    assert sm["n"] == 10 and sm["mean"] == pytest.approx(94.5) and sm["max"] == 99
    assert 98 <= sm["p95"] <= 99
    assert s.total == 100


def test_rate_meter():
    r = RateMeter(window_s=2.0)
    for i in range(50):
        r.tick(i * 0.1)
    assert r.rate(4.9) == pytest.approx(10.0)
    assert r.rate(100.0) == 0.0


def test_cv_bridge_wrapper_checks_layout_and_wraps_errors():
    """The cv_bridge path (used when cv_bridge imports) keeps the same layout checks and error type.
    cv_bridge is not installable here, so a stand-in object plays the bridge for this wrapper test."""
    from ire_vla_ros.robot.image_codec import CvBridgeDecoder

    class Bridge:
        def __init__(self, result=None, exc=None):
            self.result, self.exc, self.calls = result, exc, 0

        def imgmsg_to_cv2(self, msg, desired_encoding):
            self.calls += 1
            assert desired_encoding == "rgb8"
            if self.exc:
                raise self.exc
            return self.result

    img = _rgb()
    good = SimpleNamespace(**encode_rgb(img, "bgr8"))
    b = Bridge(result=img)
    np.testing.assert_array_equal(CvBridgeDecoder(b)(good), img)
    bad = SimpleNamespace(**{**encode_rgb(img, "bgr8"), "step": 1})
    with pytest.raises(ImageDecodeError, match="step 1"):
        CvBridgeDecoder(b)(bad)
    assert b.calls == 1  # rejected before reaching cv_bridge
    yuv = SimpleNamespace(**{**encode_rgb(img, "rgb8"), "encoding": "yuv422"})
    with pytest.raises(ImageDecodeError, match="cv_bridge: boom"):
        CvBridgeDecoder(Bridge(exc=RuntimeError("boom")))(yuv)
    with pytest.raises(ImageDecodeError, match="expected"):
        CvBridgeDecoder(Bridge(result=np.zeros((2, 2), np.uint8)))(good)
