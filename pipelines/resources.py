"""Where pipeline steps run and what they may read: the one GPU helper and the credentials.

Every GPU step goes through `on_gpu_pool`, so the accelerator, node pool, toleration and
shared memory are decided in one place (`kfp.gpu` in params.yaml). Credentials reach the
pods only as environment variables from Kubernetes Secrets, never as pipeline parameters.
"""

from kfp import kubernetes
from kfp.dsl import PipelineTask

from fersynth.settings import GpuPoolSettings, KfpSettings

S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
MLFLOW_KEYS = ("MLFLOW_TRACKING_URI",)


def on_gpu_pool(task: PipelineTask, gpu: GpuPoolSettings) -> PipelineTask:
    """Schedule `task` on the GPU node pool with a memory-backed /dev/shm."""
    task.set_accelerator_type(gpu.accelerator).set_accelerator_limit(gpu.count)
    task.set_cpu_limit(gpu.cpu).set_memory_limit(gpu.memory)
    for key, value in gpu.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    kubernetes.add_toleration(task, key=gpu.toleration_key, operator="Exists", effect="NoSchedule")
    # PyTorch DataLoader workers share batches through /dev/shm; a container's default is 64 MB.
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=gpu.shm_size
    )
    return task


def with_credentials(task: PipelineTask, kfp: KfpSettings, code_commit: str) -> PipelineTask:
    """S3 (DVC remote, model files) and MLflow settings from Secrets; the code's commit as a tag."""
    kubernetes.use_secret_as_env(task, secret_name=kfp.s3_secret, secret_key_to_env={k: k for k in S3_KEYS})
    kubernetes.use_secret_as_env(
        task, secret_name=kfp.mlflow_secret, secret_key_to_env={k: k for k in MLFLOW_KEYS}
    )
    task.set_env_variable("FERSYNTH_GIT_COMMIT", code_commit)
    return task
