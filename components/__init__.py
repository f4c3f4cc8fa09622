"""The fersynth stages as KFP v2 components on our own images (`docker/`).

`build(image, gpu_image)` makes one containerized Python component per function of
`components.stages`: the GPU stages on the CUDA image, the rest on the CPU image. Our images
hold fersynth and kfp already, so nothing is pip-installed when a step starts.
"""

from types import SimpleNamespace

from kfp import dsl

from components import stages

GPU_STAGES = ("quality", "train", "train_prior", "generate")
STAGES = (
    "resolve_settings",
    "resolve_data_rev",
    "fetch_data",
    "ingest",
    "quality",
    "guard",
    "train",
    "evaluate",
    "train_prior",
    "select_model",
    "shard_indices",
    "generate",
    "merge",
    "verify",
    "augment",
    "compare",
    "report",
    "register",
    "record_status",
)


def build(image: str, gpu_image: str, extra_gpu: tuple[str, ...] = ()) -> SimpleNamespace:
    """Every stage as a component: `components.build(...).train` and so on. `extra_gpu`: more
    stages on the CUDA image (evaluate, verify when the profile runs them on cuda)."""
    made = {}
    for name in STAGES:
        made[name] = dsl.component(
            func=getattr(stages, name),
            base_image=gpu_image if name in (*GPU_STAGES, *extra_gpu) else image,
            install_kfp_package=False,
        )
    return SimpleNamespace(**made)
