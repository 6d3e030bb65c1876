"""KubeRay manifests in deploy/: valid against the real RayJob CRD schema, and consistent with the repo.

Schema: ``spec.versions[name == v1].schema.openAPIV3Schema`` of KubeRay's ``ray.io_rayjobs.yaml``
(``../shared/data/kuberay-crds`` next to the repo), checked with ``jsonschema`` (types, enums, required) plus a
walk for unknown fields, which the API server would silently prune (the schema does not forbid them).
Consistency: Ray version vs pyproject, images, entrypoint module/config/overrides, GPUs vs Ray Train workers,
S3 Secret wiring, lifecycle fields, the Dockerfile.
"""

from __future__ import annotations

import copy
import functools
import importlib
import re
import shlex
from pathlib import Path

import jsonschema  # a dependency of ray, so always present where finemed-ray is installed
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from finemed_ray.config import load_config
from finemed_ray.registry import config_class_for

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CRD_DIR = (ROOT / "../shared/data/kuberay-crds").resolve()
RAYJOB_CRD = CRD_DIR / "ray.io_rayjobs.yaml"
MANIFESTS = sorted((DEPLOY / "kuberay").glob("rayjob*.yaml"))
SECRET_EXAMPLE = DEPLOY / "kuberay" / "secret-s3.example.yaml"
GPU = "nvidia.com/gpu"

needs_crd = pytest.mark.skipif(
    not RAYJOB_CRD.is_file(), reason=f"KubeRay CRDs not found at {CRD_DIR} (shared/data/kuberay-crds is absent)"
)


# --------------------------------------------------------------------------------------------------- helpers

def load_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.lru_cache(maxsize=None)
def rayjob_schema() -> dict:
    crd = load_yaml(RAYJOB_CRD)
    assert crd["spec"]["names"]["kind"] == "RayJob"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Dotted paths of keys the structural schema does not declare (what Kubernetes would prune).

    Objects: keys must be in ``properties`` unless ``additionalProperties`` (a schema or true) or
    ``x-kubernetes-preserve-unknown-fields`` admits them. ``x-kubernetes-int-or-string`` leaves are scalars.
    The top-level ``metadata`` is ObjectMeta, which the API server validates itself.
    """
    found: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        addl = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
        for key, sub in value.items():
            where = f"{path}.{key}" if path else key
            if where == "metadata" and not path:
                continue
            if key in props:
                found += unknown_fields(sub, props[key], where)
            elif isinstance(addl, dict):
                found += unknown_fields(sub, addl, where)
            elif addl is True or preserve:
                continue
            else:
                found.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def schema_errors(manifest: dict) -> list[str]:
    """Everything wrong with ``manifest`` as a ray.io/v1 RayJob: schema violations and unknown fields."""
    schema = rayjob_schema()
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))
    ]
    errors += [f"{p}: unknown field (Kubernetes would silently drop it)" for p in unknown_fields(manifest, schema)]
    return errors


def ray_lower_bound() -> Version:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11+")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (ray_req,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "ray"]
    lower = [s.version for s in ray_req.specifier if s.operator in (">=", "==", "~=")]
    assert len(lower) == 1, f"expected one lower bound in {ray_req}"
    return Version(lower[0])


def ray_containers(spec: dict) -> dict[str, dict]:
    """The Ray container (index 0, as KubeRay assumes) of the head, of every worker group, and the submitter."""
    cluster = spec["rayClusterSpec"]
    out = {"head": cluster["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for group in cluster.get("workerGroupSpecs", []):
        out[f"worker:{group['groupName']}"] = group["template"]["spec"]["containers"][0]
    if "submitterPodTemplate" in spec:
        out["submitter"] = spec["submitterPodTemplate"]["spec"]["containers"][0]
    return out


def quantity(value) -> float:
    """A CPU/GPU Kubernetes quantity as a number: 8, "8", "500m"."""
    s = str(value)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def limits(container: dict) -> dict:
    res = container.get("resources", {})
    return {**res.get("requests", {}), **res.get("limits", {})}


def entrypoint(spec: dict) -> tuple[str, Path, list[str]]:
    """``python -m jobs.<name> --config <file> k=v ...`` -> (module name, config path, overrides)."""
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), f"unexpected entrypoint: {argv}"
    assert argv[3] == "--config", f"entrypoint must pass --config first: {argv}"
    return argv[2], Path(argv[4]), argv[5:]


def job_config(spec: dict):
    _, config, overrides = entrypoint(spec)
    path = ROOT / config
    return load_config(config_class_for(path), path, overrides)


@pytest.fixture(params=MANIFESTS, ids=lambda p: p.name)
def manifest(request) -> dict:
    return load_yaml(request.param)


# ------------------------------------------------------------------------------------------- schema validation

def test_manifests_present():
    assert {p.name for p in MANIFESTS} >= {"rayjob-sft.yaml", "rayjob-sft-cpu.yaml", "rayjob-synthesize.yaml",
                                          "rayjob-synthesize-vllm.yaml"}


@needs_crd
def test_manifest_matches_rayjob_crd(manifest):
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    assert schema_errors(manifest) == []


@needs_crd
@pytest.mark.parametrize(
    "mutate, expected",
    [
        # a typo'd top-level field: schema-valid (nothing is required), pruned by Kubernetes -> our walk catches it
        (lambda m: m["spec"].__setitem__("rayClusterSpc", m["spec"].pop("rayClusterSpec")),
         r"spec\.rayClusterSpc: unknown field"),
        # a typo deep inside a pod template (core/v1 schema embedded in the CRD)
        (lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__(
            "envFom", [{"secretRef": {"name": "x"}}]),
         r"spec\.rayClusterSpec\.headGroupSpec\.template\.spec\.containers\[0\]\.envFom: unknown field"),
        # wrong types
        (lambda m: m["spec"].__setitem__("shutdownAfterJobFinishes", "yes"),
         r"spec\.shutdownAfterJobFinishes: 'yes' is not of type 'boolean'"),
        (lambda m: m["spec"].__setitem__("entrypoint", 5), r"spec\.entrypoint: 5 is not of type 'string'"),
        (lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
         r"rayStartParams\.num-cpus: 0 is not of type 'string'"),
        (lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("replicas", "two"),
         r"workerGroupSpecs\.0\.replicas: 'two' is not of type 'integer'"),
        # a missing required field and a value outside an enum
        (lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
         r"'groupName' is a required property"),
        (lambda m: m["spec"]["rayClusterSpec"].__setitem__("authOptions", {"mode": "password"}),
         r"authOptions\.mode: 'password' is not one of \['disabled', 'token'\]"),
    ],
    ids=["typo-rayClusterSpc", "typo-envFom", "bool-as-string", "entrypoint-int", "rayStartParams-int",
         "replicas-string", "missing-groupName", "bad-enum"],
)
def test_validator_rejects_broken_manifests(mutate, expected):
    broken = copy.deepcopy(load_yaml(DEPLOY / "kuberay" / "rayjob-sft.yaml"))
    assert schema_errors(broken) == []
    mutate(broken)
    errors = schema_errors(broken)
    assert any(re.search(expected, e) for e in errors), errors


@needs_crd
def test_int_or_string_and_preserved_fields_are_accepted():
    m = copy.deepcopy(load_yaml(DEPLOY / "kuberay" / "rayjob-sft-cpu.yaml"))
    res = m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    res["limits"]["cpu"] = 2  # x-kubernetes-int-or-string: an int quantity is as valid as "2"
    assert schema_errors(m) == []
    assert unknown_fields({"a": {"anything": 1}}, {"properties": {"a": {"x-kubernetes-preserve-unknown-fields": True}}}) == []
    assert unknown_fields({"a": {"b": 1}}, {"properties": {"a": {"type": "object", "properties": {}}}}) == ["a.b"]


# ------------------------------------------------------------------------------------------ repo consistency

def test_ray_version_matches_pyproject(manifest):
    lower = ray_lower_bound()
    ray_version = manifest["spec"]["rayClusterSpec"]["rayVersion"]
    assert isinstance(ray_version, str) and re.fullmatch(r"\d+\.\d+\.\d+", ray_version), ray_version
    assert Version(ray_version) == lower, f"rayVersion {ray_version} != pyproject's ray lower bound {lower}"
    for role, container in ray_containers(manifest["spec"]).items():
        image = container["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert ray_version in tag, f"{role}: image {image} is not tagged with Ray {ray_version}"


class _Parsed(Exception):
    def __init__(self, cls: type, cfg) -> None:
        super().__init__(cls.__name__)
        self.cls, self.cfg = cls, cfg


def config_seen_by_job(spec: dict, monkeypatch: pytest.MonkeyPatch) -> tuple[type, object]:
    """``(config class, config)`` that the entrypoint's job module itself builds from the manifest's argv: its own
    ``run()`` and ``parse()`` with its own config class, run from the repo root (the image's working dir) and
    stopped right after parsing, before anything starts."""
    argv = shlex.split(spec["entrypoint"])
    module = importlib.import_module(argv[2])
    # Stage jobs (jobs.sft/dpo/grpo) parse inside jobs._cli.run_stage_job; the others import parse themselves.
    parser_home = module if hasattr(module, "parse") else importlib.import_module("jobs._cli")
    real_parse = parser_home.parse

    def parse_then_stop(cls, description, job_argv=None):
        raise _Parsed(cls, real_parse(cls, description, job_argv))

    monkeypatch.setattr(parser_home, "parse", parse_then_stop)
    monkeypatch.chdir(ROOT)
    with pytest.raises(_Parsed) as parsed:
        module.run(argv[3:])
    return parsed.value.cls, parsed.value.cfg


def dotted_get(node, dotted: str):
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def test_entrypoint_module_and_config_exist_and_load(manifest, monkeypatch):
    module, config, overrides = entrypoint(manifest["spec"])
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"no {module.replace('.', '/')}.py in the repo"
    assert config.parts[0] == "configs" and (ROOT / config).is_file(), f"{config} is not a file under configs/"
    assert all("=" in o for o in overrides), overrides
    # What the job module makes of the entrypoint, not what this test makes of it: the config file is of the kind
    # that module parses (no synth config handed to jobs.sft), and every override reaches the job's config.
    cls, cfg = config_seen_by_job(manifest["spec"], monkeypatch)
    file_cls = config_class_for(ROOT / config)
    assert cls is file_cls, f"{module} parses a {cls.__name__}, but {config} is a {file_cls.__name__} file"
    assert type(cfg) is cls
    dumped = cfg.model_dump(mode="json")
    for override in overrides:
        key, value = override.split("=", 1)
        assert dotted_get(dumped, key) == yaml.safe_load(value), f"{module} does not see the override {override}"


def test_entrypoint_is_one_plain_command(manifest):
    # KubeRay's submitter pastes the entrypoint into a shell line (`... -- <entrypoint> ; fi ; ray job logs ...`):
    # shell syntax would run in the submitter pod, not on the Ray cluster.
    ep = manifest["spec"]["entrypoint"]
    assert not re.search(r"[;&|$<>`'\"\\\n]", ep), f"entrypoint has shell syntax: {ep!r}"


def gpus_needed(cfg) -> tuple[bool, int, float]:
    """(uses GPUs, GPUs the job needs at once, CPUs it needs next to them) for a training or synthesis config."""
    from finemed_ray.synth.config import SynthJobConfig

    if isinstance(cfg, SynthJobConfig):
        from finemed_ray.synth.teachers import TeacherSpec, make_teacher

        # Steps run one after another and each releases its engines: the largest step's engines must fit.
        need = 0
        for tc in cfg.teachers.models.values():
            teacher = make_teacher(TeacherSpec(**tc.model_dump()))
            if tc.backend == "vllm" and teacher.options.device == "gpu":
                kw = teacher.options.engine_kwargs
                need = max(need, tc.concurrency * kw.get("tensor_parallel_size", 1) * kw.get("pipeline_parallel_size", 1))
            elif tc.backend == "vllm":
                assert teacher.options.device != "auto", "a manifest must say where vLLM runs (extra.device)"
        return need > 0, need, 1.0  # Ray Data's read/map tasks next to the engines
    return cfg.scaling.use_gpu, cfg.scaling.num_workers, cfg.scaling.num_workers * cfg.scaling.cpus_per_worker


def test_cluster_fits_the_job(manifest):
    spec = manifest["spec"]
    cfg = job_config(spec)
    use_gpu, gpus_wanted, cpus_wanted = gpus_needed(cfg)
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the head must not take training or data tasks"
    assert GPU not in limits(ray_containers(spec)["head"]), "the head pod must not request GPUs"
    total_gpus = total_cpus = 0.0
    for group in cluster["workerGroupSpecs"]:
        # KubeRay rejects resources given both in rayStartParams and in the group's `resources` field
        assert not ({"num-cpus", "num-gpus", "memory", "resources"} & set(group.get("rayStartParams", {}))
                    and group.get("resources")), group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        lim = limits(group["template"]["spec"]["containers"][0])
        gpus, cpus = quantity(lim.get(GPU, 0)), quantity(lim["cpu"])
        total_gpus += group["replicas"] * gpus
        total_cpus += group["replicas"] * cpus
        if use_gpu and gpus and hasattr(cfg, "scaling"):
            # Ray Train puts one worker per GPU; each reserves cpus_per_worker on the same node
            assert gpus * cfg.scaling.cpus_per_worker < cpus, f"{group['groupName']}: too few CPUs for {gpus:g} GPUs"
    if use_gpu:
        if hasattr(cfg, "scaling"):
            assert gpus_wanted == total_gpus, (
                f"scaling.num_workers={cfg.scaling.num_workers} but the worker groups have {total_gpus:g} GPUs")
        else:  # synthesis: every step's vLLM replicas must fit at once (else ray.data.llm waits forever)
            assert gpus_wanted <= total_gpus, f"the teachers need {gpus_wanted} GPUs, the cluster has {total_gpus:g}"
    else:
        assert total_gpus == 0, "a CPU job should not hold GPUs"
    # leave at least one CPU for Ray Data next to the Ray Train workers / engines
    assert cpus_wanted < total_cpus


def test_cpu_manifests_use_the_cpu_accelerator(manifest):
    cfg = job_config(manifest["spec"])
    if not hasattr(cfg, "scaling"):
        return  # DeepSpeed is a training concern only
    for role, container in ray_containers(manifest["spec"]).items():
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if cfg.scaling.use_gpu:
            assert "DS_ACCELERATOR" not in env, role
        elif role != "submitter":
            assert env.get("DS_ACCELERATOR") == "cpu", f"{role}: DeepSpeed needs DS_ACCELERATOR=cpu without GPUs"


def test_s3_credentials_come_from_the_example_secret(manifest):
    secret = load_yaml(SECRET_EXAMPLE)
    assert secret["kind"] == "Secret" and secret["apiVersion"] == "v1"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= set(secret["stringData"])
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert secret["stringData"][key].startswith("REPLACE_"), f"{key} must stay a placeholder"
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", SECRET_EXAMPLE.read_text()), "a real-looking key"
    containers = ray_containers(manifest["spec"])
    assert "submitter" in containers, "give the submitter the same env (submitterPodTemplate)"
    for role, container in containers.items():
        refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert refs == [secret["metadata"]["name"]], f"{role}: envFrom secretRef {refs}"


def test_lifecycle_fields(manifest):
    name, spec = manifest["metadata"]["name"], manifest["spec"]
    # KubeRay: a DNS-1035 label of at most 47 characters (it appends a suffix for the RayCluster)
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"  # submitterPodTemplate needs a submitter Job
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def test_dockerfile_matches_the_repo():
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    (base,) = [ln.split()[1] for ln in instructions if ln.upper().startswith("FROM ")]
    assert base.startswith("rayproject/ray:") and Version(base.split(":")[1].split("-")[0]) == ray_lower_bound()
    assert "WORKDIR /app" in instructions
    assert any(re.search(r"pip install .*-e \"?/app\[vllm\]\"?", ln) for ln in instructions)
    for ln in instructions:
        if ln.upper().startswith("COPY "):
            sources = [a for a in ln.split()[1:-1] if not a.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
    # everything the editable install needs is copied
    copied = {a.rstrip("/") for ln in instructions if ln.upper().startswith("COPY ")
              for a in ln.split()[1:-1] if not a.startswith("--")}
    assert {"pyproject.toml", "README.md", "finemed_ray", "jobs", "serve", "configs"} <= copied


# ------------------------------------------------------------------------------------------------ RayService
RAYSERVICE = DEPLOY / "kuberay" / "rayservice.yaml"
RAYSERVICE_CRD = CRD_DIR / "ray.io_rayservices.yaml"


@functools.lru_cache(maxsize=None)
def rayservice_schema() -> dict:
    crd = load_yaml(RAYSERVICE_CRD)
    assert crd["spec"]["names"]["kind"] == "RayService"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@pytest.mark.skipif(not RAYSERVICE_CRD.is_file(), reason=f"no RayService CRD at {CRD_DIR}")
def test_rayservice_matches_crd():
    m = load_yaml(RAYSERVICE)
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayService"
    schema = rayservice_schema()
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(m)]
    errors += [f"{p}: unknown field" for p in unknown_fields(m, schema)]
    assert errors == []
    broken = copy.deepcopy(m)
    broken["spec"]["serveConfigV2"] = {"applications": []}  # must be a YAML *string*
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


def test_rayservice_matches_the_repo():
    from finemed_ray.serving.config import ServeConfig

    m = load_yaml(RAYSERVICE)
    spec = m["spec"]
    cluster = spec["rayClusterConfig"]
    assert Version(cluster["rayVersion"]) == ray_lower_bound()
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]
    for c in containers:
        assert cluster["rayVersion"] in c["image"].rsplit(":", 1)[1]
        assert [e["secretRef"]["name"] for e in c.get("envFrom", [])] == ["finemed-s3"]
    serve_cfg = yaml.safe_load(spec["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    module, attr = app["import_path"].split(":")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    import importlib

    assert callable(getattr(importlib.import_module(module), attr))
    cfg = load_config(ServeConfig, ROOT / app["args"]["config"], app["args"]["overrides"])  # every override valid
    assert cfg.http.host == "0.0.0.0" and serve_cfg["http_options"]["port"] == cfg.http.port
    # Every engine replica and the TTT trainer get a GPU at the autoscaler's maximum.
    gpus = sum(quantity(limits(g["template"]["spec"]["containers"][0]).get(GPU, 0)) * g["maxReplicas"]
               for g in cluster["workerGroupSpecs"])
    need = cfg.autoscaling.max_replicas * cfg.resources.engine_num_gpus + cfg.ttt.replicas * cfg.ttt.num_gpus
    assert cfg.resources.engine_num_gpus >= 1 and need <= gpus, (need, gpus)
    # The API key comes from a Secret, through the env var the config names.
    env = {e["name"]: e for e in containers[0].get("env", [])}
    assert "secretKeyRef" in env[cfg.security.api_key_env]["valueFrom"]
