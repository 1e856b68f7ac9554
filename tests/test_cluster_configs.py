"""The cluster files parse and agree with each other and with the project."""

import importlib.util
import re
import shlex

import yaml

from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _image_tag():
    m = re.search(r"docker build .* -t (\S+) \.", (CLUSTER / "Dockerfile").read_text())
    return m.group(1)


def test_dockerfile_uses_the_official_ray_gpu_image_of_our_ray_version():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base.startswith("rayproject/ray:") and base.endswith("-gpu")
    ray_version = base.split(":")[1].split("-")[0]
    for f in ("kuberay-raycluster.yaml",):
        assert _load(f)["spec"]["rayVersion"] == ray_version
    assert _load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"] == ray_version
    import ray

    assert ray.__version__.split(".")[:2] == ray_version.split(".")[:2]


def _containers(spec):
    yield spec["headGroupSpec"], spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in spec["workerGroupSpecs"]:
        yield group, group["template"]["spec"]["containers"][0]


def test_images_heads_and_gpu_workers_agree():
    import engine

    tag = _image_tag()
    assert tag == f"hemeflow:{engine.__version__}"  # the image says which results it gives
    assert _load("aws.yaml")["docker"]["image"] == tag
    for spec in (_load("kuberay-raycluster.yaml")["spec"],
                 _load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]):
        for _group, container in _containers(spec):
            assert container["image"] == tag
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # head takes no work
        for group in spec["workerGroupSpecs"]:
            c = group["template"]["spec"]["containers"][0]
            gpus = int(group["rayStartParams"]["num-gpus"])
            assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
            assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
    aws = _load("aws.yaml")
    assert aws["available_node_types"][aws["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(n.get("resources", {}).get("GPU") for n in aws["available_node_types"].values())
    assert "--num-cpus=0" in " ".join(aws["head_start_ray_commands"])


def test_rayjob_entrypoint_module_exists_and_tears_down():
    job = _load("kuberay-rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "-m"]
    assert importlib.util.find_spec(argv[2]) is not None
    from jobs.process_slides import parse_args

    parse_args(argv[3:])  # the job's arguments are valid for the job


def test_runtime_env_excludes_local_state():
    env = _load("runtime_env.yaml")
    assert env["working_dir"] == "."
    assert ".venv/" in env["excludes"] and ".git/" in env["excludes"]
    text = (CLUSTER / "runtime_env.yaml").read_text().lower()
    assert "aws_secret" not in text and "token:" not in text


def test_the_shipped_checkpoints_go_up_with_the_working_dir(tmp_path):
    """`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml` packs the project
    as Ray's own upload does (its default excludes, the runtime env's, the .gitignore): the
    shipped checkpoints and cards go with it, as the job imports `engine` from that copy and
    reads the default classifier's weights beside it (Ray warns that the 45 MiB file is large
    and suggests leaving it out); the local environment and history do not."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    packed = tmp_path / "working_dir.zip"

    def upload(working_dir, excludes, is_file=False):
        assert not is_file
        create_package(working_dir, packed, include_gitignore=True, excludes=excludes)

    env = {**_load("runtime_env.yaml"), "working_dir": str(ROOT)}
    upload_working_dir_if_needed(env, include_gitignore=True, upload_fn=upload)
    names = set(zipfile.ZipFile(packed).namelist())
    shipped = {p.relative_to(ROOT).as_posix()
               for p in (ROOT / "engine" / "models" / "checkpoints").iterdir()}
    assert "engine/models/checkpoints/deepheme-resnext50.safetensors" in shipped
    assert shipped <= names, sorted(shipped - names)
    assert "jobs/process_slides.py" in names
    assert not any(n.startswith((".venv/", ".git/", "hemeflow-out/")) for n in names)


def test_ray_job_stop_gives_the_submitted_jobs_time_to_stop_through_their_cleanup():
    """``ray job stop`` kills a job 3 s after its SIGTERM unless RAY_JOB_STOP_WAIT_TIME_S
    says more: the runtime env every ``ray job submit`` of the README takes, and the RayJob's,
    give it what a stop may take."""
    from engine.watchdog import STOP_WAIT_WANTED_S

    for env in (_load("runtime_env.yaml"),
                yaml.safe_load(_load("kuberay-rayjob.yaml")["spec"]["runtimeEnvYAML"])):
        assert float(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= STOP_WAIT_WANTED_S


def test_worker_pods_have_room_for_staged_slides():
    """Slides on S3 are staged under /tmp on each node (storage.stage_dir unset): the worker
    pods mount a /tmp volume larger than the staging bound in the default config."""
    bound = _load("../jobs/configs/default.yaml")["storage"]["stage_max_bytes"]
    assert _load("../jobs/configs/default.yaml")["storage"]["stage_dir"] is None
    for spec in (_load("kuberay-raycluster.yaml")["spec"],
                 _load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]):
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            volume = next(v for v in pod["volumes"] if v["name"] == mounts["/tmp"])
            size = volume["emptyDir"]["sizeLimit"]
            assert size.endswith("Gi") and int(size[:-2]) * 1024**3 > 2 * bound


def test_a_relative_output_under_ray_job_submit_with_a_working_dir_is_refused(monkeypatch,
                                                                              capsys, tmp_path):
    """`ray job submit --working-dir .` runs the driver in Ray's temporary copy of the project
    (checked by hand with a local head: .../runtime_resources/working_dir_files/_ray_pkg_...), so
    a relative --output, or process_slides' default one, was written there and went with the
    cluster's session. Such a job now stops before it starts; an absolute path or s3:// goes."""
    import json

    from jobs import process_slides, slide_summary

    small = str(ROOT.parent / "shared/data/wsi/openslide-python/small.svs")
    monkeypatch.chdir(tmp_path)  # the default output, hemeflow-out, is looked at
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}))
    for main, argv, given in [(slide_summary.main, ["--output", "results/run1"], "results/run1"),
                              (slide_summary.main, ["--output=run1"], "run1"),
                              (process_slides.main, ["--input", small, "--dry-run"],
                               "hemeflow-out")]:
        assert main(argv) == 2
        said = capsys.readouterr().err
        assert f"hemeflow: error: --output {given} is a relative path, and this job runs under " \
               "`ray job submit --working-dir`, whose driver runs in Ray's temporary copy of the " \
               "project (" in said and said.rstrip().endswith(
                   "the output would be written there and go with the cluster's session. Give "
                   "an s3:// prefix or an absolute path"), said
    out = str(tmp_path / "out")
    assert process_slides.main(["--input", small, "--dry-run", "--output", out]) == 0
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))
    assert process_slides.main(["--input", small, "--dry-run"]) == 0  # no copy: where it runs


def test_a_relative_input_under_ray_job_submit_is_said_to_be_looked_up_in_rays_copy(
        monkeypatch, capsys, tmp_path):
    """The same copy is where a relative --input (or list, config) is looked up: the job said
    only "input path does not exist: <Ray's copy>/slides". It now says why, and what to do."""
    import json

    from jobs import inventory, process_slides

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}))
    for main in (process_slides.main, inventory.main):
        assert main(["--input", "slides", "--output", str(tmp_path / "out")]) == 2
        said = capsys.readouterr().err.strip().splitlines()[-1]
        assert said == (
            f"hemeflow: error: input path does not exist: {tmp_path}/slides (a relative path: "
            "under `ray job submit --working-dir` it is looked up in Ray's temporary copy of the "
            f"project, {tmp_path}, which holds only what was uploaded with it; give an absolute "
            "path or s3://)"), said
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert process_slides.main(["--input", "slides", "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"hemeflow: error: input path does not exist: {tmp_path}/slides")
