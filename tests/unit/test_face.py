"""FaceAnalyzer on the tiny face pack: insightface itself loads and runs it; one face per portrait, largest first."""

from __future__ import annotations

import io
import pickle
import time
from pathlib import Path

import insightface
import numpy as np
import pytest
from insightface.app import FaceAnalysis
from insightface.model_zoo import get_model
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.scrfd import SCRFD
from PIL import Image, ImageOps
from skimage import data as skimage_data

from instantid_core.conditioning import RequestPhotos, face_condition
from instantid_core.config import GenerateParams, PipelineSettings
from instantid_core.errors import NoFaceDetected, WeightsError
from instantid_core.face import KPS_COLORS, FaceAnalyzer, FaceInfo, draw_kps, map_kps_to_output
from instantid_core.images import load_image
from instantid_core.tiny.face import DETECTOR_FILE, RECOGNISER_FILE, write_tiny_face_pack
from testkit.api import png_bytes

TOM_HANKS = Path(insightface.__file__).parent / "data" / "images" / "Tom_Hanks_54745.png"
# The astronaut's eyes, nose tip and mouth corners (pixels of skimage's 512x512 image, measured by eye).
ASTRONAUT_KPS = np.array([[205, 102], [245, 102], [225, 125], [207, 145], [243, 145]], np.float32)
LIMITS = {"max_pixels": 40_000_000, "max_side": 4096}


@pytest.fixture(scope="module")
def tiny_face_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_face_pack(tmp_path_factory.mktemp("antelopev2"))


@pytest.fixture(scope="module")
def analyzer(tiny_face_pack: Path) -> FaceAnalyzer:
    return FaceAnalyzer(tiny_face_pack, PipelineSettings())


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage_data.astronaut())


@pytest.fixture(scope="module")
def two_portraits() -> tuple[Image.Image, float]:
    """Head-and-shoulders crop of the astronaut top left; the same crop mirrored at 0.7x bottom right, so the
    smaller face has the larger y2: a largest-face key with a hosted fork's precedence slip, (x2 - x1) * y2 - y1,
    would pick it. Returns the image and the x where the second portrait starts."""
    crop = skimage_data.astronaut()[0:320, 96:352]  # 256 wide, face ~80 px
    small = np.asarray(Image.fromarray(np.ascontiguousarray(crop[:, ::-1])).resize((179, 224)))
    canvas = np.full((480, 256 + 179, 3), 128, np.uint8)
    canvas[:320, :256] = crop
    canvas[480 - 224:, 256:] = small
    return Image.fromarray(canvas), 256.0


def face_count(analyzer: FaceAnalyzer, image: Image.Image) -> int:
    """How many faces the analyzer sees, through its public API: the error for an index past the end says."""
    with pytest.raises(NoFaceDetected, match=r"face\(s\) found") as info:
        analyzer.analyze(image, face_index=63)
    return int(info.value.message.split(" face(s) found")[0].rsplit(" ", 1)[-1])



def condition(analyzer: FaceAnalyzer, params: GenerateParams, faces: list[Image.Image],
              pose: Image.Image | None = None):
    """face_condition on photos as a caller uploads them (PNG bytes)."""
    photos = RequestPhotos([png_bytes(face) for face in faces], png_bytes(pose) if pose is not None else None)
    return face_condition(analyzer, photos, params, PipelineSettings())

def test_face_pack_is_small_fast_to_write_and_routed_by_insightface(tmp_path: Path):
    start = time.perf_counter()
    pack = write_tiny_face_pack(tmp_path / "antelopev2")
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0  # ~0.1 s on a laptop; generous for a loaded CI box
    assert sum(f.stat().st_size for f in pack.iterdir()) < 4_000_000
    detector = get_model(str(pack / DETECTOR_FILE), providers=["CPUExecutionProvider"])
    recogniser = get_model(str(pack / RECOGNISER_FILE), providers=["CPUExecutionProvider"])
    assert isinstance(detector, SCRFD) and isinstance(recogniser, ArcFaceONNX)
    # SCRFD's 10g_bnkps layout: 3 strides, 2 anchors, keypoints, unbatched outputs, dynamic input
    assert (detector.fmc, detector._num_anchors, detector.use_kps, detector.batched) == (3, 2, True, False)
    assert detector.input_name == "input.1" and detector.input_shape[2:] == ["height", "width"]
    # a PyTorch-style ArcFace (normalised input), not the MXNet branch
    assert (recogniser.input_size, recogniser.input_mean, recogniser.input_std) == ((112, 112), 127.5, 127.5)
    app = FaceAnalysis(name=str(pack), allowed_modules=["detection", "recognition"],
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    faces = app.get(np.ascontiguousarray(skimage_data.astronaut()[:, :, ::-1]))
    assert len(faces) == 1 and faces[0].embedding.shape == (512,)


def test_missing_or_empty_face_pack_is_a_weights_error(tmp_path: Path):
    for folder in (tmp_path / "absent", tmp_path):  # insightface would try to download a pack for a bare name
        with pytest.raises(WeightsError, match="face_pack: no ONNX files"):
            FaceAnalyzer(folder, PipelineSettings())


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (128, 128, 128)])
def test_blank_image_has_no_face(analyzer: FaceAnalyzer, colour):
    with pytest.raises(NoFaceDetected, match="blank.png: no face found"):
        analyzer.analyze(Image.new("RGB", (640, 480), colour), name="blank.png")


@pytest.mark.parametrize("colour", [(255, 219, 172), (198, 134, 66), (80, 50, 35)])
@pytest.mark.parametrize("size", [(512, 512), (800, 450), (300, 600)])
def test_uniform_skin_colour_has_no_face(analyzer: FaceAnalyzer, colour, size):
    with pytest.raises(NoFaceDetected, match="skin: no face found"):
        analyzer.analyze(Image.new("RGB", size, colour), name="skin")


def test_astronaut_has_one_face_with_keypoints_on_eyes_nose_and_mouth(analyzer: FaceAnalyzer, astronaut):
    face = analyzer.analyze(astronaut, name="astronaut")
    assert face_count(analyzer, astronaut) == 1
    assert face.image_size == (512, 512) and face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    assert face.det_score >= 0.5
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = face.kps
    assert lex < nx < rex and lmx < nx < rmx  # left/right in image coordinates
    assert max(ley, rey) < ny < min(lmy, rmy)  # eyes above nose above mouth
    x1, y1, x2, y2 = face.bbox
    assert np.all((face.kps[:, 0] > x1) & (face.kps[:, 0] < x2) & (face.kps[:, 1] > y1) & (face.kps[:, 1] < y2))
    assert np.abs(face.kps - ASTRONAUT_KPS).max() < 12  # on her actual eyes, nose and mouth


def test_tom_hanks_sample_has_one_face(analyzer: FaceAnalyzer):
    photo = load_image(TOM_HANKS.read_bytes(), name="tom", **LIMITS)  # a grey, aligned 112x112 crop
    face = analyzer.analyze(photo, name="tom")
    assert face_count(analyzer, photo) == 1
    assert face.kps[0, 0] < face.kps[2, 0] < face.kps[1, 0] and face.kps[0, 1] < face.kps[2, 1] < face.kps[3, 1]


def test_two_portraits_largest_first_and_face_index_picks_the_other(analyzer: FaceAnalyzer, two_portraits):
    image, split = two_portraits
    largest, other = analyzer.analyze(image), analyzer.analyze(image, face_index=1)
    assert face_count(analyzer, image) == 2
    def area(f):
        return (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])

    assert area(largest) > area(other)
    assert largest.bbox[2] <= split + 5 and other.bbox[0] >= split - 5  # the big portrait is on the left
    def reference_key(f):
        return (f.bbox[2] - f.bbox[0]) * f.bbox[3] - f.bbox[1]

    assert reference_key(other) > reference_key(largest)  # the precedence bug would have picked the wrong one
    assert not np.allclose(largest.embedding, other.embedding)
    with pytest.raises(NoFaceDetected, match=r"face_index 2 asked for, but 2 face\(s\) found") as info:
        analyzer.analyze(image, face_index=2, name="pair.jpg")
    assert "pair.jpg" in info.value.message


def test_exif_rotated_photo_gives_the_same_face_as_the_upright_one(analyzer: FaceAnalyzer, astronaut):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side; viewers rotate it 90 degrees clockwise
    buf = io.BytesIO()
    astronaut.transpose(Image.Transpose.ROTATE_90).save(buf, "PNG", exif=exif.tobytes())  # lossless: exact pixels
    rotated = load_image(buf.getvalue(), name="phone", **LIMITS)
    upright, turned = analyzer.analyze(astronaut), analyzer.analyze(rotated)
    np.testing.assert_allclose(turned.embedding, upright.embedding, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(turned.kps, upright.kps, atol=1e-3)


def test_same_photo_same_embedding_and_different_faces_differ(analyzer: FaceAnalyzer, astronaut):
    tom = load_image(TOM_HANKS.read_bytes(), name="tom", **LIMITS)
    a, b, t = analyzer.analyze(astronaut), analyzer.analyze(astronaut.copy()), analyzer.analyze(tom)
    np.testing.assert_array_equal(a.embedding, b.embedding)
    cosine = float(a.embedding @ t.embedding / np.linalg.norm(a.embedding) / np.linalg.norm(t.embedding))
    assert cosine < 0.9


def test_several_photos_average_raw_embeddings_and_keep_the_first_layout(analyzer: FaceAnalyzer, astronaut):
    tom = load_image(TOM_HANKS.read_bytes(), name="tom", **LIMITS)
    first, second = analyzer.analyze(astronaut), analyzer.analyze(tom)
    params = GenerateParams(prompt="x")
    both, alone = (condition(analyzer, params, photos) for photos in ([astronaut, tom], [astronaut]))
    np.testing.assert_allclose(both.embedding, (first.embedding + second.embedding) / 2, rtol=1e-6)
    np.testing.assert_array_equal(both.kps_image, alone.kps_image)
    assert both.face_box == alone.face_box
    with pytest.raises(NoFaceDetected, match=r"face_image\[1\]: no face"):
        condition(analyzer, params, [astronaut, Image.new("RGB", (64, 64))])


def test_face_info_round_trips_through_pickle(analyzer: FaceAnalyzer, astronaut):
    face = analyzer.analyze(astronaut)
    copy = pickle.loads(pickle.dumps(face))
    np.testing.assert_array_equal(copy.embedding, face.embedding)
    np.testing.assert_array_equal(copy.kps, face.kps)
    np.testing.assert_array_equal(copy.bbox, face.bbox)
    assert (copy.det_score, copy.image_size) == (face.det_score, face.image_size)
    with pytest.raises(ValueError, match="shape"):
        FaceInfo(np.zeros(128), face.kps, face.bbox, 0.9, (512, 512))


def test_draw_kps_draws_the_reference_keypoint_image():
    kps = np.array([[100.0, 100.0], [200.0, 100.0], [150.0, 160.0], [110.0, 220.0], [190.0, 220.0]])
    img = draw_kps((320, 256), kps)
    arr = np.asarray(img)
    assert img.mode == "RGB" and img.size == (320, 256) and arr.shape == (256, 320, 3)
    assert arr[0, 0].tolist() == [0, 0, 0] and arr[250, 310].tolist() == [0, 0, 0]  # black canvas
    for (x, y), colour in zip(kps.astype(int), KPS_COLORS, strict=False):
        assert tuple(arr[y, x]) == colour  # full-colour dot on each point
        assert tuple(arr[y, x + 9]) == colour and arr[y, x + 12].tolist() != list(colour)  # radius 10
    left_eye_limb = ((kps[0] + kps[2]) / 2).astype(int)  # between left eye and nose, away from the dots
    assert tuple(arr[left_eye_limb[1], left_eye_limb[0]]) == (153, 0, 0)  # red dimmed to 0.6
    assert (np.asarray(draw_kps((64, 32), kps / 5)).shape) == (32, 64, 3)


def test_map_kps_to_output_covers_and_centre_crops():
    pts = np.array([[0, 0], [500, 250], [1000, 500]], np.float32)
    np.testing.assert_allclose(map_kps_to_output(pts, (1000, 500), (1000, 500)), pts)
    np.testing.assert_allclose(map_kps_to_output(pts, (1000, 500), (500, 250)), pts / 2)
    # 2:1 photo onto a square canvas: scaled by 512/500 to cover the height, 256 px cut from each side
    out = map_kps_to_output(pts, (1000, 500), (512, 512))
    np.testing.assert_allclose(out, [[-256, 0], [256, 256], [768, 512]], atol=1e-3)


def test_probe_runs_the_detector_and_fails_when_it_cannot(tiny_face_pack: Path):
    analyzer = FaceAnalyzer(tiny_face_pack, PipelineSettings())
    analyzer.probe()  # a real forward pass: the replicas' health check
    analyzer._detector.session = None  # what a lost onnxruntime session looks like to the detector
    with pytest.raises(RuntimeError):
        analyzer.probe()


def test_pose_photo_gives_the_keypoints_and_the_face_photo_the_identity(analyzer: FaceAnalyzer, astronaut):
    params = GenerateParams(prompt="x", width=256, height=256)
    mirrored = ImageOps.mirror(astronaut)
    posed = condition(analyzer, params, [astronaut], pose=mirrored)
    as_face = condition(analyzer, params, [astronaut])
    as_pose = condition(analyzer, params, [mirrored])
    np.testing.assert_array_equal(posed.embedding, as_face.embedding)  # who: the face photo
    np.testing.assert_array_equal(posed.kps_image, as_pose.kps_image)  # where: the pose photo
    assert posed.face_box == as_pose.face_box and not np.array_equal(posed.kps_image, as_face.kps_image)
