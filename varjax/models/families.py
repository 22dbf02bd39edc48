"""The model families a model directory can hold, and how each one's config and parameters are read back.

A family is a tokenizer alone (``vq``: the multi-scale VQ-VAE of VAR; ``kl``: E-CAR's KL autoencoder) or a
generator with the tokenizer it was trained on (``var``, ``ecar``). The manifest (``varjax_model.json``) stores
the tokenizer under ``vae`` and the generator under the family's own key; this table is what turns those
entries back into config objects. Adding a family adds a row here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from varjax.models.ecar import ECARConfig
from varjax.models.kl_ae import KLAEConfig
from varjax.models.var import VARConfig
from varjax.models.var_params import fit_var_params
from varjax.models.vqvae import VQVAEConfig


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    tokenizer: str  # the tokenizer family it generates for (its own name for a tokenizer)
    config: type  # the config dataclass (``from_dict`` / ``to_dict``)
    key: str | None = None  # manifest entry of the generator (None for a tokenizer)
    fit_params: Callable[[Any, Any], Any] | None = None  # stored layout -> the layout ``config`` builds


def _identity(params, cfg):
    del cfg
    return params


FAMILIES = {
    "vq": Family("vq", "vq", VQVAEConfig),
    "kl": Family("kl", "kl", KLAEConfig),
    "var": Family("var", "vq", VARConfig, key="var", fit_params=fit_var_params),
    "ecar": Family("ecar", "kl", ECARConfig, key="ecar", fit_params=_identity),
}


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is unknown; expected one of {sorted(FAMILIES)}.")
    return FAMILIES[name]
