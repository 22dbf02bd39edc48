"""Training tasks, one per model family, found by ``config.task``.

``tokenizer`` trains VAR's multi-scale VQ-VAE or E-CAR's KL autoencoder (``config.model_type``); ``var`` and
``ecar`` train a generator on a frozen tokenizer. Each module offers what ``varjax.config.resolve`` derives for
it and ``build(plan, mesh) -> Task`` for the loop (``varjax.tasks.base`` says what that is). Adding a family adds
a module here, its sampler (``varjax.sampling``), its configs and a row in ``varjax.models.families``.
"""

from __future__ import annotations

from types import ModuleType

from varjax.tasks import ecar, tokenizer, var

TASKS: dict[str, ModuleType] = {"tokenizer": tokenizer, "var": var, "ecar": ecar}


def get(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"config.task={name!r}: expected one of {sorted(TASKS)}.")
    return TASKS[name]
