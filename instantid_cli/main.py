"""`instantid` command line: weights (tiny | download | check), generate, and batch.

It sits above the core library and the batch job (both are imported, neither imports it), so `instantid_core`
stays a plain library.

Expected failures (no face, not an image, unreadable file, bad parameter, broken weights) exit with code 2 and one
clear line on stderr; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
import typing
import uuid
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from instantid_core.config import MAX_IDENTITIES, GenerateParams, ModelSources, PipelineSettings
from instantid_core.errors import InstantIDError, InvalidParameter, WeightsError
from instantid_core.poses import PosePreset
from instantid_core.quiet import silence_known_noise
from instantid_core.scoring import DEFAULT_MAX_CANDIDATES, check_scoring_params, identity_record

EXIT_USAGE = 2


def _weights_tiny(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    target = Path(args.dir)
    if target.exists() and not target.is_dir():
        raise WeightsError(f"cannot write the tiny preset to {target}: it is a file, not a folder", field="dir")

    from instantid_core.tiny.models import write_tiny_preset

    try:
        root = write_tiny_preset(target)
    except OSError as exc:  # permissions, disk full, a file in the way further down
        raise WeightsError(f"cannot write the tiny preset to {target}: {exc}", field="dir") from exc
    print(f"wrote the tiny preset to {root} in {time.perf_counter() - start:.1f}s")


def _weights_download(args: argparse.Namespace) -> None:
    from instantid_core.weights import download_all

    sources = _sources(args)
    if args.safety_checker:
        sources = sources.model_copy(update={"safety_checker": args.safety_checker})
    resolved = download_all(Path(args.dir), sources, dtype=args.dtype)
    print(f"weights ready under {args.dir} ({resolved.downloaded_files} files downloaded)")


def _weights_check(args: argparse.Namespace) -> None:
    from instantid_core.weight_checks import check_weights

    root = _weights_root(args.dir)
    check_weights(root)  # every part of the folder: missing, truncated or corrupt files, by name
    parts = ModelSources.from_root(root)
    print(f"ok: {parts.sdxl}, {parts.identitynet}, {parts.adapter}, {parts.face_pack}")


def _generate(args: argparse.Namespace) -> None:
    # Everything cheap is checked before torch and diffusers are imported: a typo costs no model load.
    params = params_from_args(args)
    settings = PipelineSettings(device=args.device, dtype=args.dtype, styles_file=args.styles_file)
    faces = [_read_image(path, settings) for path in args.face or []]
    identity_images = [[_read_image(path, settings) for path in paths] for paths, _ in args.identity] \
        if args.identity else None
    pose = _read_image(args.pose, settings) if args.pose else None
    init = _read_image(args.init_image, settings) if args.init_image else None
    mask = _read_image(args.mask, settings) if args.mask else None
    from instantid_core.request_rules import check_init_inputs  # before any model loads
    from instantid_core.styles import apply_style, load_styles

    apply_style(load_styles(settings), params.style, "", "")  # an unknown style: one error line, no model load
    check_init_inputs(params, init is not None, mask is not None, args.init_image or "--init-image",
                      args.mask or "--mask")
    # best_of / min_identity switch the identity score on; so does --score alone
    scoring = args.score or params.best_of > 1 or params.min_identity is not None
    check_scoring_params(params, scoring, args.max_candidates)
    sources = _sources(args)

    from instantid_core.pipeline import InstantIDPipeline
    from instantid_core.sidecar import build_sidecar, identities_record
    from instantid_core.storage import OutputStore, encode_image

    pipeline = InstantIDPipeline(sources, settings, scoring=scoring, max_candidates=args.max_candidates)
    result = pipeline.generate(faces, params, pose, face_names=list(args.face or []) or None,
                               pose_name=args.pose or "pose_image", init_image=init, mask_image=mask,
                               init_name=args.init_image or "init_image", mask_name=args.mask or "mask_image",
                               identity_images=identity_images)
    request_id = uuid.uuid4().hex
    identities = {}
    if identity_images is not None and result.face is not None:
        identities["identities"] = identities_record(
            params, [(person.face_box, person.keypoints) for person in result.face.identities],
            [[hashlib.sha256(data).hexdigest() for data in photos] for photos in identity_images])
    meta = build_sidecar(result.params or params, seed=result.seed, width=result.width, height=result.height,
                         inputs={"face": [str(p) for p in args.face or []],
                                 "pose": str(args.pose) if args.pose else None,
                                 "init_image": args.init_image, "mask": args.mask,
                                 **({"identities": [paths for paths, _ in args.identity]} if args.identity else {})},
                         default_scheduler=settings.default_scheduler, weights=pipeline.weights.revisions,
                         timings_s=result.timings, **identities, **identity_record(result.identity),
                         **({"face_detail": result.face_detail.model_dump(mode="json", exclude_none=True)}
                            if result.face_detail is not None else {}))
    stored = OutputStore(args.out).write_request(
        request_id, [encode_image(image, args.format) for image in result.images], args.format, meta)
    for uri in stored.image_uris:
        print(uri)
    print(stored.meta_uri)
    if result.identity is not None:
        shown = ", ".join("no face" if score is None else f"{score:.3f}" for score in result.identity.scores)
        print(f"identity: {shown} (seeds {result.identity.seeds}, {result.identity.candidates} candidates"
              + (", same model as the conditioning" if result.identity.same_model else "") + ")", file=sys.stderr)
    print("timings: " + ", ".join(f"{k}={v:.2f}s" for k, v in result.timings.items()), file=sys.stderr)


def _read_image(path: str, settings: PipelineSettings) -> bytes:
    """The file's bytes, once they are known to decode (with the pipeline's own limits) as an image."""
    from instantid_core.images import load_image  # PIL only

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InstantIDError(f"cannot read {path}: {exc.strerror}") from exc
    load_image(data, name=path, max_pixels=settings.max_image_pixels, max_side=settings.max_image_side)
    return data


def _weights_root(root: str) -> str:
    """A weights folder named on the command line, as an absolute path (so the resolver never mistakes a relative
    path for a hub id); an s3:// prefix passes through to the resolver."""
    if root.startswith("s3://"):
        return root
    path = Path(root.removeprefix("file://")).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise WeightsError(f"weights folder {root} {what}; write one with `instantid weights tiny DIR` "
                           "or `instantid weights download DIR`", field="weights")
    return str(path.resolve())


SOURCE_FLAGS = ("sdxl", "identitynet", "adapter", "face_pack", "lcm_lora", "scoring_face_pack")


def _sources(args: argparse.Namespace) -> ModelSources:
    """The published sources, or `--weights DIR`'s layout, with any single part given by its own flag."""
    overrides = {k: getattr(args, k) for k in SOURCE_FLAGS if getattr(args, k, None)}
    if getattr(args, "weights", None) is not None:
        return ModelSources.from_root(_weights_root(args.weights), **overrides)
    return ModelSources(**overrides)


def _one_of(enum: type[Enum]) -> Callable[[str], Enum]:
    """An argparse type for an Enum whose error lists the allowed values."""
    def parse(value: str) -> Enum:
        try:
            return enum(value)
        except ValueError:
            allowed = ", ".join(str(member.value) for member in enum)
            raise argparse.ArgumentTypeError(f"{value!r} is not one of: {allowed}") from None

    parse.__name__ = enum.__name__
    return parse


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other expected failure: one `error:` line (with the allowed values) and
    exit code 2; `--help` still prints the full usage."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{self.prog}: {message}")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="instantid", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    weights = commands.add_parser("weights", help="write, download or check a weights folder")
    weight_commands = weights.add_subparsers(dest="weights_command", required=True)
    for name, func, text in (("tiny", _weights_tiny, "write the tiny random preset (seconds, no download)"),
                             ("download", _weights_download, "download the published weights into DIR"),
                             ("check", _weights_check, "validate a weights folder")):
        sub = weight_commands.add_parser(name, help=text)
        sub.add_argument("dir")
        sub.set_defaults(func=func)
        if name == "download":
            _add_source_flags(sub)
            sub.add_argument("--safety-checker", dest="safety_checker",
                             help="the safety stage's checker (args.safety), e.g. "
                             "CompVis/stable-diffusion-safety-checker: into DIR/safety-checker")
            sub.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                             help="the dtype it will run in: float16/bfloat16 take SDXL's fp16 files (half the size)")

    gen = commands.add_parser("generate", help="one face photo + prompt -> images and a sidecar")
    gen.add_argument("--weights", help="a weights folder (tiny or downloaded); default: the sources below")
    _add_source_flags(gen)
    gen.add_argument("--face", action="append", help="face photo; repeat to average photos of one person")
    gen.add_argument("--identity", action="append", type=_identity, metavar="PHOTO[+PHOTO...][@X1,Y1,X2,Y2]",
                     help="several people in one image (instead of --face): one person's photos and the box of "
                     f"output pixels it acts in; repeat, up to {MAX_IDENTITIES} (without boxes: --pose's faces, left "
                     "to right)")
    gen.add_argument("--pose", help="take the face keypoints (pose) from this photo")
    for name in PARAM_FLAGS:
        _param_flag(gen, name)
    gen.add_argument("--no-enhance-face-region", action="store_true",
                     help=_field_help("enhance_face_region") + " (on unless this flag is given)")
    gen.add_argument("--init-image", help="img2img / inpainting: start from this photo (output takes its size)")
    gen.add_argument("--mask", help="with --init-image: white = regenerate (resized to the init image)")
    gen.add_argument("--inpaint-face", action="store_true", help=_field_help("inpaint_face"))
    gen.add_argument("--pose-preset", type=_one_of(PosePreset), metavar="PRESET",
                     help="place the face without a pose photo, turned: one of "
                     f"{', '.join(p.value for p in PosePreset)} (needs --pose-box)")
    gen.add_argument("--pose-box", type=_numbers(4), metavar="X1,Y1,X2,Y2",
                     help=_field_help("pose").split(":")[0] + ": the box in output pixels the preset's face fills")
    gen.add_argument("--keypoints", type=_numbers(10), metavar="X,Y,...",
                     help="five points in output pixels (left eye, right eye, nose, left and right mouth corner), "
                     "ten numbers")
    gen.add_argument("--styles-file", help="a YAML file of extra styles (the shape of instantid_core/styles.yaml)")
    gen.add_argument("--format", choices=("png", "jpeg", "webp"), default="png")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    gen.add_argument("--out", required=True, help="output prefix: a folder, file:// or s3:// URI")
    gen.add_argument("--face-detail", dest="face_detail", choices=("off", "auto", "on"),
                     help=_field_help("face_detail"))
    gen.add_argument("--score", action="store_true", help="score each image's identity (on with --best-of > 1 or "
                     "--min-identity) with --scoring-face-pack, else the weights folder's, else the conditioning pack")
    gen.add_argument("--max-candidates", type=int, default=DEFAULT_MAX_CANDIDATES,
                     help=f"images best_of and min_identity may generate in all (default {DEFAULT_MAX_CANDIDATES})")
    gen.set_defaults(func=_generate)

    from batch.job import add_batch_arguments, run_from_args

    batch = commands.add_parser("batch", help="every photo x every prompt over an image set (Ray Data)")
    add_batch_arguments(batch)
    batch.set_defaults(func=run_from_args)
    return parser


# GenerateParams fields that are `generate` flags of the same name (--negative-prompt for negative_prompt): their
# defaults, limits and help are the model's, so the CLI cannot drift from HTTP and the library.
PARAM_FLAGS = ("prompt", "negative_prompt", "style", "seed", "steps", "guidance", "identitynet_strength",
               "adapter_strength", "width", "height", "num_images", "scheduler", "face_index", "pose_face_index",
               "identity_start", "identity_end", "negative_face_noise", "strength", "best_of", "min_identity")


def params_from_args(args: argparse.Namespace) -> GenerateParams:
    """A flag left out is left out of the params too: GenerateParams' own default applies (one home)."""
    given = {name: getattr(args, name) for name in PARAM_FLAGS if getattr(args, name) is not None}
    if bool(args.face) == bool(args.identity):
        raise InvalidParameter("give --face (one person) or --identity (several), one of them", field="identity")
    if args.identity:
        given["identities"] = [{"box": box} if box is not None else {} for _, box in args.identity]
    if getattr(args, "face_detail", None) is not None:
        given["face_detail"] = args.face_detail
    if args.pose_preset is not None or args.pose_box is not None:
        given["pose"] = {"preset": args.pose_preset or PosePreset.frontal, "box": args.pose_box}
    if args.keypoints is not None:
        given["keypoints"] = [args.keypoints[i:i + 2] for i in range(0, 10, 2)]
    return GenerateParams(**given, enhance_face_region=not args.no_enhance_face_region,
                          inpaint_face=args.inpaint_face)


def _identity(text: str) -> tuple[list[str], list[float] | None]:
    """An argparse type: `photo.jpg[+other.jpg...][@x1,y1,x2,y2]` -> (photo paths, box or None)."""
    photos, at, box = text.rpartition("@") if "@" in text else (text, "", "")
    paths = [path for path in photos.split("+") if path]
    if not paths:
        raise argparse.ArgumentTypeError(f"give a photo path before '@', got {text!r}")
    return paths, _numbers(4)(box) if at else None


def _numbers(count: int):
    """An argparse type: `count` comma-separated numbers."""
    def parse(text: str) -> list[float]:
        try:
            values = [float(part) for part in text.split(",")]
        except ValueError:
            values = []
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"give {count} comma-separated numbers, got {text!r}")
        return values

    return parse


def _field_help(name: str) -> str:
    info = GenerateParams.model_fields[name]
    text = (info.description or name.replace("_", " ")).rstrip(".")
    default = info.get_default(call_default_factory=True)
    if info.is_required():
        return text
    shown = default.value if isinstance(default, Enum) else default
    return text if default in (None, "") else f"{text} (default {shown})"


def _param_flag(parser: argparse.ArgumentParser, name: str) -> None:
    """`--name` for GenerateParams.name: typed from the model, default None so the model's default applies."""
    info = GenerateParams.model_fields[name]
    kind = info.annotation if isinstance(info.annotation, type) else None
    if kind is None:  # `int | None` and the like: the non-None member
        kind = next(arg for arg in typing.get_args(info.annotation) if arg is not type(None))
    kwargs: dict[str, Any] = {"help": _field_help(name), "required": info.is_required()}
    if isinstance(kind, type) and issubclass(kind, Enum):
        kwargs.update(type=_one_of(kind), metavar=name.upper(),
                      help=f"{kwargs['help']}; one of: {', '.join(str(m.value) for m in kind)}")
    elif name == "style":
        kwargs.update(metavar="STYLE", help=f"{kwargs['help']}; extra ones with --styles-file")
    else:
        kwargs["type"] = kind
    parser.add_argument(f"--{name.replace('_', '-')}", dest=name, **kwargs)


def _add_source_flags(parser: argparse.ArgumentParser) -> None:
    for dest in SOURCE_FLAGS:
        name = dest.replace("_", "-")
        parser.add_argument(f"--{name}", dest=dest, help=f"{name} source (path, hub id, s3://)"
                            + ("; enables --scheduler lcm" if dest == "lcm_lora" else ""))


def main(argv: Sequence[str] | None = None) -> int:
    silence_known_noise()
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except InstantIDError as exc:
        _fail(exc.message)
        return EXIT_USAGE
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "parameters"
        _fail(f"{where}: {first['msg'].removeprefix('Value error, ')}")
        return EXIT_USAGE
    return 0


def _fail(message: str) -> None:
    """One line on stderr, whatever line breaks a library put into its message."""
    print("error: " + " ".join(message.split()), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
