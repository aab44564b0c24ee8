"""Synthetic indoor scenes with exact metric depth, rendered through NYUv2's camera.

Each scene is a room box (floor, four walls, ceiling) holding boxes, spheres and vertical cylinders, with
procedural textures (checkers, stripes, wood-like grain, value noise) lit mostly by a light on the camera (a
flash: its irradiance falls off with the squared distance), plus a dim ceiling point light, an ambient term
and a per-image exposure, then encoded with a 2.2 gamma like an sRGB camera. Rays are cast per pixel with
numpy; the depth map is the camera-frame z of the first hit, i.e. exactly what a Kinect/NYU depth map stores,
through the NYU intrinsics (fx=518.8579, fy=519.4696, cx=325.5824, cy=253.7362 at 640x480) scaled to the
requested size.

Depth is learnable from the image on purpose: the flash's falloff makes brightness a strong, local cue (as in
flash photography or an active camera's own illumination; the materials are light-coloured, albedo 0.3-1, so
albedo does not swamp it), and perspective of the floor and walls, object size, occlusion and texture scale
carry it too. The flash is what lets the tiny demo model learn clear depth in a few CPU minutes: with only the
ceiling light, a plain convolutional U-Net trained for 2,000 updates barely beat a constant prediction.
Every scene is tagged with an NYU scene class; the class also biases its palette and clutter so that the label
is informative.

Every view also has a per-pixel semantic label map (``Scene.label``, uint8) in ADE20K's 0-based class ids
(``vpd_jax.data.segmentation.ADE20K_CLASSES``): the surface each pixel's ray hits first, named by
:data:`SURFACE_CLASSES` (wall 0, floor 3, ceiling 5, shelf 24 for a box hanging on a wall, box 41 for one standing
on the floor, ball 119 for a sphere, column 42 for a cylinder). Pixels whose depth is dropped (beyond range,
grazing angles) keep the label of the surface they see. The labels come from the same ray casts as the depth
and change neither the images nor the depth maps.

The generator is deterministic given ``(seed, scene index, view index)`` and independent of image size apart
from sampling, so a test can ask for 48x64 and a demo for 240x320 of the same scenes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vpd_jax.scenes import NYU_CLASSES

# NYUv2 colour-camera intrinsics at 640x480 (the values the official toolbox and BTS use).
NYU_WIDTH, NYU_HEIGHT = 640, 480
NYU_FX, NYU_FY = 518.8579, 519.4696
NYU_CX, NYU_CY = 325.5824, 253.7362
MAX_DEPTH = 10.0
# Bumped whenever the rendered scenes change, so prepared copies (demo.py's) can tell they are stale.
# 1: ceiling light only. 2: the camera flash, light materials and gamma encoding.
GENERATOR_VERSION = 2
ALBEDO_FLOOR = 0.3  # material albedo lies in [ALBEDO_FLOOR, 1]: light surfaces, so the flash cue stays readable
GAMMA = 2.2  # sRGB-like encoding of the linear radiance
# Surface kind -> ADE20K 0-based class id (mmsegmentation ADE20KDataset.METAINFO order; names in
# vpd_jax.data.segmentation.ADE20K_CLASSES, which a test checks these against).
SURFACE_CLASSES = {"wall": 0, "floor": 3, "ceiling": 5, "shelf": 24, "box": 41, "column": 42, "ball": 119}


def intrinsics(height: int, width: int) -> tuple[float, float, float, float]:
    """(fx, fy, cx, cy) of the NYU camera resampled to ``height`` x ``width`` (pixel-centre convention)."""
    sx, sy = width / NYU_WIDTH, height / NYU_HEIGHT
    # Scaling about pixel centres keeps the principal point on the same scene ray at any size.
    return NYU_FX * sx, NYU_FY * sy, (NYU_CX + 0.5) * sx - 0.5, (NYU_CY + 0.5) * sy - 0.5


@dataclasses.dataclass(frozen=True)
class Scene:
    """One rendered view: ``image`` uint8 (H,W,3), ``depth`` float32 (H,W) metres (0 = no return)."""

    image: np.ndarray
    depth: np.ndarray
    scene_class: str
    scene_dir: str
    frame: int
    label: np.ndarray | None = None  # uint8 (H,W) ADE20K class ids of the surface each pixel sees


def surface_labels(room: "_Room") -> np.ndarray:
    """ADE20K class id of every surface index ``_intersect`` returns (floor, ceiling, 4 walls, then objects)."""
    c = SURFACE_CLASSES
    ids = [c["floor"], c["ceiling"]] + [c["wall"]] * 4
    for kind, prm, _ in room.objects:
        if kind == "box":
            _, cy, _, _, hy, _, _ = prm
            ids.append(c["box"] if cy + hy >= room.floor_y - 1e-9 else c["shelf"])  # its bottom on the floor?
        elif kind == "sphere":
            ids.append(c["ball"])
        else:
            ids.append(c["column"])
    return np.asarray(ids, np.uint8)


def _rot_y(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _value_noise(u: np.ndarray, v: np.ndarray, seed: int) -> np.ndarray:
    """Smooth 2-D value noise in [0,1] on a unit lattice, hashed from ``seed`` (no tables, any extent)."""
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)

    def h(a, b):
        x = np.sin(a * 127.1 + b * 311.7 + seed * 74.7) * 43758.5453
        return x - np.floor(x)

    n00, n10, n01, n11 = h(iu, iv), h(iu + 1, iv), h(iu, iv + 1), h(iu + 1, iv + 1)
    return (n00 * (1 - fu) + n10 * fu) * (1 - fv) + (n01 * (1 - fu) + n11 * fu) * fv


@dataclasses.dataclass
class _Material:
    color: np.ndarray  # base RGB in [0,1]
    color2: np.ndarray  # second colour of the pattern
    pattern: int  # 0 plain+noise, 1 checker, 2 stripes, 3 wood grain
    scale: float  # pattern period in metres
    seed: int

    def shade(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Albedo (N,3) at surface coordinates ``u, v`` in metres; texture scale is metric, so its image-space
        frequency is a depth cue."""
        s = self.scale
        if self.pattern == 1:
            t = ((np.floor(u / s) + np.floor(v / s)) % 2).astype(np.float64)
        elif self.pattern == 2:
            t = (np.sin(2 * np.pi * u / s) > 0).astype(np.float64)
        elif self.pattern == 3:
            t = 0.5 + 0.5 * np.sin(2 * np.pi * (u / s + 2.0 * _value_noise(u * 2 / s, v * 8 / s, self.seed)))
        else:
            t = _value_noise(u / s, v / s, self.seed)
        grain = 0.85 + 0.3 * _value_noise(u * 12.0, v * 12.0, self.seed + 1)
        albedo = (self.color[None] * (1 - t[:, None]) + self.color2[None] * t[:, None]) * grain[:, None]
        return ALBEDO_FLOOR + (1.0 - ALBEDO_FLOOR) * albedo


def _class_palette(cls_index: int) -> np.random.Generator:
    # A fixed per-class generator: rooms of one class share a colour mood, so the tag carries information.
    return np.random.default_rng(10_007 + cls_index)


def _random_material(rng: np.random.Generator, mood: np.ndarray) -> _Material:
    base = np.clip(mood + rng.normal(0, 0.18, 3), 0.05, 0.95)
    other = np.clip(base * rng.uniform(0.4, 0.8) + rng.normal(0, 0.08, 3), 0.02, 0.98)
    return _Material(base, other, int(rng.integers(0, 4)), float(rng.uniform(0.08, 0.6)),
                     int(rng.integers(0, 1 << 20)))


@dataclasses.dataclass
class _Room:
    """A room in world coordinates (y points down, like the camera frame; the floor is y=0)."""

    x0: float
    x1: float
    z0: float
    z1: float
    floor_y: float
    ceil_y: float
    materials: list  # floor, ceiling, wall x0, wall x1, wall z0, wall z1
    objects: list  # (kind, params, material)
    light: np.ndarray  # the ceiling point light
    light_power: float
    ambient: float
    flash_power: float = 4.0  # the light on the camera: irradiance flash_power * cos / distance^2


def _make_room(rng: np.random.Generator, cls_index: int) -> _Room:
    mood_rng = _class_palette(cls_index)
    mood = mood_rng.uniform(0.25, 0.8, 3)
    clutter = int(mood_rng.integers(2, 7))
    width = rng.uniform(3.0, 6.5)
    length = rng.uniform(4.0, 8.0)
    height = rng.uniform(2.4, 3.2)
    floor_y = 0.0
    ceil_y = -height  # y points down, as in the camera frame
    x0, x1 = -width / 2, width / 2
    z0, z1 = -length / 2, length / 2
    mats = [_random_material(rng, mood * 0.8), _random_material(rng, np.array([0.9, 0.9, 0.88]))]
    wall_mood = np.clip(mood + rng.normal(0, 0.1, 3), 0.1, 0.95)
    mats += [_random_material(rng, wall_mood) for _ in range(4)]
    objects = []
    n_obj = clutter + int(rng.integers(0, 4))
    for _ in range(n_obj):
        kind = rng.choice(["box", "box", "sphere", "cylinder"])
        mat = _random_material(rng, mood_rng.uniform(0.1, 0.95, 3))
        cx = rng.uniform(x0 + 0.5, x1 - 0.5)
        cz = rng.uniform(z0 + 0.5, z1 - 0.5)
        if kind == "box":
            hx, hz = rng.uniform(0.15, 0.8, 2)
            hy = rng.uniform(0.2, 1.0)
            # Some boxes hang on a wall (shelves, pictures) rather than stand on the floor.
            base = floor_y if rng.uniform() < 0.8 else floor_y - rng.uniform(0.8, 1.6)
            objects.append(("box", (cx, base - hy, cz, hx, hy, hz, rng.uniform(0, np.pi)), mat))
        elif kind == "sphere":
            r = rng.uniform(0.12, 0.5)
            objects.append(("sphere", (cx, floor_y - r, cz, r), mat))
        else:
            r = rng.uniform(0.1, 0.4)
            h = rng.uniform(0.3, 1.8)
            objects.append(("cylinder", (cx, cz, r, floor_y - h, floor_y), mat))
    light = np.array([rng.uniform(x0 + 0.5, x1 - 0.5), ceil_y + 0.15, rng.uniform(z0 + 0.5, z1 - 0.5)])
    # The ceiling light and ambient term are dim next to the flash (0.3x the powers an unlit room would need).
    return _Room(x0, x1, z0, z1, floor_y, ceil_y, mats, objects, light, 0.3 * float(rng.uniform(3.0, 9.0)),
                 0.3 * float(rng.uniform(0.15, 0.35)))


def _camera_pose(rng: np.random.Generator, room: _Room) -> tuple[np.ndarray, np.ndarray]:
    """A hand-held Kinect pose inside ``room``: world-from-camera rotation and camera centre."""
    eye_h = rng.uniform(1.0, 1.7)
    # Stand near one end and look roughly along the room, so most rays stay within NYU's depth range.
    cam = np.array([rng.uniform(room.x0 + 0.4, room.x1 - 0.4), room.floor_y - eye_h,
                    room.z0 + rng.uniform(0.2, 1.0)])
    yaw = rng.uniform(-0.6, 0.6)
    pitch = rng.uniform(-0.35, 0.1)  # negative looks down (y is down)
    roll = rng.uniform(-0.06, 0.06)
    rot = _rot_y(yaw) @ _rot_x(pitch) @ _rot_z(roll)
    # Keep objects out of the camera's own space.
    room.objects = [o for o in room.objects if not _contains(o, cam, margin=0.35)]
    return rot, cam


def _contains(obj, p: np.ndarray, margin: float) -> bool:
    kind, prm, _ = obj
    if kind == "box":
        cx, cy, cz, hx, hy, hz, _ = prm
        r = np.hypot(hx, hz) + margin
        return bool(np.hypot(p[0] - cx, p[2] - cz) < r)
    if kind == "sphere":
        cx, cy, cz, r = prm
        return bool(np.linalg.norm(p - np.array([cx, cy, cz])) < r + margin)
    cx, cz, r, _, _ = prm
    return bool(np.hypot(p[0] - cx, p[2] - cz) < r + margin)


def _plane_list(room: _Room):
    # (axis, coordinate, inward normal, u axis, v axis) for floor, ceiling and the four walls.
    return [(1, room.floor_y, (0, -1.0, 0), 0, 2), (1, room.ceil_y, (0, 1.0, 0), 0, 2),
            (0, room.x0, (1.0, 0, 0), 2, 1), (0, room.x1, (-1.0, 0, 0), 2, 1),
            (2, room.z0, (0, 0, 1.0), 0, 1), (2, room.z1, (0, 0, -1.0), 0, 1)]


def _safe_inv(x: np.ndarray) -> np.ndarray:
    return 1.0 / np.where(np.abs(x) < 1e-9, 1e-9, x)


def _intersect(room: _Room, o: np.ndarray, d: np.ndarray):
    """First hit of rays ``o + t d`` (d is (N,3), world frame): t, normal, surface u/v, surface index.

    Only the hit distance is computed for every ray and surface; normals and texture coordinates are then
    computed once per ray, for the surface it hit.
    """
    n = d.shape[0]
    t_best = np.full(n, np.inf)
    surf = np.full(n, -1, dtype=np.int64)
    aux = np.zeros(n, dtype=np.int64)  # box face / cylinder cap flag of the winning hit

    def take(t, s, a=None):
        hit = (t > 1e-6) & (t < t_best)
        t_best[hit] = t[hit]
        surf[hit] = s
        if a is not None:
            aux[hit] = a[hit]

    planes = _plane_list(room)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for s, (axis, value, _, _, _) in enumerate(planes):
            take((value - o[axis]) * _safe_inv(d[:, axis]), s)
        for k, (kind, prm, _) in enumerate(room.objects):
            s = 6 + k
            if kind == "box":
                cx, cy, cz, hx, hy, hz, yaw = prm
                r = _rot_y(yaw)  # box frame -> world
                lo = (o - np.array([cx, cy, cz])) @ r
                inv = _safe_inv(d @ r)
                half = np.array([hx, hy, hz])
                t1 = (-half - lo) * inv
                t2 = (half - lo) * inv
                tmin = np.minimum(t1, t2)
                t_near = tmin.max(axis=1)
                t_far = np.maximum(t1, t2).min(axis=1)
                take(np.where((t_near <= t_far) & (t_near > 1e-6), t_near, np.inf), s, tmin.argmax(axis=1))
            elif kind == "sphere":
                cx, cy, cz, rad = prm
                oc = o - np.array([cx, cy, cz])
                a = (d * d).sum(1)
                b = 2 * d @ oc
                disc = b * b - 4 * a * (oc @ oc - rad * rad)
                take(np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), np.inf), s)
            else:
                cx, cz, rad, ytop, ybot = prm
                ox, oz = o[0] - cx, o[2] - cz
                a = d[:, 0] ** 2 + d[:, 2] ** 2
                b = 2 * (ox * d[:, 0] + oz * d[:, 2])
                disc = b * b - 4 * a * (ox * ox + oz * oz - rad * rad)
                t = np.where((disc >= 0) & (a > 1e-12), (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), np.inf)
                y = o[1] + t * d[:, 1]
                take(np.where((y >= ytop) & (y <= ybot), t, np.inf), s, np.zeros(n, dtype=np.int64))
                tc = (ytop - o[1]) * _safe_inv(d[:, 1])
                inside = (ox + tc * d[:, 0]) ** 2 + (oz + tc * d[:, 2]) ** 2 <= rad * rad
                take(np.where(inside, tc, np.inf), s, np.ones(n, dtype=np.int64))

    normal = np.zeros((n, 3))
    uv = np.zeros((n, 2))
    for s in np.unique(surf[surf >= 0]):
        sel = np.nonzero(surf == s)[0]
        p = o[None] + t_best[sel, None] * d[sel]
        if s < 6:
            axis, _, nrm, ua, va = planes[s]
            normal[sel] = nrm
            uv[sel, 0], uv[sel, 1] = p[:, ua], p[:, va]
            continue
        kind, prm, _ = room.objects[s - 6]
        if kind == "box":
            cx, cy, cz, hx, hy, hz, yaw = prm
            r = _rot_y(yaw)
            lp = (p - np.array([cx, cy, cz])) @ r
            face = aux[sel]
            ln = np.zeros((sel.size, 3))
            ln[np.arange(sel.size), face] = np.sign(lp[np.arange(sel.size), face])
            normal[sel] = ln @ r.T
            uv[sel, 0] = np.where(face == 0, lp[:, 2], lp[:, 0])
            uv[sel, 1] = np.where(face == 1, lp[:, 2], lp[:, 1])
        elif kind == "sphere":
            cx, cy, cz, rad = prm
            nn = (p - np.array([cx, cy, cz])) / rad
            normal[sel] = nn
            uv[sel, 0] = np.arctan2(nn[:, 0], nn[:, 2]) * rad
            uv[sel, 1] = np.arccos(np.clip(-nn[:, 1], -1, 1)) * rad
        else:
            cx, cz, rad, ytop, _ = prm
            cap = aux[sel] == 1
            nn = np.stack([(p[:, 0] - cx) / rad, np.zeros(sel.size), (p[:, 2] - cz) / rad], 1)
            nn[cap] = (0, -1.0, 0)
            normal[sel] = nn
            uv[sel, 0] = np.where(cap, p[:, 0], np.arctan2(nn[:, 0], nn[:, 2]) * rad)
            uv[sel, 1] = np.where(cap, p[:, 2], p[:, 1])
    return t_best, normal, uv, surf


def render(room: _Room, rot: np.ndarray, cam: np.ndarray, height: int, width: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Image uint8 (H,W,3) and camera-z depth float32 (H,W) of ``room`` seen from pose (rot, cam)."""
    image, depth, _ = render_with_labels(room, rot, cam, height, width, rng)
    return image, depth


def render_with_labels(room: _Room, rot: np.ndarray, cam: np.ndarray, height: int, width: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`render` plus the uint8 (H,W) ADE20K label of the surface each pixel sees (:func:`surface_labels`)."""
    fx, fy, cx, cy = intrinsics(height, width)
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    # Camera rays with unit z: the hit parameter t is then the camera-frame z depth itself.
    d_cam = np.stack([(xs - cx) / fx, (ys - cy) / fy, np.ones_like(xs)], -1).reshape(-1, 3)
    d = d_cam @ rot.T
    t, normal, uv, mat = _intersect(room, cam, d)
    hit = np.isfinite(t)
    p = cam[None] + np.where(hit, t, 0)[:, None] * d
    albedo = np.zeros((t.shape[0], 3))
    all_mats = room.materials + [o[2] for o in room.objects]
    for m, material in enumerate(all_mats):
        sel = mat == m
        if sel.any():
            albedo[sel] = material.shade(uv[sel, 0], uv[sel, 1])
    to_light = room.light[None] - p
    dist2 = (to_light ** 2).sum(1)
    lam = np.clip((normal * to_light).sum(1) / np.sqrt(dist2 + 1e-12), 0, 1)
    light = room.ambient + room.light_power * lam / (1.0 + dist2)
    to_cam = cam[None] - p
    cam2 = np.maximum((to_cam ** 2).sum(1), 1e-6)
    light = light + room.flash_power * np.clip((normal * to_cam).sum(1) / np.sqrt(cam2), 0, 1) / cam2
    # Soft vignetting, a warm/cool light tint and the exposure: nuisance factors a depth model must look past.
    tint = np.clip(1.0 + rng.normal(0, 0.06, 3), 0.85, 1.15)
    rgb = albedo * light[:, None] * tint[None] * rng.uniform(0.9, 1.1)
    rgb = rgb.reshape(height, width, 3)
    rr = ((xs - width / 2) / width) ** 2 + ((ys - height / 2) / height) ** 2
    rgb *= (1.0 - 0.35 * rr)[..., None]
    rgb = np.maximum(rgb, 0.0) ** (1.0 / GAMMA)
    rgb += rng.normal(0, 0.01, rgb.shape)
    image = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    depth = np.where(hit, t, 0.0).reshape(height, width)
    # Kinect-like dropouts: beyond its range, and grazing-angle pixels that return nothing.
    cos_view = np.abs((normal * d).sum(1) / np.linalg.norm(d, axis=1)).reshape(height, width)
    depth = np.where((depth > MAX_DEPTH) | (cos_view < 0.08), 0.0, depth)
    label = surface_labels(room)[np.maximum(mat, 0)].reshape(height, width)  # a closed room: every ray hits
    return image, depth.astype(np.float32), label


def scene_dir_name(seed: int, scene_index: int, split: str = "train") -> tuple[str, int]:
    """``(<class>_<NNNN>, class index)`` for a scene: the BTS naming, so both class rules resolve it."""
    rng = np.random.default_rng([seed, scene_index, 0 if split == "train" else 1])
    cls_index = int(rng.integers(0, len(NYU_CLASSES)))
    offset = 0 if split == "train" else 5000
    return f"{NYU_CLASSES[cls_index]}_{scene_index + offset:04d}", cls_index


def generate_scene(seed: int, scene_index: int, frame: int, height: int, width: int,
                   split: str = "train") -> Scene:
    """View ``frame`` of scene ``scene_index``: the room depends on (seed, split, scene), the pose on the frame."""
    scene_dir, cls_index = scene_dir_name(seed, scene_index, split)
    split_id = 0 if split == "train" else 1
    room = _make_room(np.random.default_rng([seed, split_id, scene_index, 1]), cls_index)
    view_rng = np.random.default_rng([seed, split_id, scene_index, 2, frame])
    rot, cam = _camera_pose(view_rng, room)
    image, depth, label = render_with_labels(room, rot, cam, height, width, view_rng)
    return Scene(image, depth, NYU_CLASSES[cls_index], scene_dir, frame, label)


def iter_scenes(seed: int, num_images: int, height: int, width: int, split: str = "train",
                frames_per_scene: int = 4):
    """Yields ``num_images`` scenes, ``frames_per_scene`` views per room, in a fixed order."""
    for i in range(num_images):
        yield generate_scene(seed, i // frames_per_scene, i % frames_per_scene, height, width, split)
