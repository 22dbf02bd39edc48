"""Samplers, one per generator family, found by the family a model directory holds.

Each module offers ``generate(tok_cfg, gen_cfg, opts, tok_params, gen_params, label_B, rng) -> (images (B, H, W, 3)
in [0, 1], extra)`` (one program for a whole generation), ``make_sampler(tok_cfg, gen_cfg, opts)`` (that program,
jitted), ``options(defaults, **flags)`` (sampling options from command-line values and the model directory's
defaults), ``describe(opts)`` and ``EXTRA``, the name of what a sample carries besides its image (VAR's tokens,
E-CAR's latents). ``codec`` holds the tokenizers' entry points.
"""

from __future__ import annotations

from types import ModuleType

from varjax.sampling import ecar, var

SAMPLERS: dict[str, ModuleType] = {"var": var, "ecar": ecar}


def get(family: str) -> ModuleType:
    if family not in SAMPLERS:
        raise ValueError(f"a {family!r} model directory holds no generator to sample from; expected one of "
                         f"{sorted(SAMPLERS)} (point --ckpt at a `varjax train` workdir or a converted VAR).")
    return SAMPLERS[family]


def defaults(bundle) -> dict:
    """The sampling defaults a model directory records for its generator (E-CAR's ``sample`` entry)."""
    from varjax.models import families

    key = families.get(bundle.family).key
    return dict((bundle.manifest.get(key) or {}).get("sample", {})) if key else {}
