"""The cluster-launcher config and KubeRay manifests in clusters/ are valid and safe by default.

The launcher config goes through the same preparation and JSON-schema validation
that `ray up` applies; the manifests are checked for the KubeRay kinds and fields
they rely on, and their entry points against the job files and configs of this
repository.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cromss_ray.config import FinetuneConfig, PretrainConfig, TuneConfig, load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTERS = REPO / "clusters"
LAUNCHER = CLUSTERS / "aws-gpu.yaml"
RAYCLUSTER = CLUSTERS / "kuberay-raycluster.yaml"
RAYJOB = CLUSTERS / "kuberay-rayjob.yaml"
DOCKERFILE = CLUSTERS / "Dockerfile"
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-gpu"
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
)
JOB_CONFIGS = {"pretrain.py": PretrainConfig, "tune.py": TuneConfig, "finetune.py": FinetuneConfig}
SECURITY_GROUP_PLACEHOLDER = "sg-xxxxxxxxxxxxxxxxx"
SUBNET_PLACEHOLDER = "subnet-xxxxxxxxxxxxxxxxx"
"""Set by the user before ``ray up`` (clusters/README.md, "AWS"), each in one place of aws-gpu.yaml."""


def load_yaml(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict), f"{path.name}: top level is not a mapping"
    return document


def image_directory() -> PurePosixPath:
    """Where clusters/Dockerfile puts the repository inside the image (its WORKDIR)."""
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert len(workdirs) == 1, "Dockerfile: expected exactly one WORKDIR"
    return PurePosixPath(workdirs[0])


def ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """The RayCluster spec of each manifest: the RayCluster itself and the RayJob's cluster."""
    return [
        ("RayCluster", load_yaml(RAYCLUSTER)["spec"]),
        ("RayJob", load_yaml(RAYJOB)["spec"]["rayClusterSpec"]),
    ]


def pod_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [container for group in groups for container in group["template"]["spec"]["containers"]]


@pytest.mark.parametrize("path", sorted(CLUSTERS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_file_loads_as_one_mapping(path: Path) -> None:
    documents = list(yaml.safe_load_all(path.read_text()))
    assert len(documents) == 1
    assert isinstance(documents[0], dict) and documents[0]


def test_launcher_config_passes_ray_schema_validation() -> None:
    prepared = prepare_config(load_yaml(LAUNCHER))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"


def test_launcher_validation_rejects_a_misspelled_key() -> None:
    config = load_yaml(LAUNCHER)
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


def test_launcher_validation_rejects_min_workers_above_the_cluster_limit() -> None:
    config = load_yaml(LAUNCHER)
    config["available_node_types"]["gpu_worker"]["min_workers"] = config["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(config))


def test_launcher_autoscales_gpu_workers_from_zero() -> None:
    config = load_yaml(LAUNCHER)
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    workers = {name: spec for name, spec in node_types.items() if name != config["head_node_type"]}
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] == 0
    assert workers, "no worker node type"
    for name, spec in workers.items():
        assert spec["resources"]["GPU"] >= 1, name
        assert spec["min_workers"] == 0 < spec["max_workers"] <= config["max_workers"], name


def test_launcher_binds_nothing_public_and_requires_the_token() -> None:
    config = load_yaml(LAUNCHER)
    assert "0.0.0.0" not in LAUNCHER.read_text()
    assert config["provider"]["use_internal_ips"] is True
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_launcher_pins_one_security_group_and_subnet_on_every_node() -> None:
    """Without ``SecurityGroupIds`` Ray creates a group open to SSH from 0.0.0.0/0; every node type
    joins the one pinned group (whose rules the README gives) in the pinned subnets."""
    config = load_yaml(LAUNCHER)
    node_configs = {name: spec["node_config"] for name, spec in config["available_node_types"].items()}
    for name, node_config in node_configs.items():
        assert node_config["SecurityGroupIds"] == [SECURITY_GROUP_PLACEHOLDER], name
        assert node_config["SubnetIds"] == [SUBNET_PLACEHOLDER], name
    assert "security_group" not in config["provider"], "Ray's own group would add SSH from 0.0.0.0/0"
    readme = (CLUSTERS / "README.md").read_text()
    assert SECURITY_GROUP_PLACEHOLDER in readme and SUBNET_PLACEHOLDER in readme


def test_setting_each_placeholder_once_pins_every_node_and_passes_validation() -> None:
    text = LAUNCHER.read_text()
    for placeholder in (SECURITY_GROUP_PLACEHOLDER, SUBNET_PLACEHOLDER):
        assert len(re.findall(rf"\[{placeholder}\]", text)) == 1, f"{placeholder} is not set in one place"
    group, subnets = "sg-0a1b2c3d4e5f60718", ["subnet-0a1b2c3d4e5f60718", "subnet-0f1e2d3c4b5a69788"]
    filled = text.replace(f"[{SECURITY_GROUP_PLACEHOLDER}]", f"[{group}]")
    filled = filled.replace(f"[{SUBNET_PLACEHOLDER}]", f"[{', '.join(subnets)}]")
    config = yaml.safe_load(filled)
    validate_config(prepare_config(config))
    for name, spec in config["available_node_types"].items():
        assert (spec["node_config"]["SecurityGroupIds"], spec["node_config"]["SubnetIds"]) == ([group], subnets), name


def test_container_images_match_the_installed_ray_and_python() -> None:
    config = load_yaml(LAUNCHER)
    assert config["docker"]["image"] == RAY_IMAGE
    base_images = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert base_images == [RAY_IMAGE]


def test_dockerfile_ships_the_package_and_the_job_files() -> None:
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s+(\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    sources = {source for source, _ in copied}
    assert {"cromss_ray", "jobs"} <= sources
    for source, _ in copied:
        assert (REPO / source).exists(), f"Dockerfile copies missing path {source}"


@pytest.mark.parametrize(
    ("path", "kind"), [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")], ids=["raycluster", "rayjob"]
)
def test_kuberay_manifest_kind_and_api_version(path: Path, kind: str) -> None:
    manifest = load_yaml(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == kind
    assert manifest["metadata"]["name"]


@pytest.mark.parametrize(("kind", "spec"), ray_cluster_specs(), ids=["raycluster", "rayjob"])
def test_kuberay_cluster_uses_token_auth_and_no_public_service(kind: str, spec: dict[str, Any]) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert "0.0.0.0" not in yaml.safe_dump(spec)


@pytest.mark.parametrize(("kind", "spec"), ray_cluster_specs(), ids=["raycluster", "rayjob"])
def test_kuberay_gpu_workers_autoscale_and_share_one_image(kind: str, spec: dict[str, Any]) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    for group in spec["workerGroupSpecs"]:
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        for container in group["template"]["spec"]["containers"]:
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    images = {container["image"] for container in pod_containers(spec)}
    assert len(images) == 1, f"{kind}: containers run different images {images}"


@pytest.mark.parametrize(("kind", "spec"), ray_cluster_specs(), ids=["raycluster", "rayjob"])
def test_kuberay_credentials_come_from_a_secret_not_the_manifest(kind: str, spec: dict[str, Any]) -> None:
    for container in pod_containers(spec):
        assert {"secretRef": {"name": "cromss-credentials", "optional": True}} in container["envFrom"]
        literal_names = {variable["name"] for variable in container.get("env", [])}
        assert not literal_names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"}


def test_rayjob_entrypoint_runs_a_real_job_file_with_a_valid_config() -> None:
    argv = shlex.split(load_yaml(RAYJOB)["spec"]["entrypoint"])
    app = image_directory()
    assert argv[0] == "python"
    script = PurePosixPath(argv[1])
    assert script.is_relative_to(app / "jobs"), f"{script} is not one of the image's job files"
    assert (REPO / script.relative_to(app)).is_file(), f"{script.relative_to(app)} does not exist"

    options, overrides = {}, []
    for flag, value in zip(argv[2::2], argv[3::2], strict=True):
        if flag == "--set":
            overrides.append(value)
        else:
            options[flag] = value
    config_path = PurePosixPath(options.pop("--config"))
    assert config_path.is_relative_to(app / "jobs" / "configs")
    local_config = REPO / config_path.relative_to(app)
    assert local_config.is_file(), f"{local_config.relative_to(REPO)} does not exist"
    config = load_config(JOB_CONFIGS[script.name], local_config, overrides, data=options.pop("--data", None))
    assert options == {}, f"unexpected entrypoint options {options}"
    assert config.scaling.use_gpu is True
    assert config.run.storage_path.startswith("s3://"), "multi-node checkpoints need shared storage"

    worker_pod = load_yaml(RAYJOB)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    limits = worker_pod["containers"][0]["resources"]["limits"]
    workers_per_pod = int(limits["nvidia.com/gpu"]) // config.scaling.gpus_per_worker
    assert workers_per_pod * config.scaling.cpus_per_worker < int(limits["cpu"]), "no CPU left for Ray Data"


def test_readme_documents_every_file_and_credential_variable() -> None:
    readme = (CLUSTERS / "README.md").read_text()
    for path in CLUSTERS.iterdir():
        if path.is_file() and path.name != "README.md":
            assert f"`{path.name}`" in readme, f"clusters/README.md does not mention {path.name}"
    for variable in CREDENTIAL_VARIABLES:
        assert f"`{variable}`" in readme, f"clusters/README.md does not name {variable}"
