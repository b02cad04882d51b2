"""A fast stand-in for ``globeflow.apps.pipeline.Locator`` used by the server and web-page tests."""

from __future__ import annotations

import math
import threading
import time

import numpy as np

from globeflow.core.families import GeoModel

PARIS = {"city": "Paris", "region": "Ile-de-France", "country": "France", "country_code": "FR"}
LYON = {"city": "Lyon", "region": "Auvergne-Rhone-Alpes", "country": "France", "country_code": "FR"}
NYC = {
    "city": "New York City",
    "region": "New York",
    "country": "United States",
    "country_code": "US",
}


def _haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    la1, lo1, la2, lo2 = map(math.radians, (*a, *b))
    h = (
        math.sin((la2 - la1) / 2) ** 2
        + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    )
    return 2 * 6371.0 * math.asin(min(1.0, math.sqrt(h)))


class FakeLocator:
    """Samples around Paris and New York; records every batch it was called with."""

    model_name = "fake-model"
    encoder_name = "fake-encoder"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[int] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def locate_images(
        self, images, num_samples=512, guidance=2.0, steps=None, exif_gps=None, with_density=True
    ):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls.append(len(images))
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            gps = list(exif_gps) if exif_gps is not None else [None] * len(images)
            return [
                self._one(name, num_samples, guidance, steps, g, with_density)
                for (name, _), g in zip(images, gps)
            ]
        finally:
            with self._lock:
                self.active -= 1

    def _one(self, name, num_samples, guidance, steps, gps, with_density):
        rng = np.random.default_rng(0)
        n1 = int(num_samples * 0.7)
        samples = np.concatenate(
            [
                rng.normal([48.85, 2.35], [2.0, 3.0], size=(n1, 2)),
                rng.normal([40.7, -74.0], [1.5, 2.0], size=(num_samples - n1, 2)),
            ]
        )
        result = {
            "image": name,
            "ok": True,
            "error": None,
            "best_guess": {"lat": 48.85, "lon": 2.35, "place": PARIS},
            "regions": [
                {
                    "lat": 48.8,
                    "lon": 2.3,
                    "probability": 0.55,
                    "radius_km": 250.0,
                    "spread_km": 120.0,
                    "place": PARIS,
                },
                {
                    "lat": 40.7,
                    "lon": -74.0,
                    "probability": 0.3,
                    "radius_km": 250.0,
                    "spread_km": 90.0,
                    "place": NYC,
                },
                {
                    "lat": 45.76,
                    "lon": 4.84,
                    "probability": 0.15,
                    "radius_km": 250.0,
                    "spread_km": 60.0,
                    "place": LYON,
                },
            ],
            "localizability_bits": 3.31,
            "localizability_vs_uniform_bits": 6.96,
            "effective_area_km2": 4.1e6,
            "samples": [[round(a, 4), round(b, 4)] for a, b in samples.tolist()],
            "exif_gps": None,
            "error_km": None,
            "settings": {
                "model": self.model_name,
                "encoder": self.encoder_name,
                "num_samples": num_samples,
                "guidance": guidance,
                "steps": steps or 32,
            },
        }
        if gps is not None:
            result["exif_gps"] = {"lat": gps[0], "lon": gps[1]}
            result["error_km"] = _haversine_km((48.85, 2.35), gps)
        if with_density:
            lat = np.linspace(-88.5, 88.5, 60)
            lon = np.linspace(-178.5, 178.5, 120)
            logd = np.logaddexp(
                -(((lat[:, None] - 48.85) / 6) ** 2) - ((lon[None, :] - 2.35) / 8) ** 2,
                np.log(0.4) - (((lat[:, None] - 40.7) / 5) ** 2) - ((lon[None, :] + 74) / 6) ** 2,
            )
            result["density"] = {
                "lat": lat.tolist(),
                "lon": lon.tolist(),
                "log_density": logd.round(3).tolist(),
            }
        return result


# ---- a sharp answer through the real pipeline ----------------------------------------------

EIFFEL_TOWER = (48.8584, 2.2945)
LOUVRE = (48.8606, 2.3376)
SHARP_MODES = ((EIFFEL_TOWER, 0.1, 0.7), (LOUVRE, 0.3, 0.3))
"""(centre, per-axis sd in km, weight): a street-scale answer with two sharp modes 3 km apart."""


class SharpModel(GeoModel):
    """Stands in for a generative model whose posterior is :data:`SHARP_MODES` whatever the
    photo: ``sample`` draws from the mixture, ``localizability`` returns its entropy. Behind a
    real :class:`globeflow.apps.pipeline.Locator`, everything after sampling (regions, names,
    map window, OSM link, formatting) is the product's own code. A :class:`GeoModel` (it draws
    inside ``sample``, as the baselines do) whose every method in use is its own."""

    family = "sharp-stub"
    cond_dim = 4
    metadata: dict = {}
    device = "cpu"

    def __init__(self, modes=SHARP_MODES) -> None:
        super().__init__()
        self.modes = modes

    def eval(self):
        return self

    def prepare_embeddings(self, emb):
        import torch

        return torch.as_tensor(emb, dtype=torch.float32)

    def sample(self, emb, num_samples, steps=None, guidance=None, noise=None, generator=None, **_):
        import torch

        draws = [self._mixture(num_samples, generator) for _ in range(emb.shape[0])]
        return torch.stack(draws).float()

    def _mixture(self, n, generator):
        import torch

        weights = torch.tensor([w for _, _, w in self.modes], dtype=torch.float64)
        component = torch.multinomial(weights, n, replacement=True, generator=generator)
        out = torch.empty(n, 2, dtype=torch.float64)
        for i, ((lat, lon), sd_km, _) in enumerate(self.modes):
            chosen = component == i
            noise = torch.randn(int(chosen.sum()), 2, generator=generator, dtype=torch.float64)
            deg = sd_km / 111.195  # km per degree of latitude (R = 6371 km)
            out[chosen] = torch.tensor([lat, lon]) + noise * torch.tensor(
                [deg, deg / math.cos(math.radians(lat))]
            )
        return out

    def log2_density_bits(self) -> float:
        """E[log2 p] per steradian of the mixture (its modes do not overlap): minus the
        weighted entropies of the Gaussians, minus the entropy of the weights."""
        bits = 0.0
        for _, sd_km, w in self.modes:
            var_sr = (sd_km / 6371.0) ** 2
            bits -= w * math.log2(2 * math.pi * math.e * var_sr) + w * math.log2(1 / w)
        return bits

    def localizability(self, emb, num_samples, steps=None, generator=None, **_):
        import torch

        bits = torch.full((emb.shape[0],), self.log2_density_bits())
        return bits, torch.full_like(bits, 0.05)

    def sample_with_log_density(self, emb, num_samples, steps=None, generator=None, **_):
        """Log-densities (B, N) nats at every sample: the mixture's entropy, exactly."""
        import torch

        log_p = torch.full((emb.shape[0], num_samples), self.log2_density_bits() * math.log(2))
        return None, log_p


class FakeEncoder:
    name, dim = "fake-encoder", 4

    def embed(self, images):
        import torch

        return torch.zeros(len(images), self.dim)


def sharp_locator(modes=SHARP_MODES):
    """A real :class:`~globeflow.apps.pipeline.Locator` over :class:`SharpModel`."""
    from globeflow.apps.pipeline import Locator

    return Locator(SharpModel(modes), FakeEncoder(), model_name="sharp-stub")
