"""Named choices of a config key, registered beside the code that implements them; a user's own by import path.

A ``Registry`` is a dict ``name -> implementation`` for one config key (``generator.arch``, ``loss.kind`` ...).
The file that implements a choice registers it (``@GENERATORS.register("dcgan")``), and config validation,
``--help`` and the tests' coverage checks read the registry, so adding a built-in touches that file only.
Where ``allow_import`` is set, a value ``package.module:Name`` names a user's own implementation, imported on
use (distgan's package need not be edited); the run's config, checkpoints and exports record that string.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    """A value that names no choice (the config layer turns it into its ConfigError)."""


def is_import_path(value: str) -> bool:
    """``package.module:Name``: a user's own implementation rather than a built-in name."""
    module, _, name = value.partition(":")
    return bool(module) and bool(name) and all(part.isidentifier() for part in module.split(".") + name.split("."))


def import_object(value: str, key: str) -> Any:
    """The object ``package.module:Name`` names; a RegistryError that says what failed and the fix."""
    module_name, _, attr = value.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RegistryError(f"config key '{key}' = '{value}': cannot import {module_name} ({err}); put the folder "
                            f"holding it on PYTHONPATH (or install it) in every process that trains, samples or "
                            "evaluates this run") from None
    except Exception as err:  # the user's module raised while importing: name it, keep it to one line
        raise RegistryError(f"config key '{key}' = '{value}': importing {module_name} failed "
                            f"({type(err).__name__}: {err})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RegistryError(f"config key '{key}' = '{value}': {module_name} has no '{attr}'")
        obj = getattr(obj, part)
    return obj


class Registry(dict, Generic[T]):
    """``name -> implementation`` for the config key ``key``."""

    def __init__(self, key: str, allow_import: bool = False) -> None:
        super().__init__()
        self.key, self.allow_import = key, allow_import

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator (or a call on a value) adding ``name``; a name is registered once."""
        def add(value: T) -> T:
            if name in self:
                raise ValueError(f"{self.key}: '{name}' is already registered")
            self[name] = value
            return value
        return add

    def names(self) -> tuple[str, ...]:
        return tuple(self)

    def resolve(self, value: str) -> T:
        """The implementation ``value`` names (imported when it is an import path)."""
        if value in self:
            return self[value]
        if self.allow_import and is_import_path(value):
            obj = import_object(value, self.key)
            if not callable(obj):
                raise RegistryError(f"config key '{self.key}' = '{value}': names a {type(obj).__name__}, not a class")
            return obj
        match = difflib.get_close_matches(value, list(self), n=1, cutoff=0.5)
        hint = f"did you mean '{match[0]}'? " if match else ""
        extra = " or an import path package.module:Class" if self.allow_import else ""
        raise RegistryError(f"config key '{self.key}' = {value!r}: {hint}choose one of {', '.join(self)}{extra}")
