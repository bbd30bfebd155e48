"""Tool JSON Schemas from messages as inert data: checked against bounded rules, evaluated with RE2, on a time budget.

A publisher writes the `parameters` of every tool it declares, so the worker never lets one of those schemas make
it fetch anything, read a file, or run for long. Each rule has a name that the `rejected` reply quotes:

    schema_size          the schema's JSON is larger than `max_bytes`
    schema_depth         subschemas nest deeper than `max_depth`, counting through local `$ref`s
    ref_not_local        a `$ref` that is not `#` or `#/json/pointer`, or a `$id`, anchor or `$dynamicRef`
    ref_unresolvable     a local `$ref` points at nothing
    ref_fanout           following `$ref`s expands more than `max_ref_expansions` times (`allOf` chains double)
    ref_cycle            `$ref`s that loop back without descending into the instance (endless recursion)
    pattern_unsupported  a `pattern` or `patternProperties` key RE2 cannot compile (lookaround, backreferences)
    invalid_schema       not a valid JSON Schema (2020-12)
    not_object           the schema is not of type `object`
    time_budget          checking the schema, or validating arguments against it, ran out of `budget_s`

Validation uses jsonschema with an empty `referencing.Registry()` (no retrieval of any kind), RE2 for `pattern`,
`patternProperties` and `additionalProperties`, no format assertions, and a deadline checked at every keyword.
The functions here are synchronous and CPU-bound: callers run them off the event loop.
"""

import functools
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

import orjson
import re2
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema._utils import equal
from jsonschema.exceptions import best_match
from referencing import Registry


@dataclass(frozen=True, slots=True)
class SchemaLimits:
    max_bytes: int = 64 * 1024
    max_depth: int = 32
    max_ref_expansions: int = 500
    budget_s: float = 0.25


DEFAULT_LIMITS: Final = SchemaLimits()
NON_LOCAL_KEYWORDS: Final = frozenset(
    {"$id", "$anchor", "$dynamicAnchor", "$dynamicRef", "$recursiveRef", "$recursiveAnchor"}
)
# Keywords whose value is one subschema, a map of subschemas or a list of them; and which of them apply their
# subschemas to a part of the instance (a `$ref` loop through one of these ends with the instance).
ONE_SUBSCHEMA: Final = frozenset(
    {"additionalProperties", "items", "contains", "propertyNames", "unevaluatedItems", "unevaluatedProperties"}
    | {"if", "then", "else", "not", "additionalItems"}
)
# `$defs` is not among them: a definition is only evaluated where a `$ref` reaches it, and is walked there.
SUBSCHEMA_MAPS: Final = frozenset({"properties", "patternProperties", "dependentSchemas"})
SUBSCHEMA_LISTS: Final = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
DESCENDS_INTO_INSTANCE: Final = frozenset(
    {"additionalProperties", "items", "contains", "propertyNames", "unevaluatedItems", "unevaluatedProperties"}
    | {"additionalItems", "properties", "patternProperties", "prefixItems"}
)
_QUOTED_CHARS: Final = 80


class ToolSchemaError(Exception):
    """A tool schema breaks `rule`; `message` says how, without echoing more than a short quote of the schema."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule
        self.message = message


class _Deadline:
    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.at = time.monotonic() + budget_s

    def check(self) -> None:
        if time.monotonic() > self.at:
            raise ToolSchemaError("time_budget", f"took longer than the {self.budget_s:g}s budget")


_deadline: ContextVar[_Deadline | None] = ContextVar("tool_schema_deadline", default=None)


@contextmanager
def budget(limits: SchemaLimits | None = None) -> Iterator[None]:
    """One time budget for everything checked or validated inside; a budget already running is kept."""
    if _deadline.get() is not None:
        yield
        return
    token = _deadline.set(_Deadline((limits or DEFAULT_LIMITS).budget_s))
    try:
        yield
    except RecursionError:
        raise ToolSchemaError("schema_depth", "validation recursed too deep") from None
    finally:
        _deadline.reset(token)


def _spend() -> None:
    deadline = _deadline.get()
    if deadline is not None:
        deadline.check()


def check_parameters(parameters: Mapping[str, Any], limits: SchemaLimits = DEFAULT_LIMITS) -> None:
    """Raise ToolSchemaError naming the first rule `parameters` breaks."""
    with budget(limits):
        size = len(orjson.dumps(parameters))
        if size > limits.max_bytes:
            raise ToolSchemaError("schema_size", f"{size} bytes; the limit is {limits.max_bytes}")
        _Walk(parameters, limits).schema(parameters, depth=0, instance_depth=0)
        error = best_match(_META_VALIDATOR.iter_errors(parameters))
        if error is not None:
            raise ToolSchemaError("invalid_schema", f"not a valid JSON Schema: {_quote(error.message)}")
        if parameters.get("type") != "object":
            raise ToolSchemaError("not_object", "a tool's parameters must be a JSON Schema of type 'object'")


def argument_error(
    parameters: Mapping[str, Any], arguments: Mapping[str, Any], limits: SchemaLimits = DEFAULT_LIMITS
) -> str | None:
    """Why `arguments` do not match `parameters` (already checked), or None; ToolSchemaError past the budget."""
    with budget(limits):
        validator = ToolSchemaValidator(parameters, registry=Registry())
        error = best_match(validator.iter_errors(arguments))
    if error is None:
        return None
    where = "/".join(map(str, error.absolute_path)) or "(arguments)"
    return f"at {where}: {error.message}"


class _Walk:
    """One pass over a schema as jsonschema would apply it, following local `$ref`s, enforcing the rules."""

    def __init__(self, root: Mapping[str, Any], limits: SchemaLimits) -> None:
        self.root = root
        self.limits = limits
        self.expansions = 0
        # Targets being expanded (by identity, however the ref spells them) → the instance depth they were entered at.
        self.active: dict[int, int] = {}

    def schema(self, node: Any, depth: int, instance_depth: int) -> None:
        _spend()
        if depth > self.limits.max_depth:
            raise ToolSchemaError("schema_depth", f"subschemas nest deeper than {self.limits.max_depth} levels")
        if not isinstance(node, dict):
            return  # booleans are schemas; anything else is for the meta-schema check to refuse
        if found := NON_LOCAL_KEYWORDS & node.keys():
            raise ToolSchemaError("ref_not_local", f"{sorted(found)[0]} is not allowed; only '#/…' refs are")
        for keyword, value in node.items():
            below = instance_depth + (keyword in DESCENDS_INTO_INSTANCE)
            if keyword == "$ref" and isinstance(value, str):
                self.ref(value, depth, instance_depth)
            elif keyword == "pattern" and isinstance(value, str):
                compiled(value)
            elif keyword in ONE_SUBSCHEMA:
                self.schema(value, depth + 1, below)
            elif keyword in SUBSCHEMA_MAPS and isinstance(value, dict):
                if keyword == "patternProperties":
                    for pattern in value:
                        compiled(pattern)
                for subschema in value.values():
                    self.schema(subschema, depth + 1, below)
            elif keyword in SUBSCHEMA_LISTS and isinstance(value, list):
                for subschema in value:
                    self.schema(subschema, depth + 1, below)
        if "unevaluatedProperties" in node and _mentions(self.root, "patternProperties"):
            # jsonschema evaluates those with Python's backtracking `re`; RE2 cannot be plugged in there.
            raise ToolSchemaError(
                "pattern_unsupported", "unevaluatedProperties cannot be combined with patternProperties"
            )

    def ref(self, ref: str, depth: int, instance_depth: int) -> None:
        if not (ref == "#" or ref.startswith("#/")):
            raise ToolSchemaError("ref_not_local", f"$ref {_quote(ref)} is not a local '#/…' reference")
        target = _pointer(self.root, ref)
        if id(target) in self.active:
            if self.active[id(target)] == instance_depth:
                raise ToolSchemaError("ref_cycle", f"$ref {_quote(ref)} refers back to itself in place")
            return  # recursion that descends into the instance: bounded by the instance
        self.expansions += 1
        if self.expansions > self.limits.max_ref_expansions:
            raise ToolSchemaError("ref_fanout", f"$refs expand more than {self.limits.max_ref_expansions} times")
        self.active[id(target)] = instance_depth
        try:
            self.schema(target, depth + 1, instance_depth)
        finally:
            del self.active[id(target)]


def _pointer(root: Mapping[str, Any], ref: str) -> Any:
    node: Any = root
    for token in ref.removeprefix("#").split("/")[1:]:
        key = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            raise ToolSchemaError("ref_unresolvable", f"$ref {_quote(ref)} points at nothing in the schema")
    return node


def _mentions(node: Any, keyword: str) -> bool:
    if isinstance(node, dict):
        return keyword in node or any(_mentions(value, keyword) for value in node.values())
    if isinstance(node, list):
        return any(_mentions(item, keyword) for item in node)
    return False


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # RE2 would print the publisher's pattern to stderr, outside the JSON logs


@functools.lru_cache(maxsize=512)
def compiled(pattern: str) -> "re2._Regexp[str]":
    """The pattern as RE2: linear time in the input, whatever the pattern."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error:
        raise ToolSchemaError("pattern_unsupported", f"RE2 cannot compile pattern {_quote(pattern)}") from None


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTED_CHARS else text[:_QUOTED_CHARS] + "…")


# Keyword functions of the validator below (jsonschema's own evaluate patterns with Python's `re`). `validator` is
# a jsonschema validator instance; its `descend` is not part of the typed protocol, hence Any.
JsonSchemaValidator = Any


def _pattern(validator: JsonSchemaValidator, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not compiled(pattern).search(instance):
        yield ValidationError(f"{_quote(instance)} does not match {_quote(pattern)}")


def _pattern_properties(
    validator: JsonSchemaValidator, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if compiled(pattern).search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    validator: JsonSchemaValidator, extra: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    declared = schema.get("properties", {})
    patterns = [compiled(p) for p in schema.get("patternProperties", {})]
    extras = sorted(k for k in instance if k not in declared and not any(p.search(k) for p in patterns))
    if validator.is_type(extra, "object"):
        for key in extras:
            yield from validator.descend(instance[key], extra, path=key)
    elif extra is False and extras:
        yield ValidationError(f"additional properties are not allowed ({', '.join(map(_quote, extras))})")


def _unique_items(validator: JsonSchemaValidator, unique: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    # jsonschema compares unhashable items pairwise without a pause; this checks the deadline on every row.
    if not (unique and validator.is_type(instance, "array")):
        return
    for position, item in enumerate(instance):
        _spend()
        if any(equal(item, other) for other in instance[position + 1 :]):
            yield ValidationError(f"items are not unique (item {position} repeats)")
            return


KeywordFunction = Callable[[JsonSchemaValidator, Any, Any, Any], Iterator[ValidationError] | None]


def _budgeted(keyword: KeywordFunction) -> KeywordFunction:
    def apply(
        validator: JsonSchemaValidator, value: Any, instance: Any, schema: Any
    ) -> Iterator[ValidationError] | None:
        _spend()
        return keyword(validator, value, instance, schema)

    return apply


_REPLACED: dict[str, KeywordFunction] = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "uniqueItems": _unique_items,
}
_KEYWORDS: dict[str, KeywordFunction] = Draft202012Validator.VALIDATORS
ToolSchemaValidator = validators.extend(  # type: ignore[no-untyped-call]  # the stubs leave extend() untyped
    Draft202012Validator,
    {name: _budgeted(_REPLACED.get(name, function)) for name, function in _KEYWORDS.items()},
)
# Checks a tool schema against the 2020-12 meta-schema. Any registry but jsonschema's default is combined with the
# bundled specifications only, so the meta-schema's own refs resolve locally and nothing is ever retrieved.
_META_VALIDATOR = ToolSchemaValidator(Draft202012Validator.META_SCHEMA, registry=Registry())
