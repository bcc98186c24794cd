"""The error hierarchy: every failure a user can cause is one of these, with a message that says what to do."""

import difflib


class DeltaTuneError(Exception):
    """Base class of all deltatune errors."""


class ConfigError(DeltaTuneError, ValueError):
    """A configuration value is unknown, of the wrong type, or inconsistent."""


class DataError(DeltaTuneError, ValueError):
    """A data file is missing, malformed, or does not fit the task (message names file and line)."""


class TargetError(DeltaTuneError, ValueError):
    """A target pattern matches no module, or a delta does not fit the model it is attached to."""


class CheckpointError(DeltaTuneError, RuntimeError):
    """A saved delta or checkpoint is missing, corrupted, or belongs to another base model."""




Problem = tuple[list[str], str]  # (key path, what is wrong there)


def config_error(exc: "ValidationError", model: type, where: str = "") -> ConfigError:  # noqa: F821
    """Turn a pydantic ValidationError into one ConfigError naming each bad key and the keys allowed there."""
    return problems_error(validation_problems(exc, model), where)


def problems_error(problems: list[Problem], where: str = "") -> ConfigError:
    """One ConfigError listing `problems`; it keeps them, so an enclosing config can prefix their keys."""
    lines = [f"{'.'.join([where, *loc] if where else loc) or 'config'}: {text}" for loc, text in problems]
    error = ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
    error.problems = problems
    return error


def validation_problems(exc: "ValidationError", model: type) -> list[Problem]:  # noqa: F821
    problems: list[Problem] = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        inner = (err.get("ctx") or {}).get("error")
        if getattr(inner, "problems", None):  # a nested config already explained itself
            problems += [(loc + sub, text) for sub, text in inner.problems]
        elif err["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append((loc, f"unknown key{hint}; allowed keys: {', '.join(allowed)}"))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append((loc, f"{msg} (got {repr(err.get('input'))[:80]})"))
    return problems


def _fields_at(model: type, path: list[str]) -> list[str]:
    """Field names of the (nested) pydantic model found by following `path` from `model`."""
    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        nested = getattr(field, "annotation", None)
        if not (isinstance(nested, type) and hasattr(nested, "model_fields")):
            return []
        model = nested
    return list(getattr(model, "model_fields", {}))
