"""The HTTP service through FastAPI's test client (no network): the same ranking as inference.py, refusals of bad
input and of paths outside the database's images, write access only with --allow-write and the token, reloading
when the database file changes, concurrent queries batched without changing their answers."""

import io
import os
import shutil
import struct
import threading
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the [serve] extra (fastapi, uvicorn, python-multipart) is not installed")
pytest.importorskip("python_multipart", reason="the [serve] extra (python-multipart) is not installed")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (requirements-serve.txt)")

from fastapi.testclient import TestClient  # noqa: E402

from cgd.spec import SPEC  # noqa: E402
from common.database import load_database  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.searcher import Searcher  # noqa: E402
from common.service import create_app  # noqa: E402
from tests.serving import demo_photos, gallery_database, infer  # noqa: E402

TOKEN = "s3cret-token"


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A 16-image gallery database of demo photos; 4 more photos of the same classes that it does not hold."""
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    photos = demo_photos(tmp_path / "photos", classes=4, per_class=5)
    outside = tmp_path / "new"
    outside.mkdir()
    held = [p for i, p in enumerate(photos) if i % 5 != 4]
    for p in photos:
        if p not in held:
            shutil.move(p, outside / f"{Path(p).parent.name}.jpg")
    db_path = gallery_database(tmp_path, str(tmp_path / "photos"))
    return tmp_path, db_path, sorted(str(p) for p in outside.iterdir())


def _client(db_path, **kwargs) -> TestClient:
    searcher = Searcher(SPEC, db_path, device=torch.device("cpu"), index=kwargs.pop("index", None))
    return TestClient(create_app(searcher, **kwargs))


def _search(client, path, k=5, **form):
    with open(path, "rb") as f:
        return client.post("/search", files={"image": (Path(path).name, f, "image/jpeg")}, data={"k": str(k), **form})


@pytest.mark.parametrize("index", ["exact", "hnsw"])
def test_search_ranks_as_inference_does(setup, index):
    tmp_path, db_path, new = setup
    if index != "exact":
        db_path = gallery_database(tmp_path, str(tmp_path / "photos"), "ann_data_base.pth", "--index", index)
    client = _client(db_path)
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["images"] == 16 and health.json()["index"] == index
    for query in new[:2]:
        answer = _search(client, query, k=6).json()
        _, expected = infer("--data_base", str(db_path), "--query_img_name", query, "--retrieval_num", "6")[0]
        assert [r["path"] for r in answer["results"]] == [p for p, _, _ in expected]
        assert [r["rank"] for r in answer["results"]] == list(range(1, 7)) and answer["took_ms"] > 0
        for got, (_, _, score) in zip(answer["results"], expected):
            assert got["score"] == pytest.approx(score, rel=1e-5, abs=1e-6)


def test_search_by_a_stored_image_excludes_it_and_knows_its_label(setup):
    tmp_path, _, _ = setup
    rows = [(p, Path(p).parent.name) for p in sorted(str(p) for p in (tmp_path / "photos").rglob("*.jpg"))]
    listing = tmp_path / "labelled.csv"
    listing.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    db_path = gallery_database(tmp_path, str(listing), "labelled_data_base.pth")
    client = _client(db_path)
    answer = client.post("/search", data={"path": rows[3][0], "k": "15"}).json()
    names = load_database(db_path).config["label_names"]
    assert answer["query"]["label"] == names[rows[3][1]] and answer["query"]["label_name"] == rows[3][1]
    assert len(answer["results"]) == 15 and rows[3][0] not in [r["path"] for r in answer["results"]]
    _, expected = infer("--data_base", str(db_path), "--query_img_name", rows[3][0], "--retrieval_num", "15")[0]
    assert [r["path"] for r in answer["results"]] == [p for p, _, _ in expected]
    assert {r["label_name"] for r in answer["results"]} == set(names)
    assert client.post("/search", data={"path": "elsewhere/x.jpg"}).status_code == 404


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (PIL reads the size before any decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_bad_input_gets_a_json_error_and_the_server_goes_on(setup):
    tmp_path, db_path, new = setup
    client = _client(db_path, max_upload_bytes=20_000, max_pixels=4_000_000)
    cases = {
        "not an image": (("x.jpg", b"%PDF-1.4 this is not an image", "image/jpeg"), {}, 400),
        "truncated jpeg": (("t.jpg", Path(new[0]).read_bytes()[:300], "image/jpeg"), {}, 400),
        "bomb": (("b.png", _bomb_png(30_000, 30_000), "image/png"), {}, 400),
        "over the pixel limit": (("p.png", _bomb_png(2_100, 2_000), "image/png"), {}, 400),
        "too large": (("big.jpg", b"\xff\xd8" + os.urandom(40_000), "image/jpeg"), {}, 413),
        "body too large": (("huge.jpg", b"\xff\xd8" + os.urandom(200_000), "image/jpeg"), {}, 413),
        "k zero": (("q.jpg", Path(new[0]).read_bytes(), "image/jpeg"), {"k": "0"}, 422),
        "k not a number": (("q.jpg", Path(new[0]).read_bytes(), "image/jpeg"), {"k": "ten"}, 422),
        "k over the gallery": (("q.jpg", Path(new[0]).read_bytes(), "image/jpeg"), {"k": "17"}, 422),
        "k over max_k": (("q.jpg", Path(new[0]).read_bytes(), "image/jpeg"), {"k": "5000"}, 422),
    }
    for name, (upload, form, status) in cases.items():
        response = client.post("/search", files={"image": upload}, data=form)
        assert response.status_code == status, (name, response.text)
        assert "detail" in response.json(), name
    assert client.post("/search", data={"k": "3"}).status_code == 422  # neither an image nor a path
    assert client.get("/healthz").status_code == 200
    assert _search(client, new[1], k=16).status_code == 200  # k up to the gallery size


def test_images_route_serves_database_images_only(setup):
    tmp_path, db_path, new = setup
    client = _client(db_path)
    answer = _search(client, new[0], k=3).json()
    address = answer["results"][0]["thumbnail"]
    assert address.startswith("/images/") and "/photos/" not in address  # relative to the images' folder
    response = client.get(address)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).size[0] <= 256
    (tmp_path / "photos" / "stray.jpg").write_bytes(Path(new[0]).read_bytes())  # inside the root, not stored
    secret = tmp_path / "secret.jpg"
    shutil.copy(new[0], secret)
    for bad, status in [
        ("/images/%2E%2E/secret.jpg", 400),
        ("/images/..%2Fsecret.jpg", 400),
        ("/images/circle_solid/..%2F..%2Fsecret.jpg", 400),
        ("/images//" + str(secret).lstrip("/"), 400),
        ("/images/%2F" + str(secret).lstrip("/"), 400),
        ("/images/stray.jpg", 404),
        ("/images/" + str(tmp_path / "photos" / "x.jpg").lstrip("/"), 404),
    ]:
        assert client.get(bad).status_code == status, bad
    # a stored image whose folder became a symlink to somewhere else is refused too
    folder = tmp_path / "photos" / Path(answer["results"][0]["path"]).parent.name
    shutil.move(folder, tmp_path / "moved")
    os.symlink(tmp_path / "moved", folder)
    assert client.get(address).status_code == 403


def test_write_endpoints_need_allow_write_and_the_token(setup):
    tmp_path, db_path, new = setup
    read_only = _client(db_path)
    with open(new[0], "rb") as f:
        assert read_only.post("/images", files={"images": ("a.jpg", f, "image/jpeg")}).status_code == 403
    assert read_only.request("DELETE", "/images", json={"paths": [new[0]]}).status_code == 403
    with pytest.raises(UserError, match="needs a token"):
        _client(db_path, allow_write=True)
    client = _client(db_path, allow_write=True, token=TOKEN, upload_dir=tmp_path / "uploads")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        with open(new[0], "rb") as f:
            refused = client.post("/images", files={"images": ("a.jpg", f, "image/jpeg")}, headers=headers)
        assert refused.status_code == 401, headers
        assert client.request("DELETE", "/images", json={"paths": [new[0]]}, headers=headers).status_code == 401
    assert len(load_database(db_path).split("gallery").images) == 16  # nothing changed
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def upload(path, label=None):
        with open(path, "rb") as f:
            form = {"label": label} if label else {}
            return client.post("/images", files={"images": ("q.jpg", f, "image/jpeg")}, data=form, headers=auth)

    report = upload(new[0], "7").json()
    assert report["added"] == 1 and report["images"] == 17
    stored = load_database(db_path).split("gallery")
    assert stored.images[-1].startswith(str(tmp_path / "uploads")) and stored.labels[-1] == 7
    best = _search(client, new[0], k=1).json()["results"][0]  # the server reloaded: the upload is found first
    assert best["path"] == stored.images[-1] and best["score"] == pytest.approx(0, abs=1e-3)
    assert upload(new[0]).json()["present"] == 1 and len(load_database(db_path).split("gallery").images) == 17
    with open(tmp_path / "junk.jpg", "wb") as f:
        f.write(b"not an image")
    assert upload(tmp_path / "junk.jpg").status_code == 400
    removed = client.request("DELETE", "/images", json={"paths": [stored.images[-1], "never/there.jpg"]}, headers=auth)
    assert removed.json() == {**removed.json(), "removed": 1, "missing": 1, "images": 16}
    added = client.post("/images", data={"source": str(tmp_path / "new")}, headers=auth).json()
    assert added["added"] == 4 and client.get("/healthz").json()["images"] == 20


def test_server_reloads_when_a_script_changes_the_database(setup):
    tmp_path, db_path, new = setup
    client = _client(db_path)
    assert client.get("/healthz").json()["images"] == 16
    infer("--data_base", str(db_path), "--add", str(tmp_path / "new"), "--num_workers", "0")
    assert client.get("/healthz").json()["images"] == 20
    assert _search(client, new[2], k=1).json()["results"][0]["path"] == new[2]


def test_concurrent_queries_get_the_answers_of_single_queries(setup):
    tmp_path, db_path, new = setup
    searcher = Searcher(SPEC, db_path, device=torch.device("cpu"), max_batch=8)
    from common.data.images import open_image

    images = [searcher.transform(open_image(p)) for p in new] * 3
    alone = [searcher.search(5, image=x)[1] for x in images[:4]]
    together = [None] * len(images)

    def ask(i):
        together[i] = searcher.search(5, image=images[i])[1]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, answer in enumerate(together):
        assert [p for p, _, _ in answer] == [p for p, _, _ in alone[i % 4]]
        assert [s for _, _, s in answer] == pytest.approx([s for _, _, s in alone[i % 4]], rel=1e-5, abs=1e-6)


def test_serve_script_refuses_in_one_line(setup, monkeypatch):
    from cgd import serve

    tmp_path, db_path, _ = setup
    monkeypatch.delenv("RETRIEVAL_SERVE_TOKEN", raising=False)
    for argv, message in [
        (["--data_base", str(tmp_path / "none_data_base.pth")], "database not found"),
        (["--data_base", str(db_path), "--allow-write"], "needs a token"),
    ]:
        with pytest.raises(UserError, match=message):
            serve.main(serve.get_args_parser().parse_args(argv))
