"""Tiny, faithful fakes of the raw CARS-196 / CUB-200-2011 / SOP / In-shop downloads (see specs/datasets.md).

``make_fake_dataset(root, name)`` writes ``root/<name>`` in the exact raw layout (a few dozen KB, < 0.5 s);
with ``process=True`` it also runs the preprocessing so ``root/<name>/<crop_type>_index.json`` exists.
``EXPECTED`` holds what the uncropped index of each fake must contain, ``CROPS`` the clipped crop boxes.

Every fake image is a coordinate gradient (red = x, green = y), so a crop's top-left pixel tells where it was cut.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import scipy.io
from PIL import Image

# ---- CARS-196: (file, (x1, y1, x2, y2), class, official test flag, image size) ---------------------------------
CAR_RECORDS = [
    ("car_ims/000001.jpg", (2, 3, 30, 20), 1, 1, (40, 30)),
    ("car_ims/000002.jpg", (0, 0, 40, 30), 98, 0, (40, 30)),
    ("car_ims/000003.jpg", (250, 7, 300, 100), 99, 0, (320, 120)),  # x2 > 255 -> stored as uint16
    ("car_ims/000004.jpg", (5, 5, 60, 25), 100, 1, (40, 30)),  # x2 outside the 40 px wide image
    ("car_ims/000005.jpg", (1, 1, 10, 10), 196, 0, (20, 20)),
    ("car_ims/000006.jpg", (3, 2, 20, 18), 2, 1, (24, 22)),
]
CAR_CLASS_NAMES = [f"Fake Make Model {i} 2012" for i in range(1, 197)]
CAR_CLASS_NAMES[172] = "Ram C/V Cargo Van Minivan 2012"

# ---- CUB-200-2011: (relative to images/, class id, "x y w h" as written, mode, size) ----------------------------
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross", "004.Groove_billed_Ani"]
CUB_RECORDS = [
    ("001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg", 1, "10.0 5.0 30.0 20.0", "RGB", (60, 50)),
    ("001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg", 1, "0.0 0.0 20.0 10.0", "L", (30, 20)),
    ("002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg", 2, "40.0 30.0 50.0 50.0", "RGB", (60, 50)),
    ("002.Laysan_Albatross/Shared_Name_0001.jpg", 2, "1.0 1.0 8.0 8.0", "RGB", (16, 16)),
    ("003.Sooty_Albatross/Sooty_Albatross_0031_1066.jpg", 3, "4.0 6.0 12.0 9.0", "CMYK", (32, 24)),
    ("003.Sooty_Albatross/Shared_Name_0001.jpg", 3, "2.0 2.0 10.0 12.0", "RGB", (20, 20)),
    ("004.Groove_billed_Ani/Groove_Billed_Ani_0002_1670.jpg", 4, "1.0 1.0 10.0 10.0", "CORRUPT", (30, 30)),
    ("004.Groove_billed_Ani/Groove_Billed_Ani_0003_1671.jpg", 4, "2.5 3.7 20.2 10.9", "RGB", (30, 20)),
]
CUB_CORRUPT = "images/004.Groove_billed_Ani/Groove_Billed_Ani_0002_1670.jpg"

# ---- SOP: (split, class id, super class id, path); the last file is listed but missing on disk ---------------
SOP_RECORDS = [
    ("train", 1, 1, "bicycle_final/111085122871_0.JPG"),
    ("train", 1, 1, "bicycle_final/111085122871_1.JPG"),
    ("train", 2, 3, "chair_final/222222222222_0.JPG"),
    ("test", 3, 1, "bicycle_final/333333333333_0.JPG"),
    ("test", 4, 3, "chair_final/444444444444_0.JPG"),
    ("test", 4, 3, "chair_final/444444444444_1.JPG"),
]
SOP_MISSING = "chair_final/444444444444_1.JPG"

# ---- In-shop: (image name, item id, status); train and query/gallery items are disjoint -----------------------
ISC_RECORDS = [
    ("img/WOMEN/Dresses/id_00000001/02_1_front.jpg", "id_00000001", "train"),
    ("img/WOMEN/Dresses/id_00000001/02_2_side.jpg", "id_00000001", "train"),
    ("img/MEN/Denim/id_00000007/01_1_front.jpg", "id_00000007", "train"),
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "query"),
    ("img/WOMEN/Dresses/id_00000002/02_4_full.jpg", "id_00000002", "gallery"),
    ("img/MEN/Tees_Tanks/id_00000003/12_3_back.jpg", "id_00000003", "query"),
    ("img/MEN/Tees_Tanks/id_00000003/12_7_additional.jpg", "id_00000003", "gallery"),
    ("img/MEN/Tees_Tanks/id_00000003/01_1_front.jpg", "id_00000003", "gallery"),
]


def _cub_box(text: str) -> Tuple[int, int, int, int]:
    x, y, w, h = (int(float(v)) for v in text.split())
    return x, y, x + w, y + h


def _clip(box, size):
    return (
        min(max(box[0], 0), size[0]),
        min(max(box[1], 0), size[1]),
        min(max(box[2], 0), size[0]),
        min(max(box[3], 0), size[1]),
    )


EXPECTED: Dict[str, Dict[str, List[List[str]]]] = {
    "car": {
        "train": [[p, str(c)] for p, _, c, _, _ in CAR_RECORDS if c <= 98],
        "test": [[p, str(c)] for p, _, c, _, _ in CAR_RECORDS if c > 98],
    },
    "cub": {
        "train": [[f"images/{p}", str(c)] for p, c, _, _, _ in CUB_RECORDS if c <= 2],
        "test": [[f"images/{p}", str(c)] for p, c, _, m, _ in CUB_RECORDS if c > 2 and m != "CORRUPT"],
    },
    "sop": {
        split: [[p, str(c)] for s, c, _, p in SOP_RECORDS if s == split and p != SOP_MISSING]
        for split in ("train", "test")
    },
    "isc": {
        split: [[f"Img/{p}", item] for p, item, s in ISC_RECORDS if s == split]
        for split in ("train", "query", "gallery")
    },
}
CROPS: Dict[str, Dict[str, Tuple[int, int, int, int]]] = {  # relative original path -> clipped crop box
    "car": {p: _clip(b, size) for p, b, _, _, size in CAR_RECORDS},
    "cub": {f"images/{p}": _clip(_cub_box(b), size) for p, _, b, m, size in CUB_RECORDS if m != "CORRUPT"},
}


def gradient_image(size: Tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Red = x, green = y (mod 256): a crop's pixels reveal its offset in the original."""
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    rgb = np.stack([xs % 256, ys % 256, np.full_like(xs, 128)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def _save(path: Path, size: Tuple[int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "CORRUPT":  # a JPEG cut in half: the header opens, decoding fails
        gradient_image(size).save(path, quality=95)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return
    gradient_image(size, mode).save(path, format="JPEG", quality=95, subsampling=0)


def _mat_int(value: int) -> np.ndarray:
    return np.array([[value]], dtype=np.uint8 if value < 256 else np.uint16)


def write_car(root: Path) -> None:
    """cars_annos.mat (1xN struct array, MATLAB-style compact ints) + car_ims/."""
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annotations = np.zeros((1, len(CAR_RECORDS)), dtype=[(f, "O") for f in fields])
    for i, (path, box, cls, test, size) in enumerate(CAR_RECORDS):
        annotations[0, i] = (path, *(_mat_int(v) for v in box), _mat_int(cls), _mat_int(test))
        _save(root / path, size)
    names = np.empty((1, len(CAR_CLASS_NAMES)), dtype=object)
    names[0, :] = CAR_CLASS_NAMES
    scipy.io.savemat(str(root / "cars_annos.mat"), {"annotations": annotations, "class_names": names})


def write_cub(root: Path) -> None:
    """The contents of CUB_200_2011/: five id-ordered text files, README and images/<NNN.Name>/."""
    ids = range(1, len(CUB_RECORDS) + 1)
    files = {
        "images.txt": [f"{i} {r[0]}" for i, r in zip(ids, CUB_RECORDS)],
        "image_class_labels.txt": [f"{i} {r[1]}" for i, r in zip(ids, CUB_RECORDS)],
        "train_test_split.txt": [f"{i} {i % 2}" for i in ids],  # official split: ignored by the DML split
        "classes.txt": [f"{i} {name}" for i, name in enumerate(CUB_CLASSES, 1)],
        "bounding_boxes.txt": [f"{i} {r[2]}" for i, r in zip(ids, CUB_RECORDS)],
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (root / name).write_text("".join(f"{line}\n" for line in lines))
    (root / "README").write_text("Fake CUB-200-2011 for tests.\n")
    for rel, _, _, mode, size in CUB_RECORDS:
        _save(root / "images" / rel, size, mode)


def write_sop(root: Path) -> None:
    """The contents of Stanford_Online_Products/: Ebay_{info,train,test}.txt with header + <cat>_final/*.JPG."""
    header = "image_id class_id super_class_id path"
    rows = {"train": [header], "test": [header]}
    for image_id, (split, cls, sup, path) in enumerate(SOP_RECORDS, 1):
        rows[split].append(f"{image_id} {cls} {sup} {path}")
        if path != SOP_MISSING:
            _save(root / path, (24, 18))
    (root / "Ebay_train.txt").write_text("".join(f"{line}\n" for line in rows["train"]))
    (root / "Ebay_test.txt").write_text("".join(f"{line}\n" for line in rows["test"]))
    (root / "Ebay_info.txt").write_text("".join(f"{line}\n" for line in rows["train"] + rows["test"][1:]))


def write_isc(root: Path) -> None:
    """Eval/list_eval_partition.txt (count, header, space-padded rows with trailing spaces) + Img/img/..."""
    lines = [str(len(ISC_RECORDS)), "image_name item_id evaluation_status"]
    lines += [f"{name:<70} {item} {status:<8}" + " " * (i % 3) for i, (name, item, status) in enumerate(ISC_RECORDS)]
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    (root / "Eval" / "list_eval_partition.txt").write_text("".join(f"{line}\n" for line in lines))
    bbox = [str(len(ISC_RECORDS)), "image_name  clothes_type  pose_type  x_1  y_1  x_2  y_2"]
    bbox += [f"{name}  3  1  002  003  020  021" for name, _, _ in ISC_RECORDS]
    (root / "Anno").mkdir(parents=True, exist_ok=True)
    (root / "Anno" / "list_bbox_inshop.txt").write_text("".join(f"{line}\n" for line in bbox))
    for name, _, _ in ISC_RECORDS:
        _save(root / "Img" / name, (24, 24))


WRITERS = {"car": write_car, "cub": write_cub, "sop": write_sop, "isc": write_isc}


def make_fake_dataset(root: Path, name: str, process: bool = False, num_workers: Optional[int] = 1) -> Path:
    """Write a tiny raw dataset ``root/<name>`` (car, cub, sop, isc, or demo = a 2-images-per-class demo);
    with ``process=True`` also build its indexes. Returns ``root/<name>``."""
    root = Path(root)
    if name == "demo":
        from common.data.demo import generate_demo

        generate_demo(root / "demo", images_per_class=2)
    else:
        WRITERS[name](root / name)
    if process:
        from common.data.prepare import prepare

        prepare(root, [name], num_workers=num_workers)
    return root / name
