"""Typed errors for expected failures; the serving layer maps each to an HTTP status."""

from __future__ import annotations


class InstantIDError(Exception):
    """Base class: an expected failure whose message tells the caller what to fix."""

    http_status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidParameter(InstantIDError):
    """A request parameter is missing, of the wrong type or out of range."""

    http_status = 400
    code = "invalid_parameter"


class InvalidImage(InstantIDError):
    """The bytes are not a decodable image (empty, truncated, not an image format)."""

    http_status = 415
    code = "invalid_image"


class ImageTooLarge(InstantIDError):
    """The image (bytes or pixels) is above the configured limit."""

    http_status = 413
    code = "image_too_large"


class NoFaceDetected(InstantIDError):
    """The face detector found no face (or not the requested face index) in the image."""

    http_status = 422
    code = "no_face"


class WeightsError(InstantIDError):
    """A weight source is missing, incomplete or corrupt; the message names the file."""

    http_status = 500
    code = "weights_error"


class StorageError(InstantIDError):
    """The output store (file:// or s3://) could not be read or written."""

    http_status = 503
    code = "storage_unavailable"


class InputNotAllowed(InstantIDError):
    """An input URI points somewhere this deployment may not read (bucket or scheme not allowed)."""

    http_status = 403
    code = "input_not_allowed"


class InputNotFound(InstantIDError):
    """An input URI points to an object that does not exist."""

    http_status = 404
    code = "input_not_found"
