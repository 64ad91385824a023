"""Typed errors for expected failures. `code` is a stable machine-readable name; HTTP status codes are the
serving layer's business (`deployments/errors.py` maps each type to one)."""

from __future__ import annotations


class InstantIDError(Exception):
    """Base class: an expected failure whose message tells the caller what to fix."""

    code: str = "bad_request"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidParameter(InstantIDError):
    """A request parameter is missing, of the wrong type or out of range."""

    code = "invalid_parameter"


class InvalidImage(InstantIDError):
    """The bytes are not a decodable image: empty, truncated, or in no format Pillow reads. Nothing was run; send
    a PNG, JPEG or WebP file."""

    code = "invalid_image"


class ImageTooLarge(InstantIDError):
    code = "image_too_large"  # bytes or pixels above the configured limit; the message names the limit


class NoFaceDetected(InstantIDError):
    """The face detector found no face in the image, or fewer faces than the requested face index.

    The message names the input (API field or file path) so the caller knows which photo to replace."""

    code = "no_face"


class WeightsError(InstantIDError):
    """A weight source is missing, incomplete or corrupt; the message names the file."""

    code = "weights_error"


class StorageError(InstantIDError):
    code = "storage_unavailable"  # the output store (file:// or s3://) could not be read or written


class InputNotAllowed(InstantIDError):
    """An input URI points somewhere this deployment may not read: a bucket outside the allowed list, a host
    outside the allowed URL hosts, or a scheme that is not served."""

    code = "input_not_allowed"


class GPUMemoryError(InstantIDError):
    """One request does not fit in the device's free memory even alone: its batch was split and retried down to
    it, and the others of the batch went on. The message names its size; a smaller size, fewer images or a later
    retry fits."""

    code = "gpu_memory"


class InputNotFound(InstantIDError):
    """An input URI points to an object that does not exist."""

    code = "input_not_found"


class UnsafeContent(InstantIDError):
    """Every image of the request was flagged by the safety checker and the operator's mode is `block`: nothing
    was written. `images` are their indices (generation order)."""

    code = "unsafe_content"

    def __init__(self, message: str, *, images: list[int] | None = None, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.images = list(images or [])  # a default: an exception is rebuilt from its message when it is unpickled
