import json

import pytest
import torch

import globeflow as gf
from globeflow.core.checkpoints import CheckpointError, model_from_config, save_plonk_network
from globeflow.core.families import Diffusion, FlowMatching, RiemannianFlowMatching
from globeflow.core.network import Denoiser


def _rfm():
    torch.manual_seed(0)
    return RiemannianFlowMatching(Denoiser(dim=32, depth=2, cond_dim=4), cond_drop_prob=0.2)


def test_published_tiny_checkpoint_loads_with_inferred_or_given_family(plonk_compat, tmp_path):
    assert isinstance(gf.load_model(plonk_compat / "tiny"), RiemannianFlowMatching)
    assert isinstance(gf.load_model(plonk_compat / "tiny", family="flow"), FlowMatching)
    # Family inferred from the published naming scheme.
    for suffix, cls in (("_flow", FlowMatching), ("_diffusion", Diffusion)):
        d = tmp_path / f"PLONK_TINY{suffix}"
        d.mkdir()
        for name in ("config.json", "model.safetensors"):
            (d / name).write_bytes((plonk_compat / "tiny" / name).read_bytes())
        assert isinstance(gf.load_model(d), cls)


def test_round_trip_is_exact(tmp_path):
    model = _rfm()
    gf.save_model(model, tmp_path / "m", metadata={"encoder": "x"})
    loaded = gf.load_model(tmp_path / "m")
    assert loaded.cond_drop_prob == 0.2 and loaded.metadata == {"encoder": "x"}
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    emb = torch.randn(2, 4)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(
        model.sample(emb, 8, 4, generator=g1), loaded.sample(emb, 8, 4, generator=g2)
    )


def test_plonk_export_round_trip(tmp_path):
    model = _rfm()
    save_plonk_network(model, tmp_path / "plonk")
    config = json.loads((tmp_path / "plonk" / "config.json").read_text())
    assert set(config) == {"input_dim", "dim", "depth", "expansion", "cond_dim"}
    loaded = gf.load_model(tmp_path / "plonk")
    assert torch.equal(loaded.network.final_linear.weight, model.network.final_linear.weight)


def test_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory"):
        gf.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing config.json"):
        gf.load_model(tmp_path / "empty")
    gf.save_model(_rfm(), tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        gf.load_model(tmp_path / "bad")
    gf.save_model(_rfm(), tmp_path / "mismatch")
    cfg = json.loads((tmp_path / "mismatch" / "config.json").read_text())
    cfg["network"]["dim"] = 64
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((CheckpointError, RuntimeError)):
        gf.load_model(tmp_path / "mismatch")
    with pytest.raises(CheckpointError, match="family"):
        model_from_config(
            {"input_dim": 3, "dim": 8, "depth": 1, "expansion": 4, "cond_dim": 2}, family="vmf"
        )


def test_weights_are_never_unpickled(tmp_path):
    # A pickle disguised as weights must be rejected by safetensors, not executed.
    gf.save_model(_rfm(), tmp_path / "m")
    torch.save({"x": torch.zeros(1)}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(Exception) as info:
        gf.load_model(tmp_path / "m")
    assert "pickle" not in type(info.value).__name__.lower()


def _corrupt(tmp_path, name, weights=None, config=None):
    """A saved model directory whose weights bytes or config dict were replaced."""
    directory = tmp_path / name
    gf.save_model(_rfm(), directory, metadata={"encoder": "x"})
    if weights is not None:
        (directory / "model.safetensors").write_bytes(weights(directory))
    if config is not None:
        cfg = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps(config(cfg)))
    return directory


def _pickled(directory):
    torch.save({"x": torch.zeros(1)}, directory / "model.safetensors")
    return (directory / "model.safetensors").read_bytes()


def _set(cfg, section, key, value):
    cfg[section][key] = value
    return cfg


CORRUPTIONS = {
    "truncated": (
        lambda d: (d / "model.safetensors").read_bytes()[:300],
        None,
        "truncated or not a safetensors file",
    ),
    "pickled": (_pickled, None, "pickled torch file"),
    "empty": (lambda d: b"", None, "empty"),
    "sizes": (None, lambda c: _set(c, "network", "dim", 64), "do not match config.json"),
    "depth": (None, lambda c: _set(c, "network", "depth", 3), "do not match config.json"),
    "unknown-key": (None, lambda c: _set(c, "network", "bogus", 1), "config.json"),
    "not-a-dict": (None, lambda c: [1, 2], "not a JSON object"),
    "no-family": (None, lambda c: {k: v for k, v in c.items() if k != "family"}, "family"),
    "guidance-nan": (
        None,
        lambda c: _set(c, "metadata", "recommended_guidance", float("nan")),
        "recommended_guidance",
    ),
    "sampler-field": (
        None,
        lambda c: _set(c, "metadata", "recommended_sampler", {"stepz": 8}),
        "recommended_sampler: stepz not among the recipe's fields",
    ),
    "sampler-value": (
        None,
        lambda c: _set(c, "metadata", "recommended_sampler", {"grid": "cubic"}),
        "unknown time grid 'cubic'",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_model_directories_give_one_line_checkpoint_errors(tmp_path, case):
    weights, config, reason = CORRUPTIONS[case]
    directory = _corrupt(tmp_path, case, weights, config)
    with pytest.raises(CheckpointError) as info:
        gf.load_model(directory)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert str(directory) in message and reason in message, message


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    model = _rfm()
    with torch.no_grad():
        model.network.final_linear.weight[0, 0] = float("nan")
    gf.save_model(model, tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"network\.final_linear\.weight.*NaN or infinite"):
        gf.load_model(tmp_path / "m")


def test_save_of_a_loaded_model_keeps_its_metadata(tmp_path):
    meta = {"encoder": "efficientnet-lite0", "recommended_guidance": -0.5, "step": 7}
    gf.save_model(_rfm(), tmp_path / "a", metadata=meta)
    gf.save_model(gf.load_model(tmp_path / "a"), tmp_path / "b")
    assert gf.load_model(tmp_path / "b").metadata == meta
    # An explicit argument still wins over what the model carries.
    gf.save_model(gf.load_model(tmp_path / "a"), tmp_path / "c", metadata={"encoder": "y"})
    assert gf.load_model(tmp_path / "c").metadata == {"encoder": "y"}


@pytest.mark.parametrize(
    ("text", "hub"),
    [("nicolas-dufour/PLONK_YFCC", True), ("./runs/x", False), ("/abs/model", False),
     ("~/model", False), ("runs/a/b", False), ("model", False)],
)  # fmt: skip
def test_hub_ids_are_told_from_local_paths_in_one_place(text, hub):
    from globeflow.core.hub_downloads import looks_like_hub_id

    assert looks_like_hub_id(text) is hub


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_model_and_checkpoint_files_get_the_umask_mode_like_every_other_file(tmp_path, umask):
    import copy
    import os

    from globeflow.jobs.train_checkpoint import save_checkpoint

    model = _rfm()
    before = os.umask(umask)
    try:
        gf.save_model(model, tmp_path / "m")
        save_plonk_network(model, tmp_path / "plonk")
        save_checkpoint(tmp_path / "ckpt", model, copy.deepcopy(model), None, {"step": 1})
    finally:
        os.umask(before)
    want = 0o666 & ~umask
    for path in ("m/model.safetensors", "m/config.json", "plonk/model.safetensors"):
        assert (tmp_path / path).stat().st_mode & 0o777 == want, path
    assert (tmp_path / "ckpt/state.safetensors").stat().st_mode & 0o777 == want
