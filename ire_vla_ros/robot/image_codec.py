"""sensor_msgs/Image and CompressedImage -> RGB uint8 arrays without ROS (cv_bridge when it works).

`decode_image(encoding, height, width, step, data, is_bigendian)` accepts the common 8-bit
encodings rgb8, bgr8, rgba8, bgra8, mono8 and returns an (H, W, 3) uint8 RGB array. Rows may be
padded (step > width * channels); the padding is dropped. Anything else raises `ImageDecodeError`
with a reason that names the field at fault. `decode_compressed(format, data)` decodes
image_transport's `<topic>/compressed` (jpeg, png) with OpenCV.

`ImageLimits.check(msg)` bounds what a message may claim (pixels, row step, bytes) and reads a
compressed image's width and height from its JPEG/PNG header, so an image claiming a gigantic size
is refused before anything is allocated for it.

The Jazzy binary cv_bridge is built against NumPy 1. With NumPy 2 (which torch pulls in) the failure
may surface at import (`_ARRAY_API not found`) or only inside `imgmsg_to_cv2`, so `make_decoder`
converts a 1x1 image with the bridge at start-up (`probe_bridge`) and uses cv_bridge only when that
round trip gives the right pixel; otherwise the built-in converter. Robots that want the system
cv_bridge need `numpy<2`.
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
    "probe_bridge",
    "ImageLimits",
    "compressed_size",
    "decode_compressed",
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


def _probe_message():
    """A 1x1 bgr8 image (pixel B=10 G=20 R=30) as a sensor_msgs/Image when ROS is there."""
    fields = dict(height=1, width=1, encoding="bgr8", is_bigendian=0, step=3, data=bytes([10, 20, 30]))
    try:
        from sensor_msgs.msg import Image  # noqa: PLC0415

        return Image(**fields)
    except Exception:  # no ROS: a stand-in with the same fields
        from types import SimpleNamespace

        return SimpleNamespace(**fields)


def probe_bridge(bridge) -> str | None:
    """Convert a 1x1 bgr8 image with `bridge`; None when it returns the right RGB pixel, else why not.

    The NumPy 1/2 mismatch of a binary cv_bridge can pass the import and fail here."""
    try:
        out = np.asarray(bridge.imgmsg_to_cv2(_probe_message(), desired_encoding="rgb8"))
    except Exception as exc:  # noqa: BLE001 - any failure means "do not use this bridge"
        return f"imgmsg_to_cv2 failed: {type(exc).__name__}: {exc}"
    if out.dtype != np.uint8 or out.shape != (1, 1, 3) or out.reshape(3).tolist() != [30, 20, 10]:
        return f"imgmsg_to_cv2 returned {out.dtype} {out.shape} {out.reshape(-1)[:3].tolist()}, expected [30, 20, 10]"
    return None


def _import_cv_bridge():
    from cv_bridge import CvBridge  # noqa: PLC0415

    return CvBridge()


def make_decoder(prefer_cv_bridge: bool = True, bridge_factory=_import_cv_bridge):
    """cv_bridge when it imports AND converts a probe image correctly, else the built-in converter.

    The decoder has `.name` ("cv_bridge" / "builtin") and `.fallback_reason` (why not cv_bridge)."""
    reason = "prefer_cv_bridge is false"
    if prefer_cv_bridge:
        try:
            bridge = bridge_factory()
        except Exception as exc:  # ImportError, NumPy-ABI errors (`_ARRAY_API not found`), ...
            reason = f"cv_bridge does not import: {type(exc).__name__}: {exc}"
        else:
            reason = probe_bridge(bridge)
            if reason is None:
                dec = CvBridgeDecoder(bridge)
                dec.fallback_reason = ""
                return dec
    dec = _BuiltinDecoder()
    dec.fallback_reason = reason
    return dec


# ---------------------------------------------------------------------------------------------
# compressed images and size limits
# ---------------------------------------------------------------------------------------------
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, ...): not DHT C4, JPG C8, DAC CC
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def compressed_size(data) -> tuple[str, int, int]:
    """(kind "png"/"jpeg", width, height) read from the header alone; ImageDecodeError if neither."""
    buf = bytes(memoryview(_as_bytes(data))[:65536]) if not isinstance(data, bytes) else data
    if buf[:8] == _PNG_SIGNATURE:
        if len(buf) < 24 or buf[12:16] != b"IHDR":
            raise ImageDecodeError("png without an IHDR chunk")
        return "png", int.from_bytes(buf[16:20], "big"), int.from_bytes(buf[20:24], "big")
    if buf[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(buf):
            if buf[i] != 0xFF:
                raise ImageDecodeError(f"jpeg: no marker at byte {i}")
            marker = buf[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
                i += 2
                continue
            length = int.from_bytes(buf[i + 2:i + 4], "big")
            if marker in _JPEG_SOF:
                if i + 9 > len(buf):
                    break
                return "jpeg", int.from_bytes(buf[i + 7:i + 9], "big"), int.from_bytes(buf[i + 5:i + 7], "big")
            i += 2 + length
        raise ImageDecodeError("jpeg: no start-of-frame marker in the first 64 KiB")
    raise ImageDecodeError(f"compressed image is neither png nor jpeg (starts {buf[:4].hex()})")


def decode_compressed(fmt: str, data) -> np.ndarray:
    """A sensor_msgs/CompressedImage's format and data (jpeg or png) -> (H, W, 3) uint8 RGB."""
    import cv2  # noqa: PLC0415

    buf = np.frombuffer(_as_bytes(data), dtype=np.uint8)
    if buf.size == 0:
        raise ImageDecodeError(f"empty compressed image (format {fmt!r})")
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)  # BGR (grey and alpha images converted)
    if img is None:
        raise ImageDecodeError(f"OpenCV cannot decode the {len(buf)}-byte image (format {fmt!r})")
    return np.ascontiguousarray(img[:, :, ::-1])


class CompressedDecoder:
    """sensor_msgs/CompressedImage (image_transport `compressed`: jpeg or png) -> RGB."""

    name = "compressed"
    fallback_reason = ""

    def __call__(self, msg) -> np.ndarray:
        return decode_compressed(msg.format, msg.data)


class ImageLimits:
    """Bounds on what an image message may claim, checked before any decoding or allocation."""

    def __init__(self, max_pixels: int = 4096 * 4096, max_bytes: int = 64 * 1024 * 1024):
        self.max_pixels = int(max_pixels)
        self.max_bytes = int(max_bytes)

    def check(self, msg) -> str | None:
        """None when `msg` (Image or CompressedImage) is within the limits, else the reason."""
        nbytes = len(msg.data)
        if nbytes > self.max_bytes:
            return f"{nbytes} bytes > max_image_bytes {self.max_bytes}"
        if hasattr(msg, "format"):  # CompressedImage: the claimed size is in the file header
            try:
                _, width, height = compressed_size(msg.data)
            except ImageDecodeError as exc:
                return str(exc)
            step = 0
        else:
            width, height, step = int(msg.width), int(msg.height), int(msg.step)
            if step > self.max_bytes:
                return f"step {step} > max_image_bytes {self.max_bytes}"
        if width * height > self.max_pixels:
            return f"{width}x{height} = {width * height} pixels > max_image_pixels {self.max_pixels}"
        return None
