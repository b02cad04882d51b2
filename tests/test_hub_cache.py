"""The hub path offline: a Hugging Face cache laid out by hand with tiny models under the real repo
ids, then the exact commands a user runs once the files are cached, with HF_HUB_OFFLINE=1.

huggingface_hub reads HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE when it is imported, so the user
path runs in a fresh process (the environment is set with monkeypatch and inherited).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny_hub import add_to_hub_cache, tiny_clip, tiny_dinov2, tiny_plonk
from PIL import Image

from globeflow.core import hub_downloads

pytest.importorskip("transformers", reason="transformers not installed (optional hub extra)")
pytest.importorskip("huggingface_hub", reason="huggingface_hub not installed (optional hub extra)")

GLOBEFLOW = [sys.executable, "-m", "globeflow.apps.cli"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_hub_models")
    return {
        "facebook/dinov2-with-registers-large": tiny_dinov2(root / "dinov2"),
        "geolocal/StreetCLIP": tiny_clip(root / "streetclip"),
        "nicolas-dufour/PLONK_YFCC": tiny_plonk(root / "plonk_yfcc"),
        "nicolas-dufour/PLONK_OSV_5M": tiny_plonk(root / "plonk_osv5m"),
    }


def _offline_env(monkeypatch, home: Path) -> Path:
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_CACHE", raising=False)
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    return home / "hub"


def _photos(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "street.png", folder / "field.jpg"]
    Image.new("RGB", (120, 90), (180, 40, 40)).save(paths[0])
    Image.radial_gradient("L").convert("RGB").resize((80, 140)).save(paths[1])
    return paths


@pytest.mark.slow  # two fresh processes that import torch + transformers: ~20-30 s on 2 cores
def test_predict_and_pipelines_read_the_cache_offline(tmp_path, monkeypatch, tiny_models):
    cache = _offline_env(monkeypatch, tmp_path / "hf")
    for repo_id, source in tiny_models.items():
        add_to_hub_cache(cache, repo_id, source)
    photos = _photos(tmp_path / "photos")

    out = tmp_path / "out.json"
    args = ["predict", *map(str, photos), "--model", "nicolas-dufour/PLONK_YFCC", "--json"]
    args += [str(out), "--num-samples", "16", "--steps", "2", "--no-progress"]
    run = subprocess.run(GLOBEFLOW + args, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "download" not in run.stderr  # everything came from the cache: no notice
    results = json.loads(out.read_text())["results"]
    assert [r["ok"] for r in results] == [True, True]
    assert {r["settings"]["encoder"] for r in results} == {"dinov2-vitl14-reg"}
    assert {r["settings"]["model"] for r in results} == {"nicolas-dufour/PLONK_YFCC"}

    script = f"""
import json
from PIL import Image
import globeflow as gf
images = [Image.open(p).convert("RGB") for p in {[str(p) for p in photos]!r}]
loc = gf.Locator.from_pretrained("nicolas-dufour/PLONK_OSV_5M")
pipe = gf.PLONKPipeline.from_pretrained("nicolas-dufour/PLONK_YFCC")
many = pipe(images, batch_size=2, num_steps=3)
one = pipe(images[0], batch_size=5, num_steps=3, cfg=2.0)
print(json.dumps({{
    "osv_encoder": loc.encoder.name, "osv_dim": loc.encoder.dim,
    "yfcc_encoder": pipe.locator.encoder.name,
    "many": many.tolist(), "one_shape": list(one.shape),
}}))
"""
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    assert "download" not in run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["osv_encoder"] == "streetclip" and got["osv_dim"] == 32
    assert got["yfcc_encoder"] == "dinov2-vitl14-reg"
    assert got["one_shape"] == [5, 2]
    many = got["many"]
    assert len(many) == 2 and all(-90 <= lat <= 90 and -180 <= lon <= 180 for lat, lon in many)


def test_offline_without_the_encoder_says_what_it_needs(tmp_path, monkeypatch, tiny_models):
    """PLONK_OSV_5M cached, StreetCLIP not: the user is told what it would download (size,
    non-commercial licence) and gets a one-line error, not a traceback."""
    cache = _offline_env(monkeypatch, tmp_path / "hf")
    repo = "nicolas-dufour/PLONK_OSV_5M"
    add_to_hub_cache(cache, repo, tiny_models[repo])
    photo = _photos(tmp_path / "photos")[0]
    args = ["predict", str(photo), "--model", "nicolas-dufour/PLONK_OSV_5M", "--no-progress"]
    run = subprocess.run(GLOBEFLOW + args, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    notices = [line for line in run.stderr.splitlines() if line.startswith("globeflow:")]
    assert len(notices) == 1, run.stderr
    assert "geolocal/StreetCLIP" in notices[0] and "1.7 GB" in notices[0]
    assert "non-commercial" in notices[0] and "HF_HUB_OFFLINE" in notices[0]
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "geolocal/StreetCLIP" in errors[0], run.stderr


def test_download_notice_is_printed_once_and_only_when_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_downloads, "_announced", set())
    cache = tmp_path / "hub"
    stream = io.StringIO()
    assert hub_downloads.announce_download("geolocal/StreetCLIP", cache_dir=cache, stream=stream)
    assert not hub_downloads.announce_download(
        "geolocal/StreetCLIP", cache_dir=cache, stream=stream
    )
    text = stream.getvalue()
    assert text.count("\n") == 1
    assert "1.7 GB" in text and "CC-BY-NC-4.0" in text and "non-commercial" in text
    assert str(cache) in text

    # the PLONK checkpoint is announced with its own size and licence; once cached, silently used
    source = tmp_path / "plonk"
    tiny_plonk(source)
    repo = "nicolas-dufour/PLONK_YFCC"
    assert hub_downloads.announce_download(repo, cache_dir=cache, stream=stream)
    assert "144 MB" in stream.getvalue() and "MIT" in stream.getvalue()
    monkeypatch.setattr(hub_downloads, "_announced", set())
    add_to_hub_cache(cache, repo, source)
    assert hub_downloads.is_cached(repo, ("config.json", "model.safetensors"), cache_dir=cache)
    assert not hub_downloads.announce_download(repo, cache_dir=cache, stream=io.StringIO())


def test_known_repos_name_their_encoder() -> None:
    assert hub_downloads.known_repo("nicolas-dufour/PLONK_YFCC_flow").encoder == "dinov2-vitl14-reg"
    assert hub_downloads.known_repo("Nicolas-Dufour/plonk_osv_5m").encoder == "streetclip"
    assert hub_downloads.known_repo("/models/PLONK_iNaturalist").encoder == "dinov2-vitl14-reg"
    assert hub_downloads.known_repo("someone/else") is None


def test_a_silent_hub_endpoint_fails_in_one_line_naming_it(tmp_path, monkeypatch):
    import socket
    import threading

    from huggingface_hub import constants

    from globeflow.core.checkpoints import CheckpointError, load_model

    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody ever answers
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_downloads, "_announced", set())
    monkeypatch.setenv(hub_downloads.HUB_TIMEOUT_ENV, "0.5")
    outcome: list[BaseException] = []

    def fetch() -> None:
        try:
            load_model("nicolas-dufour/PLONK_YFCC")
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(timeout=60)
    silent.close()
    assert outcome, "the download still waits for an endpoint that never answers"
    assert isinstance(outcome[0], CheckpointError)
    message = str(outcome[0])
    assert f"{endpoint} did not answer within 0.5 s" in message and "\n" not in message
