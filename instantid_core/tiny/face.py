"""A tiny antelopev2-shaped face pack: a *built* SCRFD-style detector and a seeded random ArcFace-style recogniser.

Both files keep the real pack's names and insightface's input/output conventions, so insightface's own
`model_zoo.get_model` routes them to `SCRFD` and `ArcFaceONNX` and `FaceAnalysis` runs them like the real pack.
Nothing is downloaded and nothing is trained; writing both takes well under a second.

The detector is classical template matching written as one ONNX graph (dynamic height and width):
  1. per pixel: luminance Y, Y^2, a YCbCr skin likelihood and "not letterbox" (insightface pads with black);
     per image: is it a colour photo at all (share of clearly coloured pixels);
  2. for 18 face widths (32..640 px, ~1.19x apart) the maps are resized so the face becomes an 18..40 px
     template: the mean of scikit-image's bundled LFW faces, minus its ramps, in a Gaussian window. Separable
     convolutions give, every 1/9..1/20 of a face width, the weighted normalised cross-correlation (NCC) with it and
     the window's skin share, contrast and letterbox share;
  3. score = sigmoid(30 * (NCC - 0.42|0.46) - skin veto - letterbox veto) * contrast gate: a uniform image has
     no contrast and NCC 0, so it never scores, whatever its colour; a colour window must be mostly (pink) skin;
     grey photos are judged by the template alone, with a higher bar;
  4. each SCRFD anchor (3 strides x 2 anchors) reports the best of its three widths and the best position in its
     cell, as box and keypoint distances (the part a real detector regresses); then a face contains no faces (a
     confident match drops matches under ~half its width around it) and a peak test keeps one anchor per face.
It finds frontal faces in portraits (the astronaut, Tom Hanks, several per photo) and nothing on uniform images;
on grey textures (moon, grass) and cat faces it can still fire: a fixture, not a face detector to ship.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from skimage import data as skimage_data

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNISER_FILE = "glintr100.onnx"
# The scoring pack (issue 26) in buffalo_l's file names: the same detector, a recogniser of other random weights,
# so a score never comes from the model that conditioned the image.
SCORING_DETECTOR_FILE = "det_10g.onnx"
SCORING_RECOGNISER_FILE = "w600k_r50.onnx"
SCORING_RECOGNISER_SEED = 1

_OPSET = 18  # Resize with antialias (proper area downsampling) needs opset 18.
_IR_VERSION = 9  # old enough for every onnxruntime that supports opset 18

STRIDES = (8, 16, 32)  # SCRFD's three feature strides, two anchors per location
# Face widths scanned (px in the detector input), ~1.19x apart; each anchor owns three consecutive widths and
# reports the best of them, so the box size is "regressed" to within ~10%. Below ~32 px the mean face has no eyes.
_WIDTHS = np.geomspace(32, 640, 18)
ANCHOR_WIDTHS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    stride: tuple(tuple(round(float(w)) for w in _WIDTHS[(2 * i + a) * 3:(2 * i + a + 1) * 3]) for a in range(2))
    for i, stride in enumerate(STRIDES)
}
BOX_ASPECT = 25 / 22  # the mean-face crop's height / width; the box is the template window
# Five keypoints as (x, y) fractions of the box, in insightface's order: left eye, right eye, nose, left and right
# mouth corner ("left" = smaller x in the image): where they sit in the LFW mean face.
KPS_FRACTIONS = np.array(
    [[0.295, 0.34], [0.705, 0.34], [0.50, 0.56], [0.34, 0.72], [0.66, 0.72]], dtype=np.float64
)
WINDOW_SIGMAS = (0.30, 0.35)  # Gaussian window of the match, fractions of the box width and height
TEMPLATE_RANK = 4  # separable parts of the template (rank 4 keeps >99.5% of its energy)

# score = sigmoid(NCC_GAIN * (ncc - centre) + skin veto + letterbox veto) * contrast gate, where centre is
# NCC_CENTRE_COLOUR on colour photos and NCC_CENTRE_GREY on grey ones. For scale: the template gives the LFW faces
# a median NCC of 0.53, and 999 in 1,000 random windows of scikit-image's other sample images less than 0.40.
NCC_GAIN = 30.0
NCC_CENTRE_COLOUR = 0.42  # colour windows must also be mostly skin, so the template bar can be lower
NCC_CENTRE_GREY = 0.46
NCC_EPS = 0.03  # luminance std (0..1) below which a patch counts as flat: NCC shrinks towards 0
SKIN_CENTRE = 0.7  # colour photos: a window whose (weighted) skin share is below this ...
SKIN_GAIN = 20.0  # ... loses SKIN_GAIN per unit short
SKIN_HUE = 0.7  # skin has Cr >= SKIN_HUE * -Cb (hue above ~35 degrees): hair, wood, orange cloth are yellower
COLOUR_SHARE = 0.1  # an image counts as a colour photo when more than ~10% of its pixels are clearly coloured
INSIDE_CENTRE = 0.98  # windows with more than ~2% (weighted) letterbox or off-image area ...
INSIDE_GAIN = 60.0  # ... are penalised steeply: the image's edge against black looks like a brow or a cheek
STD_CENTRE = 0.035  # contrast gate: patches with luminance std below ~0.03 (0..1) never score
STD_SCALE = 0.008
CONTAIN_THRESHOLD = 0.5  # a match this confident (insightface's default det_thresh) ...
CONTAIN_RATIO = 1.9  # ... suppresses every match at most 1/1.9 of its width ...
CONTAIN_RADIUS = 1.0  # ... within this many of its widths, whatever their scores: a face contains no faces
PEAK_RADIUS = 0.6  # then each match suppresses weaker ones (own, next smaller, larger anchors) this close


# --------------------------------------------------------------------------------------------------------------
# A very small graph builder: every call appends one node and returns its output name.
# --------------------------------------------------------------------------------------------------------------
class _Graph:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def const(self, value: np.ndarray | float | list, hint: str = "c", dtype: type = np.float32) -> str:
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs: object) -> str:
        out = self._name(hint or op_type.lower())
        # Node names never start with "Sub"/"Mul": ArcFaceONNX takes such names for an MXNet model and drops its
        # input normalisation.
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"n_{out}", **attrs))
        return out

    def op_n(self, op_type: str, inputs: list[str], n_out: int, **attrs: object) -> list[str]:
        outs = [self._name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n_{outs[0]}", **attrs))
        return outs

    def op_to(self, op_type: str, inputs: list[str], output: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=f"n_{output}", **attrs))
        return output

    # shorthands
    def add(self, a: str, b: str) -> str:
        return self.op("Add", [a, b])

    def sub(self, a: str, b: str) -> str:
        return self.op("Sub", [a, b])

    def mul(self, a: str, b: str) -> str:
        return self.op("Mul", [a, b])

    def div(self, a: str, b: str) -> str:
        return self.op("Div", [a, b])

    def affine_sigmoid(self, x: str, centre: float, scale: float) -> str:
        """sigmoid((x - centre) / scale); a negative scale flips the direction."""
        z = self.mul(self.sub(x, self.const(centre)), self.const(1.0 / scale))
        return self.op("Sigmoid", [z])


def _model(graph: _Graph, inputs: list, outputs: list, name: str) -> onnx.ModelProto:
    g = helper.make_graph(graph.nodes, name, inputs, outputs, graph.initializers)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="instantid-tiny")
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------------------------
def _scan_geometry(stride: int, width: int) -> tuple[int, int, float]:
    """How one face width is scanned: template width T (18..40 px), fine positions R per anchor cell and axis, and
    the exact width stride*T/(2R). The features are resized by f = 2R/stride (a binary fraction, so sizes stay
    exact integers) and the template slides 2 resized px at a time: R x R windows per anchor cell, one every
    2/T (1/9..1/20) of the face width."""
    best: tuple[float, int, int] | None = None
    for t in range(18, 41):
        for r in range(1, 17):
            if stride * t / (2 * r) > 1.35 * width or stride * t / (2 * r) < 0.75 * width:
                continue
            err = abs(np.log(stride * t / (2 * r) / width)) + 0.002 * abs(t - 24)  # prefer T near 24
            if best is None or err < best[0]:
                best = (err, t, r)
    assert best is not None
    _, t, r = best
    return t, r, stride * t / (2 * r)


@functools.lru_cache(maxsize=1)
def _lfw_mean_face() -> np.ndarray:
    """The mean of scikit-image's 100 bundled LFW face crops (25x25), cut to the 22 columns that are
    mirror-symmetric about the face's axis and symmetrised: (25, 22), brows to chin, cheek to cheek."""
    faces = skimage_data.lfw_subset()[:100]  # the first 100 are faces, the rest non-faces
    mean = faces.mean(axis=0)[:, :22]
    mean = (mean + mean[:, ::-1]) / 2
    mean.flags.writeable = False  # cached and shared
    return mean


def _mean_face(tw: int, th: int) -> tuple[np.ndarray, np.ndarray]:
    """The template for a (th, tw) window: the mean face resampled, with what a plain edge or a lighting gradient also
    has (constant and linear ramps) removed, as a weighted-NCC template; and the Gaussian window weights.

    The Gaussian weights centre the match on eyes, nose and mouth (hair, ears and background at the window's edge
    vary too much to match). Returns (template, weights) with sum(template) == 0 and
    sum(template**2 / weights) == 1, so that <template, patch> / sqrt(weighted variance * sum(weights)) is the
    weighted normalised cross-correlation.
    """
    face = np.asarray(Image.fromarray(_lfw_mean_face().astype(np.float32)).resize((tw, th), Image.BILINEAR),
                      dtype=np.float64)
    y, x = np.mgrid[0:th, 0:tw].astype(np.float64)
    u, v = (x + 0.5) / tw - 0.5, (y + 0.5) / th - 0.5
    weights = np.exp(-0.5 * ((u / WINDOW_SIGMAS[0]) ** 2 + (v / WINDOW_SIGMAS[1]) ** 2))
    basis = np.stack([np.ones_like(u), u, v], axis=-1).reshape(-1, 3)
    sw = np.sqrt(weights).reshape(-1, 1)
    coef, *_ = np.linalg.lstsq(basis * sw, face.reshape(-1, 1) * sw, rcond=None)  # weighted fit of the ramps
    t = (face - (basis @ coef).reshape(th, tw)) * weights
    t -= weights * t.sum() / weights.sum()
    return t / np.sqrt((t**2 / weights).sum()), weights


def _separable_window(tw: int, th: int) -> tuple[np.ndarray, np.ndarray, list, list, float]:
    """The window and template of `_mean_face` as 1-D filters: Gaussian gy (th,), gx (tw,); template parts
    us[k] (th,) and vs[k] (tw,) with sum_k outer(us[k], vs[k]) - zero_fix * outer(gy, gx) summing to exactly zero
    (so a flat patch gives exactly no response) and with sum(template**2 / window) == 1."""
    t, weights = _mean_face(tw, th)
    y, x = np.arange(th, dtype=np.float64), np.arange(tw, dtype=np.float64)
    gy = np.exp(-0.5 * (((y + 0.5) / th - 0.5) / WINDOW_SIGMAS[1]) ** 2)
    gx = np.exp(-0.5 * (((x + 0.5) / tw - 0.5) / WINDOW_SIGMAS[0]) ** 2)
    u, sv, vt = np.linalg.svd(t)
    us = [u[:, k] * sv[k] for k in range(TEMPLATE_RANK)]
    vs = [vt[k] for k in range(TEMPLATE_RANK)]
    approx = sum(np.outer(a, b) for a, b in zip(us, vs, strict=True))
    zero_fix = approx.sum() / weights.sum()
    scale = 1.0 / np.sqrt(((approx - zero_fix * weights) ** 2 / weights).sum())
    return gy, gx, [a * scale for a in us], vs, zero_fix * scale


def _ch(g: _Graph, x: str, start: int, end: int | None = None) -> str:
    """Channels [start, end) of an NCHW tensor."""
    end = start + 1 if end is None else end
    return g.op("Slice", [x, g.const([start], dtype=np.int64), g.const([end], dtype=np.int64),
                          g.const([1], dtype=np.int64)])


def _width_score(g: _Graph, feats: str, colour_image: str, stride: int, width: int) -> tuple[str, str]:
    """One face width on one stride's anchor grid: score (1,1,h,w) and the 14 distances (1,14,h,w) of the best
    window within each anchor cell (box 4, kps 10, in units of stride, SCRFD's order)."""
    tw, r, _ = _scan_geometry(stride, width)
    th = round(tw * BOX_ASPECT)
    f = 2 * r / stride  # resized px per input px; a binary fraction, so every size stays an exact integer
    step = stride / r  # input px between neighbouring windows
    x = feats
    if f != 1:
        x = g.op("Resize", [feats, "", g.const([1.0, 1.0, f, f], "scales")], mode="linear", antialias=1)
    pt, pl = th // 2, tw // 2
    # Pad so that the output is resized size / 2 = R windows per anchor cell and axis. Y, Y^2 and skin replicate
    # the border (zeros would draw a dark frame, an edge, a "brow", around every image); "inside" is 0 out there,
    # so windows reaching far beyond the image are penalised like windows over the letterbox.
    pads = g.const([0, 0, pt, pl, 0, 0, th - pt - 1, tw - pl - 1], dtype=np.int64)
    x = g.op("Concat", [g.op("Pad", [_ch(g, x, 0, 3), pads], mode="edge"),
                        g.op("Pad", [_ch(g, x, 3), pads], mode="constant")], axis=1)
    # Both the Gaussian window and the template are separable (the template to rank TEMPLATE_RANK, which keeps
    # >99.5% of it): a vertical pass (stride 2 down) then a horizontal one (stride 2 across) costs th + tw
    # multiply-adds per window and channel instead of th * tw.
    gy, gx, us, vs, zero_fix = _separable_window(tw, th)
    n = float(gy.sum() * gx.sum())
    vert_y = g.op("Conv", [_ch(g, x, 0), g.const(np.stack([gy, *us])[:, None, :, None], "vert_y")], strides=[2, 1])
    vert_o = g.op("Conv", [_ch(g, x, 1, 4), g.const(np.stack([gy] * 3)[:, None, :, None], "vert_o")],
                  group=3, strides=[2, 1])
    horiz = np.stack([gx, *vs, gx, gx, gx])[:, None, None, :]  # sum Y | template parts | sums Y^2, skin, inside
    sums = g.op("Conv", [g.op("Concat", [vert_y, vert_o], axis=1), g.const(horiz, "horiz")],
                group=horiz.shape[0], strides=[1, 2])  # (1, 4 + rank, H', W')
    rank = len(us)
    # <template, patch>: the rank-r parts, minus the multiple of the window that makes the template sum to zero
    num = g.sub(g.op("ReduceSum", [_ch(g, sums, 1, 1 + rank), g.const([1], dtype=np.int64)], keepdims=1),
                g.mul(_ch(g, sums, 0), g.const(zero_fix)))
    means = g.mul(g.op("Concat", [_ch(g, sums, 0), _ch(g, sums, 1 + rank, 4 + rank)], axis=1), g.const(1.0 / n))
    mean_y, mean_y2, skin, inside = (_ch(g, means, i) for i in range(4))
    var = g.op("Relu", [g.sub(mean_y2, g.mul(mean_y, mean_y))])
    # weighted NCC = <t, P> / sqrt(n * var), floored so that flat patches give ~0 rather than noise / noise
    ncc = g.div(num, g.op("Sqrt", [g.mul(g.add(var, g.const(NCC_EPS**2)), g.const(n))]))
    # skin only vetoes (a colour window that is not mostly skin is no face); it never makes a weak match a face
    skin_term = g.mul(g.mul(g.op("Min", [g.sub(skin, g.const(SKIN_CENTRE)), g.const(0.0)]), g.const(SKIN_GAIN)),
                      colour_image)
    # a window over insightface's black letterbox is no face: the image's edge against it looks like a brow line
    pad_term = g.mul(g.op("Min", [g.sub(inside, g.const(INSIDE_CENTRE)), g.const(0.0)]), g.const(INSIDE_GAIN))
    # colour photos get a lower NCC bar (the skin veto already removed most look-alikes); grey ones a higher one
    centre = g.add(g.const(NCC_CENTRE_GREY), g.mul(colour_image, g.const(NCC_CENTRE_COLOUR - NCC_CENTRE_GREY)))
    logit = g.add(g.add(g.mul(g.sub(ncc, centre), g.const(NCC_GAIN)), skin_term), pad_term)
    std = g.op("Sqrt", [g.add(var, g.const(1e-8))])
    fine = g.mul(g.op("Sigmoid", [logit]), g.affine_sigmoid(std, STD_CENTRE, STD_SCALE))

    # Window of fine index (row a, col b) inside anchor cell (i, j), in input px:
    # x0 = j*stride + b*step - pl/f, width tw/f; likewise y. Distances from the anchor centre (j*stride, i*stride):
    left, top, box_w, box_h = pl / f, pt / f, tw / f, th / f
    base = [left, top, box_w - left, box_h - top]
    ex, ey = [-1.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 1.0]  # how dx, dy move each distance
    for fx, fy in KPS_FRACTIONS:
        base += [fx * box_w - left, fy * box_h - top]
        ex += [1.0, 0.0]
        ey += [0.0, 1.0]
    base_c = g.const((np.asarray(base) / stride).reshape(1, 14, 1, 1), "dist")
    if r == 1:
        return fine, g.add(base_c, g.mul(fine, g.const(0.0)))  # broadcast to (1,14,h,w)
    # The best window of each anchor cell, and where it is inside the cell: the part a real detector regresses.
    score, idx = g.op_n("MaxPool", [fine], 2, kernel_shape=[r, r], strides=[r, r])
    fine_w = g.op("Gather", [g.op("Shape", [fine]), g.const(3, dtype=np.int64)])
    rr = g.const(r, dtype=np.int64)
    row = g.op("Mod", [g.op("Div", [idx, fine_w]), rr])
    col = g.op("Mod", [g.op("Mod", [idx, fine_w]), rr])
    dy = g.mul(g.op("Cast", [row], to=TensorProto.FLOAT), g.const(step / stride))
    dx = g.mul(g.op("Cast", [col], to=TensorProto.FLOAT), g.const(step / stride))
    dist = g.add(base_c, g.add(g.mul(dx, g.const(np.reshape(ex, (1, 14, 1, 1)))),
                               g.mul(dy, g.const(np.reshape(ey, (1, 14, 1, 1))))))
    return score, dist


def _odd(k: float) -> int:
    k = max(1, round(k))
    return k if k % 2 else k + 1


def build_detector() -> onnx.ModelProto:
    """The SCRFD-shaped detector graph (see the module docstring)."""
    g = _Graph("d_")
    x = "input.1"  # (1,3,H,W) RGB, (pixel - 127.5) / 128 as insightface feeds SCRFD
    # One 1x1 conv gives luminance and YCbCr chroma in 0..1 units straight from the normalised input.
    to01 = 128.0 / 255.0
    ycc = np.array([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]]) * to01
    ycc_bias = np.array([0.5, 0.0, 0.0])  # chroma rows sum to 0, so only Y keeps the +127.5 offset
    yc = g.op("Conv", [x, g.const(ycc[:, :, None, None], "ycc"), g.const(ycc_bias, "ycc_b")])
    luma, cb, cr = _ch(g, yc, 0), _ch(g, yc, 1), _ch(g, yc, 2)
    # Skin: the classic YCbCr box (Cb 77..127, Cr 133..173 of 255), softened, and not too dark.
    skin = g.mul(g.mul(g.affine_sigmoid(cr, 0.035, 0.01), g.affine_sigmoid(cr, 0.19, -0.01)),
                 g.mul(g.affine_sigmoid(cb, -0.17, 0.01), g.affine_sigmoid(cb, -0.025, -0.01)))
    skin = g.mul(skin, g.affine_sigmoid(luma, 0.15, 0.03))
    # ... and pink rather than yellow (Cr >= 0.7 * -Cb): blond/brown hair, wood and orange fabric are yellower
    skin = g.mul(skin, g.affine_sigmoid(g.add(cr, g.mul(cb, g.const(SKIN_HUE))), 0.0, 0.01))
    # Is this a colour photo at all? The share of clearly coloured pixels among the non-black ones (the letterbox
    # padding is black). On grey images the skin term switches off and the template alone decides.
    coloured = g.affine_sigmoid(g.add(g.op("Abs", [cb]), g.op("Abs", [cr])), 0.04, 0.01)
    valid = g.op("Cast", [g.op("Greater", [luma, g.const(0.004)])], to=TensorProto.FLOAT)
    axes = g.const([2, 3], dtype=np.int64)
    share = g.div(g.op("ReduceSum", [g.mul(coloured, valid), axes], keepdims=1),
                  g.op("Max", [g.op("ReduceSum", [valid, axes], keepdims=1), g.const(1.0)]))
    colour_image = g.affine_sigmoid(share, COLOUR_SHARE, 0.02)  # (1,1,1,1)
    feats = g.op("Concat", [luma, g.mul(luma, luma), skin, valid], axis=1)  # (1,4,H,W)

    # Every width on its stride's anchor grid, smallest first.
    scans = [(s, a, w, *_width_score(g, feats, colour_image, s, w))
             for s in STRIDES for a in range(2) for w in ANCHOR_WIDTHS[s][a]]

    def dilate_to_8(score: str, stride: int, width: float, radius: float) -> str:
        """Max filter of radius * width around each cell, on the stride-8 grid where all maps meet."""
        k = _odd(2 * radius * width / stride)
        d = g.op("MaxPool", [score], kernel_shape=[k, k], pads=[k // 2] * 4, strides=[1, 1])
        if stride > 8:
            d = g.op("Resize", [d, "", g.const([1.0, 1.0, stride / 8, stride / 8], "up")], mode="nearest")
        return d

    def suffix_max(maps: list[str]) -> list[str]:
        out = [maps[-1]]
        for m in reversed(maps[:-1]):
            out.insert(0, g.op("Max", [m, out[0]]))
        return out

    def on_grid(m: str, s: int) -> str:
        r = s // 8
        return m if r == 1 else g.op("MaxPool", [m], kernel_shape=[r, r], strides=[r, r])

    # 1) A face contains no faces: a width is dropped where a confident (>= CONTAIN_THRESHOLD) match at least
    #    CONTAIN_RATIO times wider lies within CONTAIN_RADIUS of ITS width (boxes on an eye or the mouth).
    containers = suffix_max([dilate_to_8(sc, s, w, CONTAIN_RADIUS) for s, _, w, sc, _ in scans])
    widths = [w for _, _, w, _, _ in scans]
    anchors: dict[tuple[int, int], tuple[str, str]] = {}
    for s, a, w, score, dist in scans:
        j = next((j for j, v in enumerate(widths) if v >= CONTAIN_RATIO * w), None)
        if j is not None:
            inside = g.op("GreaterOrEqual", [on_grid(containers[j], s), g.const(CONTAIN_THRESHOLD)])
            score = g.op("Where", [inside, g.const(0.0), score])
        # each anchor reports its best width: the box size a real detector regresses
        if (s, a) in anchors:
            best_score, best_dist = anchors[(s, a)]
            dist = g.op("Where", [g.op("Greater", [score, best_score]), dist, best_dist])
            score = g.op("Max", [best_score, score])
        anchors[(s, a)] = (score, dist)

    # 2) Peaks: an anchor is kept only where it is the max of its own, the next smaller and all larger anchors
    #    within PEAK_RADIUS of their widths (one face found at neighbouring sizes or cells is reported once).
    order = list(anchors)  # (stride, anchor), increasing width
    rivals = suffix_max([dilate_to_8(anchors[k][0], k[0], max(ANCHOR_WIDTHS[k[0]][k[1]]), PEAK_RADIUS)
                         for k in order])

    scores_out, bbox_out, kps_out = [], [], []
    for s in STRIDES:
        kept, dists = [], []
        for a in range(2):
            score, dist = anchors[(s, a)]
            i = order.index((s, a))
            keep = g.op("GreaterOrEqual", [score, g.sub(on_grid(rivals[max(i - 1, 0)], s), g.const(1e-6))])
            kept.append(g.op("Where", [keep, score, g.const(0.0)]))
            dists.append(g.op("Unsqueeze", [dist, g.const([1], dtype=np.int64)]))  # (1,1,14,h,w)
        # SCRFD order: location-major (row by row), then the two anchors of a location.
        sc = g.op("Transpose", [g.op("Concat", kept, axis=1)], perm=[0, 2, 3, 1])  # (1,h,w,2)
        scores_out.append(g.op_to("Reshape", [sc, g.const([-1, 1], dtype=np.int64)], f"score_{s}"))
        ds = g.op("Transpose", [g.op("Concat", dists, axis=1)], perm=[0, 3, 4, 1, 2])  # (1,h,w,2,14)
        ds = g.op("Reshape", [ds, g.const([-1, 14], dtype=np.int64)])  # (N,14)
        bbox_out.append(g.op_to("Slice", [ds, g.const([0], dtype=np.int64), g.const([4], dtype=np.int64),
                                          g.const([1], dtype=np.int64)], f"bbox_{s}"))
        kps_out.append(g.op_to("Slice", [ds, g.const([4], dtype=np.int64), g.const([14], dtype=np.int64),
                                         g.const([1], dtype=np.int64)], f"kps_{s}"))

    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])]
    outputs = []
    for names, width in ((scores_out, 1), (bbox_out, 4), (kps_out, 10)):
        for s, name in zip(STRIDES, names, strict=True):
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"anchors_{s}", width]))
    return _model(g, inputs, outputs, "tiny_scrfd")


# --------------------------------------------------------------------------------------------------------------
# Recogniser
# --------------------------------------------------------------------------------------------------------------
def build_recogniser(seed: int = 0) -> onnx.ModelProto:
    """A seeded random conv net, (N,3,112,112) -> (N,512). Keeps spatial layout before the Gemm (no global pool)
    so different faces land far apart; the same pixels always give the same embedding."""
    rng = np.random.default_rng(seed)
    g = _Graph("r_")
    x = "input.1"
    channels = [3, 8, 16, 16, 16]  # 112 -> 56 -> 28 -> 14 -> 7
    for i, (cin, cout) in enumerate(itertools.pairwise(channels)):
        w = rng.normal(0.0, np.sqrt(2.0 / (cin * 9)), size=(cout, cin, 3, 3))
        b = rng.normal(0.0, 0.05, size=(cout,))
        x = g.op("Conv", [x, g.const(w, f"conv{i}_w"), g.const(b, f"conv{i}_b")],
                 hint=f"conv{i}", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        x = g.op("PRelu", [x, g.const(np.full((cout, 1, 1), 0.25), f"prelu{i}")], hint=f"prelu{i}")
    x = g.op("Flatten", [x], hint="flatten", axis=1)  # (N, 16*7*7)
    fan_in = channels[-1] * 7 * 7
    w = rng.normal(0.0, np.sqrt(1.0 / fan_in), size=(512, fan_in))
    g.op_to("Gemm", [x, g.const(w, "fc_w"), g.const(np.zeros(512), "fc_b")], "embedding", transB=1)
    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["None", 512])]
    return _model(g, inputs, outputs, "tiny_arcface")


def write_tiny_face_pack(dest: Path) -> Path:
    """Write the tiny antelopev2-shaped pack (detector + recogniser) into `dest`.

    Args:
        dest: Folder to create (parents too); existing pack files are overwritten.

    Returns:
        `dest`, ready for `FaceAnalysis(name=str(dest), allowed_modules=["detection", "recognition"])`.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    onnx.save(build_detector(), str(dest / DETECTOR_FILE))
    onnx.save(build_recogniser(), str(dest / RECOGNISER_FILE))
    return dest


def write_tiny_scoring_pack(dest: Path) -> Path:
    """Write the tiny scoring pack (buffalo_l's names: detector + a second, differently seeded recogniser).

    Returns:
        `dest`, loadable by `FaceAnalysis` like the real buffalo_l.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    onnx.save(build_detector(), str(dest / SCORING_DETECTOR_FILE))
    onnx.save(build_recogniser(seed=SCORING_RECOGNISER_SEED), str(dest / SCORING_RECOGNISER_FILE))
    return dest
