"""Robot-side logic that needs no ROS: image decoding, safety filter, motion maths, statistics."""
from ire_vla_ros.robot.image_codec import ImageDecodeError, decode_image, decode_image_msg, make_decoder, resize_rgb
from ire_vla_ros.robot.safety import MotionDelta, Reason, SafetyConfig, SafetyFilter, SafetyResult

__all__ = [
    "ImageDecodeError", "decode_image", "decode_image_msg", "make_decoder", "resize_rgb",
    "MotionDelta", "Reason", "SafetyConfig", "SafetyFilter", "SafetyResult",
]
