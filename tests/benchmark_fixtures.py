"""Small copies of each benchmark in its hub repo's exact layout and schema.

Column names, feature types, image encoding and answer formats follow each dataset card
(docs/benchmarks.md); files sit where the hub repo keeps them, with the card's `configs:`
block, so `datasets.load_dataset(folder, config, split=...)` reads them exactly as it reads
the hub. Rows are few and chosen so scores can be computed by hand in tests/test_benchmarks.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import datasets
from datasets import Features, Image, Sequence, Value
from PIL import Image as PILImage


def image_bytes(seed: int, fmt: str = "PNG", size: int = 24) -> dict:
    """An image feature value: `{"bytes": encoded image, "path": None}`, a colour per seed."""
    buffer = io.BytesIO()
    PILImage.new("RGB", (size, size), ((37 * seed) % 256, (91 * seed) % 256, (53 * seed) % 256)).save(buffer, fmt)
    return {"bytes": buffer.getvalue(), "path": None}


def write_card(folder: Path, configs: dict[str, dict[str, str | list[str]]]) -> None:
    """README.md with the card's `configs:` block: config -> {split: data file pattern(s)}."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        for split, paths in splits.items():
            paths = [paths] if isinstance(paths, str) else paths
            lines += [f"  - split: {split}", "    path:"] + [f"    - {p}" for p in paths]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text("\n".join(lines + ["---", ""]))


def write_parquet(rows: list[dict], features: Features, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))


MMSTAR_FEATURES = Features({
    "index": Value("int64"), "question": Value("string"), "image": Image(), "answer": Value("string"),
    "category": Value("string"), "l2_category": Value("string"),
    "meta_info": {"source": Value("string"), "split": Value("string"), "image_path": Value("string")},
})
MMSTAR_ROWS = [  # (category, l2_category, answer)
    ("coarse perception", "image scene and topic", "A"),
    ("fine-grained perception", "object counting", "B"),
    ("instance reasoning", "single-instance reasoning", "C"),
    ("logical reasoning", "diagram reasoning", "D"),
    ("math", "geometry", "A"),
    ("science & technology", "biology & chemistry & physics", "B"),
]


def mmstar(folder: Path) -> Path:
    """Lin-Chen/MMStar: `mmstar.parquet` at the repo root, config `val`, split `val`."""
    rows = [{"index": i, "question": f"Which option describe the object in image {i}?\nOptions: A: The red one, "
                                     f"B: The blue one, C: The green one, D: The one on the left, with a hat.",
             "image": image_bytes(i, "JPEG"), "answer": answer, "category": category, "l2_category": l2,
             "meta_info": {"source": "MMBench", "split": "val", "image_path": f"images/{i}.jpg"}}
            for i, (category, l2, answer) in enumerate(MMSTAR_ROWS)]
    write_parquet(rows, MMSTAR_FEATURES, folder / "mmstar.parquet")
    write_card(folder, {"val": {"val": "mmstar.parquet"}})
    return folder


CVBENCH_FEATURES = Features({
    "idx": Value("int64"), "type": Value("string"), "task": Value("string"), "image": Image(),
    "question": Value("string"), "choices": Sequence(Value("string")), "answer": Value("string"),
    "prompt": Value("string"), "filename": Value("string"), "source": Value("string"),
    "source_dataset": Value("string"), "source_filename": Value("string"), "target_class": Value("string"),
    "target_size": Value("int64"), "bbox": Sequence(Sequence(Value("float64"))),
})
CVBENCH_ROWS = [  # (type, task, source, choices, answer)
    ("2D", "Count", "ADE20K", ["3", "2", "1", "0"], "(C)"),
    ("2D", "Count", "ADE20K", ["3", "2", "1", "0"], "(A)"),
    ("2D", "Relation", "COCO", ["left", "right"], "(B)"),
    ("2D", "Relation", "COCO", ["left", "right"], "(A)"),
    ("3D", "Depth", "Omni3D", ["lamp", "chair"], "(A)"),
    ("3D", "Distance", "Omni3D", ["table", "sofa"], "(B)"),
]


def cvbench(folder: Path) -> Path:
    """nyu-visionx/CV-Bench: `test_2d.parquet` and `test_3d.parquet`; configs default (both), 2D, 3D."""
    rows = []
    for i, (kind, task, source, choices, answer) in enumerate(CVBENCH_ROWS):
        question = f"How many organs are in image {i}?" if task == "Count" else f"Which is closer, question {i}?"
        options = "\n".join(f"({chr(65 + k)}) {c}" for k, c in enumerate(choices))
        rows.append({"idx": i, "type": kind, "task": task, "image": image_bytes(i), "question": question,
                     "choices": choices, "answer": answer,
                     "prompt": f"{question} Select from the following choices.\n{options}",
                     "filename": f"img/{kind}/{task.lower()}/{source.lower()}_{i}.png", "source": source,
                     "source_dataset": f"{source} Validation Set", "source_filename": f"{i}.jpg",
                     "target_class": "person" if source == "COCO" else None,
                     "target_size": 1200 if source == "COCO" else None,
                     "bbox": [[1.0, 2.0, 3.0, 4.0]] if source == "Omni3D" else None})
    write_parquet([r for r in rows if r["type"] == "2D"], CVBENCH_FEATURES, folder / "test_2d.parquet")
    write_parquet([r for r in rows if r["type"] == "3D"], CVBENCH_FEATURES, folder / "test_3d.parquet")
    write_card(folder, {"default": {"test": ["test_2d.parquet", "test_3d.parquet"]}, "2D": {"test": "test_2d.parquet"},
                        "3D": {"test": "test_3d.parquet"}})
    return folder


POPE_FEATURES = Features({
    "id": Value("string"), "question_id": Value("string"), "question": Value("string"), "answer": Value("string"),
    "image_source": Value("string"), "image": Image(), "category": Value("string"),
})
POPE_ROWS = [  # (category, object, answer)
    ("adversarial", "snowboard", "yes"), ("adversarial", "dog", "no"), ("adversarial", "car", "yes"),
    ("adversarial", "cup", "no"), ("random", "person", "yes"), ("random", "bus", "no"),
]


def pope(folder: Path) -> Path:
    """lmms-lab/POPE: `data/test-00000-of-00001.parquet`, config default, split test."""
    rows = [{"id": str(i), "question_id": str(i + 1), "question": f"Is there a {obj} in the image?", "answer": answer,
             "image_source": f"COCO_val2014_{i:012d}", "image": image_bytes(i, "JPEG"), "category": category}
            for i, (category, obj, answer) in enumerate(POPE_ROWS)]
    write_parquet(rows, POPE_FEATURES, folder / "data" / "test-00000-of-00001.parquet")
    write_card(folder, {"default": {"test": "data/test-*"}})
    return folder


MME_FEATURES = Features({
    "question_id": Value("string"), "image": Image(), "question": Value("string"), "answer": Value("string"),
    "category": Value("string"),
})
MME_ROWS = [  # (category, image, answer): two questions per image, one Yes and one No
    ("existence", "existence/000000006040.jpg", "Yes"), ("existence", "existence/000000006040.jpg", "No"),
    ("existence", "existence/000000018150.jpg", "Yes"), ("existence", "existence/000000018150.jpg", "No"),
    ("code_reasoning", "code_reasoning/0020.png", "Yes"), ("code_reasoning", "code_reasoning/0020.png", "No"),
]


def mme(folder: Path) -> Path:
    """lmms-lab/MME: `data/test-00000-of-00001.parquet`, split test."""
    rows = [{"question_id": image, "image": image_bytes(i // 2), "question": f"Is there a thing {i}? Please answer "
             f"yes or no.", "answer": answer, "category": category} for i, (category, image, answer) in enumerate(MME_ROWS)]
    write_parquet(rows, MME_FEATURES, folder / "data" / "test-00000-of-00001.parquet")
    write_card(folder, {"default": {"test": "data/test-*"}})
    return folder


OCRBENCH_FEATURES = Features({
    "dataset": Value("string"), "question": Value("string"), "question_type": Value("string"),
    "answer": Sequence(Value("string")), "image": Image(),
})
OCRBENCH_ROWS = [  # (dataset, question_type, answers)
    ("IIIT5K", "Regular Text Recognition", ["CENTRE"]),
    ("WordArt", "Artistic Text Recognition", ["ANTONIOS", "ANTONIO'S"]),
    ("docVQA", "Doc-oriented VQA", ["12 May"]),
    ("HME100k", "Handwritten Mathematical Expression Recognition", ["x ^ { 2 } + 1"]),
    ("FUNSD", "Key Information Extraction", ["Total"]),
]


def ocrbench(folder: Path) -> Path:
    """echo840/OCRBench: `data/test-00000-of-00001.parquet`, split test; JPEG bytes, answers as lists."""
    rows = [{"dataset": ds, "question": "what is written in the image?", "question_type": qt, "answer": answers,
             "image": {"bytes": image_bytes(i, "JPEG")["bytes"], "path": ""}}
            for i, (ds, qt, answers) in enumerate(OCRBENCH_ROWS)]
    write_parquet(rows, OCRBENCH_FEATURES, folder / "data" / "test-00000-of-00001.parquet")
    write_card(folder, {"default": {"test": "data/test-*"}})
    return folder


MATHVISTA_FEATURES = Features({
    "pid": Value("string"), "question": Value("string"), "image": Value("string"), "decoded_image": Image(),
    "choices": Sequence(Value("string")), "unit": Value("string"), "precision": Value("float64"),
    "answer": Value("string"), "question_type": Value("string"), "answer_type": Value("string"),
    "metadata": {"category": Value("string"), "context": Value("string"), "grade": Value("string"),
                 "img_height": Value("int64"), "img_width": Value("int64"), "language": Value("string"),
                 "skills": Sequence(Value("string")), "source": Value("string"), "split": Value("string"),
                 "task": Value("string")},
    "query": Value("string"),
})
MATHVISTA_ROWS = [  # (question_type, answer_type, choices, precision, answer, task)
    ("multi_choice", "text", ["97", "102", "107", "122"], None, "107", "geometry problem solving"),
    ("multi_choice", "text", ["Yes", "No"], None, "No", "figure question answering"),
    ("free_form", "integer", None, None, "1000", "math word problem"),
    ("free_form", "float", None, 1.0, "1.2", "figure question answering"),
    ("free_form", "float", None, 2.0, "0.35", "textbook question answering"),
    ("free_form", "list", None, None, "[1, 2, 3]", "visual question answering"),
]
HINTS = {"text": "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
         "integer": "Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, "
                    "3, at the end."}


def mathvista(folder: Path) -> Path:
    """AI4Math/MathVista: `data/testmini-00000-of-00001.parquet`, split testmini; `image` a path,
    `decoded_image` the pixels."""
    rows = []
    for i, (qtype, atype, choices, precision, answer, task) in enumerate(MATHVISTA_ROWS):
        question = f"Question {i}: find the value."
        query = f"Hint: {HINTS.get(atype, 'Please answer the question.')}\nQuestion: {question}"
        if choices:
            query += "\nChoices:\n" + "\n".join(f"({chr(65 + k)}) {c}" for k, c in enumerate(choices))
        rows.append({"pid": str(i + 1), "question": question, "image": f"images/{i + 1}.jpg",
                     "decoded_image": image_bytes(i), "choices": choices, "unit": None, "precision": precision,
                     "answer": answer, "question_type": qtype, "answer_type": atype,
                     "metadata": {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school",
                                  "img_height": 24, "img_width": 24, "language": "english",
                                  "skills": ["geometry reasoning"], "source": "Geometry3K", "split": "testmini",
                                  "task": task},
                     "query": query})
    write_parquet(rows, MATHVISTA_FEATURES, folder / "data" / "testmini-00000-of-00001.parquet")
    write_card(folder, {"default": {"testmini": "data/testmini-*"}})
    return folder


BUILDERS = {"mmstar": mmstar, "cvbench": cvbench, "pope": pope, "mme": mme, "ocrbench": ocrbench,
            "mathvista": mathvista}
