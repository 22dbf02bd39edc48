"""Model configs as JSON: the one way a config dataclass becomes a dict (model directories, logs) and back."""

from __future__ import annotations

import dataclasses
from typing import Any


class DictConfig:
    """Mixin of the frozen config dataclasses: ``to_dict()`` and ``from_dict(d)``; JSON lists become the tuples
    the dataclass holds (the fields whose default is a tuple)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        tuples = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, tuple)}
        return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in dict(d).items()})
