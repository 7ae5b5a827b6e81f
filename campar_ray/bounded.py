"""YAML and JSON from files a user did not write, parsed in bounded memory and time.

A config, a bundle's ``config.yaml``, a checkpoint's ``meta.json``, a search's
``trials.json`` and every ``--set`` value go through :func:`load_yaml` or :func:`load_json`.
A 1.3 KB YAML alias bomb ("billion laughs") expands to gigabytes, and a 20,000-deep list
overflows Python's stack: both are refused here, before anything is built, by limits far
above any real file (:data:`MAX_BYTES`, :data:`MAX_DEPTH`, :data:`MAX_NODES`). YAML is
walked as an event stream first (PyYAML's parser is iterative), counting the nodes every
alias would expand to, so the check itself costs one pass over the text. Every refusal is
one :class:`BoundedError` line that names the file and quotes at most :func:`shorten` of a
value.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

MAX_BYTES = 64 * 2**20
"""Largest file parsed: a search's record of thousands of trials is a few MB."""
MAX_DEPTH = 64
"""Deepest nesting of lists and mappings (campar's own files nest 4 levels)."""
MAX_NODES = 1_000_000
"""Most values a YAML document may hold once every alias is expanded."""
QUOTE = 80
"""Characters of a value an error message quotes."""

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class BoundedError(ValueError):
    """A YAML/JSON text that is malformed or over a limit; the message names its source."""


def shorten(value: object, limit: int = QUOTE) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error line quotes a value from a file
    without repeating a megabyte of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def load_yaml(text: str | bytes, source: str) -> Any:
    """The value of the YAML document ``text`` (safe tags only), read from ``source``."""
    _check_size(text, source)
    try:
        _check_events(yaml.parse(text, Loader=_LOADER), source)
        return yaml.load(text, Loader=_LOADER)  # a safe loader: no Python tags
    except yaml.YAMLError as error:
        if "nesting depth" in str(getattr(error, "problem", "")):  # libyaml's own limit, 1000
            raise BoundedError(_too_deep(source)) from None
        raise BoundedError(f"{source} is not valid YAML: {_yaml_problem(error)}") from None


def load_json(text: str | bytes, source: str, **options: Any) -> Any:
    """The value of the JSON document ``text`` read from ``source`` (``options`` go to
    :func:`json.loads`)."""
    _check_size(text, source)
    try:
        value = json.loads(text, **options)
    except RecursionError:
        raise BoundedError(_too_deep(source)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BoundedError(f"{source} is not valid JSON: {shorten(str(error))}") from None
    _check_depth(value, source)
    return value


def _check_size(text: str | bytes, source: str) -> None:
    if len(text) > MAX_BYTES:
        raise BoundedError(
            f"{source} holds {len(text)} bytes, more than the {MAX_BYTES} read from such a file"
        )


def _check_events(events: Any, source: str) -> None:
    """Refuse a document nested deeper than :data:`MAX_DEPTH`, or one whose aliases expand to
    more than :data:`MAX_NODES` values, from its event stream (nothing is built)."""
    sizes: dict[str, int] = {}  # anchor -> nodes it expands to
    stack: list[list[Any]] = [[None, 0]]  # per open collection: [anchor, nodes so far]
    for event in events:
        if isinstance(event, yaml.CollectionStartEvent):
            stack.append([event.anchor, 0])
            if len(stack) - 1 > MAX_DEPTH:
                raise BoundedError(_too_deep(source))
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, inner = stack.pop()
            size = inner + 1
        elif isinstance(event, yaml.AliasEvent):
            size, anchor = sizes.get(event.anchor, 1), None
        elif isinstance(event, yaml.ScalarEvent):
            size, anchor = 1, event.anchor
        else:
            continue
        if anchor is not None:
            sizes[anchor] = size
        stack[-1][1] += size  # a collection's count covers every value inside it
        if stack[-1][1] > MAX_NODES:
            raise BoundedError(
                f"{source} expands to more than {MAX_NODES} values (YAML aliases repeating "
                "others: an alias bomb?); write the values out"
            )


def _check_depth(value: Any, source: str) -> None:
    """Iteratively: a value nested deeper than :data:`MAX_DEPTH` is refused."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BoundedError(_too_deep(source))
        if isinstance(item, dict):
            stack.extend((inner, depth + 1) for inner in item.values())
        elif isinstance(item, list):
            stack.extend((inner, depth + 1) for inner in item)


def _too_deep(source: str) -> str:
    return f"{source} is nested more than {MAX_DEPTH} levels deep (campar's own files nest a few)"


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong and where, on one line, without the text around it."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    text = problem if len(problem) <= QUOTE else f"{problem[: QUOTE - 3]}..."
    return f"{text}{where}"
