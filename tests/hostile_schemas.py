"""Tool-parameter schemas a hostile publisher might send, each with the tool-schema rule it must break."""

from typing import Any

Schema = dict[str, Any]


def _object(**properties: Any) -> Schema:
    return {"type": "object", "properties": properties}


def remote_ref(url: str) -> Schema:
    return _object(target={"$ref": url})


def remote_base(url: str) -> Schema:
    # A `$id` would make the "local" ref below resolve against a remote base.
    return {"$id": url, "type": "object", "properties": {"x": {"$ref": "#/$defs/x"}}, "$defs": {"x": {}}}


def exponential_chain(levels: int = 12, fan: int = 4) -> Schema:
    """Each level refers to the next `fan` times: fan**levels expansions from a schema of a few hundred bytes."""
    defs: dict[str, Any] = {f"d{n}": {"allOf": [{"$ref": f"#/$defs/d{n + 1}"}] * fan} for n in range(levels)}
    defs[f"d{levels}"] = {"type": "string"}
    return {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": defs}


def self_cycle() -> Schema:
    # Validating anything against it recurses forever without consuming the instance.
    return {
        "type": "object",
        "$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}]}},
        "properties": {"x": {"$ref": "#/$defs/a"}},
    }


def deep(depth: int = 40) -> Schema:
    node: Schema = {"type": "string"}
    for _ in range(depth):
        node = _object(next=node)
    return node


def oversized(kilobytes: int = 200) -> Schema:
    return _object(x={"type": "string", "description": "d" * (kilobytes * 1024)})


def lookahead_pattern() -> Schema:
    return _object(x={"type": "string", "pattern": "^(?=a)a+$"})


def backreference_in_pattern_properties() -> Schema:
    return {"type": "object", "patternProperties": {r"^(a)\1$": {"type": "string"}}}


def unresolvable_local_ref() -> Schema:
    return _object(x={"$ref": "#/$defs/missing"})


def catastrophic_pattern() -> Schema:
    """Fine for RE2 (linear time); Python's `re` backtracks exponentially on `"a" * n + "!"`."""
    return {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}}, "required": ["s"]}


def hostile(ref_url: str, file_url: str) -> dict[str, tuple[Schema, str]]:
    """Every hostile schema, by name, with the rule its `rejected` reply must name."""
    return {
        "remote_ref": (remote_ref(ref_url), "ref_not_local"),
        "file_ref": (remote_ref(file_url), "ref_not_local"),
        "remote_base": (remote_base(ref_url), "ref_not_local"),
        "exponential_chain": (exponential_chain(), "ref_fanout"),
        "self_cycle": (self_cycle(), "ref_cycle"),
        "deep": (deep(), "schema_depth"),
        "oversized": (oversized(), "schema_size"),
        "lookahead_pattern": (lookahead_pattern(), "pattern_unsupported"),
        "backreference": (backreference_in_pattern_properties(), "pattern_unsupported"),
        "unresolvable_ref": (unresolvable_local_ref(), "ref_unresolvable"),
        "not_object": ({"type": "string"}, "not_object"),
        "invalid_schema": (_object(x={"type": "nonsense"}), "invalid_schema"),
    }
