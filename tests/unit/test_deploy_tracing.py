"""deploy/ turns tracing on the standard way: an optional collector in compose, OTEL_* variables in Kubernetes."""

from typing import Any

import yaml

from tests.unit.test_deploy import DEPLOY, k8s_documents
from worker.tracing import tracing_requested

SAMPLERS = {"always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_traceidratio"}


def test_compose_collector_is_optional_and_receives_otlp_http_where_the_worker_sends() -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    collector = services["otel-collector"]
    assert collector["profiles"] == ["tracing"]  # not started by a plain `docker compose up`
    config_file, mounted, _ = collector["volumes"][0].split(":")
    assert f"--config={mounted}" in collector["command"]
    config = yaml.safe_load((DEPLOY / config_file).read_text())
    receiver_port = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].rsplit(":", 1)[1]
    assert f"{receiver_port}:{receiver_port}" in collector["ports"]
    assert config["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]
    environment = services["worker"]["environment"]
    # Unset on the host, the endpoint is empty and tracing stays off.
    assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}"
    assert not tracing_requested({**environment, "OTEL_EXPORTER_OTLP_ENDPOINT": ""})
    assert f"http://otel-collector:{receiver_port}" in (DEPLOY / "compose.yaml").read_text()


def test_deployment_sets_the_otel_variables() -> None:
    [container] = k8s_documents()[("Deployment", "atlas-inference-worker")]["spec"]["template"]["spec"]["containers"]
    env: dict[str, Any] = {item["name"]: item.get("value") for item in container["env"]}
    assert tracing_requested(env)
    assert env["OTEL_SERVICE_NAME"] == "atlas-inference-worker"
    assert env["OTEL_TRACES_SAMPLER"] in SAMPLERS
    assert 0 < float(env["OTEL_TRACES_SAMPLER_ARG"]) <= 1
    names = list(env)
    # Kubernetes expands $(POD_NAME) only when POD_NAME is defined earlier in the list.
    assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http")
