"""Config files (YAML or TOML) and ``--key=value`` overrides, shared by every command.

A config is a flat or one-level-nested dict: ``{"model": {...}, "train": {...}, "data": {...}}``.
Overrides address nested keys with dots: ``--train.lr=3e-4 --model.dim=256``. Values are parsed
as YAML scalars so ``1e-3``, ``true``, ``null`` and ``[1, 2]`` mean what they look like.
Unknown keys are refused with the closest known key suggested (``check_keys``).
"""

from __future__ import annotations

import copy
import difflib
import tomllib
from pathlib import Path
from typing import Any, Iterable
from ..errors import UserError

__all__ = ["ConfigError", "check_range", "check_seed", "load_config_file", "apply_overrides", "check_keys", "closest", "coerce_fields", "dataclass_from_dict"]


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message says why and what to do."""


def check_range(flag: str, value, low, high) -> None:
    """Refuse ``value`` outside ``[low, high]`` (or NaN) as a ConfigError naming ``flag``: a count
    or length far beyond what any run here could use would otherwise overflow deep inside."""
    if value is not None and not low <= value <= high:
        raise ConfigError(f"{flag} must lie in [{low:,}, {high:,}], got {value}")


def check_seed(flag: str, value: int) -> None:
    """A seed every generator here takes: an integer in [0, 2**63)."""
    check_range(flag, value, 0, 2**63 - 1)


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"config file {path} must end in .yaml, .yml or .toml")
    except ConfigError:
        raise
    except Exception as err:  # yaml / toml parse errors carry line numbers; keep them, on one line
        raise ConfigError(f"cannot parse config file {path}: {_one_line(err)}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def _one_line(err: Exception) -> str:
    """A parser's error on one line: YAML's marked errors name the problem and where it is, then
    quote the line under it (left out here: the line and column say where)."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        context = getattr(err, "context", None)
        return f"{context + ': ' if context else ''}{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(err).split())


def _parse_value(text: str) -> Any:
    import yaml

    for number in (int, float):  # YAML 1.1 reads "1e-3" as a string
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except Exception:
        return text


def apply_overrides(config: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``config`` with each ``key=value`` (dots for nesting) applied."""
    out = copy.deepcopy(config)  # nested sections too: the caller's dict is never changed
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=3e-4)")
        key, value = item.split("=", 1)
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return out


def coerce_fields(klass, given: dict[str, Any], where: str) -> dict[str, Any]:
    """Check the values of a dataclass's fields against their declared types, converting where
    the meaning is unambiguous (an int for a float field, a numeric string such as YAML's
    ``1e-3`` for a number); anything else is refused naming the field."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(klass)
    out = dict(given)
    for f in dataclasses.fields(klass):
        if f.name not in given:
            continue
        value, hint = given[f.name], hints[f.name]
        args = typing.get_args(hint)
        allowed = tuple(a for a in args if isinstance(a, type)) if args else (hint,)
        if value is None and type(None) in allowed:
            continue
        if isinstance(hint, type) and hint is dict or typing.get_origin(hint) is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{f.name} must be a mapping, got {value!r}")
            continue
        if bool in allowed:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{f.name} must be true or false, got {value!r}")
            continue
        if isinstance(value, bool):
            raise ConfigError(f"{where}.{f.name} must be a {allowed[0].__name__}, got {value!r}")
        if float in allowed and isinstance(value, (int, str)):
            try:
                out[f.name] = float(value)
                continue
            except ValueError:
                pass
        if int in allowed and isinstance(value, float) and value.is_integer():
            out[f.name] = int(value)
            continue
        if not isinstance(out[f.name], allowed):
            names = " or ".join(a.__name__ for a in allowed if a is not type(None))
            raise ConfigError(f"{where}.{f.name} must be {names}, got {value!r}")
    return out


def dataclass_from_dict(klass, given: dict[str, Any], where: str):
    """``klass(**given)`` after refusing unknown keys (with a suggestion) and checking types."""
    import dataclasses

    check_keys(given, [f.name for f in dataclasses.fields(klass)], where)
    given = coerce_fields(klass, given, where)
    try:
        return klass(**given)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def closest(name: str, known: Iterable[str]) -> str | None:
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return match[0] if match else None


def check_keys(given: Iterable[str], known: Iterable[str], where: str) -> None:
    """Refuse keys that do not exist, suggesting the closest existing one."""
    known = list(known)
    for key in given:
        if key not in known:
            hint = closest(key, known)
            tip = f"; did you mean {hint!r}?" if hint else f"; known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown key {key!r} in {where}{tip}")
