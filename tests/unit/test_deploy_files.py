"""deploy/: the YAML parses, the alert rules pass promtool, and QG001 fires in one scrape;
the Kubernetes manifests validate offline against the Kubernetes JSON schemas (and
prometheus-operator's models) and agree with each other and with what the discovery
tests measured."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from qmpguard.daemon.settings import settings_from_toml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
MANIFESTS = sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
#: The oldest Kubernetes the manifests target (securityContext.appArmorProfile: 1.30).
KUBERNETES_VERSION = "1.30.0"
#: What tests/integration/test_discovery_libvirt.py measured as the least that finds and
#: inspects a QEMU of another user in another mount namespace.
MEASURED_CAPABILITIES = {"SYS_PTRACE", "DAC_OVERRIDE"}


@pytest.mark.parametrize(
    "name",
    [
        "prometheus.yml",
        "qmpguard.rules.yml",
        "qmpguard.rules.test.yml",
        *(f"kubernetes/{name}" for name in MANIFESTS),
    ],
)
def test_yaml_parses(name: str) -> None:
    docs = list(yaml.safe_load_all((DEPLOY / name).read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def test_daemonset_runs_the_daemon() -> None:
    docs = {
        d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes/daemonset.yaml").read_text())
    }
    container = docs["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "daemon"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def _docs() -> list[dict[str, Any]]:
    return [d for name in MANIFESTS for d in yaml.safe_load_all((KUBERNETES / name).read_text())]


def _kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs() if d["kind"] == kind]
    return doc


_UNITS = ("y", "w", "d", "h", "m", "s", "ms")
#: prometheus-operator's Duration type: 0, or units in order (1h30m, 60s).
_DURATION = {"type": "string", "pattern": "^(0|" + "".join(f"([0-9]+{u})?" for u in _UNITS) + ")$"}
_SECRET_KEY = {
    "type": "object",
    "required": ["key"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "key": {"type": "string"},
        "optional": {"type": "boolean"},
    },
}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {"type": "object"}},
    },
}
_ENDPOINT_FIELDS = [
    "targetPort", "scheme", "params", "tlsConfig", "bearerTokenFile", "bearerTokenSecret",
    "honorLabels", "honorTimestamps", "trackTimestampsStaleness", "basicAuth", "oauth2",
    "metricRelabelings", "relabelings", "proxyUrl", "followRedirects", "enableHttp2",
    "filterRunning",
]  # fmt: skip
#: monitoring.coreos.com/v1 ServiceMonitor: the fields of prometheus-operator's CRD that a
#: scrape endpoint uses, strict (unknown keys fail, as a typo would be silently ignored by
#: the operator). No package on the reachable registries ships the CRD schemas without
#: side effects (cloudcoil's models register a pytest plugin), so the subset is kept here.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "targetLimit": {"type": "integer", "minimum": 0},
                "endpoints": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": _SECRET_KEY,
                                },
                            },
                            **{name: {} for name in _ENDPOINT_FIELDS},
                        },
                    },
                },
            },
        },
    },
}


def _validate_custom(doc: dict[str, Any]) -> None:
    import jsonschema

    assert doc["kind"] == "ServiceMonitor", f"no schema for {doc['kind']}"
    jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_validate_against_the_schemas(name: str) -> None:
    """Built-in kinds against the Kubernetes JSON schemas that kubernetes-validate ships
    (strict: unknown fields fail); the ServiceMonitor against the CRD subset above."""
    import kubernetes_validate

    for doc in yaml.safe_load_all((KUBERNETES / name).read_text()):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            _validate_custom(doc)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_catches_a_typo() -> None:
    import kubernetes_validate

    ds = _kind("DaemonSet")
    ds["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, KUBERNETES_VERSION, strict=True)
    import jsonschema

    sm = _kind("ServiceMonitor")
    sm["spec"]["endpoints"][0]["portt"] = "http"
    with pytest.raises(jsonschema.ValidationError, match="portt"):
        _validate_custom(sm)
    sm = _kind("ServiceMonitor")
    sm["spec"]["endpoints"][0]["interval"] = "soon"
    with pytest.raises(jsonschema.ValidationError):
        _validate_custom(sm)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == MANIFESTS


def test_manifests_agree_with_each_other() -> None:
    docs = _docs()
    namespace = _kind("Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    ns = namespace["metadata"]["name"]
    assert all(d["metadata"].get("namespace") == ns for d in docs if d["kind"] != "Namespace")
    ds, svc, sm, netpol, secret, config = (
        _kind(k)
        for k in ("DaemonSet", "Service", "ServiceMonitor", "NetworkPolicy", "Secret", "ConfigMap")
    )
    pod = ds["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] in ports
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == svc_port["name"]
    creds = endpoint["authorization"]["credentials"]
    assert creds["name"] == secret["metadata"]["name"] and creds["key"] in secret["stringData"]
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert [p["port"] for p in netpol["spec"]["ingress"][0]["ports"]] == list(ports.values())
    # The config the pod reads: where --config points, listening on the port, the token
    # from the mounted Secret, process discovery on.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config_path = container["args"][container["args"].index("--config") + 1]
    assert config_path == f"{mounts['config']}/config.toml"
    assert volumes["config"]["configMap"]["name"] == config["metadata"]["name"]
    settings = tomllib.loads(config["data"]["config.toml"])
    assert settings["listen"].endswith(f":{svc_port['port']}")
    # The daemon accepts it (the token file exists only in the pod: [http] left out).
    checked = settings_from_toml(config["data"]["config.toml"].split("[http]")[0])
    assert checked.discover == ("proc",) and checked.watch == ()
    (token_volume,) = [n for n, v in volumes.items() if "secret" in v]
    assert volumes[token_volume]["secret"]["secretName"] == secret["metadata"]["name"]
    assert settings["http"]["token_file"] == f"{mounts[token_volume]}/{creds['key']}"


def test_daemonset_has_the_measured_privileges_and_no_more() -> None:
    pod = _kind("DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ctx = container["securityContext"]
    assert pod["hostPID"] is True and not pod.get("hostNetwork") and not pod.get("hostIPC")
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert set(ctx["capabilities"]["add"]) == MEASURED_CAPABILITIES
    assert ctx["privileged"] is False and ctx["allowPrivilegeEscalation"] is False
    assert ctx["runAsUser"] == 0  # added capabilities are effective for uid 0 only
    assert not [v for v in pod["volumes"] if "hostPath" in v]  # /proc/PID/root instead
    assert pod["automountServiceAccountToken"] is False


def test_unit_is_hardened() -> None:
    unit = (DEPLOY / "qmpguard.service").read_text()
    for line in (
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "User=qmpguard",
    ):
        assert line in unit


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        if os.environ.get("CI"):
            raise AssertionError("promtool missing: deploy/install-dev.sh installs prometheus")
        pytest.skip("promtool not installed (Debian package prometheus)")
    return tool


def test_promtool_check_rules() -> None:
    proc = subprocess.run(
        [_promtool(), "check", "rules", str(DEPLOY / "qmpguard.rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_qg001_alert_fires_within_one_scrape_interval() -> None:
    proc = subprocess.run(
        [_promtool(), "test", "rules", "qmpguard.rules.test.yml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=DEPLOY,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
