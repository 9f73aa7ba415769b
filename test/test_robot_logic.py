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


# ------------------------------------------------------------------------------ cv_bridge probe
class _FakeBridge:
    """Plays cv_bridge for the probe: `mode` good | raises | wrong_pixel."""

    def __init__(self, mode="good"):
        self.mode, self.calls = mode, 0

    def imgmsg_to_cv2(self, msg, desired_encoding):
        self.calls += 1
        if self.mode == "raises":  # what the NumPy-1 binary does under NumPy 2, after a clean import
            raise AttributeError("_ARRAY_API not found")
        img = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)
        if self.mode == "wrong_pixel":  # forgot the bgr -> rgb swap
            return img.copy()
        return np.ascontiguousarray(img[:, :, ::-1])


def test_cv_bridge_chosen_only_when_probe_converts():
    from ire_vla_ros.robot.image_codec import probe_bridge

    good = _FakeBridge("good")
    assert probe_bridge(good) is None and good.calls == 1
    dec = make_decoder(True, bridge_factory=lambda: good)
    assert dec.name == "cv_bridge" and dec.fallback_reason == ""
    img = _rgb()
    np.testing.assert_array_equal(dec(SimpleNamespace(**encode_rgb(img, "bgr8"))), img)

    broken = make_decoder(True, bridge_factory=lambda: _FakeBridge("raises"))  # imports, fails on use
    assert broken.name == "builtin" and "_ARRAY_API" in broken.fallback_reason
    wrong = make_decoder(True, bridge_factory=lambda: _FakeBridge("wrong_pixel"))
    assert wrong.name == "builtin" and "expected [30, 20, 10]" in wrong.fallback_reason

    def no_module():
        raise ModuleNotFoundError("No module named 'cv_bridge'")

    missing = make_decoder(True, bridge_factory=no_module)
    assert missing.name == "builtin" and "does not import" in missing.fallback_reason
    assert make_decoder(False, bridge_factory=lambda: good).name == "builtin"


# ------------------------------------------------------------------------------ compressed images, limits
@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_compressed_header_size_and_decode(fmt):
    import cv2

    from ire_vla_ros.robot.image_codec import compressed_size, decode_compressed

    img = _rgb(48, 80)
    ok, buf = cv2.imencode("." + fmt, img[:, :, ::-1])
    assert ok
    assert compressed_size(buf.tobytes()) == (fmt, 80, 48)
    out = decode_compressed(f"rgb8; {fmt} compressed bgr8", buf.tobytes())
    assert out.shape == (48, 80, 3)
    if fmt == "png":  # lossless
        np.testing.assert_array_equal(out, img)
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        decode_compressed(fmt, buf.tobytes()[:40])
    with pytest.raises(ImageDecodeError, match="neither png nor jpeg"):
        compressed_size(b"GIF89a....")


def _png_header(width, height):
    import struct

    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", width, height) + b"\x08\x02\0\0\0"


def test_image_limits_refuse_gigantic_claims_before_decoding():
    from ire_vla_ros.robot.image_codec import ImageLimits

    lim = ImageLimits(max_pixels=1000 * 1000, max_bytes=4 * 1024 * 1024)
    ok = SimpleNamespace(**encode_rgb(_rgb(6, 5), "rgb8"))
    assert lim.check(ok) is None
    # a raw image that claims 100000 x 100000 with 12 bytes of data
    huge = SimpleNamespace(height=100_000, width=100_000, step=300_000, encoding="rgb8", data=b"x" * 12)
    assert "max_image_pixels" in lim.check(huge)
    assert "max_image_bytes" in lim.check(SimpleNamespace(height=1, width=1, step=10**9, encoding="rgb8",
                                                          data=b"x" * 3))
    assert "max_image_bytes" in lim.check(SimpleNamespace(**{**vars(ok), "data": b"x" * (5 * 1024 * 1024)}))
    # a 60-byte png whose header claims 60000 x 60000: refused from the header, never decoded
    bomb = SimpleNamespace(format="png", data=_png_header(60_000, 60_000))
    assert "60000x60000" in lim.check(bomb)
    assert lim.check(SimpleNamespace(format="png", data=_png_header(640, 480))) is None


def test_latest_observations_bounds_instruction_and_wakes_on_frame():
    from ire_vla_ros.robot.image_codec import ImageLimits
    from ire_vla_ros.robot.runner import LatestObservations

    obs = LatestObservations(ImageLimits(max_pixels=100), max_instruction_bytes=8, instruction="start")
    assert obs.set_instruction("ééé") == (True, "")          # 6 bytes
    ok, why = obs.set_instruction("éééé" + "x")              # 9 bytes
    assert not ok and "9 bytes" in why and obs.instruction == "ééé"
    assert obs.counters["oversize_instructions"] == 1
    assert obs.wait_frame(0.0) is False
    big = SimpleNamespace(**encode_rgb(_rgb(20, 20), "rgb8"))
    assert obs.offer_image(big, 1.0, 1.0) is not None and obs.counters["oversize_images"] == 1
    assert obs.snapshot().image is None and obs.wait_frame(0.0) is False
    small = SimpleNamespace(**encode_rgb(_rgb(5, 5), "rgb8"))
    threading.Timer(0.05, lambda: obs.offer_image(small, 2.0, 2.5)).start()
    assert obs.wait_frame(30.0) is True
    snap = obs.snapshot()
    assert snap.image is small and (snap.image_stamp, snap.image_rx) == (2.0, 2.5)


# ------------------------------------------------------------------------------ stamp staleness
def test_precheck_judges_image_by_stamp_as_well_as_arrival():
    f = _filter()
    assert f.precheck(10.0, 9.99, 9.99, 9.99, image_stamp=9.9).ok
    late = f.precheck(10.0, 9.99, 9.99, 9.99, image_stamp=9.0)   # arrived just now, stamped 1 s ago
    assert not late.ok and late.reason == Reason.STALE_IMAGE
    assert f.precheck(10.0, 9.99, 9.99, 9.99, image_stamp=0.0).reason == Reason.STALE_IMAGE   # unstamped
    assert f.precheck(10.0, 9.99, 9.99, 9.99, image_stamp=12.0).reason == Reason.STALE_IMAGE  # clock ahead
    f.set_estop_link(False)
    assert f.precheck(10.0, 9.99, 9.99, 9.99, image_stamp=9.9).reason == Reason.ESTOP_LOST
    assert f.apply(np.zeros(4), [0, 0, 0.2]).reason == Reason.ESTOP_LOST


def test_set_config_takes_effect_on_next_apply():
    f = _filter()
    big = np.array([1.0, 0.0, 0.0, 0.0])  # 10 mm
    assert np.linalg.norm(f.apply(big, [0, 0, 0.2]).delta.translation_m) == pytest.approx(0.01)
    f.set_config(SafetyConfig(max_translation_m=0.004, workspace_min=(-0.5, -0.5, 0.0),
                              workspace_max=(0.001, 0.5, 0.5)))
    d = f.apply(big, [0, 0, 0.2]).delta.translation_m
    assert d[0] == pytest.approx(0.001)   # the new box, then the new clamp
    assert np.linalg.norm(f.apply(big, [-0.2, 0, 0.2]).delta.translation_m) == pytest.approx(0.004)


# ------------------------------------------------------------------------------ pacing
@pytest.mark.parametrize("mode", ["timer", "frame"])
def test_pacer_keeps_the_rate_on_a_30hz_camera(mode):
    """Simulated time: a 30 Hz camera, a 10 Hz grid. Both modes give 10 commands/s; frame mode acts
    right when a frame arrives (age 0), timer mode on whatever frame is newest."""
    from ire_vla_ros.robot.runner import ControlPacer

    pacer = ControlPacer(0.1, mode, now=0.0)
    frames = [i / 30.0 + 0.004 for i in range(400)]  # 13 s of frames (10 s simulated), 4 ms transport
    acts, ages, t, k = [], [], 0.0, 0
    for _ in range(10_000):  # bounded: a pacer that never advances fails instead of hanging
        if t >= 10.0:
            break
        deadline = t + pacer.timeout(t)
        nxt = frames[k] if k < len(frames) else 1e9
        if mode == "frame" and nxt <= deadline:
            t, got = nxt, True
            k += 1
        else:
            t, got = deadline, False
            while k < len(frames) and frames[k] <= t:
                k += 1
        if pacer.ready(t, got):
            acts.append(t)
            if k:
                ages.append(t - frames[k - 1])
            pacer.done(t)
    assert t >= 10.0, "the pacer stopped advancing"
    assert len(acts) == pytest.approx(100, abs=2)
    gaps = np.diff(acts)
    assert gaps.max() <= 0.1 + 1 / 30.0 + 1e-9      # steady: never more than a period + a frame
    if mode == "frame":
        assert max(ages) < 1e-9                      # acted on arrival
    else:
        assert np.mean(ages) > 0.01                  # waited on the grid


def test_pacer_restarts_grid_after_stall():
    from ire_vla_ros.robot.runner import ControlPacer

    p = ControlPacer(0.1, "timer", now=0.0)
    p.done(0.0)
    p.done(5.0)                                       # the step took 5 s
    assert p.due == pytest.approx(5.1)                # no burst of 50 catch-up steps


# ------------------------------------------------------------------------------ runner
class _Policy:
    """A stand-in with the VLAPolicy surface the runner uses (act, action_spec, joint_names)."""

    def __init__(self, action, joint_names=("j0", "j1")):
        self.action = np.asarray(action, np.float32)
        self.action_spec = METAWORLD_4D
        self.joint_names = list(joint_names)
        self.backbone = SimpleNamespace(image_size=64)
        self.calls = 0

    def act(self, image, state, instruction, deterministic=True):
        self.calls += 1
        assert image.shape == (64, 64, 3) and state.shape == (len(self.joint_names),)
        return SimpleNamespace(action=self.action, log_prob=-1.0, value=0.5)


def _runner(policy=None, **kw):
    from ire_vla_ros.robot.image_codec import make_decoder as md
    from ire_vla_ros.robot.runner import PolicyRunner

    policy = policy or _Policy([0.5, 0.0, 0.0, 1.0])
    r = PolicyRunner(policy, "/ckpt/a", _filter(), md(False), **kw)
    r.enabled = True
    return r


def _snap(now=10.0, stamp=None, **kw):
    from ire_vla_ros.robot.runner import Snapshot

    msg = SimpleNamespace(**encode_rgb(_rgb(48, 80), "rgb8"))
    base = dict(image=msg, image_stamp=now - 0.05 if stamp is None else stamp, image_rx=now - 0.01,
                joints={"j0": (0.1, now - 0.01), "j1": (0.2, now - 0.01)}, ee_pos=np.array([0, 0, 0.2]),
                ee_quat=np.array([0, 0, 0, 1.0]), ee_time=now - 0.01, instruction="go")
    base.update(kw)
    return Snapshot(**base)


def test_runner_step_command_and_each_skip_reason():
    from ire_vla_ros.robot.runner import Skip

    r = _runner()
    out = r.step(_snap(), 10.0)
    assert out.command is not None and out.command.delta.translation_m[0] == pytest.approx(0.005)
    assert out.command.image_stamp == pytest.approx(9.95)
    r.sent(out.command, 10.01)
    assert r.latency_ms.summary()["mean"] == pytest.approx(60.0, abs=1e-3)
    assert r.step(_snap(stamp=8.0), 10.0).reason == Reason.STALE_IMAGE
    assert r.step(_snap(joints={"j0": (0.1, 9.99)}), 10.0).reason == Skip.MISSING_JOINTS
    assert r.step(_snap(joints={"j0": (np.nan, 9.99), "j1": (0.0, 9.99)}), 10.0).reason == Skip.MISSING_JOINTS
    assert r.step(_snap(ee_frame_ok=False), 10.0).reason == Skip.EE_FRAME
    bad = _snap(image=SimpleNamespace(**{**encode_rgb(_rgb(), "rgb8"), "encoding": "yuv422"}))
    assert r.step(bad, 10.0).reason == Skip.REJECTED_IMAGE
    r.enabled = False
    assert r.step(_snap(), 10.0).reason == Skip.DISABLED
    st = r.stats(10.0)
    assert (st["commands_sent"], st["reject_stale_image"], st["missing_joints"], st["ee_frame_mismatch"],
            st["rejected_images"], st["disabled"], st["ticks"]) == (1, 1, 2, 1, 1, 1, 7)
    nan = _runner(_Policy([np.nan, 0, 0, 0]))
    assert nan.step(_snap(), 10.0).reason == Reason.NAN_ACTION


def test_runner_decodes_each_image_once():
    r = _runner()
    snap = _snap()
    calls = []
    inner = r.decoder
    r.decoder = lambda m: calls.append(1) or inner(m)
    r.step(snap, 10.0)
    r.step(snap, 10.0)
    assert len(calls) == 1 and r.policy.calls == 2


def test_runner_swaps_offered_model_between_steps_only():
    r = _runner()
    new = _Policy([-0.5, 0.0, 0.0, 0.0])
    r.offer_model(new, "/ckpt/b")
    assert r.policy is not new and str(r.checkpoint) == "/ckpt/a"   # not until the next step
    out = r.step(_snap(), 10.0)
    assert r.policy is new and str(r.checkpoint) == "/ckpt/b" and r.counters["models_swapped"] == 1
    assert out.command.delta.translation_m[0] == pytest.approx(-0.005)


def test_reloader_answers_at_once_one_at_a_time_and_failed_load_keeps_model():
    from ire_vla_ros.robot.runner import ModelReloader

    gate, results = threading.Event(), []
    r = _runner()
    old = r.policy
    outcome = {"fail": False}

    def load():
        gate.wait(30)
        if outcome["fail"]:
            raise ValueError("heads.safetensors truncated")
        return _Policy([0.1, 0, 0, 0]), "/ckpt/new"

    rl = ModelReloader(load, r.offer_model, lambda ok, msg: results.append((ok, msg)))
    accepted, msg = rl.request()                   # returns while the load is blocked
    assert accepted and "accepted" in msg and rl.running
    busy, msg = rl.request()
    assert not busy and "already running" in msg and rl.counters["reloads_refused_busy"] == 1
    gate.set()
    rl.join(30)
    assert results == [(True, "loaded /ckpt/new")]
    r.step(_snap(), 10.0)
    assert r.policy is not old and str(r.checkpoint) == "/ckpt/new"
    kept = r.policy
    outcome["fail"] = True
    assert rl.request()[0]
    rl.join(30)
    assert results[-1][0] is False and "truncated" in results[-1][1]
    r.step(_snap(), 10.0)
    assert r.policy is kept and rl.counters["reloads_failed"] == 1 and rl.counters["reloads_ok"] == 1
