"""Export a trained run's model as the package's bundled default model.

Weights are stored in float16 (half the size; loading casts them back to float32), and the
metadata keeps the encoder name, training config and validation metrics.

    python scripts/export_default_model.py runs/default-rfm/best src/globeflow/default_model \
        [W [SAMPLER]]

W, if given, is stored as the model's ``recommended_guidance`` (used when the user gives none);
SAMPLER, a JSON object of sampler fields and a ``measured`` note, as its
``recommended_sampler`` (the recipe it runs when the user gives none; measure it anew for each
model: docs/defaults.md, "The bundled model's recommended sampler"). The bundled model's:

    '{"solver": "lagged-midpoint", "grid": "quadratic", "steps": 4, "precision": "fp32",
      "localizability_steps": 8, "measured": "..."}'
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from globeflow.core.checkpoints import CONFIG_NAME, WEIGHTS_NAME, load_model
from globeflow.core.sampler_settings import RECOMMENDED_SAMPLER_KEY, sampler_recommendation


def main(src: str, dst: str, guidance: str | None = None, sampler: str | None = None) -> None:
    model = load_model(src)
    out = Path(dst)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = json.loads((Path(src) / CONFIG_NAME).read_text())
    if guidance is not None:
        config.setdefault("metadata", {})["recommended_guidance"] = float(guidance)
    if sampler is not None:
        recommendation = json.loads(sampler)
        sampler_recommendation(recommendation)  # refuses fields the recipe does not have
        config.setdefault("metadata", {})[RECOMMENDED_SAMPLER_KEY] = recommendation
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    state = {
        k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(out / WEIGHTS_NAME))
    reloaded = load_model(out)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, model.cond_dim, generator=g)
    a = model.sample(emb, 64, 8, 2.0, generator=torch.Generator().manual_seed(1))
    b = reloaded.sample(emb, 64, 8, 2.0, generator=torch.Generator().manual_seed(1))
    print(
        json.dumps(
            {
                "size_mb": (out / WEIGHTS_NAME).stat().st_size / 2**20,
                "max_sample_shift_deg": float((a - b).abs().max()),
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
