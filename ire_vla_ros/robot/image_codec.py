"""sensor_msgs/Image <-> RGB uint8 arrays without ROS (cv_bridge is used instead when it imports).

`decode_image(encoding, height, width, step, data, is_bigendian)` accepts the common 8-bit
encodings rgb8, bgr8, rgba8, bgra8, mono8 and returns an (H, W, 3) uint8 RGB array. Rows may be
padded (step > width * channels); the padding is dropped. Anything else raises `ImageDecodeError`
with a reason that names the field at fault.

The Jazzy binary cv_bridge is built against NumPy 1; with NumPy 2 (which torch pulls in) its import
fails (`_ARRAY_API not found`). `CvBridgeDecoder.create()` treats any import failure as "not
installed" and falls back to this module. Robots that want the system cv_bridge need `numpy<2`.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "ImageDecodeError",
    "SUPPORTED_ENCODINGS",
    "decode_image",
    "decode_image_msg",
    "encode_rgb",
    "resize_rgb",
    "make_decoder",
]

#: encoding -> channels
SUPPORTED_ENCODINGS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}


class ImageDecodeError(ValueError):
    """The image message cannot be turned into an RGB array; the message says why."""


def decode_image(encoding: str, height: int, width: int, step: int, data, is_bigendian: int = 0) -> np.ndarray:
    """Image fields -> (H, W, 3) uint8 RGB (a fresh array, never a view of `data`)."""
    enc = (encoding or "").lower()
    if enc not in SUPPORTED_ENCODINGS:
        raise ImageDecodeError(
            f"unsupported encoding {encoding!r} (supported: {', '.join(SUPPORTED_ENCODINGS)})"
        )
    channels = SUPPORTED_ENCODINGS[enc]
    height, width, step = int(height), int(width), int(step)
    buf = np.frombuffer(_as_bytes(data), dtype=np.uint8)
    _check_layout(enc, height, width, step, buf.size)
    row_bytes = width * channels
    img = buf.reshape(height, step)[:, :row_bytes].reshape(height, width, channels)
    if enc == "rgb8":
        return img.copy()
    if enc == "bgr8":
        return np.ascontiguousarray(img[:, :, ::-1])
    if enc == "rgba8":
        return np.ascontiguousarray(img[:, :, :3])
    if enc == "bgra8":
        return np.ascontiguousarray(img[:, :, 2::-1])
    # mono8
    return np.ascontiguousarray(np.repeat(img, 3, axis=2))


def _check_layout(enc: str, height: int, width: int, step: int, size: int) -> None:
    channels = SUPPORTED_ENCODINGS[enc]
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"empty image: {width}x{height}")
    row_bytes = width * channels
    if step < row_bytes:
        raise ImageDecodeError(f"step {step} < width*channels = {width}*{channels} = {row_bytes} ({enc})")
    if size != step * height:
        raise ImageDecodeError(
            f"data length {size} != step*height = {step}*{height} = {step * height} ({enc} {width}x{height})"
        )


def _as_bytes(data):
    # rclpy gives array.array('B') or bytes for uint8[]; numpy arrays pass through frombuffer too.
    if isinstance(data, (bytes, bytearray, memoryview)):
        return data
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data, dtype=np.uint8)
    try:
        return memoryview(data)
    except TypeError:
        return bytes(data)


def decode_image_msg(msg) -> np.ndarray:
    """A sensor_msgs/Image (or anything with the same fields) -> (H, W, 3) uint8 RGB."""
    return decode_image(msg.encoding, msg.height, msg.width, msg.step, msg.data, getattr(msg, "is_bigendian", 0))


def encode_rgb(image: np.ndarray, encoding: str = "rgb8", row_padding: int = 0) -> dict:
    """(H, W, 3) uint8 RGB -> the fields of a sensor_msgs/Image (for publishers and tests).

    Returns dict(height, width, encoding, is_bigendian, step, data: bytes).
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8, got {img.shape} {img.dtype}")
    enc = encoding.lower()
    if enc == "rgb8":
        out = img
    elif enc == "bgr8":
        out = img[:, :, ::-1]
    elif enc == "rgba8":
        out = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=2)
    elif enc == "bgra8":
        out = np.concatenate([img[:, :, ::-1], np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=2)
    elif enc == "mono8":
        out = img.mean(axis=2, keepdims=True).round().astype(np.uint8)
    else:
        raise ValueError(f"cannot encode {encoding!r}")
    h, w, c = out.shape
    rows = np.ascontiguousarray(out).reshape(h, w * c)
    if row_padding:
        rows = np.concatenate([rows, np.zeros((h, row_padding), np.uint8)], axis=1)
    return dict(height=h, width=w, encoding=enc, is_bigendian=0, step=w * c + row_padding, data=rows.tobytes())


def resize_rgb(image: np.ndarray, size: tuple[int, int] | int | None) -> np.ndarray:
    """Resize to (height, width) with OpenCV INTER_AREA (the model's input size). None: unchanged."""
    if size is None:
        return image
    if isinstance(size, int):
        size = (size, size)
    h, w = int(size[0]), int(size[1])
    if image.shape[0] == h and image.shape[1] == w:
        return image
    import cv2

    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


class _BuiltinDecoder:
    name = "builtin"

    def __call__(self, msg) -> np.ndarray:
        return decode_image_msg(msg)


class CvBridgeDecoder:
    """cv_bridge-based decoder; errors are re-raised as ImageDecodeError."""

    name = "cv_bridge"

    def __init__(self, bridge):
        self._bridge = bridge

    @classmethod
    def create(cls):
        """A decoder using cv_bridge, or None when cv_bridge does not import (any failure)."""
        try:
            from cv_bridge import CvBridge  # noqa: PLC0415

            return cls(CvBridge())
        except Exception:  # ImportError, NumPy-ABI errors (`_ARRAY_API not found`), ...
            return None

    def __call__(self, msg) -> np.ndarray:
        enc = (msg.encoding or "").lower()
        if enc in SUPPORTED_ENCODINGS:  # same layout checks as the built-in path
            _check_layout(enc, int(msg.height), int(msg.width), int(msg.step), len(msg.data))
        try:
            img = self._bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8")
        except Exception as exc:  # CvBridgeError, cv2.error, ValueError, TypeError
            raise ImageDecodeError(f"cv_bridge: {exc}") from exc
        img = np.asarray(img)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ImageDecodeError(f"cv_bridge returned {img.shape} {img.dtype}, expected (H, W, 3) uint8")
        return img


def make_decoder(prefer_cv_bridge: bool = True):
    """cv_bridge when importable (and wanted), else the built-in converter. Has `.name`."""
    if prefer_cv_bridge:
        dec = CvBridgeDecoder.create()
        if dec is not None:
            return dec
    return _BuiltinDecoder()
