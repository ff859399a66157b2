"""The Kubernetes manifests, validated offline: schemas, semantics, and their own command run.

The tests read ``k8s/rendered/<overlay>.yaml`` (what ``k8s/render.sh`` writes with kustomize) so
that they need no kustomize; where kustomize or kubectl is installed, a test renders the overlays
again and fails if the committed files are stale.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from distrib import exitcodes
from distrib.config import Config

from .conftest import REPO, base_env, chaos, free_port, wait_listening

yaml = pytest.importorskip("yaml")
K8S = REPO / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
CRDS = REPO.parent / "shared" / "k8s-crds"
KUBERNETES_VERSION = "1.34.0"  # schemas bundled with the pinned kubernetes-validate
CRD_FILES = {"PyTorchJob": "pytorchjobs.crd.yaml", "JobSet": "jobsets.crd.yaml"}

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def rendered(overlay: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / "rendered" / f"{overlay}.yaml").read_text()) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod templates of a workload (Job, PyTorchJob), as their ``template`` objects."""
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]]
    if doc["kind"] == "PyTorchJob":
        return [r["template"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    return []


def workloads() -> Iterator[tuple[str, dict[str, Any]]]:
    for overlay in OVERLAYS:
        for doc in rendered(overlay):
            if pod_templates(doc):
                yield overlay, doc


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", ()) if "value" in e}


def argv_of(container: dict[str, Any]) -> list[str]:
    return list(container.get("command", [])) + list(container.get("args", []))


# ------------------------------------------------------------------------------------------------
# The rendered files are what kustomize makes of the overlays


def test_every_overlay_is_rendered_and_the_renders_are_fresh(tmp_path: Path) -> None:
    assert set(OVERLAYS) == {"s3", "pvc", "pytorchjob"}
    assert {p.stem for p in (K8S / "rendered").glob("*.yaml")} == set(OVERLAYS)
    if shutil.which("kustomize"):
        render = ["kustomize", "build"]
    elif shutil.which("kubectl"):
        render = ["kubectl", "kustomize"]
    else:
        pytest.skip("neither kustomize nor kubectl is installed: cannot re-render the overlays")
    for overlay in OVERLAYS:
        out = subprocess.run([*render, str(K8S / "overlays" / overlay)], capture_output=True,
                             text=True, check=True).stdout
        assert list(yaml.safe_load_all(out)) == rendered(overlay), (
            f"k8s/rendered/{overlay}.yaml is stale: run `bash k8s/render.sh`")


# ------------------------------------------------------------------------------------------------
# Schemas: built-in kinds with kubernetes-validate --strict, custom resources with their CRDs


def builtin_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for overlay in OVERLAYS:
        for doc in rendered(overlay):
            if doc["kind"] not in CRD_FILES:
                yield overlay, doc
    for path in sorted(K8S.glob("overlays/*/*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and doc["kind"] not in CRD_FILES:
                    yield str(path.relative_to(K8S)), doc


def test_built_in_kinds_pass_kubernetes_validate_strict() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    checked = []
    for where, doc in builtin_documents():
        kv.validate(doc, KUBERNETES_VERSION, strict=True)
        checked.append(f"{where}:{doc['kind']}")
    kinds = {c.split(":")[1] for c in checked}
    assert {"Job", "Service", "ConfigMap", "PersistentVolumeClaim", "Secret"} <= kinds, checked


def test_kubernetes_validate_strict_rejects_an_unknown_or_mistyped_field() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    job = find(rendered("s3"), "Job")
    typo = copy.deepcopy(job)
    typo["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, KUBERNETES_VERSION, strict=True)
    mistyped = copy.deepcopy(job)
    mistyped["spec"]["completions"] = "2"
    with pytest.raises(kv.ValidationError):
        kv.validate(mistyped, KUBERNETES_VERSION, strict=True)


def strict_schema(schema: Any) -> Any:
    """A CRD's openAPIV3Schema with unknown fields rejected: ``additionalProperties: false`` on
    every object schema that lists ``properties`` and neither sets ``additionalProperties`` nor
    is marked ``x-kubernetes-preserve-unknown-fields`` (what a structural schema prunes)."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_validator(kind: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    path = CRDS / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(f"{path.relative_to(REPO.parent)} is absent: the CRD schemas live in "
                    "../shared/k8s-crds beside the repository")
    crd = yaml.safe_load(path.read_text())
    schemas = {f"{crd['spec']['group']}/{v['name']}": v["schema"]["openAPIV3Schema"]
               for v in crd["spec"]["versions"]}
    return lambda doc: jsonschema.validate(doc, strict_schema(schemas[doc["apiVersion"]]))


def test_custom_resources_match_their_crd_schema_with_unknown_fields_rejected() -> None:
    checked = 0
    for overlay in OVERLAYS:
        for doc in rendered(overlay):
            if doc["kind"] in CRD_FILES:
                crd_validator(doc["kind"])(doc)
                checked += 1
    assert checked >= 1


def test_the_crd_check_rejects_an_unknown_field_and_a_wrong_type() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validate = crd_validator("PyTorchJob")
    job = find(rendered("pytorchjob"), "PyTorchJob")
    typo = copy.deepcopy(job)
    typo["spec"]["elasticPolicy"]["maxRestart"] = 3
    with pytest.raises(jsonschema.ValidationError, match="maxRestart"):
        validate(typo)
    mistyped = copy.deepcopy(job)
    mistyped["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate(mistyped)


# ------------------------------------------------------------------------------------------------
# Semantics: what the manifests promise matches what distrib does


def test_pod_failure_policy_uses_distribs_exit_codes_with_restart_policy_never() -> None:
    jobs = [(o, d) for o, d in workloads() if d["kind"] == "Job"]
    assert {o for o, _ in jobs} == {"s3", "pvc"}
    for overlay, job in jobs:
        spec, pod = job["spec"], job["spec"]["template"]["spec"]
        assert spec["completionMode"] == "Indexed", overlay
        assert spec["podReplacementPolicy"] == "Failed", overlay  # a rank never runs twice
        assert "podFailurePolicy" in spec and pod["restartPolicy"] == "Never", overlay
        rules = {(r["action"], tuple(r.get("onExitCodes", {}).get("values", ())),
                  tuple(c["type"] for c in r.get("onPodConditions", ())))
                 for r in spec["podFailurePolicy"]["rules"]}
        assert rules == {("Ignore", (), ("DisruptionTarget",)),
                         ("Ignore", (exitcodes.PREEMPTED,), ()),
                         ("FailJob", (exitcodes.PERMANENT,), ())}, overlay
        names = {c["name"] for c in pod["containers"]}
        for rule in spec["podFailurePolicy"]["rules"]:
            if "onExitCodes" in rule:
                assert rule["onExitCodes"]["containerName"] in names, overlay


def test_grace_period_exceeds_torchruns_shutdown_timeout_which_exceeds_the_save() -> None:
    from distrib.runtime.preemption import shutdown_budget_problems

    for overlay, doc in workloads():
        for template in pod_templates(doc):
            pod = template["spec"]
            grace = pod["terminationGracePeriodSeconds"]
            for container in pod["containers"]:
                env = env_of(container)
                shutdown = int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
                assert int(env["DISTRIB_GRACE_PERIOD_SECONDS"]) == grace, overlay
                assert shutdown < grace, overlay
                # the trainer's own check agrees: no warning for a 30 s emergency save...
                os.environ.update(TORCH_ELASTIC_SHUTDOWN_TIMEOUT=str(shutdown),
                                  DISTRIB_GRACE_PERIOD_SECONDS=str(grace))
                try:
                    assert shutdown_budget_problems(shutdown / 2) == [], overlay
                    assert shutdown_budget_problems(shutdown) != [], overlay  # ...but for a slow one
                finally:
                    del os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]
                    del os.environ["DISTRIB_GRACE_PERIOD_SECONDS"]


def test_every_container_runs_distrib_train_through_the_launcher() -> None:
    seen = 0
    for overlay, doc in workloads():
        for template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                argv = argv_of(container)
                assert argv[:3] == ["python", "-m", "distrib.launch"], overlay
                i = argv.index("-m", 3)
                assert argv[i:i + 2] == ["-m", "distrib.train"], overlay
                assert "--config=/etc/distrib/run.toml" in argv[i + 2:], overlay
                assert "--checkpoint-dir=$(CHECKPOINT_DIR)" in argv[i + 2:], overlay
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert "/etc/distrib" in mounts and "/dev/shm" in mounts, overlay
                seen += 1
    assert seen == len(OVERLAYS)


def test_rendezvous_endpoint_names_pod_zero_of_the_job_through_the_headless_service() -> None:
    for overlay in ("s3", "pvc"):
        docs = rendered(overlay)
        job, service = find(docs, "Job"), find(docs, "Service")
        pod = job["spec"]["template"]["spec"]
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
        assert pod["subdomain"] == service["metadata"]["name"]
        args = argv_of(pod["containers"][0])
        endpoint = next(a.split("=", 1)[1] for a in args if a.startswith("--rdzv-endpoint="))
        host, port = endpoint.rsplit(":", 1)
        assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}
        assert "--rdzv-backend=c10d" in args and "--node_rank=$(JOB_COMPLETION_INDEX)" in args


def test_node_and_gpu_counts_agree() -> None:
    for overlay, doc in workloads():
        if doc["kind"] == "Job":
            container = doc["spec"]["template"]["spec"]["containers"][0]
            env = env_of(container)
            assert doc["spec"]["completions"] == doc["spec"]["parallelism"] == int(env["NNODES"])
            nproc = env["NPROC_PER_NODE"]
        else:
            elastic = doc["spec"]["elasticPolicy"]
            replicas = doc["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"]
            assert elastic["minReplicas"] <= replicas <= elastic["maxReplicas"]
            assert elastic["rdzvBackend"] == "c10d" and elastic["maxRestarts"] > 0
            container = doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"][
                "containers"][0]
            assert container["name"] == "pytorch"  # the training operator requires this name
            nproc = doc["spec"]["nprocPerNode"]
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        if gpus is not None:
            assert int(gpus) == int(nproc), overlay


def test_configuration_storage_credentials_and_security() -> None:
    dockerfile = (K8S / "Dockerfile").read_text()
    image_uid = int(re.search(r"^USER (\d+)", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    for overlay, doc in workloads():
        docs = rendered(overlay)
        config = find(docs, "ConfigMap", "distrib-train-config")["data"]["run.toml"]
        Config.from_dict(tomllib.loads(config), source="run.toml")  # a valid distrib config
        checkpoint_dir = find(docs, "ConfigMap", "distrib-train-env")["data"]["CHECKPOINT_DIR"]
        assert not any(d["kind"] == "Secret" for d in docs), "never apply placeholder credentials"
        for template in pod_templates(doc):
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] == image_uid
            volumes = {v["name"]: v for v in pod["volumes"]}
            container = pod["containers"][0]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert "memory" in container["resources"]["limits"]
            env_from = [next(iter(e.values()))["name"] for e in container["envFrom"]]
            if checkpoint_dir.startswith("s3://"):
                assert "distrib-s3" in env_from, overlay
            else:
                mount = next(m for m in mounts if checkpoint_dir.startswith(m + "/"))
                claim = volumes[mounts[mount]]["persistentVolumeClaim"]["claimName"]
                pvc = find(docs, "PersistentVolumeClaim", claim)
                assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every rank reads it
    secret = yaml.safe_load((K8S / "overlays" / "s3" / "secret.example.yaml").read_text())
    assert {v for k, v in secret["stringData"].items() if "SECRET" in k or "KEY_ID" in k} == {
        "REPLACE-ME"}
    assert "AWS_ENDPOINT_URL" in secret["stringData"]


# ------------------------------------------------------------------------------------------------
# The image


@pytest.mark.slow
def test_dockerfile_pins_torch_first_and_its_build_context_makes_a_working_wheel(
        tmp_path: Path) -> None:
    dockerfile = (K8S / "Dockerfile").read_text()
    runs = re.findall(r"^RUN (.+)$", dockerfile, re.M)
    torch_at = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    package_at = next(i for i, r in enumerate(runs) if 'pip install ".[s3]"' in r)
    assert torch_at < package_at
    # Build a wheel from exactly what the Dockerfile copies and .dockerignore lets through.
    copied = [p for line in re.findall(r"^COPY (.+)$", dockerfile, re.M)
              for p in line.split()[:-1]]
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    context = tmp_path / "context"
    for name in copied:
        assert name in allowed, f"{name} is copied but excluded by .dockerignore"
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            context.mkdir(exist_ok=True)
            shutil.copy(src, context / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                           "--wheel-dir", str(tmp_path / "wheel"), str(context)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("distrib-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"distrib/launch.py", "distrib/train.py", "distrib/tasks/classifier.py"} <= names


# ------------------------------------------------------------------------------------------------
# The Indexed Job's own command, run as two local "pods"


def k8s_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command and args (``$$`` escapes a ``$``)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


class Pod:
    """One pod as a local process group, started from a workload's container spec."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log.open("a"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def terminate(self) -> None:
        """What the kubelet does first on eviction or preemption: SIGTERM to PID 1."""
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """A node lost: SIGKILL the launcher, torchrun and the workers (their own groups)."""
        for pid in [self.proc.pid, *chaos.descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


class LocalCluster:
    """Runs a rendered overlay's pods as local processes, the way the kubelet would: envFrom (the
    ConfigMaps; the Secret has the example's keys, pointed at the loopback S3 server), then env,
    ``$(VAR)`` expanded in the command, the ConfigMap volume as a local directory, and the
    ``hosts`` names (pod 0's DNS name) mapped to 127.0.0.1 and a free port. The bucket is a
    fresh one on that server in place of the overlay's placeholder."""

    UID = "0f6c2b7e-5d1a-4c1e-9a57-3b2d7c9e1f00"  # the Job's metadata.uid, as its pods see it
    TRAIN = ["--task", "tests.tasks:tiny", "--task-arg", "dropout=0.1", "--max-epochs", "2",
             "--no-early-stop", "--batch-size", "16", "--save-every-steps", "50",
             "--log-every-steps", "0", "--memory-every-steps", "5"]

    def __init__(self, overlay: str, tmp: Path, endpoint: str, hosts: list[str]) -> None:
        from .s3servers import make_bucket, s3_env

        self.docs = rendered(overlay)
        self.tmp = tmp
        self.workload = next(d for d in self.docs if pod_templates(d))
        pod = pod_templates(self.workload)[0]["spec"]
        self.container = pod["containers"][0]
        config_maps = {d["metadata"]["name"]: d["data"] for d in self.docs
                       if d["kind"] == "ConfigMap"}
        secret_keys = set(yaml.safe_load((K8S / "overlays" / "s3" / "secret.example.yaml")
                                         .read_text())["stringData"])
        self.env: dict[str, str] = {}
        for source in self.container["envFrom"]:
            if "configMapRef" in source:
                self.env.update(config_maps[source["configMapRef"]["name"]])
            else:
                values = s3_env(endpoint)
                assert secret_keys <= set(values)
                self.env.update({k: values[k] for k in secret_keys})
        self.env.update(env_of(self.container))
        for entry in self.container.get("env", ()):  # the downward API: this Job's labels
            path = entry.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
            if path == "metadata.labels['batch.kubernetes.io/controller-uid']":
                self.env[entry["name"]] = self.UID
        bucket, path = self.env["CHECKPOINT_DIR"].removeprefix("s3://").split("/", 1)
        assert bucket == "your-bucket", self.env["CHECKPOINT_DIR"]  # the overlay's placeholder
        self.checkpoint_dir = self.env["CHECKPOINT_DIR"] = f"s3://{make_bucket(endpoint)}/{path}"
        self.s3 = s3_env(endpoint)

        self.etc = tmp / "etc-distrib"
        self.mount = next(m for m in self.container["volumeMounts"] if m["name"] == "config")
        volume = next(v for v in pod["volumes"] if v["name"] == "config")
        self.etc.mkdir()
        for key, value in config_maps[volume["configMap"]["name"]].items():
            (self.etc / key).write_text(value)
        self.port = free_port()  # the rendezvous store's (the first pod's agent hosts it)
        self.hosts = {h: f"127.0.0.1:{self.port}" for h in hosts}

    # Test speed only: a lost pod drops out of the rendezvous after 3 s without a heartbeat
    # (torchrun's default: 15 s), and an elastic group admits late pods 3 s after reaching its
    # minimum (default: 30 s). torchrun reads PET_RDZV_CONF where --rdzv-conf is not given.
    RDZV_CONF = "keep_alive_interval=1,keep_alive_max_attempt=3,last_call_timeout=3"

    def start(self, name: str, train_samples: int, *extra_args: str, **extra_env: str) -> Pod:
        env = base_env(**self.env, PET_RDZV_CONF=self.RDZV_CONF, **extra_env)
        env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # the launcher must set it itself
        argv = [k8s_expand(a, env) for a in argv_of(self.container)]
        assert "$(" not in " ".join(argv), argv
        local = []
        for arg in argv:
            for host, address in self.hosts.items():
                arg = arg.replace(host, address)
            local.append(sys.executable if arg == "python" else
                         arg.replace(self.mount["mountPath"], str(self.etc)))
        shm = self.tmp / f"shm-{name}"  # each pod's own /dev/shm (a Memory emptyDir)
        shm.mkdir()
        train = [*self.TRAIN, "--task-arg", f"train={train_samples}", "--memory-dir", str(shm),
                 *extra_args]
        return Pod(local + train, env, self.tmp / f"{name}.log")

    def wait_rendezvous(self, pod: Pod) -> None:
        """Wait until ``pod``'s agent hosts the rendezvous store on :attr:`port`."""
        wait_listening(self.port, pod)

    @staticmethod
    def wait_first_step(pods: list[Pod], timeout: float = 120) -> None:
        wait_for(lambda: any(chaos.FIRST_STEP in p.text() for p in pods), pods, timeout)

    def final_checkpoint(self) -> tuple[Any, dict[str, Any] | None]:
        """The newest checkpoint's info and the run's completion marker."""
        from distrib.checkpoint.storage import open_storage
        from distrib.checkpoint.store import CheckpointStore

        from .s3servers import clear_s3fs_cache

        os.environ.update(self.s3)
        try:
            clear_s3fs_cache()
            store = CheckpointStore(open_storage(self.checkpoint_dir))
            return store.scan()[-1], store.completion()
        finally:
            for key in self.s3:
                os.environ.pop(key, None)


def wait_for(condition: Callable[[], bool], pods: list[Pod], timeout: float = 120) -> None:
    """Poll ``condition`` while every pod runs."""
    deadline = time.monotonic() + timeout
    while not condition():
        logs = "".join(p.text()[-3000:] for p in pods)
        assert time.monotonic() < deadline, logs
        assert all(p.proc.poll() is None for p in pods), logs
        time.sleep(0.05)


@pytest.mark.slow
def test_the_indexed_jobs_command_runs_as_two_local_pods_and_survives_losing_one(
        tmp_path: Path, moto_endpoint: str) -> None:
    """Two pods form one job, with two data-loader workers per rank. Both are preempted
    (SIGTERM): they write the emergency checkpoint and exit 75, and the Job controller starts
    them again. Then pod 1's node is lost and the Job controller starts a replacement with the
    same index: the job resumes and completes, with both ranks."""
    docs = rendered("s3")
    job, service = find(docs, "Job"), find(docs, "Service")
    pod0 = f"{job['metadata']['name']}-0.{service['metadata']['name']}:29500"
    cluster = LocalCluster("s3", tmp_path, moto_endpoint, hosts=[pod0])
    workers = ("--num-workers", "2")

    def start_both(attempt: str) -> list[Pod]:
        started = [cluster.start(f"pod-0{attempt}", 8000, *workers, JOB_COMPLETION_INDEX="0")]
        cluster.wait_rendezvous(started[0])  # pod 0 first: its agent hosts the store
        started.append(cluster.start(f"pod-1{attempt}", 8000, *workers,
                                     JOB_COMPLETION_INDEX="1"))
        cluster.wait_first_step(started)
        return started

    pods = start_both("")
    time.sleep(1.0)
    for p in pods:
        p.terminate()
    for p in pods:
        assert p.proc.wait(timeout=120) == exitcodes.PREEMPTED, p.text()[-4000:]
    assert "emergency checkpoint committed" in pods[0].text()
    pods = start_both("-again")
    assert "no steps are lost" in pods[0].text() + pods[1].text()
    time.sleep(1.5)
    pods[1].kill()  # the node under pod 1 is gone...
    time.sleep(1.0)
    starts = pods[0].text().count(chaos.FIRST_STEP)
    pods[1] = cluster.start("pod-1-new", 8000, *workers,
                            JOB_COMPLETION_INDEX="1")  # ...and is replaced
    wait_for(lambda: pods[0].text().count(chaos.FIRST_STEP) > starts, pods)
    time.sleep(0.3)  # a few snapshots on both pods (every 5 steps)
    os.kill(chaos.workers(pods[0].proc.pid)[0], signal.SIGKILL)  # a worker of pod 0 crashes
    for p in pods:
        assert p.proc.wait(timeout=240) == exitcodes.OK, p.text()[-4000:]
    logs = pods[0].text() + pods[1].text()
    resumes = re.findall(r"resuming from the memory tier: step \d+ \((\w+)", logs)
    # the new pod got the state from its peer; after the worker crash the group restarted from
    # memory again (each pod its own snapshot, or from the peer when the crash cut a snapshot
    # short on pod 0)
    assert resumes[:1] == ["broadcast"] and len(resumes) == 2, logs[-6000:]
    final, complete = cluster.final_checkpoint()
    assert complete is not None  # the run is marked complete
    assert final.step == 2 * 8000 // (2 * 16)  # 2 epochs, 2 ranks x 16 samples per step
    assert final.manifest.meta.world_size == 2 and final.manifest.meta.final is True


@pytest.mark.slow
def test_the_pytorchjobs_command_runs_elastically_on_the_operators_pet_variables(
        tmp_path: Path, moto_endpoint: str) -> None:
    """The PyTorchJob's container gets torchrun's options only from the PET_* variables the
    training operator sets for an elasticPolicy. Two pods form the group; one is lost and not
    replaced: the other re-forms the group alone (minReplicas 1) and completes."""
    cluster = LocalCluster("pytorchjob", tmp_path, moto_endpoint, hosts=[])
    spec = cluster.workload["spec"]
    elastic = spec["elasticPolicy"]
    operator_env = {  # what the training operator sets in every Worker pod (elastic mode)
        "PET_NNODES": f"{elastic['minReplicas']}:{elastic['maxReplicas']}",
        "PET_RDZV_BACKEND": elastic["rdzvBackend"],
        "PET_RDZV_ENDPOINT": f"127.0.0.1:{cluster.port}",
        "PET_RDZV_ID": cluster.workload["metadata"]["name"],
        "PET_MAX_RESTARTS": str(elastic["maxRestarts"]),
        "PET_NPROC_PER_NODE": spec["nprocPerNode"],
    }
    pods = [cluster.start("worker-0", 8000, **operator_env)]
    cluster.wait_rendezvous(pods[0])  # worker-0 first: its agent hosts the store
    pods.append(cluster.start("worker-1", 8000, **operator_env))
    cluster.wait_first_step(pods)
    time.sleep(1.0)
    pods[1].kill()
    assert pods[0].proc.wait(timeout=240) == exitcodes.OK, pods[0].text()[-4000:]
    log = pods[0].text()
    assert "resuming a 2-rank checkpoint with 1 ranks" in log and "resumed from" in log
    final, complete = cluster.final_checkpoint()
    assert complete is not None and final.manifest.meta.world_size == 1
