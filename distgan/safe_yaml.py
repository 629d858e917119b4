"""YAML that cannot explode: every YAML distgan reads (configs, overrides, a run's saved config) goes through here.

PyYAML's safe loader still expands aliases (a 401-byte file of nested aliases becomes gigabytes, and an error
printing the value prints all of it) and lets a later duplicate key replace an earlier one silently (two
``train:`` sections merge into the second). Here aliases are refused before anything is built from them,
duplicate keys are refused by name and line, and the number of nodes is bounded.
"""
from __future__ import annotations

from typing import Any

import yaml

from distgan.errors import UserError, shown

MAX_NODES = 100_000  # a config has a few hundred


class YAMLInputError(UserError):
    """YAML that distgan refuses to build (an alias, a duplicate key, too many nodes, a number too long)."""


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise YAMLInputError(f"line {event.start_mark.line + 1}: an alias (*{shown(event.anchor)[1:-1]}); distgan "
                                 "does not expand YAML aliases: write the value out")
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise YAMLInputError(f"more than {MAX_NODES} YAML nodes; a distgan config has a few hundred")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base constructor says so
                    continue
                if first is not None:
                    raise YAMLInputError(f"line {key_node.start_mark.line + 1}: the key {shown(key)} appears again "
                                         f"(first on line {first}); write each key (and each section) once")
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """The value of one YAML document. Raises YAMLInputError for what distgan refuses, yaml.YAMLError for text that
    is not YAML, RecursionError for nesting past Python's limit."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except ValueError as err:  # int("1" * 5000): past Python's digit limit
        if isinstance(err, YAMLInputError):
            raise
        raise YAMLInputError(f"a value cannot be read ({shown(str(err))})") from None
    finally:
        loader.dispose()
