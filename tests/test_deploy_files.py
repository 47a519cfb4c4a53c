"""cluster.yaml and the KubeRay manifests, validated offline: the autoscaler's own schema, sane
worker ranges, and resource names and capacities that match what the code and configs request."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from carryon_ray.config import CarryOnConfig, load_config
from conftest import ROOT
from serve.settings import ReplicaConfig, validate_serve_config

KUBE = ROOT / "deploy" / "kuberay"
JOB_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "tiny-test.yaml")


def cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def node_types(cfg: dict) -> dict[str, dict]:
    return cfg["available_node_types"]


def capacity(cfg: dict, resource: str) -> float:
    """Units of `resource` with every node type at max_workers."""
    return sum(t.get("resources", {}).get(resource, 0) * t["max_workers"] for t in node_types(cfg).values())


def ranges_ok(types: dict[str, tuple[int, int]]) -> list[str]:
    return [f"{name}: min {lo} > max {hi}" for name, (lo, hi) in types.items() if lo > hi]


def test_cluster_yaml_passes_the_autoscaler_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster_yaml())))
    broken = cluster_yaml()
    broken["available_node_types"]["inference_gpu"]["node_config_typo"] = {}
    with pytest.raises(Exception, match="node_config_typo"):
        validate_config(prepare_config(broken))


def test_worker_ranges_are_ordered():
    cfg = cluster_yaml()
    types = {n: (t["min_workers"], t["max_workers"]) for n, t in node_types(cfg).items()}
    assert not ranges_ok(types)
    assert sum(hi for _, hi in types.values()) <= cfg["max_workers"]
    assert ranges_ok({"bad": (3, 1)}) == ["bad: min 3 > max 1"]  # the check itself bites
    assert node_types(cfg)[cfg["head_node_type"]]["resources"].get("CPU") == 0  # no work on the head


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=[p.name for p in JOB_CONFIGS])
def test_job_configs_fit_the_cluster(path):
    """Every resource a job config requests exists in cluster.yaml, and the largest actor pool and
    Train worker range fit the node types at max_workers (co-located configs share the units)."""
    cfg, cl = load_config(path), cluster_yaml()
    r = cfg.resources
    assert capacity(cl, r.inference_resource) > 0, f"{r.inference_resource} is on no node type"
    assert capacity(cl, r.training_resource) > 0, f"{r.training_resource} is on no node type"
    if r.inference_resource == r.training_resource:
        assert r.embed_actors_max + r.train_workers_max <= capacity(cl, r.inference_resource)
    else:
        assert r.embed_actors_max <= capacity(cl, r.inference_resource)
        assert r.train_workers_max <= capacity(cl, r.training_resource)
    for t in node_types(cl).values():  # a GPU node can hold its units' GPU shares
        units = t.get("resources", {})
        if r.inference_resource in units and r.embed_gpus:
            assert r.embed_gpus * units[r.inference_resource] <= units.get("GPU", 0)
        if r.training_resource in units and r.train_gpus:
            assert r.train_gpus * units[r.training_resource] <= units.get("GPU", 0)


def test_code_defaults_name_the_cluster_resources():
    cl = cluster_yaml()
    defaults = CarryOnConfig.model_fields["resources"].default_factory()
    for name in (defaults.inference_resource, defaults.training_resource, ReplicaConfig().resource):
        assert capacity(cl, name) > 0, name


def serve_deploy_args() -> dict:
    return yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"][0]["args"]


def test_serve_deploy_config_fits_the_inference_nodes():
    cfg, cl = validate_serve_config(serve_deploy_args()), cluster_yaml()
    r = cfg.replicas
    assert r.max_replicas * r.resource_units <= capacity(cl, r.resource)
    inference = next(t for t in node_types(cl).values() if r.resource in t.get("resources", {}))
    assert r.num_gpus * inference["resources"][r.resource] <= inference["resources"]["GPU"]


# -- KubeRay ---------------------------------------------------------------------------------------


def kube(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d]


def groups(spec: dict) -> dict[str, dict]:
    """groupName -> {min, max, replicas, resources (custom), cpus, gpus, image}."""
    out = {}
    for g in spec["workerGroupSpecs"]:
        container = g["template"]["spec"]["containers"][0]
        custom = json.loads(json.loads(g["rayStartParams"]["resources"]))  # KubeRay's quoted JSON string
        out[g["groupName"]] = {"min": g["minReplicas"], "max": g["maxReplicas"], "replicas": g["replicas"],
                               "resources": custom, "image": container["image"],
                               "cpus": float(container["resources"]["limits"]["cpu"]),
                               "gpus": int(container["resources"]["limits"].get("nvidia.com/gpu", 0))}
    return out


def check_cluster_spec(spec: dict) -> dict[str, dict]:
    assert spec["rayVersion"] == __import__("ray").__version__  # the version the project pins
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gs = groups(spec)
    for name, g in gs.items():
        assert 0 <= g["min"] <= g["replicas"] <= g["max"], name
        assert g["gpus"] >= 1, f"{name}: model groups need a GPU"
    head_image = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert {g["image"] for g in gs.values()} == {head_image}  # one image everywhere
    return gs


def test_kuberay_cluster_matches_cluster_yaml():
    (rc,) = kube("raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    gs = check_cluster_spec(rc["spec"])
    cl = cluster_yaml()
    # Same node classes: for each cluster.yaml worker type, a KubeRay group with the same custom
    # resource units and worker range.
    launcher = {tuple(sorted((k, v) for k, v in t["resources"].items() if k not in ("CPU", "GPU"))):
                (t["min_workers"], t["max_workers"]) for n, t in node_types(cl).items() if n != cl["head_node_type"]}
    kuberay = {tuple(sorted(g["resources"].items())): (g["min"], g["max"]) for g in gs.values()}
    assert kuberay == launcher
    idle = rc["spec"]["autoscalerOptions"]["idleTimeoutSeconds"]
    assert idle == cl["idle_timeout_minutes"] * 60


def test_kuberay_rayjob_runs_a_valid_config_on_that_cluster():
    (job,) = kube("rayjob.yaml")
    (rc,) = kube("raycluster.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    words = job["spec"]["entrypoint"].split()
    assert words[:3] == ["python", "-m", "jobs.customize"]
    config = ROOT / words[words.index("--config") + 1]
    cfg = load_config(config)
    units = {k for g in groups(rc["spec"]).values() for k in g["resources"]}
    assert {cfg.resources.inference_resource, cfg.resources.training_resource} <= units


def test_kuberay_producers_job_starts_the_shared_service_for_a_valid_config():
    from carryon_cli import build_parser

    (job,) = kube("producers.yaml")
    (rc,) = kube("raycluster.yaml")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    words = job["spec"]["entrypoint"].split()
    assert words[:3] == ["python", "-m", "carryon_cli"]
    args = build_parser().parse_args(words[3:])  # the command line the CLI accepts
    assert (args.cmd, args.action) == ("producers", "start")
    cfg = load_config(ROOT / args.config)
    units = {k for g in groups(rc["spec"]).values() for k in g["resources"]}
    assert cfg.resources.inference_resource in units


def test_kuberay_trainers_job_starts_the_service_on_a_training_unit_that_fits_it():
    from carryon_cli import build_parser

    (job,) = kube("trainers.yaml")
    (rc,) = kube("raycluster.yaml")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    words = job["spec"]["entrypoint"].split()
    assert words[:3] == ["python", "-m", "carryon_cli"]
    args = build_parser().parse_args(words[3:])
    assert (args.cmd, args.action) == ("trainers", "start")
    # some group offers the unit it asks for and the CPUs and GPUs it holds
    fits = [g for g in groups(rc["spec"]).values() if g["resources"].get(args.training_resource, 0) >= 1
            and g["cpus"] >= args.cpus and g["gpus"] >= args.gpus]
    assert fits, (args, groups(rc["spec"]))


def test_kuberay_rayservice_serves_the_deploy_config_on_the_same_groups():
    from ray.serve.schema import ServeDeploySchema

    (svc,) = kube("rayservice.yaml")
    (rc,) = kube("raycluster.yaml")
    assert svc["kind"] == "RayService"
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    assert serve_cfg == yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())  # one source of truth
    args = validate_serve_config(serve_cfg["applications"][0]["args"])
    gs = check_cluster_spec(svc["spec"]["rayClusterConfig"])
    assert gs == groups(rc["spec"])
    pinned = [g for g in gs.values() if args.replicas.resource in g["resources"]]
    assert pinned and args.replicas.max_replicas <= sum(g["resources"][args.replicas.resource] * g["max"] for g in pinned)
    head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in head["containers"][0].get("volumeMounts", [])}
    assert str(Path(args.auth.keys_file).parent) in mounts  # the keys file comes from a mounted Secret


def test_mlflow_manifest_backs_the_tracking_uri_the_pods_use():
    docs = kube("mlflow.yaml")
    service = next(d for d in docs if d["kind"] == "Service")
    (rc,) = kube("raycluster.yaml")
    env = {e["name"]: e["value"] for e in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert "sqlite:" in " ".join(deployment["spec"]["template"]["spec"]["containers"][0]["command"])
