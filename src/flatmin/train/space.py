"""The search space of a sweep: which settings vary, over which values, for which methods.

A dimension is one setting of ``TrainConfig`` with a list of values or a range::

    sigma=0.005,0.01,0.02          a list (any field; the only form for base, neighbour, divergence)
    sigma=0.001:0.1:log:5          a range: low:high, then options: log, int, and a number of grid points
    lr=0.01:0.2                    a linear float range (random and TPE draw from it)
    rwp.sigma=0.01,0.02            only for one method of the sweep

The same in a YAML file, one entry per dimension, a list or a mapping
``{low, high, log, int, points}`` or the text above. A method hyperparameter applies to the methods
of the sweep that have it, and is an error where none has it (or where the named method lacks it),
as in ``flatmin create``. Every value, and both ends of a range, must pass ``TrainConfig.validate``.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .config import METHOD_DEFAULTS, METHOD_HPARAMS, ConfigError, TrainConfig, load_yaml

# Settings a sweep does not vary: the seeds are the sweep's own (--seed, --seeds), the validation
# split is what every point is scored on, and the rest say where and how a run executes.
NOT_SWEPT = ("seed", "val_fraction", "threads", "num_workers", "flatness", "stop_after", "eval_batch_size", "device",
             "data_dir", "out", "progress", "log", "amp", "parallel", "fsdp", "method", "data", "model")
CATEGORICAL = ("base", "neighbour", "divergence")


def _field_kinds() -> Dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    kinds = {}
    for f in dataclasses.fields(TrainConfig):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        kinds[f.name] = args[0]
    return kinds


KINDS = _field_kinds()
SWEEPABLE = tuple(name for name, kind in KINDS.items()
                  if name not in NOT_SWEPT and (kind in (int, float) or name in CATEGORICAL))


@dataclass(frozen=True)
class Dimension:
    """One swept setting: ``values`` (a list), or ``low``..``high`` (log-spaced with ``log``, whole
    numbers with ``integer``; ``points`` values of it on a grid)."""

    name: str
    method: Optional[str]
    text: str
    values: Optional[Tuple[Any, ...]] = None
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    integer: bool = False
    points: Optional[int] = None

    @property
    def is_range(self) -> bool:
        return self.values is None

    def grid(self) -> List[Any]:
        """The values a grid visits: the list, or ``points`` values spaced evenly (in log space for
        a log range) from ``low`` to ``high``."""
        if not self.is_range:
            return list(self.values)
        space = np.geomspace if self.log else np.linspace
        raw = space(self.low, self.high, self.points)
        if self.integer:
            return list(dict.fromkeys(int(round(v)) for v in raw))
        return [float(f"{v:.6g}") for v in raw]  # readable in tables and YAML, distinct at 6 digits

    def describe(self) -> Dict[str, Any]:
        if not self.is_range:
            return {"values": list(self.values)}
        return {"low": self.low, "high": self.high, "log": self.log, "int": self.integer, "points": self.points}


def _number(name: str, text: str, entry: str) -> Any:
    kind = KINDS[name]
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--space {entry}: {text.strip()!r} is not a number") from None
    if kind is int:
        if not value.is_integer():
            raise ConfigError(f"--space {entry}: {name} takes whole numbers, not {text.strip()!r}")
        return int(value)
    return value


def parse_value(name: str, value: Any, entry: str) -> Dimension:
    """One dimension from its name (``NAME`` or ``METHOD.NAME``) and its list, mapping or text."""
    method, _, field_name = name.rpartition(".")
    method = method or None
    field_name = field_name.replace("-", "_")
    if field_name not in SWEEPABLE:
        why = ("the seeds are --seed and --seeds" if field_name == "seed" else
               "every point is scored on the same validation split" if field_name == "val_fraction" else
               "it is not a setting of a run" if field_name not in KINDS else "it is not a swept setting")
        raise ConfigError(f"--space {entry}: {field_name!r} cannot be swept ({why}); sweepable: "
                          + ", ".join(SWEEPABLE))
    if method is not None and method not in METHOD_DEFAULTS:
        raise ConfigError(f"--space {entry}: unknown method {method!r}: choose from {', '.join(METHOD_DEFAULTS)}")
    categorical = field_name in CATEGORICAL
    if isinstance(value, str) and ":" in value:
        if categorical:
            raise ConfigError(f"--space {entry}: {field_name} takes a list of values, not a range")
        parts = [p.strip() for p in value.split(":")]
        low, high = _number(field_name, parts[0], entry), _number(field_name, parts[1], entry)
        log = integer = False
        points = None
        for option in parts[2:]:
            if option in ("log", "int", "lin"):
                log, integer = log or option == "log", integer or option == "int"
            elif option.isdigit():
                points = int(option)
            else:
                raise ConfigError(f"--space {entry}: unknown range option {option!r}: use log, int, lin or a "
                                  "number of grid points")
        return _range(field_name, method, entry, low, high, log, integer or KINDS[field_name] is int, points)
    if isinstance(value, dict):
        unknown = set(value) - {"low", "high", "log", "int", "points"}
        if unknown or not {"low", "high"} <= set(value):
            raise ConfigError(f"--space {entry}: a range is a mapping of low, high and optionally log, int, points")
        if categorical:
            raise ConfigError(f"--space {entry}: {field_name} takes a list of values, not a range")
        low, high = (_number(field_name, str(value[k]), entry) for k in ("low", "high"))
        points = value.get("points")
        if points is not None and (isinstance(points, bool) or not isinstance(points, int)):
            raise ConfigError(f"--space {entry}: points={points!r} must be a whole number")
        return _range(field_name, method, entry, low, high, bool(value.get("log", False)),
                      bool(value.get("int", False)) or KINDS[field_name] is int, points)
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    if not items or any(isinstance(v, str) and not v for v in items):
        raise ConfigError(f"--space {entry}: the list of values is empty or has an empty item")
    if categorical:
        values = tuple(str(v) for v in items)
    else:
        values = tuple(_number(field_name, str(v), entry) for v in items)
    if len(set(values)) < len(values):
        raise ConfigError(f"--space {entry}: a value is listed twice")
    return Dimension(field_name, method, entry, values=values)


def _range(name: str, method: Optional[str], entry: str, low: float, high: float, log: bool, integer: bool,
           points: Optional[int]) -> Dimension:
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"--space {entry}: the range's ends must be finite numbers")
    if low > high:
        raise ConfigError(f"--space {entry}: the range is reversed ({low} > {high}): give low:high")
    if low == high:
        raise ConfigError(f"--space {entry}: the range is empty ({low} to {high}): give low < high, or a list")
    if log and low <= 0:
        raise ConfigError(f"--space {entry}: a log range must lie above 0, and {low}:{high} reaches 0 or below: "
                          "give low > 0 or a linear range")
    if points is not None and points < 2:
        raise ConfigError(f"--space {entry}: a range needs at least 2 grid points, not {points}")
    if integer and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"--space {entry}: an int range needs whole-number ends")
    if integer:
        low, high = int(low), int(high)
    return Dimension(name, method, entry, low=low, high=high, log=log, integer=integer, points=points)


def parse_space(entries: Sequence[str]) -> List[Dimension]:
    """The dimensions of ``--space`` entries: ``NAME=VALUES`` each, or the path of a YAML file."""
    dims: List[Dimension] = []
    for entry in entries:
        if "=" in entry:
            name, _, value = entry.partition("=")
            dims.append(parse_value(name.strip(), value.strip(), entry))
        elif entry.endswith((".yaml", ".yml")) or Path(entry).is_file():
            for name, value in load_yaml(entry).items():
                dims.append(parse_value(str(name), value, f"{name}={value} ({entry})"))
        else:
            raise ConfigError(f"--space {entry!r} is neither NAME=VALUES (e.g. sigma=0.01,0.02 or "
                              "sigma=0.001:0.1:log:5) nor a YAML file")
    return dims


def method_space(dims: Sequence[Dimension], methods: Sequence[str]) -> Dict[str, List[Dimension]]:
    """Each method's dimensions; a method hyperparameter that no method of the sweep has (or that
    the named method lacks) is refused as ``flatmin create`` refuses it."""
    spaces: Dict[str, List[Dimension]] = {m: [] for m in methods}
    for dim in dims:
        if dim.method is not None and dim.method not in methods:
            raise ConfigError(f"--space {dim.text}: method {dim.method!r} is not in --methods ({', '.join(methods)})")
        targets = [dim.method] if dim.method else list(methods)
        if dim.name in METHOD_HPARAMS:
            having = [m for m in targets if dim.name in METHOD_DEFAULTS[m]]
            if not having:
                lacking = targets[0]
                raise ConfigError(f"--space {dim.text}: --{dim.name.replace('_', '-')} does not apply to method "
                                  f"{lacking!r} (its hyperparameters: "
                                  f"{', '.join(sorted(METHOD_DEFAULTS[lacking])) or 'none'})")
            targets = having
        for m in targets:
            if any(d.name == dim.name for d in spaces[m]):
                raise ConfigError(f"--space {dim.text}: {dim.name} of {m} is given twice")
            spaces[m].append(dim)
    return spaces


def check_space(base: TrainConfig, spaces: Dict[str, List[Dimension]], grid: bool) -> None:
    """Every listed value and both ends of every range through ``TrainConfig.validate`` (a value
    outside its allowed interval is refused by name), and a grid that has all its points."""
    for method, dims in spaces.items():
        for dim in dims:
            if grid and dim.is_range and dim.points is None:
                raise ConfigError(f"--space {dim.text}: a grid needs the number of points of a range "
                                  f"(e.g. {dim.name}={dim.low}:{dim.high}{':log' if dim.log else ''}:5)")
            for value in (dim.values if not dim.is_range else (dim.low, dim.high)):
                try:
                    dataclasses.replace(base, method=method, **{dim.name: value}).validate()
                except ValueError as err:  # ConfigError, or the methods' own range check
                    raise ConfigError(f"--space {dim.text}: {err}") from None


def grid_points(dims: Sequence[Dimension]) -> List[Dict[str, Any]]:
    """Every combination of the dimensions' grid values, the first dimension slowest."""
    names = [d.name for d in dims]
    return [dict(zip(names, combo)) for combo in itertools.product(*(d.grid() for d in dims))]


def describe(spaces: Dict[str, List[Dimension]]) -> Dict[str, Dict[str, Any]]:
    return {m: {d.name: d.describe() for d in dims} for m, dims in spaces.items()}
