"""deploy/ agrees with the code: ports, probe paths, queue names, metric names, drain time, tenant files."""

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from contracts import Topology
from worker.broker.limits import MAX_BODY_BYTES
from worker.cli import build_parser
from worker.ops.metrics import Metrics
from worker.tenants import validate_path

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
TOPOLOGY = Topology()  # manifests use the default namespace
REQUIRED_ALERTS = {
    "AtlasDeadLettersGrowing",
    "AtlasRetryRateHigh",
    "AtlasBreakerOpen",
    "AtlasRequestsQueueHasNoConsumers",
    "AtlasRepliesUnroutable",
}


def exported_metric_names() -> set[str]:
    names: set[str] = set()
    for family in Metrics(lambda _: True).registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
        names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:atlas_worker|gen_ai_client)_[a-z_]+", expr))


def queues_in(expr: str) -> set[str]:
    return set(re.findall(r'queue(?:Name)?="([^"]+)"', expr))


def k8s_documents() -> dict[tuple[str, str], dict[str, Any]]:
    documents = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and doc["kind"] != "Kustomization":
                documents[(doc["kind"], doc["metadata"]["name"])] = doc
    return documents


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    return k8s_documents()


@pytest.fixture(scope="module")
def worker_container(k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    [container] = k8s[("Deployment", "atlas-inference-worker")]["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def test_broker_config_caps_message_size_just_above_the_workers_body_limit() -> None:
    lines = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text().splitlines()
    settings = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition("=") for line in lines if line.strip() and not line.startswith("#"))
    )
    assert MAX_BODY_BYTES < int(settings["max_message_size"]) <= 2 * MAX_BODY_BYTES


def test_dockerfile_is_slim_non_root_and_checks_the_health_port() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.replace("\\\n", " ").splitlines() if line and line[0] != "#"]
    by_name: dict[str, list[str]] = {}
    for name, rest in instructions:
        by_name.setdefault(name, []).append(rest.strip())
    assert all(re.fullmatch(r"python:3\.1[1-9]-slim( AS \w+)?", image) for image in by_name["FROM"])
    [user] = by_name["USER"]
    assert user.split(":")[0] not in ("root", "0")
    [expose] = by_name["EXPOSE"]
    [healthcheck] = by_name["HEALTHCHECK"]
    assert f"127.0.0.1:{expose}/healthz" in healthcheck
    assert json.loads(by_name["ENTRYPOINT"][0]) == ["atlas-worker"]
    command = json.loads(by_name["CMD"][0])
    assert command[0] == "run"
    assert flag(command, "--metrics-port") == expose
    build_parser().parse_args(command)


def test_compose_runs_broker_with_ui_worker_and_standin_model() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert "management" in services["rabbitmq"]["image"]
    assert "15672:15672" in services["rabbitmq"]["ports"]
    assert services["standin-model"]["entrypoint"] == ["python", "-m", "demo.standin_model"]
    worker = services["worker"]
    args = build_parser().parse_args(worker["command"])
    assert args.command == "run"
    assert f"{args.metrics_port}:{args.metrics_port}" in worker["ports"]
    assert worker["environment"]["AMQP_URL"].startswith("amqp://guest:guest@rabbitmq:5672/")
    assert float(worker["stop_grace_period"].removesuffix("s")) > args.grace
    host_dir, mounted, _ = worker["volumes"][0].split(":")
    assert mounted == str(args.tenants)
    configs, problems = validate_path(DEPLOY / host_dir)
    assert not problems
    assert {c.tenant_id for c in configs} == {"acme", "globex"}
    assert all("standin-model:8089" in str(c.provider.model_dump()) for c in configs)


def test_deployment_probes_ports_resources_and_drain_time(worker_container: dict[str, Any], k8s: Any) -> None:
    pod = k8s[("Deployment", "atlas-inference-worker")]["spec"]["template"]["spec"]
    args = build_parser().parse_args(worker_container["args"])
    [port] = worker_container["ports"]
    assert port["containerPort"] == args.metrics_port
    assert worker_container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert worker_container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert worker_container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert args.namespace == TOPOLOGY.namespace
    # Kubernetes waits longer than the drain, but not so long that a stuck pod lingers.
    assert args.grace < pod["terminationGracePeriodSeconds"] <= args.grace + 30
    assert {"cpu", "memory"} <= set(worker_container["resources"]["requests"])
    assert "memory" in worker_container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert worker_container["securityContext"]["readOnlyRootFilesystem"] is True


def test_tenants_come_from_the_configmap_and_their_secrets_from_the_secret(
    worker_container: dict[str, Any], k8s: Any, tmp_path: Path
) -> None:
    pod = k8s[("Deployment", "atlas-inference-worker")]["spec"]["template"]["spec"]
    args = build_parser().parse_args(worker_container["args"])
    [mount] = [m for m in worker_container["volumeMounts"] if m["mountPath"] == str(args.tenants)]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmap = k8s[("ConfigMap", volume["configMap"]["name"])]
    for name, text in configmap["data"].items():
        (tmp_path / name).write_text(text)
    configs, problems = validate_path(tmp_path)
    assert not problems
    references = {
        value.removeprefix("env:")
        for config in configs
        for value in re.findall(r"env:[A-Z0-9_]+", str(config.provider.model_dump(mode="python")))
    } | set(re.findall(r'"env:([A-Z0-9_]+)"', "".join(configmap["data"].values())))
    [source] = worker_container["envFrom"]
    secrets = {
        doc["metadata"]["name"]: doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / "secret.example.yaml").read_text())
    }
    assert references <= set(secrets[source["secretRef"]["name"]]["stringData"])
    for name in ("AMQP_URL", "ATLAS_HEADER_KEY"):
        [variable] = [e for e in worker_container["env"] if e["name"] == name]
        reference = variable["valueFrom"]["secretKeyRef"]
        assert reference["key"] in secrets[reference["name"]]["stringData"]


def test_the_deployed_workers_sign_their_headers(worker_container: dict[str, Any]) -> None:
    # Without --header-key a publisher's forged x-death and atlas-attempts are believed.
    args = worker_container["args"]
    assert args[args.index("--header-key") + 1] == "env:ATLAS_HEADER_KEY"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["worker"]
    assert compose["command"][compose["command"].index("--header-key") + 1] == "env:ATLAS_HEADER_KEY"
    assert "ATLAS_HEADER_KEY" in compose["environment"]


def test_keda_scales_the_deployment_on_the_requests_queue(worker_container: dict[str, Any], k8s: Any) -> None:
    scaled = k8s[("ScaledObject", "atlas-inference-worker")]["spec"]
    args = build_parser().parse_args(worker_container["args"])
    assert scaled["scaleTargetRef"]["name"] == "atlas-inference-worker"
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == Topology(args.namespace).requests
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert trigger["metadata"]["protocol"] == "http"  # counts unacked (prefetched) messages too
    assert int(trigger["metadata"]["value"]) == args.prefetch
    assert scaled["minReplicaCount"] >= 1
    auth = k8s[("TriggerAuthentication", trigger["authenticationRef"]["name"])]["spec"]["secretTargetRef"][0]
    secrets = {
        d["metadata"]["name"]: d for d in yaml.safe_load_all((DEPLOY / "k8s" / "secret.example.yaml").read_text())
    }
    assert auth["key"] in secrets[auth["name"]]["stringData"]


def test_pdb_service_and_servicemonitor_select_the_worker_pods(worker_container: dict[str, Any], k8s: Any) -> None:
    labels = k8s[("Deployment", "atlas-inference-worker")]["spec"]["template"]["metadata"]["labels"]
    pdb = k8s[("PodDisruptionBudget", "atlas-inference-worker")]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    service = k8s[("Service", "atlas-inference-worker")]
    assert service["spec"]["selector"].items() <= labels.items()
    [service_port] = service["spec"]["ports"]
    assert service_port["targetPort"] == worker_container["ports"][0]["name"]
    monitor = k8s[("ServiceMonitor", "atlas-inference-worker")]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == (service_port["name"], "/metrics")


def test_kustomization_lists_existing_files_and_no_secrets() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert all((DEPLOY / "k8s" / name).is_file() for name in kustomization["resources"])
    assert "secret.example.yaml" not in kustomization["resources"]
    if shutil.which("kubectl"):
        built = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True)
        assert built.returncode == 0, built.stderr


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alerts_cover_the_failure_modes_and_use_real_metric_and_queue_names() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= REQUIRED_ALERTS
    exported = exported_metric_names()
    readme = (ROOT / "README.md").read_text().lower()
    for rule in rules:
        assert metrics_in(rule["expr"]) <= exported, rule["alert"]
        assert queues_in(rule["expr"]) <= {TOPOLOGY.requests, TOPOLOGY.dead}, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
        anchor = rule["annotations"]["runbook"].removeprefix("README.md#")
        assert f"#### {anchor}" in readme, f"README has no section for {rule['alert']}"


def test_prometheus_operator_rule_matches_the_rules_file(k8s: Any) -> None:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"]
    assert k8s[("PrometheusRule", "atlas-inference-worker")]["spec"]["groups"] == groups


def test_dashboard_queries_real_metrics_and_queues() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "atlas-inference-worker.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = set().union(*(metrics_in(e) for e in exprs))
    exported = exported_metric_names()
    assert used <= exported
    # Every family the worker exports has a panel (histograms through their buckets).
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in exported}
    assert families <= {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    assert set().union(*(queues_in(e) for e in exprs)) <= {TOPOLOGY.requests, TOPOLOGY.dead}
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in dashboard["panels"])


def test_manifest_commands_parse_with_the_cli(worker_container: dict[str, Any]) -> None:
    # A typo in a flag would only show up when the pod starts; the parser catches it here.
    assert build_parser().parse_args(worker_container["args"]).command == "run"
    assert shlex.join(worker_container["args"]).startswith("run ")
