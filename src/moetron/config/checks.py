"""Checks shared by the validators. A NaN compares false with everything (`nan <= 0` is False), so every
range check is written as `not (value in range)`, and every float field is first checked to be finite."""

import dataclasses
import math

from moetron.config.errors import invalid


def require_finite(config, prefix: str) -> None:
    """Refuse NaN and +-inf in any float field of the dataclass `config` (and the dataclasses inside it),
    naming the field, e.g. `train.optim.lr`."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise invalid(f"{prefix}.{f.name}", value, "a finite number")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            require_finite(value, f"{prefix}.{f.name}")
        if isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item) and not isinstance(item, type):
                    require_finite(item, f"{prefix}.{f.name}[{i}]")
