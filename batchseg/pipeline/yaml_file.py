"""Reading a pipeline file: YAML with ``safe_load`` semantics, and the line of every key.

Errors name the file and the line (and column for syntax errors), so a cron mail says
where to look. Duplicate keys, which ``yaml.safe_load`` silently resolves to the last
one, are errors here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from batchseg.errors import UsageError

# Where a value sits in the document: keys and list indices from the top, e.g.
# ("train-student", 0, "epochs"); () is the document itself.
KeyPath = tuple[Any, ...]


@dataclass(frozen=True)
class YamlDocument:
    """A parsed pipeline file: its data and the line (1-based) of every key and value."""

    path: Path
    data: Any
    key_lines: dict[KeyPath, int]  # the line a key is written on (list items: the item's line)
    overrides: dict[KeyPath, str] = field(default_factory=dict)  # keys set on the command line: their --set text

    def line(self, where: KeyPath) -> int:
        """The line of ``where``, or of its closest written ancestor (1 for the document)."""
        for cut in range(len(where), 0, -1):
            if where[:cut] in self.key_lines:
                return self.key_lines[where[:cut]]
        return 1

    def error(self, where: KeyPath, message: str) -> UsageError:
        """A usage error naming the file, the line and the key."""
        name = dotted(where)
        given = next((self.overrides[where[:cut]] for cut in range(len(where), 0, -1) if where[:cut] in self.overrides),
                     None)
        place = f"--set {given}" if given is not None else f"line {self.line(where)}"
        return UsageError(f"{self.path}, {place}: {name + ': ' if name else ''}{message}")


def dotted(where: KeyPath) -> str:
    """``("train-student", 0, "epochs")`` -> ``train-student[0].epochs``."""
    text = ""
    for part in where:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def read_yaml(path: Path) -> YamlDocument:
    """Parse ``path``; ``UsageError`` (exit 2) for a missing file or bad YAML."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"pipeline file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read pipeline file {path}: {exc}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[KeyPath, int] = {}
        if node is not None:
            _walk(path, node, (), lines)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise UsageError(f"{path}{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: YAML syntax error: {exc}") from None
    finally:
        loader.dispose()
    return YamlDocument(path, data, lines)


def _walk(path: Path, node: yaml.Node, where: KeyPath, lines: dict[KeyPath, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise UsageError(f"{path}, line {line}: {dotted(where + (key,))} is given twice "
                                 f"(first on line {seen[key]})")
            seen[key] = line
            lines[where + (key,)] = line
            _walk(path, value_node, where + (key,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[where + (index,)] = item.start_mark.line + 1
            _walk(path, item, where + (index,), lines)
