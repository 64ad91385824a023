"""Narrow filters for third-party messages that every run printed and that tell our users nothing they can act on.

Each filter matches one known message from one module; every other warning and log record still shows. A library
leaves a process's logging alone, so importing instantid_core installs nothing: the applications call
`silence_known_noise()` (the CLI's main, and the `deployments` and `batch` packages, whose processes are ours).
"""

from __future__ import annotations

import logging
import warnings

# transformers (5.x) logs this the first time diffusers' pipelines import CLIPImageProcessor / SiglipImageProcessor
# without torchvision. We never use an image processor of transformers (the face stage is insightface), and the
# PIL fallback it announces is exactly what we would want anyway.
_TRANSFORMERS_LOGGER = "transformers.utils.import_utils"
_TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"

# scikit-image 0.26 deprecated `SimilarityTransform.estimate`; insightface 2.1's face_align calls it for every face
# it aligns, so each analysis printed a FutureWarning pointing into insightface. Alignment results are unchanged.
_SKIMAGE_ESTIMATE = r"`estimate` is deprecated"
_INSIGHTFACE_ALIGN = r"insightface\.utils\.face_align"


# Prompts longer than 77 tokens are encoded in chunks by compel (instantid_core.text); diffusers' encode_prompt,
# which gives them their pooled vector, and the tokenizer both announce a truncation that does not happen to the
# prompt's embeddings.
_DIFFUSERS_SDXL_LOGGER = "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl"
_TRUNCATED = "The following part of your input was truncated because CLIP can only handle"
_TOKENIZER_LOGGER = "transformers.tokenization_utils_base"
_TOO_LONG = "Token indices sequence length is longer than the specified maximum sequence length"


# diffusers' StableDiffusionSafetyChecker warns that "a black image will be returned instead" whenever it flags one;
# instantid_core.safety reads its verdict only and the configured mode decides what is written (block, blur, flag).
_SAFETY_LOGGER = "diffusers.pipelines.stable_diffusion.safety_checker"
_BLACK_IMAGE = "A black image will be returned instead"


def _drop_black_image_notice(record: logging.LogRecord) -> bool:
    return _BLACK_IMAGE not in record.getMessage()


def _drop_truncation_notice(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return _TRUNCATED not in message and _TOO_LONG not in message


def _drop_torchvision_fallback(record: logging.LogRecord) -> bool:
    return _TORCHVISION_FALLBACK not in record.getMessage()


def silence_known_noise() -> None:
    """Install the filters; idempotent (the same filter object or warning filter is never added twice)."""
    logging.getLogger(_TRANSFORMERS_LOGGER).addFilter(_drop_torchvision_fallback)
    logging.getLogger(_DIFFUSERS_SDXL_LOGGER).addFilter(_drop_truncation_notice)
    logging.getLogger(_TOKENIZER_LOGGER).addFilter(_drop_truncation_notice)
    logging.getLogger(_SAFETY_LOGGER).addFilter(_drop_black_image_notice)
    warnings.filterwarnings("ignore", message=_SKIMAGE_ESTIMATE, category=FutureWarning, module=_INSIGHTFACE_ALIGN)
