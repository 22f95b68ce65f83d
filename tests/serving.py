"""A small photo collection (demo-like shapes, a few classes) and a gallery database of it, for the catalogue and
server tests: embedded by an untrained tiny CGD run, so everything stays in seconds on a CPU."""

from pathlib import Path
from typing import List

import numpy as np
from PIL import Image

from common.data.demo import demo_classes, render
from tests.tiny import CGD_RUN, make_untrained_cgd_run

RUN = CGD_RUN


def demo_photos(folder: Path, classes: int = 4, per_class: int = 5, size: int = 48, seed: int = 7) -> List[str]:
    """``folder/<class>/<n>.jpg`` for the first ``classes`` demo classes; returns the sorted paths."""
    paths = []
    for c, (shape, pattern) in enumerate(demo_classes()[:classes]):
        (Path(folder) / f"{shape}_{pattern}").mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            pixels, _ = render(shape, pattern, np.random.default_rng([seed, c, n]), size)
            path = Path(folder) / f"{shape}_{pattern}" / f"{n:02d}.jpg"
            Image.fromarray(pixels).save(path, quality=92)
            paths.append(str(path))
    return sorted(paths)


def gallery_database(tmp_path: Path, source: str, name: str = "mine_data_base.pth", *extra: str) -> Path:
    """``inference.py --gallery source --save_data_base tmp_path/name`` with the untrained CGD run."""
    from cgd import inference

    folder = tmp_path / "results" / "cgd"
    if not (folder / f"{RUN}_model.pth").is_file():
        make_untrained_cgd_run(folder)
    target = tmp_path / name
    argv = ["--data_base", f"{RUN}_data_base.pth", "--gallery", str(source), "--save_data_base", str(target)]
    inference.main(inference.get_args_parser().parse_args(argv + ["--num_workers", "0", *extra]))
    return target


def infer(*args: str):
    from cgd import inference

    return inference.main(inference.get_args_parser().parse_args(list(args)))
