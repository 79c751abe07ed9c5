"""The kustomize overlays (deploy/kubernetes) as a cluster would receive them.

Each overlay is rendered by ``kubectl kustomize`` (with the placeholder secrets of
``secrets.example/``, as ``make lint`` does), validated against the Kubernetes 1.32 API
schema with kubernetes-validate in strict mode, and then read for what a schema cannot
say: every workload probed, bounded, locked down, pinned, spread, budgeted and scaled;
every reference resolved; the network closed but for the documented paths.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy.kubernetes.render import KUBERNETES, KUBERNETES_VERSION, OVERLAYS, SECRETS_EXAMPLE, render
from gateway.__main__ import OVERLAY_VALUES
from gateway.config import HEALTH_PATH, apis
from services.runtime.settings import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, WORKERS

REPO = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
SERVICES = tuple(DEFAULT_PORTS)
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {overlay: [doc for doc in yaml.safe_load_all(render(overlay)) if doc] for overlay in OVERLAYS}


def of_kind(objects: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def generated(objects: list[Obj], kind: str, name: str) -> Obj:
    """The object a generator made of ``name`` (its name then carries a hash of its content)."""
    (found,) = [o for n, o in of_kind(objects, kind).items() if re.fullmatch(rf"{name}-[a-z0-9]{{10}}", n)]
    return found


def containers(pod_spec: Obj) -> Iterator[Obj]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


def pod_specs(objects: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for kind in ("Deployment", "Job"):
        for name, workload in of_kind(objects, kind).items():
            yield f"{kind}/{name}", workload["spec"]["template"]["spec"]
    for name, cron in of_kind(objects, "CronJob").items():
        yield f"CronJob/{name}", cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def matches(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions In/NotIn) selects ``labels``."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        inside = labels.get(expression["key"]) in expression["values"]
        if inside != (expression["operator"] == "In"):
            return False
    return True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_of_the_overlay_is_valid_for_kubernetes_1_32_in_strict_mode(rendered, overlay):
    objects = rendered[overlay]
    assert len(objects) > 30
    for obj in objects:
        # Raises ValidationError naming the field (strict: unknown fields too).
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert f"--kubernetes-version {KUBERNETES_VERSION}" in (REPO / "Makefile").read_text(), "make lint checks another"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_is_in_the_platforms_namespace_with_a_service_account_of_its_own(rendered, overlay):
    objects = rendered[overlay]
    assert set(of_kind(objects, "Namespace")) == {"towerco"}
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "towerco", f"{obj['kind']}/{obj['metadata']['name']}"
    accounts = of_kind(objects, "ServiceAccount")
    used = []
    for where, spec in pod_specs(objects):
        account = spec["serviceAccountName"]
        assert account in accounts, f"{where} runs as a ServiceAccount nothing defines"
        assert accounts[account]["automountServiceAccountToken"] is False
        assert spec["automountServiceAccountToken"] is False, f"{where} mounts an API token it never uses"
        used.append(account)
    assert len(used) == len(set(used)) == len(accounts), "one ServiceAccount per workload"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_is_probed_bounded_locked_down_pinned_spread_budgeted_and_scaled(rendered, overlay):
    objects = rendered[overlay]
    deployments = of_kind(objects, "Deployment")
    assert set(deployments) == {*SERVICES, "gateway"}
    budgets = of_kind(objects, "PodDisruptionBudget").values()
    scalers = {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(objects, "HorizontalPodAutoscaler").values()}
    readiness = {api.cluster: api.health_service for api in apis()}
    for name, deployment in deployments.items():
        template = deployment["spec"]["template"]
        spec, labels = template["spec"], template["metadata"]["labels"]
        assert "replicas" not in deployment["spec"], f"{name}: the HPA owns the replica count"
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        keys = {c["topologyKey"] for c in spec["topologySpreadConstraints"]}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, name
        (container,) = spec["containers"]
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])
        image, _, tag = container["image"].rpartition(":")
        assert image and tag and tag != "latest", f"{name}: image {container['image']} is not pinned"
        if name in SERVICES:
            assert tag == VERSION, f"{name} runs {tag}, the release is {VERSION}"
            port = DEFAULT_PORTS[name]
            assert container["livenessProbe"]["grpc"] == {"port": port}
            assert container["readinessProbe"]["grpc"]["port"] == port
            # Ready as the gateway's health checks see it: the service's own name (its database answers).
            assert container["readinessProbe"]["grpc"]["service"] == readiness[name]
        else:
            for probe in ("readinessProbe", "livenessProbe"):
                get = container[probe]["httpGet"]
                assert (get["path"], get["port"]) == (HEALTH_PATH, "http"), probe
        assert [b for b in budgets if matches(b["spec"]["selector"], labels)], f"{name} has no PodDisruptionBudget"
        scaler = scalers[name]["spec"]
        (metric,) = scaler["metrics"]
        assert metric["resource"]["name"] == "cpu" and 1 <= scaler["minReplicas"] < scaler["maxReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_pods_grace_period_covers_prestop_and_the_services_whole_drain(rendered, overlay):
    objects = rendered[overlay]
    shared = generated(objects, "ConfigMap", "towerco-services")
    delay = float(shared["data"]["SHUTDOWN_DELAY_SECONDS"])
    grace = float(shared["data"]["SHUTDOWN_GRACE_SECONDS"])
    for name, deployment in of_kind(objects, "Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pre_stop > 0, f"{name} gets SIGTERM while still listed in the endpoints"
        drain = delay + grace if name in SERVICES else 0
        if name in SERVICES:
            assert {"configMapRef": {"name": shared["metadata"]["name"]}} in container["envFrom"]
        assert spec["terminationGracePeriodSeconds"] > pre_stop + drain, f"{name} is killed mid-drain"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_pod_is_one_worker_process_and_replicas_scale(rendered, overlay):
    deployments = of_kind(rendered[overlay], "Deployment")
    for name in SERVICES:
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        # Not make run's default (the machine's cores): a pod's CPU limit is not the node's cores.
        assert env.get(WORKERS[name].name) == "1", f"{name}: {WORKERS[name].name} must be 1 in a pod"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_runs_one_envoy_worker_per_core_of_its_cpu_limit_balanced_exactly(rendered, overlay):
    import json

    objects = rendered[overlay]
    (container,) = of_kind(objects, "Deployment")["gateway"]["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    # Without --concurrency Envoy starts a worker per core of the node, whatever the pod's limit.
    assert "--concurrency" in args, "the gateway's Envoy would start one worker per core of the node"
    workers = int(args[args.index("--concurrency") + 1])
    limit = str(container["resources"]["limits"]["cpu"])
    cores = int(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
    assert workers == max(1, int(cores)), (workers, limit)
    config = json.loads(generated(objects, "ConfigMap", "towerco-gateway")["data"]["envoy.json"])
    (listener,) = config["static_resources"]["listeners"]
    assert listener["connection_balance_config"] == {"exact_balance": {}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_and_configmap_a_pod_reads_is_generated_with_that_key(rendered, overlay):
    objects = rendered[overlay]
    data = {
        (obj["kind"], obj["metadata"]["name"]): {**obj.get("data", {}), **obj.get("stringData", {})}
        for obj in objects
        if obj["kind"] in {"ConfigMap", "Secret"}
    }
    referenced = 0
    for where, spec in pod_specs(objects):
        wanted: list[tuple[str, str, str | None]] = []
        for container in containers(spec):
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                for ref, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    if ref in source:
                        wanted.append((kind, source[ref]["name"], source[ref]["key"]))
            for env_from in container.get("envFrom", []):
                for ref, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if ref in env_from:
                        wanted.append((kind, env_from[ref]["name"], None))
        for volume in spec.get("volumes", []):
            for ref, kind, name_key in (("secret", "Secret", "secretName"), ("configMap", "ConfigMap", "name")):
                if ref in volume:
                    items = volume[ref].get("items") or [{"key": None}]
                    wanted.extend((kind, volume[ref][name_key], item["key"]) for item in items)
        for kind, name, key in wanted:
            assert (kind, name) in data, f"{where} reads {kind} {name}, which the overlay does not generate"
            assert key is None or key in data[kind, name], f"{where} reads {key} of {kind} {name}: not there"
            # Generated (name-hashed), so a changed value rolls the pods that read it.
            assert re.search(r"-[a-z0-9]{10}$", name), f"{where}: {kind} {name} is not from a generator"
            referenced += 1
    assert referenced > 50


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_reads_its_own_runtime_dsn_and_only_the_migration_job_the_owners(rendered, overlay):
    objects = rendered[overlay]
    secrets = {name.rsplit("-", 1)[0]: s for name, s in of_kind(objects, "Secret").items()}
    for name in SERVICES:
        assert f"{name.upper()}_DATABASE_URL" in secrets[f"towerco-{name}"]["data"]
    assert "MIGRATION_DATABASE_URL" in secrets["towerco-migration"]["data"]
    for where, spec in pod_specs(objects):
        mentions = "towerco-migration-" in yaml.safe_dump(spec)
        assert mentions == where.startswith("Job/"), f"{where}: the owner DSN belongs to the migration Job alone"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_migration_job_migrates_every_service_in_order_before_anything_serves(rendered, overlay):
    (job,) = of_kind(rendered[overlay], "Job").values()
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    steps = [c["args"] for c in containers(spec)]
    assert steps == [[f"services.{name}", "migrate"] for name in SERVICES]
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "migration"
    # The documented first step applies everything but what the selector leaves out: the pods that serve.
    for deployment in of_kind(rendered[overlay], "Deployment").values():
        assert deployment["metadata"]["labels"]["app.kubernetes.io/component"] in {"server", "gateway"}
    readme = (REPO / "README.md").read_text()
    assert "-l 'app.kubernetes.io/component notin (server,gateway)'" in readme
    assert "wait --for=condition=complete job/towerco-migrate" in readme


def _peers(policy: Obj, port: int) -> list[Obj] | None:
    """The ``from`` peers a policy admits on ``port`` (an empty list: from anywhere); None if none."""
    found: list[Obj] | None = None
    for rule in policy["spec"].get("ingress", []):
        if not rule.get("ports") or any(p["port"] == port for p in rule["ports"]):
            if not rule.get("from"):
                return []
            found = [*(found or []), *rule["from"]]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_and_the_services_reach_grpc_and_only_monitoring_the_metrics(rendered, overlay):
    objects = rendered[overlay]
    policies = list(of_kind(objects, "NetworkPolicy").values())
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}, "no default deny"
    deployments = of_kind(objects, "Deployment")
    gateway_labels = deployments["gateway"]["spec"]["template"]["metadata"]["labels"]
    cron = of_kind(objects, "CronJob")["towerco-audit-retention"]["spec"]["jobTemplate"]["spec"]
    retention_labels = cron["template"]["metadata"]["labels"]
    for name in SERVICES:
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        applying = [p for p in policies if matches(p["spec"]["podSelector"], labels)]
        for port in (DEFAULT_PORTS[name], DEFAULT_METRICS_PORTS[name]):
            peers = [peer for p in applying if (found := _peers(p, port)) is not None for peer in found]
            allowed = [p for p in applying if _peers(p, port) is not None]
            assert allowed, f"nothing may reach {name}:{port}"
            assert all(_peers(p, port) for p in allowed), f"{name}:{port} is open to anyone"
            for peer in peers:
                assert "ipBlock" not in peer, f"{name}:{port} open to addresses"
                if port == DEFAULT_PORTS[name]:
                    assert "namespaceSelector" not in peer
                    admitted = peer["podSelector"]
                    # The retention CronJob reaches the feature gate alone (each tenant's period).
                    retention = name == "features" and matches(admitted, retention_labels)
                    assert matches(admitted, gateway_labels) or matches(admitted, labels) or retention, admitted
                    assert not matches(admitted, {"app": "towerco-migrate", "app.kubernetes.io/component": "x"})
                else:
                    assert peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    egress = [p for p in policies if "Egress" in p["spec"]["policyTypes"] and p["spec"].get("egress")]
    job_labels = of_kind(objects, "Job")["towerco-migrate"]["spec"]["template"]["metadata"]["labels"]
    job_egress = [r for p in egress if matches(p["spec"]["podSelector"], job_labels) for r in p["spec"]["egress"]]
    for port in (5432, 6379):
        assert any(port in [q["port"] for q in rule["ports"]] for rule in job_egress), f"the Job cannot reach {port}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_balances_over_every_pod_through_headless_services(rendered, overlay):
    import json

    objects = rendered[overlay]
    services = of_kind(objects, "Service")
    gateway_config = generated(objects, "ConfigMap", "towerco-gateway")
    clusters = {c["name"]: c for c in json.loads(gateway_config["data"]["envoy.json"])["static_resources"]["clusters"]}
    for name in SERVICES:
        assert services[name]["spec"]["clusterIP"] == "None", f"{name}'s ClusterIP pins HTTP/2 to one pod"
        (endpoint,) = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        assert (clusters[name]["type"], address["address"], address["port_value"]) == (
            "STRICT_DNS",
            name,
            DEFAULT_PORTS[name],
        )
    assert services["gateway"]["spec"]["type"] == "LoadBalancer"


def test_dev_and_prod_differ_in_every_production_value(rendered):
    values = {overlay: generated(rendered[overlay], "ConfigMap", "towerco-platform")["data"] for overlay in OVERLAYS}
    for name in OVERLAY_VALUES:
        assert values["dev"][name] != values["prod"][name], f"{name} is the same in dev and prod"
    gateways = {o: generated(rendered[o], "ConfigMap", "towerco-gateway")["data"]["envoy.json"] for o in OVERLAYS}
    for name in ("BASE_DOMAIN", "JWT_ISSUER", "JWT_JWKS_URL"):
        assert values["prod"][name] in gateways["prod"] and values["prod"][name] not in gateways["dev"], name


def test_the_secret_templates_hold_placeholders_only_and_the_real_secrets_stay_out_of_git():
    for path in sorted(SECRETS_EXAMPLE.iterdir()):
        if path.suffix == ".md":
            continue
        lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        assert lines and all("CHANGE_ME" in line for line in lines), f"{path.name} holds a value, not a placeholder"
    for overlay in OVERLAYS:
        secret = KUBERNETES / "overlays" / overlay / "secrets" / "tenant.env"
        done = subprocess.run(["git", "check-ignore", "-q", str(secret)], cwd=REPO, check=False)
        assert done.returncode == 0, f"git would commit {secret.relative_to(REPO)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_gateway_serving_tls_has_its_pair_mounted_and_is_probed_over_https(rendered, overlay):
    import json

    objects = rendered[overlay]
    config = json.loads(generated(objects, "ConfigMap", "towerco-gateway")["data"]["envoy.json"])
    (listener,) = config["static_resources"]["listeners"]
    sockets = [chain["transport_socket"] for chain in listener["filter_chains"] if "transport_socket" in chain]
    spec = of_kind(objects, "Deployment")["gateway"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    schemes = {container[probe]["httpGet"].get("scheme", "HTTP") for probe in ("readinessProbe", "livenessProbe")}
    if not sockets:
        assert schemes == {"HTTP"}, "a plaintext gateway probed over HTTPS is never ready"
        return
    assert schemes == {"HTTPS"}, "a TLS-only listener answers no plain HTTP probe: the gateway would never be ready"
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    secrets = {name: set(s["data"]) for name, s in of_kind(objects, "Secret").items()}
    for socket in sockets:
        for pair in socket["typed_config"]["common_tls_context"]["tls_certificates"]:
            for part in ("certificate_chain", "private_key"):
                folder, _, file = pair[part]["filename"].rpartition("/")
                assert folder in mounts, f"{pair[part]['filename']} is on no volume of the gateway pod"
                secret = volumes[mounts[folder]]["secret"]
                keys = secrets[secret["secretName"]]
                items = {i["path"]: i["key"] for i in secret.get("items", [])} or {k: k for k in keys}
                assert items.get(file) in keys, f"{file} is not in {secret['secretName']}"
