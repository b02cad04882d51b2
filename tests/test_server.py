"""The JSON API and page server, with a fake locator (no model needed)."""

from __future__ import annotations

import io
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _fake_locator import FakeLocator  # noqa: E402
from _photos import gps_exif  # noqa: E402

from globeflow.apps.server import create_app  # noqa: E402


def _jpeg(size: tuple[int, int] = (96, 64), exif: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, (30, 120, 200))
    img.paste((240, 200, 40), (10, 10, 40, 40))
    if exif is None:
        img.save(buf, "JPEG", quality=90)
    else:
        img.save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


def _gps_exif(lat: float, lon: float) -> bytes:
    return gps_exif(lat, lon).tobytes()


@pytest.fixture
def locator() -> FakeLocator:
    return FakeLocator()


@pytest.fixture
def client(locator: FakeLocator):
    with TestClient(create_app(locator, max_upload_mb=1, max_batch=4)) as c:
        yield c


def test_health_and_page(client: TestClient) -> None:
    r = client.get("/v1/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["model"] == "fake-model" and body["encoder"] == "fake-encoder"
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    coast = client.get("/v1/coastlines")
    assert coast.status_code == 200 and len(coast.json()["coastlines"]) > 100


def test_openapi_and_docs(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "/v1/locate" in schema["paths"] and "/v1/health" in schema["paths"]
    assert client.get("/docs").status_code == 200


def test_locate_valid_photo(client: TestClient) -> None:
    r = client.post(
        "/v1/locate",
        params={"num_samples": 64, "guidance": 1.5, "steps": 8},
        files={"file": ("photo.jpg", _jpeg(), "image/jpeg")},
    )
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    assert res["image"] == "photo.jpg" and res["ok"] is True and res["error"] is None
    assert set(res["best_guess"]) >= {"lat", "lon", "place"}
    assert res["best_guess"]["place"]["city"] == "Paris"
    assert len(res["regions"]) == 3
    assert all({"lat", "lon", "probability", "place"} <= set(g) for g in res["regions"])
    assert len(res["samples"]) == 64
    assert res["settings"] == {
        "model": "fake-model",
        "encoder": "fake-encoder",
        "num_samples": 64,
        "guidance": 1.5,
        "steps": 8,
    }
    assert res["exif_gps"] is None and res["error_km"] is None
    d = res["density"]
    assert len(d["log_density"]) == len(d["lat"]) and len(d["log_density"][0]) == len(d["lon"])


def test_form_settings_and_several_files(client: TestClient, locator: FakeLocator) -> None:
    r = client.post(
        "/v1/locate",
        data={"num_samples": "32", "guidance": "0"},
        files=[
            ("files", ("a.jpg", _jpeg(), "image/jpeg")),
            ("files", ("b.png", _png(), "image/png")),
        ],
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["image"] for x in results] == ["a.jpg", "b.png"]
    assert all(x["settings"]["num_samples"] == 32 for x in results)
    assert results[0]["settings"]["guidance"] == 0.0


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (20, 20), (1, 2, 3, 128)).save(buf, "PNG")
    return buf.getvalue()


def test_non_image_rejected(client: TestClient) -> None:
    r = client.post(
        "/v1/locate", files={"file": ("notes.jpg", b"just some text\n" * 20, "image/jpeg")}
    )
    assert 400 <= r.status_code < 500
    detail = r.json()["detail"]
    assert "notes.jpg" in detail and "image" in detail


def test_truncated_jpeg_rejected(client: TestClient) -> None:
    data = _jpeg((400, 300))
    r = client.post("/v1/locate", files={"file": ("cut.jpg", data[: len(data) // 2], "image/jpeg")})
    assert 400 <= r.status_code < 500
    assert "cut.jpg" in r.json()["detail"]


def test_empty_file_rejected(client: TestClient) -> None:
    r = client.post("/v1/locate", files={"file": ("empty.jpg", b"", "image/jpeg")})
    assert 400 <= r.status_code < 500 and "empty.jpg" in r.json()["detail"]


def test_oversize_rejected(client: TestClient) -> None:
    big = _jpeg() + b"\0" * (2 * 2**20)
    r = client.post("/v1/locate", files={"file": ("big.jpg", big, "image/jpeg")})
    assert r.status_code == 413
    assert "big.jpg" in r.json()["detail"] and "too large" in r.json()["detail"]


def test_bad_parameters_and_missing_file(client: TestClient) -> None:
    r = client.post(
        "/v1/locate", params={"num_samples": 5}, files={"file": ("a.jpg", _jpeg(), "image/jpeg")}
    )
    assert r.status_code == 422 and "num_samples" in r.json()["detail"]
    r = client.post(
        "/v1/locate", params={"guidance": 99}, files={"file": ("a.jpg", _jpeg(), "image/jpeg")}
    )
    assert r.status_code == 422 and "guidance" in r.json()["detail"]
    r = client.post("/v1/locate", data={"num_samples": "64"})
    assert r.status_code == 400 and "no file" in r.json()["detail"]
    # still serving after bad requests
    ok = client.post("/v1/locate", files={"file": ("a.jpg", _jpeg(), "image/jpeg")})
    assert ok.status_code == 200


def test_exif_gps_gives_truth_and_error(client: TestClient) -> None:
    lat, lon = 45.764, 4.8357  # Lyon
    r = client.post(
        "/v1/locate", files={"file": ("lyon.jpg", _jpeg(exif=_gps_exif(lat, lon)), "image/jpeg")}
    )
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["exif_gps"]["lat"] == pytest.approx(lat, abs=1e-3)
    assert res["exif_gps"]["lon"] == pytest.approx(lon, abs=1e-3)
    assert res["error_km"] == pytest.approx(392, abs=10)  # Paris -> Lyon


def test_geojson_format(client: TestClient) -> None:
    r = client.post(
        "/v1/locate",
        params={"format": "geojson"},
        files={"file": ("g.jpg", _jpeg(exif=_gps_exif(-33.86, 151.21)), "image/jpeg")},
    )
    assert r.status_code == 200, r.text
    fc = r.json()
    assert fc["type"] == "FeatureCollection"
    kinds = [f["properties"]["kind"] for f in fc["features"]]
    assert kinds.count("best_guess") == 1 and kinds.count("region") == 3
    assert kinds.count("exif_gps") == 1
    best = fc["features"][0]
    assert best["geometry"] == {"type": "Point", "coordinates": [2.35, 48.85]}


def test_concurrent_requests_are_batched() -> None:
    locator = FakeLocator(delay_s=0.05)
    with TestClient(create_app(locator, max_batch=4)) as client:
        data = _jpeg()

        def one(i: int) -> int:
            r = client.post(
                "/v1/locate",
                params={"num_samples": 32},
                files={"file": (f"p{i}.jpg", data, "image/jpeg")},
            )
            assert r.json()["results"][0]["image"] == f"p{i}.jpg"
            return r.status_code

        with ThreadPoolExecutor(20) as pool:
            codes = list(pool.map(one, range(20)))
    assert codes == [200] * 20
    assert sum(locator.calls) == 20
    assert max(locator.calls) <= 4
    assert len(locator.calls) < 20  # concurrent images shared model calls
    assert locator.max_active == 1  # one inference at a time


def test_inference_failure_is_reported_and_server_recovers() -> None:
    class Flaky(FakeLocator):
        fail = True

        def locate_images(self, images, **kw):
            if self.fail:
                self.fail = False
                raise RuntimeError("boom")
            return super().locate_images(images, **kw)

    with TestClient(create_app(Flaky()), raise_server_exceptions=False) as client:
        r = client.post("/v1/locate", files={"file": ("a.jpg", _jpeg(), "image/jpeg")})
        assert r.status_code == 500 and "boom" in r.json()["detail"]
        r = client.post("/v1/locate", files={"file": ("a.jpg", _jpeg(), "image/jpeg")})
        assert r.status_code == 200


def test_huge_request_rejected_before_parsing() -> None:
    with TestClient(create_app(FakeLocator(), max_upload_mb=0.1, max_files=2)) as client:
        big = b"\xff\xd8" + b"\0" * (2 * 2**20)
        r = client.post("/v1/locate", files={"file": ("huge.jpg", big, "image/jpeg")})
        assert r.status_code == 413 and "request too large" in r.json()["detail"]
        assert client.get("/v1/health").status_code == 200


def test_mixed_good_and_bad_files_keep_every_good_result(
    client: TestClient, locator: FakeLocator
) -> None:
    too_big = _jpeg() + b"\0" * (2 * 2**20)  # the client's limit is 1 MB per file
    r = client.post(
        "/v1/locate",
        params={"num_samples": 32},
        files=[
            ("file", ("a.jpg", _jpeg(), "image/jpeg")),
            ("file", ("notes.jpg", b"just some text\n" * 20, "image/jpeg")),
            ("file", ("big.jpg", too_big, "image/jpeg")),
            ("file", ("b.png", _png(), "image/png")),
        ],
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["image"] for x in results] == ["a.jpg", "notes.jpg", "big.jpg", "b.png"]
    assert [x["ok"] for x in results] == [True, False, False, True]
    assert results[1]["error"].startswith("notes.jpg: ") and "image" in results[1]["error"]
    assert results[2]["error"].startswith("big.jpg: ") and "too large" in results[2]["error"]
    assert all(len(x["samples"]) == 32 for x in (results[0], results[3]))
    assert sum(locator.calls) == 2  # only the good files reached the model


def test_mixed_batch_as_geojson_names_the_bad_file(client: TestClient) -> None:
    r = client.post(
        "/v1/locate",
        params={"format": "geojson"},
        files=[
            ("file", ("good.jpg", _jpeg(), "image/jpeg")),
            ("file", ("empty.jpg", b"", "image/jpeg")),
        ],
    )
    assert r.status_code == 200, r.text
    fc = r.json()
    assert {f["properties"]["image"] for f in fc["features"]} == {"good.jpg"}
    (error,) = fc["errors"]
    assert error["image"] == "empty.jpg" and "empty" in error["error"]


def test_request_with_only_bad_files_names_each(client: TestClient) -> None:
    data = _jpeg((400, 300))
    r = client.post(
        "/v1/locate",
        files=[
            ("file", ("cut.jpg", data[: len(data) // 2], "image/jpeg")),
            ("file", ("notes.jpg", b"hello " * 50, "image/jpeg")),
        ],
    )
    assert r.status_code == 422
    body = r.json()
    assert "cut.jpg" in body["detail"] and "notes.jpg" in body["detail"]
    assert [x["ok"] for x in body["results"]] == [False, False]


@pytest.mark.parametrize(
    ("setting", "value"),
    [("max_upload_mb", -1.0), ("max_upload_mb", 0.0), ("max_upload_mb", float("nan"))]
    + [("max_batch", 0), ("max_files", -2)],
)
def test_settings_that_cannot_work_are_refused(setting: str, value: float) -> None:
    with pytest.raises(ValueError, match=setting):
        create_app(FakeLocator(), **{setting: value})


def test_worker_gives_freed_memory_back_after_each_batch(monkeypatch) -> None:
    import globeflow.apps.server as server

    calls: list[int] = []
    locator = FakeLocator()
    monkeypatch.setattr(server, "release_free_heap", lambda: calls.append(len(locator.calls)))
    with TestClient(create_app(locator)) as client:
        for name in ("a.jpg", "b.jpg"):
            r = client.post("/v1/locate", files={"file": (name, _jpeg(), "image/jpeg")})
            assert r.status_code == 200
    assert calls[:2] == [1, 2]  # once after each model call


def test_thousands_of_files_get_our_limit_and_head_requests_answer(client: TestClient) -> None:
    files = [("file", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(5000)]
    r = client.post("/v1/locate", files=files)
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == "too many files (more than 32); at most 32 per request"
    for path in ("/", "/v1/health"):
        r = client.head(path)
        assert r.status_code == 200 and r.content == b"", path
