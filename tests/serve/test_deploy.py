"""Deployment files: manifests parse and agree with the Dockerfile; its install step works."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import REPO_ROOT

from histolite.serve.app import ServeSettings

DEPLOY = REPO_ROOT / "deploy"
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()


def _manifests() -> dict[str, dict]:
    """The prediction service's objects by kind (the slide service and Jobs are apart)."""
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name in ("slide-job.yaml", "slides-deployment.yaml", "volumes.yaml"):
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_slide_service_is_one_replica_with_the_slide_volume() -> None:
    docs = {
        d["kind"]: d
        for d in yaml.safe_load_all((DEPLOY / "k8s" / "slides-deployment.yaml").read_text())
    }
    spec = docs["Deployment"]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HISTOLITE_SLIDE_ROOT"] == "/slides"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/slides"]["readOnly"] is True and env["HISTOLITE_JOBS_DIR"].startswith("/data")
    # the service reads exactly these variables into its settings
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            if value is not None:
                patch.setenv(name, value)
        settings = ServeSettings(model_dir=Path("/models"))
    assert settings.slide_root == Path("/slides")
    assert settings.jobs_dir == Path(env["HISTOLITE_JOBS_DIR"])
    assert docs["Service"]["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert 'ENTRYPOINT ["histolite", "serve", "/models"' in DOCKERFILE


def test_manifests_parse_and_cover_the_deployment() -> None:
    docs = _manifests()
    assert set(docs) == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler"}
    for doc in docs.values():
        assert doc["apiVersion"] and doc["metadata"]["name"] == "histolite-serve"
    assert docs["Service"]["spec"]["type"] == "LoadBalancer"
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == "histolite-serve"


def test_manifests_agree_with_the_dockerfile_and_the_app() -> None:
    docs = _manifests()
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    documented_tag = re.search(r"docker build .* -t (\S+) ", DOCKERFILE)
    assert documented_tag is not None and container["image"] == documented_tag.group(1)
    exposed = int(re.search(r"^EXPOSE (\d+)", DOCKERFILE, re.M).group(1))  # type: ignore[union-attr]
    assert container["ports"][0]["containerPort"] == exposed
    assert f'--port", "{exposed}"' in DOCKERFILE
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    # probes hit routes the app really has
    from histolite.serve.routes import ROUTERS

    paths = {route.path for router in ROUTERS for route in router.routes}  # type: ignore[attr-defined]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" and "/readyz" in paths
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" and "/healthz" in paths
    assert "/healthz" in DOCKERFILE
    # resources, non-root, config keys the app reads
    assert container["resources"]["requests"] and container["resources"]["limits"]
    uid = docs["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert f"USER {uid}" in DOCKERFILE and f"--uid {uid}" in DOCKERFILE
    # every ConfigMap key is a setting the service reads (HISTOLITE_ + a ServeSettings field)
    for key in docs["ConfigMap"]["data"]:
        assert key.startswith("HISTOLITE_"), key
        assert key.removeprefix("HISTOLITE_").lower() in ServeSettings.model_fields, key


def test_dockerfile_runs_the_tested_install_script() -> None:
    assert "COPY deploy/install_serving.sh" in DOCKERFILE
    assert "RUN sh /usr/local/bin/install_serving.sh /opt/venv /src" in DOCKERFILE
    assert DOCKERFILE.count("FROM ") == 2  # multi-stage: the runtime stage copies the venv only
    assert "COPY --from=build /opt/venv /opt/venv" in DOCKERFILE


@pytest.mark.slow
def test_install_script_builds_a_torch_free_serving_venv(tmp_path: Path) -> None:
    """The Dockerfile's install step, run here in a fresh venv (needs the package index)."""
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["sh", str(DEPLOY / "install_serving.sh"), str(venv), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    listing = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    assert "onnxruntime" in listing and "fastapi" in listing
    assert "\ntorch " not in listing and "lightning" not in listing
    help_text = subprocess.run(
        [str(venv / "bin" / "histolite"), "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "model_dir" in help_text.lower()
    assert sys.executable  # the test venv itself is untouched


DOCS = (REPO_ROOT / "docs" / "deploy.md").read_text()


def _commands(text: str, program: str) -> list[str]:
    """Shell commands of ``program`` in a text (comment markers dropped, continuations joined)."""
    lines = [re.sub(r"^#\s?", "", line).strip() for line in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [line for line in joined.splitlines() if line.startswith(program)]


def test_every_claim_the_manifests_mount_is_defined() -> None:
    """Regression: histolite-slides, -results and -slide-jobs were mounted but never defined."""
    claims = {
        doc["metadata"]["name"]: doc["spec"]
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / "volumes.yaml").read_text())
        if doc["kind"] == "PersistentVolumeClaim"
    }
    mounted = set(re.findall(r"claimName: ([\w-]+)", "".join(
        p.read_text() for p in (DEPLOY / "k8s").glob("*.yaml")
    )))  # fmt: skip
    assert mounted == {"histolite-slides", "histolite-results", "histolite-slide-jobs"}
    assert mounted <= set(claims)
    assert claims["histolite-results"]["accessModes"] == ["ReadWriteMany"]  # shards write at once
    assert claims["histolite-slide-jobs"]["accessModes"] == ["ReadWriteOnce"]  # one replica
    for spec in claims.values():
        assert spec["resources"]["requests"]["storage"]


def test_docs_apply_manifests_by_name_so_the_service_never_starts_batch_jobs() -> None:
    """Regression: `kubectl apply -f deploy/k8s/` also started the slide-shard Jobs."""
    applies = _commands(DOCS, "kubectl apply")
    assert applies
    for command in applies:
        paths = re.findall(r"-f (\S+)", command)
        assert paths and all((REPO_ROOT / p).is_file() for p in paths), command
        assert "deploy/k8s/slide-job.yaml" not in paths or paths == ["deploy/k8s/slide-job.yaml"]
    applied = {p for c in applies for p in re.findall(r"-f (\S+)", c)}
    assert {"deploy/k8s/volumes.yaml", "deploy/k8s/slides-deployment.yaml"} <= applied


def test_docker_docs_build_what_the_dockerfile_copies_and_set_the_slide_root() -> None:
    """Regression: the docs exported to deploy/model, the image copies deploy/models; /slides
    was mounted without HISTOLITE_SLIDE_ROOT, so slide jobs stayed off."""
    models = re.search(r"^ARG MODELS=(\S+)", DOCKERFILE, re.M)
    assert models is not None
    docker = DOCS.split("## Docker", 1)[1].split("## Kubernetes", 1)[0]
    outs = [m for c in _commands(docker, "histolite export") for m in re.findall(r"--out (\S+)", c)]
    assert outs and all(o.startswith(models.group(1) + "/") for o in outs), outs
    for text in (DOCKERFILE, DOCS):
        runs = _commands(text, "docker run")
        assert any(":/slides" in r for r in runs)
        for run in runs:
            assert (":/slides" in run) == ("HISTOLITE_SLIDE_ROOT=/slides" in run), run


def _mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_the_memory_limit_holds_the_largest_images_the_configmap_allows() -> None:
    """Peak per worker ~ 110 MB + slots x 8 B x max pixels (BENCHMARKS.md "Service memory",
    60 MP measured at 439 MB for RGBA); the pod limit must hold it with 20% to spare, or
    near-limit uploads get the pod OOM-killed instead of answered."""
    docs = _manifests()
    config = docs["ConfigMap"]["data"]
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    limit_mb = _mebibytes(container["resources"]["limits"]["memory"]) * 1.048576
    slots = int(config["HISTOLITE_MAX_CONCURRENT_PREDICTIONS"])
    peak_mb = 110 + slots * 8 * int(config["HISTOLITE_MAX_PIXELS"]) / 1e6
    assert peak_mb * 1.2 <= limit_mb, (peak_mb, limit_mb)


def test_both_services_read_the_audit_key_from_a_secret_file() -> None:
    """The HMAC key of the audit chain is a mounted secret (0440), never an env value or in the
    database; the variable names the file inside the mount."""
    for name in ("deployment.yaml", "slides-deployment.yaml"):
        docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]
        spec = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        key = env["HISTOLITE_AUDIT_KEY_FILE"]
        assert (
            key.startswith(mounts["audit-key"]["mountPath"] + "/")
            and mounts["audit-key"]["readOnly"]
        )
        secret = volumes["audit-key"]["secret"]
        assert secret["defaultMode"] == 0o440 and spec["securityContext"]["fsGroup"] == 10001
