"""The toy model's procedural video world: one flat-coloured shape moving on a flat background,
with a caption from a fixed grammar. A bench/training tool, never part of the runtime or of CI.

Grammar: ``a {color} {shape} moving {direction} on a {background} background`` and, for the
``bouncing`` direction, ``a {color} {shape} bouncing on a {background} background``.

Two worlds: the shipped model's (``wrap=False``: a straight mover stays inside the frame for the
clip's length) and the wrapping one (``wrap=True``: the frame is a torus, a straight mover leaves
by one edge and comes back by the opposite one, so that it keeps its direction for as long as a
clip lasts; what a long clip of several windows needs to show one motion across them). Bouncing
objects bounce in both.

Everything is a pure function of a seed, so a data set is rebuilt exactly from its seed. The
palette below is the one the Rust checker (``longtake inspect``) compares against: keep the two in
step (``cli/src/inspect/world.rs``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

FPS = 16
SIZE = 64  # frames are SIZE × SIZE pixels
FRAMES = 17  # the native window: 5 latent frames (1 s)

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "orange": (245, 140, 30),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down", "bouncing")
BACKGROUNDS = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "blue": (30, 50, 140),
    "green": (30, 110, 50),
    "white": (255, 255, 255),
}

RADIUS = (9.0, 14.0)  # half the object's extent, pixels
STRAIGHT_SPEED = (1.5, 2.0)  # pixels per frame: a latent cell (8 px) per latent frame
BOUNCE_SPEED = (2.0, 3.0)


def held_out(color: str, shape: str, direction: str) -> bool:
    """The colour × shape × direction combinations kept out of training: 21 of 105 (20%), one
    direction per colour × shape pair, so every colour, shape and direction is still seen."""
    c = list(COLORS).index(color)
    s = SHAPES.index(shape)
    d = DIRECTIONS.index(direction)
    return (c + 2 * s + 3 * d) % 5 == 0


def compatible(color: str, background: str) -> bool:
    """An object is never the colour of its background (it would be invisible)."""
    return color != background


@dataclasses.dataclass(frozen=True)
class Clip:
    color: str
    shape: str
    direction: str
    background: str
    radius: float
    start: tuple[float, float]  # centre (x, y) at frame 0
    velocity: tuple[float, float]  # pixels per frame
    wrap: bool = False  # the torus world: straight movers wrap around the frame's edges

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.direction, self.background)

    def centres(self, frames: int) -> np.ndarray:
        """The object's centre at each frame, shape (frames, 2); bouncing reflects at the edges so
        the whole object stays inside. In the wrapping world a straight mover's centre is not
        reduced modulo the frame here (the track stays continuous); `render` wraps it."""
        lo, hi = self.radius, SIZE - self.radius
        out = np.empty((frames, 2))
        (x, y), (vx, vy) = self.start, self.velocity
        for i in range(frames):
            out[i] = (x, y)
            x, y = x + vx, y + vy
            if self.direction == "bouncing":
                if x < lo or x > hi:
                    vx = -vx
                    x = 2 * lo - x if x < lo else 2 * hi - x
                if y < lo or y > hi:
                    vy = -vy
                    y = 2 * lo - y if y < lo else 2 * hi - y
        return out

    def reflections(self, frames: int) -> int:
        """How many times the centre's velocity reverses along x or y within `frames` frames."""
        d = np.sign(np.diff(self.centres(frames), axis=0))
        return int(np.sum(d[1:] * d[:-1] < 0))

    def render(self, frames: int = FRAMES, first: int = 0) -> np.ndarray:
        """uint8 frames `first..frames`, shape (frames - first, SIZE, SIZE, 3), anti-aliased by
        4×4 supersampling."""
        ss = 4
        grid = (np.arange(SIZE * ss) + 0.5) / ss
        gx, gy = np.meshgrid(grid, grid)
        bg = np.array(BACKGROUNDS[self.background], dtype=np.float32)
        fg = np.array(COLORS[self.color], dtype=np.float32)
        video = np.empty((frames - first, SIZE, SIZE, 3), dtype=np.uint8)
        for i, (cx, cy) in enumerate(self.centres(frames)[first:]):
            dx, dy = gx - cx, gy - cy
            if self.wrap:
                # the nearest copy of the centre on the torus
                dx = (dx + SIZE / 2) % SIZE - SIZE / 2
                dy = (dy + SIZE / 2) % SIZE - SIZE / 2
            inside = shape_mask(self.shape, dx, dy, self.radius)
            cover = inside.reshape(SIZE, ss, SIZE, ss).mean(axis=(1, 3))[..., None]
            video[i] = np.round(bg * (1 - cover) + fg * cover).astype(np.uint8)
        return video


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":
        # pointing up, base 2r at dy = r, apex at dy = -r
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def caption(color: str, shape: str, direction: str, background: str) -> str:
    motion = "bouncing" if direction == "bouncing" else f"moving {direction}"
    return f"a {color} {shape} {motion} on a {background} background"


def combinations(split: str) -> list[tuple[str, str, str]]:
    """colour × shape × direction triples of `split`: "train", "held_out" or "all"."""
    out = []
    for c in COLORS:
        for s in SHAPES:
            for d in DIRECTIONS:
                h = held_out(c, s, d)
                if split == "all" or (split == "held_out") == h:
                    out.append((c, s, d))
    return out


def sample_clip(rng: np.random.Generator, split: str = "train", frames: int = FRAMES,
                radius: tuple[float, float] = RADIUS, wrap: bool = False) -> Clip:
    """One random clip of `split` whose object (of a radius drawn from `radius`) stays inside the
    frame for `frames` frames (in the wrapping world a straight mover starts anywhere along its
    way and wraps around, wholly inside the frame across it)."""
    triples = combinations(split)
    color, shape, direction = triples[rng.integers(len(triples))]
    backgrounds = [b for b in BACKGROUNDS if compatible(color, b)]
    background = backgrounds[rng.integers(len(backgrounds))]
    r = float(rng.uniform(*radius))
    lo, hi = r, SIZE - r
    if direction == "bouncing":
        while True:  # redrawn until it reflects at least once within the clip
            speed = rng.uniform(*BOUNCE_SPEED)
            angle = rng.uniform(0, 2 * math.pi)
            velocity = (speed * math.cos(angle), speed * math.sin(angle))
            start = (rng.uniform(lo, hi), rng.uniform(lo, hi))
            clip = Clip(color, shape, direction, background, r, start, velocity, wrap)
            if clip.reflections(frames) > 0:
                return clip
    elif wrap:
        # anywhere along its way (it wraps there), wholly inside across it
        speed = rng.uniform(*STRAIGHT_SPEED)
        along, across = rng.uniform(0, SIZE), rng.uniform(lo, hi)
        start = (along, across) if direction in ("left", "right") else (across, along)
        velocity = {"right": (speed, 0.0), "left": (-speed, 0.0), "down": (0.0, speed),
                    "up": (0.0, -speed)}[direction]
    else:
        speed = rng.uniform(*STRAIGHT_SPEED)
        travel = speed * (frames - 1)
        if travel > hi - lo:  # a short frame makes long clips slower, never leaving the picture
            speed = (hi - lo) / (frames - 1)
            travel = hi - lo
        along = rng.uniform(lo, hi - travel)
        across = rng.uniform(lo, hi)
        if direction == "right":
            start, velocity = (along, across), (speed, 0.0)
        elif direction == "left":
            start, velocity = (hi - (along - lo), across), (-speed, 0.0)
        elif direction == "down":
            start, velocity = (across, along), (0.0, speed)
        else:  # up
            start, velocity = (across, hi - (along - lo)), (0.0, -speed)
    return Clip(color, shape, direction, background, r, start, velocity, wrap)


def dataset(seed: int, count: int, split: str = "train", frames: int = FRAMES,
            wrap: bool = False) -> list[Clip]:
    rng = np.random.default_rng(seed)
    return [sample_clip(rng, split, frames, wrap=wrap) for _ in range(count)]


def vocabulary() -> list[str]:
    words = {"a", "moving", "bouncing", "on", "background"}
    words.update(COLORS, SHAPES, BACKGROUNDS)
    words.update(d for d in DIRECTIONS if d != "bouncing")
    return sorted(words)


if __name__ == "__main__":
    import argparse

    from PIL import Image

    p = argparse.ArgumentParser(description="write a few clips of the toy world as PNG strips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--out", default="world-samples")
    p.add_argument("--frames", type=int, default=FRAMES)
    p.add_argument("--wrap", action="store_true", help="the wrapping world")
    a = p.parse_args()
    import os

    os.makedirs(a.out, exist_ok=True)
    for i, clip in enumerate(dataset(a.seed, a.count, frames=a.frames, wrap=a.wrap)):
        v = clip.render(a.frames)
        strip = np.concatenate([v[k] for k in (0, a.frames // 2, a.frames - 1)], axis=1)
        Image.fromarray(strip).resize((strip.shape[1] * 3, strip.shape[0] * 3), 0).save(
            f"{a.out}/{i:02d}.png"
        )
        print(i, clip.caption)
