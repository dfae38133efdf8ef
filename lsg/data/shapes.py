"""Deterministic synthetic VQA benchmark of coloured shapes on a grid.

Mirrors a few CV-Bench / MMStar / POPE sub-tasks (count, spatial relation, relative
distance, depth, attribute recognition, object existence) in a fully offline,
reproducible form. Every object sits inside one grid cell, and with the default
96 px image and 6x6 grid a cell is exactly one 16x16 ViT patch, so patch-level
labels are exact.

Sample i of split s is drawn from random.Random(f"shapes/{s}/{i}"): Python seeds
string seeds through SHA-512, so samples are reproducible across runs and
machines, and different splits never share a seed.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lsg.files import write_json

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOUR_NAMES = tuple(COLOURS)  # label id = index + 1; 0 means an empty cell
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
SUBTASKS = ("count", "relation", "distance", "depth", "colour", "shape", "existence")
RELATIONS = ("left of", "right of", "above", "below")
POPE_KINDS = ("random", "popular", "adversarial")  # negative kinds; positives are "positive"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

N_COUNT_OPTIONS = 5  # chance 1/5, as in CV-Bench count
N_COLOUR_OPTIONS = 4
MAX_TRIES = 1000  # scene rejection-sampling budget; typical success takes < 5 tries
GENERATOR_VERSION = 1  # bump when generation changes so cached splits are rebuilt
PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
CAPTION_PROMPT = "Describe the image concisely."  # one of LLaVA stage-1's brief-caption instructions; answer: describe()


@dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 96  # px, square
    grid: int = 6  # grid x grid cells; cell = image_size / grid = 16 px = one ViT patch
    jitter_px: int = 2  # max centre offset from the cell centre (clamped to keep objects in-cell)
    radius_small: int = 4  # px, half-extent of a small object
    radius_large: int = 7  # px, half-extent of a large object
    min_objects: int = 1
    max_objects: int = 6
    background: tuple[int, int, int] = (128, 128, 128)

    def __post_init__(self) -> None:
        if self.image_size % self.grid:
            raise ValueError(f"image_size={self.image_size} must be divisible by grid={self.grid}")
        if 2 * self.radius_large + 1 > self.cell:
            raise ValueError(f"radius_large={self.radius_large} does not fit in a {self.cell} px cell")
        if not 1 <= self.min_objects <= self.max_objects <= min(self.grid**2, len(COLOURS) * len(SHAPES)):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= cells and colour/shape combos, "
                             f"got {self.min_objects}..{self.max_objects}")

    @property
    def cell(self) -> int:
        return self.image_size // self.grid


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str  # "small" | "large"
    cell: tuple[int, int]  # (row, col)
    centre: tuple[int, int]  # (x, y) px
    radius: int  # px

    @property
    def ref(self) -> str:
        return f"the {self.colour} {self.shape}"


@dataclass
class Scene:
    objects: list[SceneObject] = field(default_factory=list)


def make_scene(rng: random.Random, cfg: ShapesConfig = ShapesConfig(), n_objects: int | None = None) -> Scene:
    """Random scene: objects in distinct cells with unique (colour, shape) pairs.

    n_objects defaults to uniform in [cfg.min_objects, cfg.max_objects].
    Raises ValueError if n_objects exceeds the free cells or colour/shape combos.
    """
    n = rng.randint(cfg.min_objects, cfg.max_objects) if n_objects is None else n_objects
    combos = [(c, s) for c in COLOUR_NAMES for s in SHAPES]
    if n > min(cfg.grid**2, len(combos)):
        raise ValueError(f"cannot place {n} objects")
    objects = []
    for cell_id, (colour, shape) in zip(rng.sample(range(cfg.grid**2), n), rng.sample(combos, n)):
        row, col = divmod(cell_id, cfg.grid)
        size = rng.choice(SIZES)
        r = cfg.radius_small if size == "small" else cfg.radius_large
        half = cfg.cell // 2
        # Clamp jitter so [centre - r, centre + r] stays within the cell's pixels [0, cell - 1].
        lo, hi = max(-cfg.jitter_px, r - half), min(cfg.jitter_px, cfg.cell - 1 - half - r)
        x = col * cfg.cell + half + rng.randint(lo, hi)
        y = row * cfg.cell + half + rng.randint(lo, hi)
        objects.append(SceneObject(colour, shape, size, (row, col), (x, y), r))
    return Scene(objects)


def render(scene: Scene, cfg: ShapesConfig = ShapesConfig()) -> Image.Image:
    """Draw the scene as an RGB image of cfg.image_size^2 px (no antialiasing, so the
    pixel at every object's centre has exactly the object's colour)."""
    img = Image.new("RGB", (cfg.image_size, cfg.image_size), cfg.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        (x, y), r, fill = o.centre, o.radius, COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif o.shape == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return img


def describe(scene: Scene, cfg: ShapesConfig = ShapesConfig()) -> str:
    """A short caption of the scene (LLaVA stage-1 style): the object count, then every object
    in reading order with its size, colour, shape and coarse place, e.g.
    "2 objects: a large red circle at the top left, a small blue square at the bottom centre."
    The grid's rows and columns are split into thirds (top/middle/bottom, left/centre/right)."""
    rows, cols = ("top", "middle", "bottom"), ("left", "centre", "right")
    parts = [f"a {o.size} {o.colour} {o.shape} at the {rows[3 * o.cell[0] // cfg.grid]} {cols[3 * o.cell[1] // cfg.grid]}"
             for o in sorted(scene.objects, key=lambda o: o.cell)]
    n = len(scene.objects)
    return f"{n} object{'s' if n > 1 else ''}: " + ", ".join(parts) + "."


def patch_labels(scene: Scene, cfg: ShapesConfig = ShapesConfig()) -> dict[str, np.ndarray | int]:
    """Per-cell labels, each an int64 array of shape (grid*grid,) in row-major cell order:
    "colour" (0 empty, 1..8 = COLOUR_NAMES index + 1), "shape" (0 empty, 1..4),
    "size" (0 empty, 1 small, 2 large); plus "count" (int, number of objects)."""
    labels = {k: np.zeros(cfg.grid**2, dtype=np.int64) for k in ("colour", "shape", "size")}
    for o in scene.objects:
        idx = o.cell[0] * cfg.grid + o.cell[1]
        labels["colour"][idx] = COLOUR_NAMES.index(o.colour) + 1
        labels["shape"][idx] = SHAPES.index(o.shape) + 1
        labels["size"][idx] = SIZES.index(o.size) + 1
    return {**labels, "count": len(scene.objects)}


# ---------------------------------------------------------------------------------------
# Question makers: (rng, scene, cfg, j) -> (question, options, answer_index, extra) or
# None if the scene cannot pose an unambiguous question; j = per-sub-task sample index,
# used to balance answer content exactly.

def _q_count(rng, scene, cfg, j):
    values = range(cfg.min_objects, cfg.max_objects + 1)
    n = len(scene.objects)
    others = rng.sample([v for v in values if v != n], min(N_COUNT_OPTIONS, len(values)) - 1)
    return "How many objects are in the image?", [str(n)] + [str(v) for v in others], 0, {}


def _relation(a: SceneObject, b: SceneObject, cell: int) -> str | None:
    """Relation of a to b, or None when ambiguous (dominant axis gap < one cell or a tie)."""
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) >= cell and abs(dy) < abs(dx):
        return "left of" if dx < 0 else "right of"
    if abs(dy) >= cell and abs(dx) < abs(dy):
        return "above" if dy < 0 else "below"  # image y grows downwards
    return None


def _q_relation(rng, scene, cfg, j):
    target = RELATIONS[j % len(RELATIONS)]
    pairs = [(a, b) for a in scene.objects for b in scene.objects
             if a is not b and _relation(a, b, cfg.cell) == target]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    return f"Where is {a.ref} relative to {b.ref}?", list(RELATIONS), RELATIONS.index(target), {}


def _dist(a: SceneObject, b: SceneObject) -> float:
    return float(np.hypot(a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]))


def _q_distance(rng, scene, cfg, j):
    objs = scene.objects
    triples = [(x, p, q) for x in objs for k, p in enumerate(objs) for q in objs[k + 1:]
               if x is not p and x is not q and abs(_dist(x, p) - _dist(x, q)) >= cfg.cell]
    if not triples:
        return None
    x, p, q = rng.choice(triples)
    return f"Which object is closer to {x.ref}?", [p.ref, q.ref], int(_dist(x, q) < _dist(x, p)), {}


def _q_depth(rng, scene, cfg, j):
    large = [o for o in scene.objects if o.size == "large"]
    small = [o for o in scene.objects if o.size == "small"]
    if not large or not small:
        return None
    # Under a fixed true object size, the bigger projection is the closer object.
    return "Which object is closer to the camera?", [rng.choice(large).ref, rng.choice(small).ref], 0, {}


def _q_colour(rng, scene, cfg, j):
    unique = [o for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    distractors = rng.sample([c for c in COLOUR_NAMES if c != o.colour], N_COLOUR_OPTIONS - 1)
    return f"What colour is the {o.shape}?", [o.colour] + distractors, 0, {}


def _q_shape(rng, scene, cfg, j):
    unique = [o for o in scene.objects if sum(p.colour == o.colour for p in scene.objects) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    return f"What shape is the {o.colour} object?", list(SHAPES), SHAPES.index(o.shape), {}


def _q_existence(rng, scene, cfg, j):
    # Even j: positive; odd j: negatives cycling random -> popular -> adversarial.
    kind = "positive" if j % 2 == 0 else POPE_KINDS[(j // 2) % len(POPE_KINDS)]
    present = {(o.colour, o.shape) for o in scene.objects}
    colours, shapes = {c for c, _ in present}, {s for _, s in present}
    absent = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in present]
    candidates = {
        "positive": sorted(present),
        "random": absent,
        # Popular: the colour is in the image but the shape is not (distinct from adversarial).
        "popular": [(c, s) for c, s in absent if c in colours and s not in shapes],
        # Adversarial: colour and shape both present, just never together.
        "adversarial": [(c, s) for c, s in absent if c in colours and s in shapes],
    }[kind]
    if not candidates:
        return None
    c, s = rng.choice(candidates)
    article = "an" if c[0] in "aeiou" else "a"
    return f"Is there {article} {c} {s} in the image?", ["Yes", "No"], int(kind != "positive"), {"pope": kind}


QUESTION_MAKERS = {"count": _q_count, "relation": _q_relation, "distance": _q_distance,
                   "depth": _q_depth, "colour": _q_colour, "shape": _q_shape,
                   "existence": _q_existence}
MIN_OBJECTS = {"relation": 2, "distance": 3, "depth": 2}  # fewer objects can never succeed
FIXED_ORDER = {"existence"}  # keep the conventional (A) Yes (B) No; balanced by construction


def format_prompt(question: str, options: list[str]) -> str:
    """Human turn in LLaVA multiple-choice format, starting with the "<image>" tag."""
    lines = [f"({LETTERS[k]}) {opt}" for k, opt in enumerate(options)]
    return "\n".join(["<image>", question, "Options:", *lines, PROMPT_SUFFIX])


def sample_scene(split: str, i: int, cfg: ShapesConfig = ShapesConfig()) -> tuple[Scene, dict]:
    """Scene and LLaVA-format record of sample i of split (sub-task SUBTASKS[i % 7]).

    The scene is rejection-sampled until the sub-task's question is unambiguous.
    Raises RuntimeError if that fails MAX_TRIES times (only for degenerate configs).
    """
    rng = random.Random(f"shapes/{split}/{i}")
    subtask = SUBTASKS[i % len(SUBTASKS)]
    lo = max(cfg.min_objects, MIN_OBJECTS.get(subtask, 1))
    if lo > cfg.max_objects:
        raise RuntimeError(f"sub-task {subtask!r} needs >= {lo} objects but max_objects={cfg.max_objects}")
    for _ in range(MAX_TRIES):
        scene = make_scene(rng, cfg, rng.randint(lo, cfg.max_objects))
        qa = QUESTION_MAKERS[subtask](rng, scene, cfg, i // len(SUBTASKS))
        if qa is not None:
            break
    else:
        raise RuntimeError(f"could not generate a {subtask!r} question for {split}/{i} in {MAX_TRIES} tries")
    return scene, _record(rng, f"{split}_{i:06d}", subtask, *qa)


def _record(rng: random.Random, name: str, subtask: str, question: str, options: list[str], answer: int,
            extra: dict) -> dict:
    """LLaVA-format record of one question; options shuffled by rng unless the sub-task's
    order is fixed."""
    order = list(range(len(options)))
    if subtask not in FIXED_ORDER:
        rng.shuffle(order)
    options = [options[k] for k in order]
    return {
        "id": f"shapes_{name}",
        "image": f"images/{name}.png",
        "conversations": [{"from": "human", "value": format_prompt(question, options)},
                          {"from": "gpt", "value": LETTERS[order.index(answer)]}],
        "subtask": subtask,
        "options": options,
        **extra,
    }


def scene_questions(split: str, i: int, cfg: ShapesConfig = ShapesConfig()) -> tuple[Scene, list[dict]]:
    """Scene i of `split`'s multi-question stream and one record per sub-task it can pose
    unambiguously (in SUBTASKS order), as LLaVA's multi-turn training conversations ask
    several questions about one image.

    The stream's seeds ("shapes/{split}/multi/{i}") never meet `sample_scene`'s, and the
    object count is uniform in [cfg.min_objects, cfg.max_objects] as there. Sub-task
    question index j = i keeps the per-sub-task balancing of `sample_scene`.
    """
    rng = random.Random(f"shapes/{split}/multi/{i}")
    scene = make_scene(rng, cfg)
    records = []
    for subtask in SUBTASKS:
        qa = QUESTION_MAKERS[subtask](rng, scene, cfg, i)
        if qa is not None:
            records.append(_record(rng, f"{split}_multi_{i:06d}_{subtask}", subtask, *qa))
    return scene, records


def generate_scene_sample(split: str, i: int, cfg: ShapesConfig = ShapesConfig()
                          ) -> tuple[Image.Image, dict, dict[str, np.ndarray | int]]:
    """In-memory sample i of split: (RGB image, LLaVA record, patch_labels)."""
    scene, record = sample_scene(split, i, cfg)
    return render(scene, cfg), record, patch_labels(scene, cfg)


def generate_split(split: str, n: int, out_dir: Path, cfg: ShapesConfig = ShapesConfig()) -> Path:
    """Write out_dir/images/{split}_{i:06d}.png and out_dir/{split}.json (LLaVA format,
    image paths relative to out_dir) for i in range(n); return the JSON path.

    Skipped if {split}.meta.json records the same n, config and generator version.
    Raises ValueError for n < 0.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out_dir = Path(out_dir)
    json_path, meta_path = out_dir / f"{split}.json", out_dir / f"{split}.meta.json"
    # Round-trip through JSON so tuples compare equal to the lists read back from disk.
    meta = json.loads(json.dumps({"n": n, "config": asdict(cfg), "version": GENERATOR_VERSION}))
    if json_path.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        return json_path
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        image, record, _ = generate_scene_sample(split, i, cfg)
        image.save(out_dir / record["image"], compress_level=1)  # tiny images: speed over size
        records.append(record)
    write_json(json_path, records, indent=1)  # atomic: an interrupted run never leaves a truncated JSON
    write_json(meta_path, meta, indent=1)
    return json_path
