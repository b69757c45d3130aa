"""An embedded synthetic facial-expression set: needs no files, deterministic by seed.

Every image is a procedurally drawn face. Per *identity*: face shape (width, height,
chin), skin tone, hair colour/length/hairline, eye spacing/height/size, iris colour,
brow thickness, mouth position/width, lip colour and a resting expression offset. Per
*sample*: pose (roll, yaw, position), scale, lighting direction and strength,
contrast/brightness/colour cast, background, gaze, occasional greyscale, and pixel noise.
Brows (height, inner tilt, arch), eyes (opening), mouth (width, opening, corner curve,
sneer, teeth) and nose/brow wrinkles carry the seven basic emotions, with a random
intensity per sample.

Classes and prior follow RAF-DB (order Surprise, Fear, Disgust, Happiness, Sadness,
Anger, Neutral; train counts 1290, 281, 717, 4772, 1982, 705, 2524). A fraction
``blend_fraction`` of the samples mixes the parameters of two expressions with weight
``w`` in [0.5, 0.9] on the labelled one; ``soft_labels`` holds ``w`` and ``1 - w``
(one-hot for the others), so label ambiguity is known exactly.

Rendering is vectorised over chunks of images in torch: each facial part is a signed
distance field with a one-pixel antialiased edge, composited with ``lerp``. Images are
generated at ``resolution`` (default 100, as RAF-DB's aligned faces); ``image_size`` of
:func:`nla_fast.data.load_dataset` resizes afterwards like every other dataset. Train and
test use disjoint identities. The result is cached like the other datasets (key: every
option and :data:`GENERATOR_VERSION`); ``cache=False`` regenerates it.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from . import cache as _cache
from .decode import default_workers
from .rafdb import CLASSES, TRAIN_COUNTS

GENERATOR_VERSION = 1
DEFAULT_SAMPLES = {"train": 10000, "test": 2000, "valid": 2000}
_SPLIT_SALT = {"train": 1, "test": 2, "valid": 3}

# Expression parameters (face-local units: the face is ~1 wide, ~1.2 tall; y points down).
PARAM_NAMES = (
    "brow_raise", "brow_tilt", "brow_arch", "eye_open", "mouth_width", "mouth_open",
    "mouth_curve", "teeth", "wrinkle", "frown", "sneer",
)
EXPRESSIONS = {
    #            raise  tilt   arch   eye    m.w    m.open curve  teeth wrinkle frown sneer
    "Surprise":  (0.31, 0.00, 0.07, 0.125, 0.15, 0.17, 0.00, 0.0, 0.0, 0.0, 0.00),
    "Fear":      (0.27, 0.10, 0.00, 0.115, 0.33, 0.07, -0.05, 0.8, 0.0, 0.3, 0.00),
    "Disgust":   (0.12, -0.05, 0.00, 0.045, 0.25, 0.035, -0.06, 0.6, 1.0, 0.4, 0.07),
    "Happiness": (0.18, 0.00, 0.03, 0.040, 0.37, 0.055, 0.14, 1.0, 0.25, 0.0, 0.00),
    "Sadness":   (0.19, 0.11, -0.02, 0.050, 0.25, 0.00, -0.12, 0.0, 0.0, 0.35, 0.00),
    "Anger":     (0.08, -0.12, -0.01, 0.080, 0.23, 0.015, -0.03, 0.4, 0.3, 1.0, 0.00),
    "Neutral":   (0.17, 0.00, 0.02, 0.068, 0.27, 0.00, 0.00, 0.0, 0.0, 0.0, 0.00),
}
EXPRESSION_TABLE = torch.tensor([EXPRESSIONS[c] for c in CLASSES], dtype=torch.float32)  # 7 x P
NEUTRAL = CLASSES.index("Neutral")


def _split_seed(seed: int, split: str) -> int:
    return (int(seed) * 1_000_003 + _SPLIT_SALT.get(split, 7) * 7919) % (2**63 - 1)


def class_allocation(n: int, prior=TRAIN_COUNTS) -> list[int]:
    """Per-class sample counts proportional to ``prior`` (largest remainder)."""
    total = sum(prior)
    exact = [n * p / total for p in prior]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(prior)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    return counts


def _u(g, n, lo, hi):
    return torch.rand(n, generator=g) * (hi - lo) + lo


def draw_identities(n: int, g: torch.Generator) -> dict:
    """Identity attributes, each a tensor of length ``n`` (colours n x 3)."""
    tone = torch.rand(n, generator=g)
    light = torch.tensor([0.96, 0.80, 0.70])
    dark = torch.tensor([0.36, 0.24, 0.18])
    skin = light + (dark - light) * tone[:, None]
    skin = (skin * (1 + 0.03 * torch.randn(n, 3, generator=g))).clamp(0.1, 1.0)
    hair_palette = torch.tensor(
        [[0.08, 0.06, 0.05], [0.22, 0.14, 0.08], [0.45, 0.30, 0.16], [0.80, 0.66, 0.40],
         [0.55, 0.55, 0.55], [0.45, 0.15, 0.07]]
    )
    hair = hair_palette[torch.multinomial(torch.tensor([0.35, 0.25, 0.15, 0.1, 0.08, 0.07]), n, True, generator=g)]
    hair = (hair * (1 + 0.06 * torch.randn(n, 1, generator=g))).clamp(0.02, 1.0)
    iris_palette = torch.tensor([[0.25, 0.15, 0.08], [0.10, 0.07, 0.05], [0.25, 0.40, 0.55], [0.30, 0.40, 0.25]])
    iris = iris_palette[torch.multinomial(torch.tensor([0.4, 0.3, 0.2, 0.1]), n, True, generator=g)]
    lip = (skin * torch.tensor([0.86, 0.56, 0.56]) + 0.05 * torch.randn(n, 3, generator=g)).clamp(0.05, 1)
    return {
        "face_a": _u(g, n, 0.80, 0.95), "face_b": _u(g, n, 1.08, 1.26), "chin": _u(g, n, 0.82, 1.0),
        "skin": skin, "hair": hair, "iris": iris, "lip": lip,
        "hair_len": _u(g, n, -0.2, 1.1), "hair_vol": _u(g, n, 0.04, 0.18), "hairline": _u(g, n, -0.92, -0.62),
        "eye_x": _u(g, n, 0.33, 0.42), "eye_y": _u(g, n, -0.20, -0.10), "eye_scale": _u(g, n, 0.85, 1.15),
        "brow_th": _u(g, n, 0.028, 0.05), "brow_len": _u(g, n, 0.85, 1.1),
        "nose_y": _u(g, n, 0.20, 0.30), "mouth_y": _u(g, n, 0.50, 0.60), "mouth_scale": _u(g, n, 0.88, 1.12),
        "lip_u": _u(g, n, 0.025, 0.045), "lip_l": _u(g, n, 0.035, 0.06),
        # resting-face offsets (some people look a little sad or surprised at rest)
        "rest": torch.randn(n, len(PARAM_NAMES), generator=g) * torch.tensor(
            [0.02, 0.02, 0.01, 0.008, 0.015, 0.004, 0.025, 0.0, 0.0, 0.0, 0.0]
        ),
    }


def draw_samples(n: int, n_ident: int, g: torch.Generator, blend_fraction: float, intensity=(0.6, 1.1)) -> dict:
    counts = class_allocation(n)
    labels = torch.cat([torch.full((c,), k, dtype=torch.int64) for k, c in enumerate(counts)])
    labels = labels[torch.randperm(n, generator=g)]
    prior = torch.tensor(TRAIN_COUNTS, dtype=torch.float32)
    # second expression of a blend: drawn from the prior, different from the first
    other = torch.multinomial(prior.expand(n, -1) * (1 - torch.nn.functional.one_hot(labels, 7).float()), 1, generator=g)[:, 0]
    blend = torch.rand(n, generator=g) < blend_fraction
    w = torch.where(blend, _u(g, n, 0.5, 0.9), torch.ones(n))
    soft = torch.zeros(n, 7)
    soft.scatter_(1, labels[:, None], w[:, None])
    soft.scatter_add_(1, other[:, None], (1 - w)[:, None])
    return {
        "labels": labels, "soft": soft, "blend": blend,
        "identity": torch.randint(0, n_ident, (n,), generator=g),
        "intensity": _u(g, n, *intensity),
        "jitter": torch.randn(n, len(PARAM_NAMES), generator=g) * torch.tensor(
            [0.012, 0.012, 0.008, 0.006, 0.012, 0.006, 0.012, 0.08, 0.08, 0.08, 0.01]
        ),
        "sneer_side": torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0),
        "roll": (torch.randn(n, generator=g) * 0.12).clamp(-0.35, 0.35),
        "scale": _u(g, n, 0.72, 0.88),
        "yaw": _u(g, n, -0.22, 0.22),
        "cx": torch.randn(n, generator=g) * 0.04, "cy": 0.06 + torch.randn(n, generator=g) * 0.035,
        "light_dir": _u(g, n, 0, 2 * math.pi), "light_k": _u(g, n, 0.0, 0.35),
        "contrast": _u(g, n, 0.75, 1.2), "bright": _u(g, n, -0.1, 0.1),
        "cast": 1 + 0.05 * torch.randn(n, 3, generator=g),
        "bg0": torch.rand(n, 3, generator=g), "bg1": torch.rand(n, 3, generator=g),
        "bg_dir": _u(g, n, 0, 2 * math.pi),
        "gaze": torch.randn(n, 2, generator=g) * 0.015,
        "grey": torch.rand(n, generator=g) < 0.1,
        "noise": _u(g, n, 0.0, 0.035),
    }


def expression_params(s: dict, ident: dict) -> torch.Tensor:
    """Per-sample expression parameter vectors (n x P)."""
    table = EXPRESSION_TABLE
    mixed = s["soft"] @ table  # blend of the two expressions
    neutral = table[NEUTRAL]
    p = neutral + s["intensity"][:, None] * (mixed - neutral)
    return p + ident["rest"][s["identity"]] + s["jitter"]


# Feature canvas in face units: x in [-CANVAS_X, CANVAS_X]; rows split in two bands.
CANVAS_X = 0.74
CANVAS_Y = (-0.98, 1.08)
BAND_SPLIT = 0.02  # eyes, brows, frown and nose-bridge wrinkles above; nose tip, folds, mouth below

_WHITE = (0.93, 0.92, 0.88)
_MOUTH = (0.25, 0.05, 0.06)
_TEETH = (0.93, 0.91, 0.84)


def _const(rgb, alpha=1.0):
    return torch.tensor([*rgb, alpha], dtype=torch.float32).view(1, 4, 1, 1)


def _rgba(color_b3):
    """B x 3 colour -> B x 4 x 1 x 1 premultiplied target (alpha 1)."""
    return torch.cat([color_b3, torch.ones(len(color_b3), 1)], 1).view(-1, 4, 1, 1)


def render_features(P, ident_b: dict, s_b: dict, res: int) -> tuple[torch.Tensor, float, tuple]:
    """Eyes, brows, nose and mouth of B samples on an upright canvas in face units.

    Returns a premultiplied RGBA canvas ``B x 4 x Hc x Wc`` (alpha 0 where nothing is drawn),
    its pixel size and its extent. Each band only evaluates the parts that can reach it.
    """
    B = P.shape[0]
    ps = 2.2 / res  # a little finer than one output pixel at the largest face scale
    wc = int(math.ceil(2 * CANVAS_X / ps))
    hc = int(math.ceil((CANVAS_Y[1] - CANVAS_Y[0]) / ps))
    x0, y0 = -wc * ps / 2, CANVAS_Y[0]
    X = (x0 + (torch.arange(wc, dtype=torch.float32) + 0.5) * ps).view(1, 1, wc)
    Yall = (y0 + (torch.arange(hc, dtype=torch.float32) + 0.5) * ps).view(1, hc, 1)
    split_row = int(round((BAND_SPLIT - y0) / ps))
    canvas = torch.zeros(B, 4, hc, wc)
    inv = 1.0 / ps

    def cov(d):
        return (0.5 - d * inv).clamp_(0.0, 1.0)

    col = lambda v: v.view(B, 1, 1)  # noqa: E731
    pp = lambda name: col(P[:, PARAM_NAMES.index(name)])  # noqa: E731
    I = lambda k: col(ident_b[k])  # noqa: E741,E731
    skin = ident_b["skin"]
    dark = _rgba(skin * 0.35)
    yaw = col(s_b["yaw"])
    xs = X - 0.28 * yaw  # features follow the yaw
    side = torch.sign(xs)
    xl = xs.abs()  # both halves at once: mirrored, inner corner towards 0

    # ---------------- upper band: eyes, brows, frown lines, nose-bridge wrinkles
    up = canvas[:, :, :split_row]
    Y = Yall[:, :split_row]

    def paint_up(target, alpha):
        up.lerp_(target, alpha.unsqueeze(1))

    ex, ey, es = I("eye_x"), I("eye_y"), I("eye_scale")
    near = 1 + side * yaw * 0.6  # the side turned towards the camera looks larger
    ew = 0.14 * es * near
    eo = (pp("eye_open") * es).clamp(min=0.006)
    dx = xl - ex
    q = (dx / ew).clamp(-1, 1)
    lid = eo * (1 - q * q)
    dy = Y - ey
    adx = dx.abs()
    eye = cov(torch.maximum(dy.abs() - lid, adx - ew))
    paint_up(_const(_WHITE), eye)
    gz = s_b["gaze"]
    ir = 0.055 * es
    r_iris = torch.sqrt((dx - side * col(gz[:, 0])) ** 2 + (dy - col(gz[:, 1])) ** 2)
    paint_up(_rgba(ident_b["iris"]), eye * cov(r_iris - ir))
    paint_up(_const((0.0, 0.0, 0.0)), eye * cov(r_iris - 0.45 * ir))
    paint_up(_const((0.08, 0.08, 0.08)), cov(torch.maximum((dy + lid).abs() - 0.016 * es, adx - ew * 1.08)))
    paint_up(_rgba(skin * 0.7), cov(torch.maximum((dy - lid).abs() - 0.006, adx - ew)))
    bw = 0.16 * I("brow_len")
    tb = (dx / bw).clamp(-1.2, 1.2)
    yb = ey - pp("brow_raise") - pp("brow_arch") * (1 - tb * tb) - pp("brow_tilt") * (1 - tb) / 2
    th = I("brow_th") * (1 - 0.3 * tb * tb)
    paint_up(_rgba(ident_b["hair"] * 0.8), cov(torch.maximum((Y - yb).abs() - th, adx - bw)))
    fr = pp("frown").clamp(0, 1)
    paint_up(dark, 0.55 * fr * cov(torch.maximum((xl - 0.045).abs() - 0.008, (Y - (ey - 0.17)).abs() - 0.07)))
    ny = I("nose_y")
    wr = pp("wrinkle").clamp(0, 1)
    # three short horizontal lines on the nose bridge: distance to the nearest of them
    yw = (Y - (ny - 0.16)) / -0.045  # 0, 1, 2 at the lines
    d_lines = (yw - yw.round().clamp(0, 2)).abs() * 0.045
    paint_up(dark, 0.6 * wr * cov(torch.maximum(d_lines - 0.007, xl - 0.07)))

    # ---------------- lower band: nose tip, nostrils, nasolabial folds, mouth
    lo = canvas[:, :, split_row:]
    Y = Yall[:, split_row:]

    def paint_lo(target, alpha):
        lo.lerp_(target, alpha.unsqueeze(1))

    paint_lo(_rgba(skin * 0.82), 0.6 * cov((torch.sqrt((xs / 0.10) ** 2 + ((Y - ny + 0.03) / 0.055) ** 2) - 1) * 0.055))
    paint_lo(_rgba(skin * 0.4), cov((torch.sqrt(((xl - 0.065) / 0.034) ** 2 + ((Y - ny) / 0.02) ** 2) - 1) * 0.02))
    my, mw = I("mouth_y"), pp("mouth_width") * I("mouth_scale")
    slope = (mw + 0.04 - 0.12) / (my - ny)
    xf = 0.12 + (Y - ny) * slope
    paint_lo(dark, 0.5 * wr * cov(torch.maximum((xl - xf).abs() - 0.008, (Y - (ny + my) / 2).abs() - (my - ny) / 2)))
    qm = (xs / mw).clamp(-1, 1)
    sq = torch.sqrt((1 - qm * qm).clamp(min=0))
    yc = my - pp("mouth_curve") * qm * qm + pp("sneer") * col(s_b["sneer_side"]) * qm
    o = pp("mouth_open").clamp(min=0) * sq
    top_in, bot_in = yc - 0.55 * o, yc + o
    top_out, bot_out = top_in - I("lip_u") * sq, bot_in + I("lip_l") * sq
    side_d = xl - mw
    paint_lo(_rgba(ident_b["lip"]), cov(torch.maximum(side_d, torch.maximum(top_out - Y, Y - bot_out))))
    d_open = torch.maximum(side_d + 0.01, torch.maximum(top_in - Y, Y - bot_in)) - 0.006
    paint_lo(_const(_MOUTH), cov(d_open))
    teeth_bottom = top_in + pp("teeth").clamp(0, 1) * 0.9 * o
    paint_lo(_const(_TEETH), cov(torch.maximum(d_open + 0.006, Y - teeth_bottom)))
    return canvas, ps, (x0, y0, wc * ps, hc * ps)


def render_chunk(s: dict, ident: dict, params: torch.Tensor, idx: torch.Tensor, h: int, w: int,
                 noise_gen: torch.Generator) -> torch.Tensor:
    """Render the samples ``idx``; returns uint8 B x H x W x 3.

    Head, hair and background are drawn in image space; the facial parts on an upright
    canvas (:func:`render_features`) that one bilinear ``grid_sample`` places with the
    sample's pose, then lighting, photometric changes and pixel noise.
    """
    B = len(idx)
    iid = s["identity"][idx]
    ident_b = {k: v[iid] for k, v in ident.items()}
    s_b = {k: v[idx] for k, v in s.items() if torch.is_tensor(v) and v.dim() >= 1 and len(v) == len(s["labels"])}
    col = lambda v: v.view(B, 1, 1)  # noqa: E731
    C = lambda v: v.view(B, 3, 1, 1)  # noqa: E731
    I = lambda k: col(ident_b[k])  # noqa: E741,E731
    S = lambda k: col(s_b[k])  # noqa: E731

    u = ((torch.arange(w, dtype=torch.float32) * 2 + 1) / w - 1).view(1, 1, w)
    v = ((torch.arange(h, dtype=torch.float32) * 2 + 1) / h - 1).view(1, h, 1)
    du, dv = u - S("cx"), v - S("cy")
    c, sn, sc = S("cos"), S("sin"), S("scale")
    x = (c * du + sn * dv) / sc
    y = (-sn * du + c * dv) / sc
    inv_px = sc * (min(h, w) / 2.0)

    def cov(d):
        return (0.5 - d * inv_px).clamp_(0.0, 1.0)

    bd = s_b["bg_dir"]
    t = (0.5 + 0.5 * (u * col(torch.cos(bd)) + v * col(torch.sin(bd)))).clamp_(0, 1)
    img = torch.empty((B, 3, h, w)).contiguous(memory_format=torch.channels_last)
    torch.lerp(C(s_b["bg0"]).expand(B, 3, h, w), C(s_b["bg1"]), t.unsqueeze(1), out=img)

    def paint(color, alpha):
        img.lerp_(color, alpha.unsqueeze(1))

    skin, hair = C(ident_b["skin"]), C(ident_b["hair"])
    a, b = I("face_a"), I("face_b")
    hv = I("hair_vol")
    rh = torch.sqrt((x / (a + hv)) ** 2 + ((y + 0.12) / (b + hv)) ** 2) - 1
    paint(hair, cov(torch.maximum(rh * a, y - I("hair_len"))))
    paint(skin * 0.78, cov(torch.maximum(x.abs() - 0.42 * a, 0.55 - y)))
    bb = torch.where(y > 0, b * I("chin"), b)
    rf = torch.sqrt((x / a) ** 2 + (y / bb) ** 2)
    face = cov((rf - 1) * a)
    paint(skin, face)
    paint(hair, face * cov(y - (I("hairline") + 0.22 * (x / a) ** 2)))

    canvas, _ps, (cx0, cy0, cw, ch) = render_features(params[idx], ident_b, s_b, min(h, w))
    grid = torch.stack(((x - cx0) / cw * 2 - 1, (y - cy0) / ch * 2 - 1), dim=-1)
    feat = torch.nn.functional.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img.mul_(1 - feat[:, 3:]).add_(feat[:, :3])

    # lighting (face only), then contrast, brightness, colour cast and the 0..255 scale in one pass
    ld = s_b["light_dir"]
    shade = 1 + S("light_k") * (x * col(torch.cos(ld)) + y * col(torch.sin(ld))) / 1.3 - 0.12 * rf.clamp_(max=1.2) ** 2
    img.mul_((1 + (shade - 1) * face).unsqueeze(1))
    contrast, cast = S("contrast").unsqueeze(1), C(s_b["cast"])
    gain = 255 * contrast * cast
    offset = 255 * (0.5 - 0.5 * contrast + S("bright").unsqueeze(1)) * cast
    img = torch.addcmul(offset, img, gain).contiguous(memory_format=torch.channels_last)
    grey = s_b["grey"].nonzero().flatten()
    if len(grey):
        lum = (img[grey] * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        img[grey] = lum.expand(-1, 3, -1, -1)
    noise = torch.randn((B, h, w, 3), generator=noise_gen).permute(0, 3, 1, 2)
    img.addcmul_(noise, 255 * S("noise").unsqueeze(1))
    out = img.round_().clamp_(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1)



def generate(split: str = "train", num_samples=None, seed: int = 0, resolution: int = 100,
             blend_fraction: float = 0.2, num_identities=None, workers=None, verbose: bool = False) -> dict:
    """Generate the set; returns a dict of tensors (``images``, ``labels``, ``soft_labels``, ...)."""
    n = DEFAULT_SAMPLES.get(split, 2000) if num_samples is None else int(num_samples)
    if n < 0:
        raise ValueError(f"num_samples must be >= 0, got {n}")
    if not 0 <= blend_fraction <= 1:
        raise ValueError(f"blend_fraction must lie in [0, 1], got {blend_fraction}")
    h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    n_ident = int(num_identities) if num_identities else max(1, min(2000, n // 20))
    g = torch.Generator().manual_seed(_split_seed(seed, split))
    ident = draw_identities(n_ident, g)
    s = draw_samples(n, n_ident, g, blend_fraction)
    s["cos"], s["sin"] = torch.cos(s["roll"]), torch.sin(s["roll"])
    params = expression_params(s, ident)
    images = torch.empty((n, h, w, 3), dtype=torch.uint8)
    t0 = time.perf_counter()
    chunk = 64  # fixed: each chunk draws its pixel noise from its own seeded generator
    starts = list(range(0, n, chunk))

    def work(c: int) -> None:
        start = starts[c]
        idx = torch.arange(start, min(n, start + chunk))
        noise_gen = torch.Generator().manual_seed(_split_seed(seed, split) + 104729 * (c + 1))
        images[start:start + len(idx)] = render_chunk(s, ident, params, idx, h, w, noise_gen)

    # Chunks run in parallel on single-threaded ops: the ops are small, and intra-op
    # threading of small ops spins badly on a busy machine (measured 20x slower).
    workers = min(len(starts), max(1, int(workers or default_workers())))
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        if workers <= 1:
            for c in range(len(starts)):
                work(c)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(work, range(len(starts))))
    finally:
        torch.set_num_threads(prev)
    if verbose:
        print(f"[nla_fast.data] synthetic/{split}: rendered {n} images {h}x{w} in {time.perf_counter() - t0:.1f} s")
    return {
        "images": images, "labels": s["labels"], "soft_labels": s["soft"], "blend": s["blend"],
        "identity": s["identity"], "params": params,
        "names": [f"synthetic_{split}_{i:06d}" for i in range(n)],
    }


def load(root=None, split: str = "train", num_samples=None, seed: int = 0, resolution=None,
         blend_fraction: float = 0.2, num_identities=None, cache_size=None, use_cache=True, cache_dir=None,
         workers=None, verbose=True, **_):
    if split not in _SPLIT_SALT:
        raise ValueError(f"synthetic splits are 'train', 'test' and 'valid', got {split!r}")
    if resolution is not None and cache_size is not None and resolution != cache_size:
        raise ValueError(f"synthetic: resolution {resolution} and cache_size {cache_size} differ; give one")
    resolution = resolution or cache_size or 100  # the set is drawn at the size it is cached at
    key = {"version": GENERATOR_VERSION, "n": num_samples, "seed": seed, "resolution": resolution,
           "blend_fraction": blend_fraction, "num_identities": num_identities, "torch": torch.__version__}

    def build():
        out = generate(split, num_samples, seed, resolution, blend_fraction, num_identities, workers=workers, verbose=verbose)
        return out

    payload, path, built = _cache.load_or_build("synthetic", split, key, build, use_cache, cache_dir, verbose)
    return dict(
        images=payload["images"], labels=payload["labels"], names=list(payload["names"]), classes=CLASSES,
        soft_labels=payload["soft_labels"],
        info={"seed": seed, "blend": payload["blend"], "identity": payload["identity"], "params": payload["params"],
              "cache_file": str(path) if path else None, "cache_built": built, "cache_size": resolution},
    )
