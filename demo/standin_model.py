"""A STAND-IN model server for demos: speaks OpenAI Chat Completions, answers from the prompt, no real LLM.

It reads the incident text the worker sends and builds deterministic, plausible answers: a summary from the
first lines, an RCA citing the evidence tags it finds, runbook tool calls filled from the tools' schemas.
Run it with `python -m demo.standin_model --port 8089` (`--port 0`: any free port, printed on the first line).

To show the fallback policies it also plays an unhealthy model: under `/down/v1` every call fails with 503,
under `/flaky/v1` the first two calls with a given prompt fail with 503 and the third is answered.
"""

import argparse
import asyncio
import hashlib
import re
from collections import Counter
from typing import Any

import orjson
from aiohttp import web

STANDIN_NOTICE = "[stand-in model: deterministic answer, no real LLM]"
TAG = re.compile(r"^\[(timeline|alert|log|metric|deploy) (\d+)\] (.*)$", re.MULTILINE)


def _incident_text(body: dict[str, Any]) -> str:
    return "\n".join(str(m.get("content") or "") for m in body.get("messages", []) if m.get("role") == "user")


def _evidence(text: str) -> dict[str, list[tuple[int, str]]]:
    found: dict[str, list[tuple[int, str]]] = {}
    for kind, index, line in TAG.findall(text):
        found.setdefault(kind, []).append((int(index), line))
    return found


def _field(text: str, name: str, default: str) -> str:
    match = re.search(rf"^{name}: (.*)$", text, re.MULTILINE)
    return match.group(1) if match else default


def rca_answer(text: str) -> dict[str, Any]:
    evidence = _evidence(text)
    title = _field(text, "Incident", "the incident")
    causes = []
    if deploys := evidence.get("deploy"):
        index, line = deploys[-1]
        refs = [{"kind": "deploy", "index": index, "note": line[:200]}]
        refs += [{"kind": "log", "index": i, "note": line[:200]} for i, line in evidence.get("log", [])[-2:]]
        causes.append(
            {
                "title": "A recent deploy introduced the fault",
                "description": line[:500],
                "confidence": 0.7,
                "evidence": refs,
            }
        )
    if alerts := evidence.get("alert"):
        index, line = alerts[0]
        causes.append(
            {
                "title": "Resource saturation",
                "description": line[:500],
                "confidence": 0.4,
                "evidence": [{"kind": "alert", "index": index, "note": line[:200]}],
            }
        )
    if not causes:
        causes.append(
            {
                "title": "Insufficient evidence",
                "description": "No deploys or alerts were provided.",
                "confidence": 0.1,
                "evidence": [],
            }
        )
    return {
        "summary": f"{STANDIN_NOTICE} {title}",
        "probable_causes": causes,
        "impact": f"Service {_field(text, 'Service', 'unknown')} degraded.",
        "remediation": [
            {"action": "Roll back the most recent deploy", "rationale": "It precedes the first alert.", "risk": "low"},
            {"action": "Watch error rate and latency for 15 minutes", "rationale": "Confirm recovery.", "risk": "low"},
        ],
        "follow_ups": ["Add a canary stage for this service"],
    }


def _value_for(schema: dict[str, Any], name: str, service: str) -> Any:
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "integer":
        return max(int(schema.get("minimum", 0)), 2)
    if kind == "number":
        return float(schema.get("minimum", 1))
    if kind == "boolean":
        return False
    if kind == "array":
        return []
    if kind == "object":
        return {}
    return service if name in ("service", "team") else f"(stand-in) {name} for {service}"


def tool_calls(body: dict[str, Any], text: str) -> list[dict[str, Any]]:
    service = _field(text, "Service", "unknown-service")
    tools = [t["function"] for t in body.get("tools", [])]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        tools = [t for t in tools if t["name"] == choice["function"]["name"]]
    calls = []
    for number, tool in enumerate(tools[:3]):
        params = tool.get("parameters") or {}
        props = params.get("properties", {})
        args = {name: _value_for(props.get(name, {}), name, service) for name in params.get("required", [])}
        calls.append(
            {
                "id": f"call_{number}",
                "type": "function",
                "function": {"name": tool["name"], "arguments": orjson.dumps(args).decode()},
            }
        )
    return calls


def completion(body: dict[str, Any]) -> dict[str, Any]:
    """A full Chat Completions response for a request body."""
    text = _incident_text(body)
    message: dict[str, Any] = {"role": "assistant", "content": None}
    finish = "stop"
    if body.get("tools") and body.get("tool_choice") != "none":
        message["tool_calls"] = tool_calls(body, text)
        finish = "tool_calls"
    elif (body.get("response_format") or {}).get("type") in ("json_schema", "json_object"):
        message["content"] = orjson.dumps(rca_answer(text)).decode()
    else:
        first = _field(text, "Incident", text.splitlines()[0] if text else "no context")
        message["content"] = f"{STANDIN_NOTICE} {first}. Severity {_field(text, 'Severity', 'unknown')}."
    prompt_tokens = max(1, len(orjson.dumps(body.get("messages", []))) // 4)
    completion_tokens = max(1, len(orjson.dumps(message)) // 4)
    return {
        "id": "chatcmpl-standin",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "standin"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


FLAKY_FAILURES = 2  # calls with one prompt that `/flaky/v1` fails before it answers
_CALLS = web.AppKey("calls", Counter[str])


def _unavailable() -> web.Response:
    error = {"message": "stand-in model: unavailable (a demo of a provider outage)", "type": "server_error"}
    return web.json_response({"error": error}, status=503)


async def _chat(request: web.Request) -> web.Response:
    body = await request.json(loads=orjson.loads)
    mode = request.match_info.get("mode")
    if mode == "down":
        return _unavailable()
    if mode == "flaky":
        calls = request.app[_CALLS]
        prompt = hashlib.sha256(orjson.dumps(body.get("messages", []))).hexdigest()
        calls[prompt] += 1
        if calls[prompt] <= FLAKY_FAILURES:
            return _unavailable()
    return web.json_response(completion(body), dumps=lambda o: orjson.dumps(o).decode())


async def _models(request: web.Request) -> web.Response:
    return web.json_response(
        {"object": "list", "data": [{"id": "standin", "object": "model", "max_model_len": 131072}]}
    )


def make_app() -> web.Application:
    app = web.Application()
    app[_CALLS] = Counter()
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/{mode:down|flaky}/v1/chat/completions", _chat)
    app.router.add_get("/{mode:down|flaky}/v1/models", _models)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(make_app())
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound = runner.addresses[0][1]
    print(f"stand-in model (NOT a real LLM) on http://{host}:{bound}/v1", flush=True)
    await asyncio.Event().wait()  # until the process is stopped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        where = f"{args.host}:{args.port}"
        raise SystemExit(f"error: the stand-in model cannot listen on {where}: {exc.strerror}") from None


if __name__ == "__main__":
    main()
