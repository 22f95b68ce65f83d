"""Hostile data: writes that stay inside the dataset folder, every image mode decoded against numpy, EXIF
orientation, the pixel limit (one skipped image, one error line as a query), and unreadable text files."""

import shutil
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import data_utils
from cgd import inference
from common import errors
from common.data.datasets import RetrievalDataset
from common.data.images import ENV_MAX_PIXELS, ImageError, ImageTooLarge, open_image
from common.data.own import prepare_custom, read_custom_csv, read_custom_folder
from common.data.prepare import prepare
from common.data.verify import _check_image
from common.database import load_database
from common.errors import UserError
from tests.fakes import make_fake_dataset
from tests.tiny import CGD_RUN, make_tiny_processed, make_untrained_cgd_run


def cli(capsys, main, parser, *argv):
    """A script's __main__ path (argparse + common.errors.run_cli) in-process: exit code and stderr."""
    code = 0
    try:
        errors.run_cli(main, parser.parse_args([str(a) for a in argv]))
    except SystemExit as e:
        code = e.code
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


def assert_one_error_line(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def data_utils_cli(capsys, *argv):
    return cli(capsys, data_utils.main, data_utils.get_args_parser(), "--num_workers", 1, *argv)


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- writes stay inside


CUB_CROP = "cropped/images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"


@pytest.fixture
def outside(tmp_path):
    """A folder outside the data folder holding sentinels where crops would land if links were followed."""
    folder = tmp_path / "outside"
    for rel in (CUB_CROP, CUB_CROP.split("/", 1)[1], CUB_CROP.split("/", 2)[2], CUB_CROP.rsplit("/", 1)[1]):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"sentinel: must stay byte-identical")
    return folder


@pytest.mark.parametrize("link", ["cropped", "cropped/images", "cropped/images/001.Black_footed_Albatross"])
def test_a_link_out_of_the_crop_tree_is_refused_and_nothing_outside_changes(tmp_path, capsys, outside, link):
    data = tmp_path / "data"
    root = make_fake_dataset(data, "cub")
    target = {
        "cropped": outside,
        "cropped/images": outside / "images",
        "cropped/images/001.Black_footed_Albatross": outside,
    }[link]
    (root / link).parent.mkdir(parents=True, exist_ok=True)
    (root / link).symlink_to(target, target_is_directory=True)
    before = files_of(outside)
    result = data_utils_cli(capsys, "--data_path", data, "--data_name", "cub")
    assert_one_error_line(result, str(root / link), "outside the dataset folder")
    assert files_of(outside) == before
    assert not (root / "cropped_index.json").exists()


def test_the_worker_itself_never_writes_through_a_link(tmp_path, outside):
    """Second line of defence (a link made after the check): the crop is one skipped image, nothing written."""
    root = make_fake_dataset(tmp_path / "data", "cub")
    base = root.resolve()
    (root / "cropped").symlink_to(outside, target_is_directory=True)
    before = files_of(outside)
    src = root / "images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
    reason = _check_image(("x.jpg", src, base / CUB_CROP, (1, 1, 9, 9), True, None, base))
    assert reason is not None and "OutsideDataset" in reason and str(outside) in reason
    assert files_of(outside) == before


def test_links_at_file_names_are_replaced_never_followed(tmp_path, outside):
    """A crop or an index that is a link to an outside file: the link is replaced by our file inside the folder."""
    data = tmp_path / "data"
    root = make_fake_dataset(data, "cub")
    sentinel = outside / CUB_CROP.rsplit("/", 1)[1]
    (root / CUB_CROP).parent.mkdir(parents=True)
    (root / CUB_CROP).symlink_to(sentinel)
    (root / "cropped_index.json").symlink_to(outside / "index.json")
    before = files_of(outside)
    prepare(data, ["cub"], num_workers=1)
    assert files_of(outside) == before and not (outside / "index.json").exists()
    for path in (root / CUB_CROP, root / "cropped_index.json"):
        assert path.is_file() and not path.is_symlink()
    assert Image.open(root / CUB_CROP).size == (30, 20)  # the box x 10, y 5, w 30, h 20


def test_custom_crops_refuse_a_link_out(tmp_path, capsys, outside):
    data, photos = tmp_path / "data", tmp_path / "photos"
    rows = []
    for cls, split in (("a", "train"), ("b", "train"), ("c", "test"), ("d", "test")):
        (photos / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 12), (40 * i, 80, 120)).save(photos / cls / f"{i}.png")
            rows.append(f"{cls}/{i}.png,{cls},{split},1,1,9,9")
    (photos / "df.csv").write_text("path,label,split,x_1,y_1,x_2,y_2\n" + "\n".join(rows) + "\n")
    (data / "mine").mkdir(parents=True)
    (data / "mine" / "cropped").symlink_to(outside, target_is_directory=True)
    before = files_of(outside)
    result = data_utils_cli(capsys, "--data_path", data, "--data_name", "mine", "--from_csv", photos / "df.csv")
    assert_one_error_line(result, str(data / "mine" / "cropped"), "outside the dataset folder")
    assert files_of(outside) == before


def test_demo_generation_refuses_a_link_out(tmp_path, capsys, outside):
    data = tmp_path / "data"
    (data / "demo").mkdir(parents=True)
    (data / "demo" / "images").symlink_to(outside, target_is_directory=True)
    before = files_of(outside)
    result = data_utils_cli(capsys, "--data_path", data, "--data_name", "demo")
    assert_one_error_line(result, str(data.resolve() / "demo" / "images"), "outside")
    assert files_of(outside) == before


def test_written_files_get_the_usual_permissions(tmp_path):
    root = make_fake_dataset(tmp_path / "data", "cub", process=True)
    plain = tmp_path / "plain"  # what any other file written by the user gets under the process umask
    plain.write_text("x")
    umask = 0o777 & ~plain.stat().st_mode
    for path in (root / CUB_CROP, root / "cropped_index.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_data_path_that_is_a_file_is_refused_at_parse_time(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for path in (a_file, a_file / "sub"):
        with pytest.raises(SystemExit) as e:
            data_utils.get_args_parser().parse_args(["--data_path", str(path), "--data_name", "demo"])
        assert e.value.code == 2
        assert f"{a_file} is a file, not a folder" in capsys.readouterr().err
    assert a_file.read_text() == "x"


# ------------------------------------------------------------------------------------- image modes


def _save(tmp_path: Path, img: Image.Image, name: str, **kw) -> str:
    path = tmp_path / name
    img.save(path, **kw)
    return str(path)


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Independent statement of alpha compositing onto white, rounded to the nearest grey level."""
    a = alpha.astype(np.float64)[..., None] / 255
    return np.floor(colour.astype(np.float64) * a + 255 * (1 - a) + 0.5).astype(np.uint8)


RNG = np.random.default_rng(7)


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path, fmt):
    values = np.concatenate([[0, 1, 128, 129, 257, 32767, 65534, 65535], RNG.integers(0, 65536, 64)]).astype(np.uint16)
    values = values.reshape(8, 9)
    path = _save(tmp_path, Image.fromarray(values), f"g16.{fmt}")
    assert Image.open(path).mode.startswith("I;16")
    out = np.asarray(open_image(path))
    assert np.array_equal(out, _rgb(np.round(values / 257.0).astype(np.uint8)))  # v / 257 is never x.5
    assert out.mean() < 200  # Pillow's own convert clips: almost every pixel would be 255


def test_32_bit_integer_images(tmp_path):
    """I: 16-bit content (Pillow reads 16-bit PGM as I) by the 16-bit rule; anything else stretched min..max."""
    values = RNG.integers(0, 65536, (6, 7)).astype(">u2")
    pgm = tmp_path / "g16.pgm"
    pgm.write_bytes(b"P5\n7 6\n65535\n" + values.tobytes())
    assert Image.open(pgm).mode == "I"
    assert np.array_equal(np.asarray(open_image(str(pgm))), _rgb(np.round(values.astype(float) / 257).astype(np.uint8)))
    wide = np.array([[-70000, 0, 5], [100000, 123456, 7]], dtype=np.int32)
    path = _save(tmp_path, Image.fromarray(wide), "i32.tif")
    expected = np.floor((wide - wide.min()) * 255 / (wide.max() - wide.min()) + 0.5).astype(np.uint8)
    assert np.array_equal(np.asarray(open_image(path)), _rgb(expected))


def test_float_images(tmp_path):
    unit = np.concatenate([[0.0, 1.0, 0.25], RNG.uniform(0, 1, 33)]).astype(np.float32).reshape(4, 9)
    out = np.asarray(open_image(_save(tmp_path, Image.fromarray(unit), "unit.tif")))
    assert np.array_equal(out, _rgb(np.floor(unit.astype(np.float64) * 255 + 0.5).astype(np.uint8)))
    wide = np.array([[-3.0, 0.0, np.nan], [10.0, 2.5, np.inf]], dtype=np.float32)
    out = np.asarray(open_image(_save(tmp_path, Image.fromarray(wide), "wide.tif")))
    lo, hi = -3.0, 10.0
    expected = np.floor((np.nan_to_num(wide, nan=lo, posinf=lo) - lo) * 255 / (hi - lo) + 0.5).astype(np.uint8)
    expected[0, 2] = expected[1, 2] = 0  # non-finite values are black
    assert np.array_equal(out, _rgb(expected))


def test_alpha_modes_are_composited_onto_white(tmp_path):
    rgba = RNG.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    rgba[0, :, 3], rgba[1, :, 3] = 0, 255
    out = np.asarray(open_image(_save(tmp_path, Image.fromarray(rgba, "RGBA"), "rgba.png")))
    assert np.array_equal(out, _on_white(rgba[..., :3], rgba[..., 3]))
    la = rgba[..., [0, 3]]
    out = np.asarray(open_image(_save(tmp_path, Image.fromarray(la, "LA"), "la.png")))
    assert np.array_equal(out, _rgb(_on_white(la[..., :1], la[..., 1])[..., 0]))


def test_palette_with_transparency(tmp_path):
    palette = RNG.integers(0, 256, (16, 3), dtype=np.uint8)
    idx = RNG.integers(0, 16, (7, 10), dtype=np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette(palette.ravel().tolist())
    keyed = np.asarray(open_image(_save(tmp_path, img, "key.png", transparency=3)))
    alpha = np.where(idx == 3, 0, 255)
    assert np.array_equal(keyed, _on_white(palette[idx], alpha))
    entry_alpha = RNG.integers(0, 256, 16, dtype=np.uint8)  # per-entry alpha (PNG tRNS with a byte per entry)
    graded = np.asarray(open_image(_save(tmp_path, img, "graded.png", transparency=entry_alpha.tobytes())))
    assert np.array_equal(graded, _on_white(palette[idx], entry_alpha[idx]))
    plain = np.asarray(open_image(_save(tmp_path, img, "plain.png")))
    assert np.array_equal(plain, palette[idx])


def test_cmyk_and_other_modes(tmp_path):
    cmyk = RNG.integers(0, 256, (6, 8, 4), dtype=np.uint8)
    out = np.asarray(open_image(_save(tmp_path, Image.fromarray(cmyk, "CMYK"), "cmyk.tif")))
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    assert np.array_equal(out, np.floor((255 - c) * (255 - k) / 255 + 0.5).astype(np.uint8))
    grey = RNG.integers(0, 256, (5, 4), dtype=np.uint8)
    assert np.array_equal(np.asarray(open_image(_save(tmp_path, Image.fromarray(grey), "l.png"))), _rgb(grey))
    bits = RNG.integers(0, 2, (5, 9)).astype(bool)
    out = np.asarray(open_image(_save(tmp_path, Image.fromarray(bits), "one.png")))
    assert np.array_equal(out, _rgb(np.where(bits, 255, 0).astype(np.uint8)))


def test_an_unusable_file_is_an_oserror(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageError) as err:
        open_image(str(path))
    assert isinstance(err.value, OSError)


# ----------------------------------------------------------------------------------- EXIF orientation

# Where each EXIF orientation puts the stored pixels (TIFF/EXIF 2.32, tag 274), written with numpy:
ORIENTED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # rotate 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: a.transpose(1, 0, 2)[::-1, :],  # rotate 90 degrees counter-clockwise
}


def _tagged_jpeg(path: Path, orientation: int, size=(40, 24), mode="RGB") -> Path:
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([x * 6, y * 10, (x + y) * 3], axis=-1).astype(np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, quality=95, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    path = _tagged_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    with Image.open(path) as raw:
        stored = np.asarray(raw.convert("RGB"))  # the pixels as stored, tag ignored
    out = open_image(str(path))
    assert np.array_equal(np.asarray(out), ORIENTED[orientation](stored))
    assert out.size == ((24, 40) if orientation >= 5 else (40, 24))


def test_reduced_decode_keeps_the_displayed_sides(tmp_path):
    """JPEG draft sizes are asked in the displayed orientation: both displayed sides stay >= (w, h)."""
    path = _tagged_jpeg(tmp_path / "wide.jpg", 6, size=(1600, 400))  # displayed 400 x 1600
    out = open_image(str(path), draft=(400, 100))
    assert out.size[0] >= 400 and out.size[1] >= 100


# ------------------------------------------------------------------------------------- pixel limit


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid greyscale PNG of zeros declaring width x height, a few hundred KB: the deflate block of a band of
    rows is flushed so it stands alone, then repeated (Adler-32 of n zero bytes is n mod 65521 << 16 | 1)."""
    band = 100
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = raw.compress(b"\0" * (band * (width + 1))) + raw.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    assert height % band == 0
    n = height * (width + 1)
    stream = b"\x78\xda" + block * (height // band) + end + struct.pack(">I", (n % 65521) << 16 | 1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b""))
    return path


def test_the_bomb_helper_writes_a_valid_png(tmp_path):
    path = bomb_png(tmp_path / "small.png", 300, 200)
    assert np.array_equal(np.asarray(Image.open(path)), np.zeros((200, 300), np.uint8))


def test_pixel_limit_refuses_from_the_header(tmp_path, monkeypatch):
    hundred = bomb_png(tmp_path / "100mp.png", 10000, 10000)  # under Pillow's own error threshold
    assert hundred.stat().st_size < 120_000
    with pytest.raises(ImageTooLarge, match=f"10000x10000 = 100,000,000 pixels .*{ENV_MAX_PIXELS}"):
        open_image(str(hundred))
    bomb = bomb_png(tmp_path / "bomb.png", 20000, 10000)  # over it: Pillow's DecompressionBombError
    with pytest.raises(ImageTooLarge, match="200,000,000 pixels is over the limit of 67,108,864"):
        open_image(str(bomb))
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(small)
    monkeypatch.setenv(ENV_MAX_PIXELS, "1199")
    with pytest.raises(ImageTooLarge, match="40x30 = 1,200 pixels is over the limit of 1,199"):
        open_image(str(small))
    monkeypatch.setenv(ENV_MAX_PIXELS, "1200")
    assert open_image(str(small)).size == (40, 30)
    monkeypatch.setenv(ENV_MAX_PIXELS, "lots")
    with pytest.raises(UserError, match=ENV_MAX_PIXELS):
        open_image(str(small))


def test_a_larger_limit_also_lifts_pillows_own_check(tmp_path, monkeypatch):
    """With the limit above 179 MP, a 200-MP header passes both checks (the truncated data then fails to decode)."""
    path = tmp_path / "cut.png"
    data = bomb_png(tmp_path / "bomb.png", 20000, 10000).read_bytes()
    path.write_bytes(data[:200])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    monkeypatch.setenv(ENV_MAX_PIXELS, str(250_000_000))
    with pytest.raises(ImageError) as err:
        open_image(str(path))
    assert not isinstance(err.value, ImageTooLarge)


@pytest.fixture
def cgd_run(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    data = make_tiny_processed(tmp_path / "data", "cub", num_classes=4, per_class=2, size=32)
    make_untrained_cgd_run(tmp_path / "results" / "cgd")
    gallery = tmp_path / "photos"
    shutil.copytree(data / "cub" / "images", gallery)
    bomb_png(gallery / "bomb.png", 20000, 10000)
    bomb_png(gallery / "big.png", 10000, 10000)
    return tmp_path, gallery


def test_a_bomb_in_a_gallery_is_one_skipped_image(cgd_run, capsys):
    tmp_path, gallery = cgd_run
    target = tmp_path / "mine_data_base.pth"
    argv = ["--data_base", f"{CGD_RUN}_data_base.pth", "--gallery", gallery, "--save_data_base", target]
    result = cli(capsys, inference.main, inference.get_args_parser(), *argv, "--num_workers", 0)
    assert result.returncode == 0, result.stderr
    images = load_database(target).split("gallery").images
    assert sorted(images) == sorted(str(p) for p in gallery.rglob("*.jpg"))
    logged = Path(f"{target}.errors.log").read_text().splitlines()
    assert sorted(logged) == sorted([str(gallery / "big.png"), str(gallery / "bomb.png")])


def test_a_bomb_as_a_query_is_one_error_line(cgd_run, capsys):
    tmp_path, gallery = cgd_run
    argv = ["--data_base", f"{CGD_RUN}_data_base.pth", "--query_img_name", gallery / "bomb.png"]
    result = cli(capsys, inference.main, inference.get_args_parser(), *argv, "--retrieval_num", 1)
    assert_one_error_line(result, str(gallery / "bomb.png"), "over the limit")


def test_a_bomb_in_a_dataset_is_one_skipped_image(tmp_path):
    photos = tmp_path / "photos"
    for cls in ("a", "b", "c", "d"):
        (photos / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (12, 10), (60 * i, 30, 90)).save(photos / cls / f"{i}.png")
    bomb_png(photos / "a" / "bomb.png", 20000, 10000)
    samples = read_custom_folder(photos, 0.5, seed=0)
    data = tmp_path / "data"
    (summary,) = prepare_custom(data, "mine", samples, "folder", num_workers=1)
    assert summary.skipped == 1 and sum(summary.counts.values()) == 8
    log = (data / "mine" / "uncropped_errors.log").read_text()
    assert "bomb.png: ImageTooLarge: 200,000,000 pixels is over the limit" in log


# ------------------------------------------------------------------------------- text files


def test_non_utf8_annotation_files_are_one_error_line(tmp_path, capsys):
    for name, rel in (("cub", "images.txt"), ("sop", "Ebay_train.txt"), ("isc", "Eval/list_eval_partition.txt")):
        root = make_fake_dataset(tmp_path, name)
        path = root / rel
        path.write_bytes(path.read_bytes() + "caf\u00e9 x y\n".encode("latin-1"))
        result = data_utils_cli(capsys, "--data_path", tmp_path, "--data_name", name)
        line = len(path.read_bytes().splitlines())
        assert_one_error_line(result, f"{path}:{line}", "0xe9", "UTF-8")


def test_a_byte_order_mark_is_accepted(tmp_path):
    root = make_fake_dataset(tmp_path, "cub")
    for rel in ("images.txt", "image_class_labels.txt"):
        (root / rel).write_bytes(b"\xef\xbb\xbf" + (root / rel).read_bytes())
    (summary, _) = prepare(tmp_path, ["cub"], num_workers=1)
    assert summary.counts == {"train": 4, "test": 3}


@pytest.mark.parametrize(
    "name,rel,content",
    [
        ("cub", "images.txt", ""),
        ("sop", "Ebay_test.txt", "image_id class_id super_class_id path\n"),
        ("isc", "Eval/list_eval_partition.txt", "0\nimage_name item_id evaluation_status\n"),
    ],
)
def test_an_empty_annotation_file_is_refused(tmp_path, capsys, name, rel, content):
    root = make_fake_dataset(tmp_path, name)
    (root / rel).write_text(content)
    result = data_utils_cli(capsys, "--data_path", tmp_path, "--data_name", name)
    assert_one_error_line(result, f"{name}: the annotation files list no", rel)
    assert not list(root.glob("*_index.json"))


def test_csv_not_utf8_or_with_a_huge_field_is_one_error_line(tmp_path, capsys):
    photos, data = tmp_path / "photos", tmp_path / "data"
    photos.mkdir()
    latin = photos / "latin.csv"
    latin.write_bytes("path,label,split\n\u00e9t\u00e9.png,a,train\n".encode("latin-1"))
    result = data_utils_cli(capsys, "--data_path", data, "--data_name", "mine", "--from_csv", latin)
    assert_one_error_line(result, f"{latin}:2", "0xe9", "UTF-8")
    huge = photos / "huge.csv"
    huge.write_text("path,label,split\n" + "x" * (200 * 1024) + ".png,a,train\n")
    result = data_utils_cli(capsys, "--data_path", data, "--data_name", "mine", "--from_csv", huge)
    assert_one_error_line(result, f"{huge}:2", "field larger than field limit", "UTF-8")
    assert not data.exists()
    with pytest.raises(UserError, match="CSV file"):
        read_custom_csv(latin)


def test_a_non_utf8_gallery_list_is_one_error_line(cgd_run, capsys):
    tmp_path, gallery = cgd_run
    listing = tmp_path / "list.txt"
    listing.write_bytes("\n".join(str(p) for p in gallery.rglob("*.jpg")).encode() + "\n\u00e9.jpg\n".encode("latin-1"))
    argv = ["--data_base", f"{CGD_RUN}_data_base.pth", "--gallery", listing, "--save_data_base", tmp_path / "x.pth"]
    result = cli(capsys, inference.main, inference.get_args_parser(), *argv, "--num_workers", 0)
    assert_one_error_line(result, str(listing), "not UTF-8")


def test_every_reader_sees_the_oriented_image(tmp_path):
    """Training/evaluation datasets and the crops of data preparation use the same opener: a box is read in the
    displayed orientation (here it lies outside the stored 40 x 24 frame, inside the displayed 24 x 40 one)."""
    (tmp_path / "photos" / "a").mkdir(parents=True)
    src = _tagged_jpeg(tmp_path / "photos" / "a" / "turned.jpg", 6)
    item = RetrievalDataset([(str(src), "a")], {"a": 0})[0][0]
    assert np.array_equal(np.asarray(item), np.asarray(open_image(str(src))))
    assert item.size == (24, 40)
    box = (2, 26, 20, 38)
    rows = [f"{src.relative_to(tmp_path / 'photos')},a,train,{','.join(map(str, box))}"]
    for cls, split in (("b", "train"), ("c", "test"), ("d", "test")):
        (tmp_path / "photos" / cls).mkdir()
        Image.new("RGB", (30, 40), (20, 40, 60)).save(tmp_path / "photos" / cls / "0.png")
        rows.append(f"{cls}/0.png,{cls},{split},1,1,20,30")
    (tmp_path / "photos" / "df.csv").write_text("path,label,split,x_1,y_1,x_2,y_2\n" + "\n".join(rows) + "\n")
    data = tmp_path / "data"
    prepare_custom(data, "mine", read_custom_csv(tmp_path / "photos" / "df.csv"), "csv", num_workers=1)
    crop = np.asarray(Image.open(data / "mine" / "cropped" / "a" / "turned.jpg")).astype(int)
    expected = np.asarray(item)[box[1] : box[3], box[0] : box[2]].astype(int)
    assert crop.shape == expected.shape and np.abs(crop - expected).mean() < 3  # re-encoded as JPEG quality 95


def test_a_split_emptied_by_unreadable_images_is_refused(tmp_path, capsys):
    root = make_fake_dataset(tmp_path, "sop")
    for line in (root / "Ebay_test.txt").read_text().splitlines()[1:]:
        (root / line.split()[3]).unlink(missing_ok=True)
    result = data_utils_cli(capsys, "--data_path", tmp_path, "--data_name", "sop")
    assert_one_error_line(result, "sop uncropped: the test split is empty once the unreadable images are skipped")
    assert not (root / "uncropped_index.json").exists()
