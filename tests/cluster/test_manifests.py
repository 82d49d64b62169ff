"""Every deployment file in cluster/ (and the Dockerfile) is valid by construction, without a cluster.

KubeRay objects validate against the operator's CRD schemas (``<repo>/../shared/schemas/kuberay``),
strictly: a field the CRD does not define is an error, as with ``kubectl apply`` (strict field
validation) rather than silently pruned by the API server. The launcher config validates against
the installed Ray's ``ray/autoscaler/ray-schema.json``. Entrypoints, configs and their overrides are
parsed by the real CLI parser and config loader; versions must agree everywhere; credentials are
never inline; the resources each job's config asks for fit the cluster its manifest defines.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import tomllib
import yaml

from mmray.cli import build_parser
from mmray.config import load_config
from tests.helpers import REPO

CLUSTER = REPO / "cluster"
KUBERAY_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
YAML_FILES = sorted(CLUSTER.glob("*.yaml"))
CREDENTIAL_ENV = re.compile(r"^AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN|SECURITY_TOKEN)$")
ACCESS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
DAY_S = 24 * 3600


# --------------------------------------------------------------------------------------------------
# Reading the files
# --------------------------------------------------------------------------------------------------


@functools.cache
def documents(path: Path) -> tuple[dict, ...]:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def embedded(doc: dict) -> list[dict]:
    """Manifests a ConfigMap carries as YAML text (the plain CronJob's RayJob)."""
    if doc.get("kind") != "ConfigMap":
        return []
    return [yaml.safe_load(v) for k, v in doc.get("data", {}).items() if k.endswith(".yaml")]


def all_objects() -> list[tuple[str, dict]]:
    objs = []
    for path in YAML_FILES:
        if path.name in ("aws.yaml", "runtime_env.yaml"):
            continue
        for doc in documents(path):
            objs += [(path.name, doc)] + [(f"{path.name} (embedded)", e) for e in embedded(doc)]
    return objs


def objects(kind: str) -> list[tuple[str, dict]]:
    return [(name, obj) for name, obj in all_objects() if obj["kind"] == kind]


def one(kind: str, file: str) -> dict:
    (obj,) = [o for name, o in objects(kind) if name.startswith(file)]
    return obj


def rayjob_specs() -> list[tuple[str, dict]]:
    """Every RayJob spec: RayJobs and the jobTemplate of each RayCronJob."""
    specs = [(name, obj["spec"]) for name, obj in objects("RayJob")]
    return specs + [(name, obj["spec"]["jobTemplate"]) for name, obj in objects("RayCronJob")]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    return [(name, obj["spec"]) for name, obj in objects("RayCluster")] + [
        (name, spec["rayClusterSpec"]) for name, spec in rayjob_specs()
    ]


def pod_templates(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]


def all_pod_specs() -> list[tuple[str, dict]]:
    pods = [(name, t["spec"]) for name, spec in ray_cluster_specs() for t in pod_templates(spec)]
    return pods + [(name, c["spec"]["jobTemplate"]["spec"]["template"]["spec"]) for name, c in objects("CronJob")]


def dockerfile_args() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))


def image_root() -> str:
    """The Dockerfile's WORKDIR: where the image holds the repo's jobs/ and configs/."""
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    return workdir.rstrip("/") + "/"


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def entrypoint_args(spec: dict) -> tuple[str, list[str]]:
    """(script path in the repo, its arguments) of a RayJob entrypoint ``python <script> ...``."""
    python, script, *args = shlex.split(spec["entrypoint"])
    assert python == "python" and script.startswith(image_root()), spec["entrypoint"]
    return script[len(image_root()) :], [in_repo(a) for a in args]


def in_repo(arg: str) -> str:
    return str(REPO / arg[len(image_root()) :]) if arg.startswith(image_root()) else arg


def job_config(spec: dict):
    """The entrypoint parsed by the real CLI parser, and the config it would load."""
    script, args = entrypoint_args(spec)
    verb = {"jobs/train.py": "train", "jobs/score.py": "score", "jobs/nightly_score.py": "nightly"}[script]
    parsed = build_parser().parse_args([verb, *args])
    return parsed, load_config(parsed.config, parsed.overrides)


def strict(schema: Any) -> Any:
    """``schema`` with unknown fields refused wherever the CRD lists the fields of an object."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Validator:
    path = KUBERAY_SCHEMAS / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(f"KubeRay CRD schemas not found at {KUBERAY_SCHEMAS} (outside this repo's CI)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 56k lines
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def ray_launcher_schema() -> dict:
    (ray_dir,) = importlib.util.find_spec("ray").submodule_search_locations
    return json.loads(Path(ray_dir, "autoscaler", "ray-schema.json").read_text())


def cpus(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --------------------------------------------------------------------------------------------------
# Parsing and schemas
# --------------------------------------------------------------------------------------------------


def test_the_deployment_files_exist():
    names = {p.name for p in YAML_FILES}
    assert {
        "raycluster.yaml",
        "kuberay-rayjob.yaml",
        "nightly-raycronjob.yaml",
        "nightly-cronjob.yaml",
        "aws.yaml",
        "runtime_env.yaml",
    } <= names
    assert {k for _, o in all_objects() for k in [o["kind"]]} >= {"RayCluster", "RayJob", "RayCronJob", "CronJob"}


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_yaml_parses_into_objects(path):
    docs = documents(path)
    assert docs and all(isinstance(d, dict) for d in docs)
    for doc in docs:
        if "apiVersion" in doc:
            assert doc.get("kind") and doc.get("metadata", {}).get("name") or doc["metadata"].get("generateName")
            for e in embedded(doc):
                assert e["apiVersion"] and e["kind"]


@pytest.mark.parametrize(
    "name, obj",
    [o for o in all_objects() if o[1]["apiVersion"] == "ray.io/v1"],
    ids=lambda v: v if isinstance(v, str) else v["kind"],
)
def test_kuberay_objects_validate_strictly_against_the_crds(name, obj):
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(obj["kind"]).iter_errors(obj)
    ]
    assert not errors, f"{name}: " + "\n".join(errors)


def test_the_crd_validation_rejects_what_kubernetes_would():
    """The check above can fail: unknown fields (e.g. CronJob's concurrencyPolicy, which RayCronJob lacks),
    typos and wrong types are all errors."""
    cron = one("RayCronJob", "nightly-raycronjob.yaml")
    bad_cron = copy.deepcopy(cron)
    bad_cron["spec"]["concurrencyPolicy"] = "Forbid"
    assert not crd_validator("RayCronJob").is_valid(bad_cron)
    cluster = one("RayCluster", "raycluster.yaml")
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = typo["spec"]["workerGroupSpecs"][0].pop("maxReplicas")
    assert not crd_validator("RayCluster").is_valid(typo)
    wrong_type = copy.deepcopy(one("RayJob", "kuberay-rayjob.yaml"))
    wrong_type["spec"]["activeDeadlineSeconds"] = "one day"
    assert not crd_validator("RayJob").is_valid(wrong_type)
    assert crd_validator("RayCronJob").is_valid(cron)


def test_launcher_config_validates_against_rays_schema():
    schema = ray_launcher_schema()
    config = documents(CLUSTER / "aws.yaml")[0]
    jsonschema.validate(config, schema)
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate({**config, "max_worker": 3}, schema)  # a typo is caught


# --------------------------------------------------------------------------------------------------
# What the manifests name exists and parses
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, spec", rayjob_specs(), ids=[name for name, _ in rayjob_specs()])
def test_entrypoints_name_real_scripts_configs_and_keys(name, spec):
    script, args = entrypoint_args(spec)
    assert (REPO / script).is_file(), f"{name}: {script} does not exist"
    parsed, cfg = job_config(spec)  # unknown flags, keys or bad values raise here
    assert Path(parsed.config).is_file()
    assert cfg.train.storage_path.startswith("s3://"), f"{name}: multi-node runs need shared storage"


def test_dockerfile_copies_what_the_manifests_use():
    copies = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", (REPO / "Dockerfile").read_text(), re.M)
    sources = {s for line in copies for s in line.split()}
    assert all((REPO / s).exists() for s in sources), sources
    assert {"jobs", "configs", "mmray", "pyproject.toml"} <= sources


def test_launcher_mounts_and_installs_the_checkout():
    config = documents(CLUSTER / "aws.yaml")[0]
    for source in config["file_mounts"].values():
        assert (REPO / source).exists(), source
    (target,) = config["file_mounts"]
    assert any("pip install" in c and target in c for c in config["setup_commands"])
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    gpu = [v for v in workers.values() if re.match(r"(g|p)\d", v["node_config"]["InstanceType"])]
    assert gpu and len(workers) > len(gpu)  # a GPU worker type and a CPU one
    assert all(v["min_workers"] <= v["max_workers"] for v in workers.values())
    assert sum(v["max_workers"] for v in workers.values()) <= config["max_workers"]


def test_runtime_env_is_what_the_kuberay_jobs_use():
    runtime_env = documents(CLUSTER / "runtime_env.yaml")[0]
    assert runtime_env["working_dir"] == "."
    assert {".venv/", ".git/", "work/", "runs/"} <= set(runtime_env["excludes"])
    for name, spec in rayjob_specs():
        assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"] == runtime_env["env_vars"], name


# --------------------------------------------------------------------------------------------------
# Versions agree
# --------------------------------------------------------------------------------------------------


def test_versions_agree_across_dockerfile_manifests_pyproject_and_makefile():
    args = dockerfile_args()
    project = pyproject()["project"]
    deps = {re.split(r"[\[<>=]", d, maxsplit=1)[0]: d for d in project["dependencies"]}
    ray_version = re.search(r"==([\d.]+)$", deps["ray"]).group(1)
    assert args["RAY_VERSION"] == ray_version == importlib.metadata.version("ray")
    makefile = (REPO / "Makefile").read_text()
    for pkg, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        assert f'"{pkg}=={args[arg]}"' in makefile, f"Makefile pins {pkg} differently from the Dockerfile"
        assert deps[pkg].endswith(f"<={args[arg]}"), f"pyproject.toml's {pkg} bound differs from the pin"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert args["PYTHON_TAG"] == python, "the image's Python is not the one the tests run on"
    assert f"{sys.version_info.major}.{sys.version_info.minor}" >= project["requires-python"].lstrip(">=")

    tag = f"{project['version']}-ray{ray_version}-{python}"
    assert tag in (REPO / "Dockerfile").read_text()
    for name, spec in ray_cluster_specs():
        assert spec["rayVersion"] == ray_version, name
        for template in pod_templates(spec):
            for container in template["spec"]["containers"]:
                assert container["image"].endswith(f"/mmray:{tag}"), f"{name}: {container['image']}"
    assert documents(CLUSTER / "aws.yaml")[0]["docker"]["image"].endswith(f"/mmray:{tag}")
    assert f"ray.__version__ == '{ray_version}'" in " ".join(documents(CLUSTER / "aws.yaml")[0]["setup_commands"])


# --------------------------------------------------------------------------------------------------
# Credentials, cluster shape, schedules, resources
# --------------------------------------------------------------------------------------------------


def test_no_credentials_are_inline():
    for path in [*YAML_FILES, REPO / "Dockerfile"]:
        assert not ACCESS_KEY_ID.search(path.read_text()), f"{path.name} holds an AWS access key id"
    for name, pod in all_pod_specs():
        for container in pod["containers"]:
            for env in container.get("env", []):
                assert not (CREDENTIAL_ENV.match(env["name"]) and "value" in env), f"{name}: inline {env['name']}"
    for name, spec in ray_cluster_specs():
        for template in pod_templates(spec):
            pod = template["spec"]
            from_secret = any("secretRef" in e for c in pod["containers"] for e in c.get("envFrom", []))
            assert pod.get("serviceAccountName") or from_secret, f"{name}: no service account (IRSA) or Secret"


def test_long_lived_cluster_has_cpu_and_gpu_groups_and_autoscales():
    spec = one("RayCluster", "raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = [
        g for g in groups.values() if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu and len(gpu) < len(groups)
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["minReplicas"] < g["maxReplicas"]
    for name, cluster in ray_cluster_specs():
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name


def test_training_rayjob_is_bounded_and_its_submitter_fails_fast():
    spec = one("RayJob", "kuberay-rayjob.yaml")["spec"]
    assert 0 < spec["activeDeadlineSeconds"] <= 7 * DAY_S and spec["backoffLimit"] >= 0
    assert spec["submitterConfig"]["backoffLimit"] == 0 and spec["preRunningDeadlineSeconds"] > 0
    parsed, cfg = job_config(spec)
    assert cfg.train.name, "a retried RayJob resumes only with a fixed train.name"


def test_nightly_runs_yesterday_in_the_schedules_time_zone_both_ways():
    cron = one("RayCronJob", "nightly-raycronjob.yaml")["spec"]
    plain = one("CronJob", "nightly-cronjob.yaml")["spec"]
    (rayjob,) = [e for d in documents(CLUSTER / "nightly-cronjob.yaml") for e in embedded(d)]
    assert rayjob["spec"] == cron["jobTemplate"], "the CronJob's RayJob drifted from the RayCronJob's"
    assert cron["schedule"] == plain["schedule"] and re.fullmatch(r"(\S+ ){4}\S+", cron["schedule"])
    assert cron["timeZone"] == plain["timeZone"]
    parsed, _ = job_config(cron["jobTemplate"])
    assert parsed.date == "yesterday" and parsed.tz == cron["timeZone"]
    # Runs cannot overlap: the RayJob ends (deadline) long before the next day; the CronJob forbids it.
    assert cron["jobTemplate"]["activeDeadlineSeconds"] < DAY_S
    assert plain["concurrencyPolicy"] == "Forbid"
    assert plain["jobTemplate"]["spec"]["activeDeadlineSeconds"] > cron["jobTemplate"]["activeDeadlineSeconds"]


def test_plain_cronjob_submitter_script_and_permissions():
    docs = {d["kind"]: d for d in documents(CLUSTER / "nightly-cronjob.yaml")}
    pod = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    (mount,) = pod["containers"][0]["volumeMounts"]
    script = pod["containers"][0]["command"][-1]
    assert script.startswith(mount["mountPath"] + "/")
    body = docs["ConfigMap"]["data"][Path(script).name]
    assert f"{mount['mountPath']}/rayjob.yaml" in body and "SUCCEEDED" in body
    subprocess.run(["sh", "-n"], input=body, text=True, check=True)  # the shell parses it
    assert docs["RoleBinding"]["subjects"][0]["name"] == pod["serviceAccountName"]
    (rule,) = docs["Role"]["rules"]
    assert rule["resources"] == ["rayjobs"] and {"create", "get"} <= set(rule["verbs"])


def cluster_capacity(cluster: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees at maxReplicas; the head adds none (num-cpus 0)."""
    total_cpu = total_gpu = 0.0
    for g in cluster["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        total_cpu += g["maxReplicas"] * cpus(limits["cpu"])
        total_gpu += g["maxReplicas"] * float(limits.get("nvidia.com/gpu", 0))
    return total_cpu, total_gpu


@pytest.mark.parametrize("name, spec", rayjob_specs(), ids=[name for name, _ in rayjob_specs()])
def test_each_jobs_resources_fit_its_cluster(name, spec):
    """Trainer workers + actor pools + the one CPU Ray Data's read needs: more than the cluster has hangs."""
    parsed, cfg = job_config(spec)
    total_cpu, total_gpu = cluster_capacity(spec["rayClusterSpec"])
    pre = cfg.data.preprocess.concurrency * cfg.data.preprocess.num_cpus
    if parsed.command == "train":
        per = cfg.train.resources_per_worker
        cpu = cfg.train.num_workers * per.get("CPU", 0) + pre + 1
        gpu = cfg.train.num_workers * (1 if cfg.train.use_gpu else per.get("GPU", 0))
    else:
        cpu = pre + cfg.score.concurrency * cfg.score.num_cpus + 1
        gpu = cfg.score.concurrency * cfg.score.num_gpus
    assert cpu <= total_cpu and gpu <= total_gpu, f"{name}: needs {cpu} CPU / {gpu} GPU, has {total_cpu} / {total_gpu}"
