"""The trainer image runs exactly as the rendered pod spec runs it (testkit.container: the
unshare runner; `podman run` cannot start containers on these machines). Each container gets the
chart's command, args and env, the operator's injected env, the ConfigMap at its mountPath, the
emptyDirs as tmpfs, the securityContext's uid/gid/read-only root/no capabilities, the kubelet's
hosts file and hostname, and a loopback-only network with S3 on it."""

from __future__ import annotations

import json
import signal

import pytest
import yaml

from testkit import container

from .conftest import job_file, rendered_pods

START_S = 60  # python + torch + diffusers imports in the container, on 2 busy cores
PROBE = """
import os, socket
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
def writable(path):
    try:
        open(os.path.join(path, ".probe"), "w").close(); return True
    except OSError: return False
mounts = {line.split()[1]: line.split()[2] for line in open("/proc/self/mounts")}
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
    "cap_eff": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip(), "pid": os.getpid(),
    "root_writable": writable("/"), "home_writable": writable(os.environ["HOME"]), "tmp_writable": writable("/tmp"),
    "config_writable": writable("/etc/ctrlnet"), "config": open("/etc/ctrlnet/config.yaml").read(),
    "shm": mounts.get("/dev/shm"), "home": mounts.get("/home/ctrlnet"), "hostname": socket.gethostname(),
    "interfaces": sorted(n for _, n in socket.if_nameindex()), "cwd": os.getcwd(),
    "env": {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "PET_", "MASTER_", "WORLD", "RANK", "HOME"))},
}))
"""


def test_a_container_runs_as_the_pod_spec_says(image, net, tmp_path):
    """The runner itself: what the trainer sees in its container is what the chart asked for."""
    (pod,) = rendered_pods(job_file(tmp_path, "probe", {"output": "s3://ctrlnet-test/runs/probe"}))
    pod.spec["containers"][0]["command"] = ["python", "-c", "import json\n" + PROBE]
    pod.spec["containers"][0]["args"] = []
    run = container.start(pod, image, net.name)
    assert run.wait(timeout=120) == 0, run.log
    seen = json.loads(run.lines[-1])
    assert (seen["uid"], seen["gid"]) == (10001, 10001) and 10001 in seen["groups"]
    assert seen["cap_eff"] == "0000000000000000" and seen["no_new_privs"] == "1" and seen["pid"] == 1
    assert not seen["root_writable"] and not seen["config_writable"]
    assert seen["home_writable"] and seen["tmp_writable"] and seen["shm"] == "tmpfs" and seen["home"] == "tmpfs"
    assert yaml.safe_load(seen["config"])["output"] == "s3://ctrlnet-test/runs/probe"
    assert seen["hostname"] == "probe-master-0" and seen["interfaces"] == ["lo"] and seen["cwd"] == "/home/ctrlnet"
    env = seen["env"]
    assert env["AWS_ACCESS_KEY_ID"] == "testing" and env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert env["MASTER_ADDR"] == "probe-master-0" and env["PET_NNODES"] == "1" and env["RANK"] == "0"
    assert "testing" not in json.dumps(pod.spec)  # the secret reached the env by reference only


def test_the_demo_trains_in_the_image_and_its_controlnet_loads_in_diffusers(image, net, tmp_path):
    from diffusers import ControlNetModel

    (pod,) = rendered_pods(job_file(tmp_path, "demo", {"output": "s3://ctrlnet-test/runs/demo"}))
    run = container.start(pod, image, net.name)
    assert run.wait(timeout=START_S + 240) == 0, run.log[-3000:]
    assert "done: 4 steps" in run.log
    keys = net.s3_keys("runs/demo")
    assert "runs/demo/FINISHED" in keys and "runs/demo/checkpoints/step-00000004/COMMITTED" in keys
    model = ControlNetModel.from_pretrained(net.s3_get("runs/demo/controlnet", tmp_path / "controlnet"))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_a_bad_config_exits_2_with_one_line_and_is_not_restarted(image, net, tmp_path):
    (pod,) = rendered_pods(job_file(tmp_path, "bad", {"output": "s3://ctrlnet-test/runs/bad"}))
    config = yaml.safe_load(pod.configmaps["bad-config"]["config.yaml"])
    config["loop"]["max_stepz"] = 4  # a typo in the ConfigMap
    pod.configmaps["bad-config"]["config.yaml"] = yaml.safe_dump(config)
    run = container.start(pod, image, net.name)
    code = run.wait(timeout=START_S + 60)
    assert code == 2, run.log[-3000:]
    errors = [ln for ln in run.lines if ln.startswith("error:")]
    assert len(errors) == 1 and "max_stepz" in errors[0] and errors[0] == run.lines[-1], run.log[-3000:]
    assert "Traceback" not in run.log
    # PyTorchJob restartPolicy ExitCode: 1-127 are permanent, only 128-255 restart the pod.
    assert pod.spec.get("restartPolicy", "ExitCode") in ("ExitCode", "Never") and code < 128


def test_the_precompute_job_fills_the_cache_in_s3(image, net, tmp_path):
    sets = ("cluster.task=precompute", "train.data.cache=s3://ctrlnet-test/caches/demo")
    (pod,) = rendered_pods(job_file(tmp_path, "pre", {"output": "s3://ctrlnet-test/runs/pre"}), *sets)
    run = container.start(pod, image, net.name)
    assert run.wait(timeout=START_S + 240) == 0, run.log[-3000:]
    keys = net.s3_keys("caches/demo")
    assert "caches/demo/cache.json" in keys and any(k.endswith(".safetensors") or "shard" in k for k in keys), keys


def test_the_prepare_job_annotates_a_source_in_s3_into_a_dataset(image, net, tmp_path):
    """`ctrlnet prepare --cluster`'s pod: a parquet of photos + captions in S3 becomes the dataset
    training reads (canny with the image's OpenCV), shard by shard, manifest last."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature
    from PIL import Image, ImageDraw

    images = []
    for i in range(6):
        photo = Image.new("RGB", (80, 64), "white")
        ImageDraw.Draw(photo).rectangle((8 + 4 * i, 8, 50 + 2 * i, 50), fill=(30 * i, 90, 200 - 20 * i))
        images.append(photo)
    source = tmp_path / "photos.parquet"
    features = Features({"image": ImageFeature(), "text": Value("string")})
    Dataset.from_dict({"image": images, "text": [f"box {i}" for i in range(6)]}, features=features).to_parquet(
        str(source)
    )
    net.python(f"import s3fs; s3fs.S3FileSystem().put('{source}', 'ctrlnet-test/sources/photos/train.parquet')")
    sets = (
        "cluster.task=prepare",
        "train.prepare.source=s3://ctrlnet-test/sources/photos",
        "train.data.dataset=s3://ctrlnet-test/datasets/photos-canny",
        "train.prepare.shard_rows=4",
    )
    (pod,) = rendered_pods(job_file(tmp_path, "prep", {"output": "s3://ctrlnet-test/runs/prep"}), *sets)
    run = container.start(pod, image, net.name)
    assert run.wait(timeout=START_S + 120) == 0, run.log[-3000:]
    assert "done: 6 rows (0 skipped) in 2 shards" in run.log
    keys = net.s3_keys("datasets/photos-canny")
    assert {"datasets/photos-canny/data/shard-00000.parquet", "datasets/photos-canny/prepared.json"} <= set(keys)
    manifest = json.loads((net.s3_get("datasets/photos-canny/prepared.json", tmp_path / "m.json")).read_text())
    assert manifest["rows"] == 6 and manifest["annotator"]["name"] == "canny"


def test_two_pods_preempted_after_a_checkpoint_resume_to_the_uninterrupted_weights(image, net, tmp_path):
    """Master + 1 worker, one process each, rendezvousing over the pod network. SIGTERM to the
    master after a committed checkpoint: both exit 143 (ExitCode policy: restart), both are
    started again, resume from `latest`, and finish with the weights of an uninterrupted run."""
    from testkit.training import max_weight_diff

    train = {"loop": {"max_steps": 16}, "checkpoint": {"every_steps": 4}}

    def job(name: str) -> list[container.Pod]:
        return rendered_pods(job_file(tmp_path, name, {**train, "output": f"s3://ctrlnet-test/runs/{name}"}, nodes=2))

    def run_all(pods: list[container.Pod]) -> list[container.Running]:
        return [container.start(p, image, net.name) for p in pods]

    straight = run_all(job("straight"))
    assert [r.wait(timeout=START_S + 400) for r in straight] == [0, 0], straight[0].log[-3000:]

    pods = job("preempted")
    first = run_all(pods)
    master = first[0]
    assert master.wait_for_line('"event":"checkpoint"', timeout=START_S + 300), master.log[-3000:]
    master.signal(signal.SIGTERM)
    codes = [r.wait(timeout=300) for r in first]
    assert codes == [143, 143], f"{codes}\n{master.log[-3000:]}"
    assert "exiting 143" in master.log and not any('"event":"done"' in ln for ln in master.lines)

    again = run_all(pods)  # the operator restarts both pods of a 143
    assert [r.wait(timeout=START_S + 400) for r in again] == [0, 0], again[0].log[-3000:]
    assert any("resuming from s3://ctrlnet-test/runs/preempted/checkpoints/step-" in ln for ln in again[0].lines)
    a = net.s3_get("runs/straight/controlnet", tmp_path / "a")
    b = net.s3_get("runs/preempted/controlnet", tmp_path / "b")
    assert max_weight_diff(a, b) == 0.0


@pytest.fixture(autouse=True)
def _which_runner(record_property):
    record_property("runner", container.RUNNER)
