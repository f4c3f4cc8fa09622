"""Putting a compiled pipeline on a Kubeflow Pipelines server: upload as a new version, start a
run, and create or replace the recurring retraining run.

Everything goes through `kfp.Client`, so the requests are the ones the KFP API expects; the
tests point a client at a loopback server that records them (no KFP server runs there).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fersynth.errors import FersynthError

log = logging.getLogger(__name__)
EXPERIMENT = "fersynth"


@dataclass(frozen=True)
class Uploaded:
    pipeline_id: str
    version_id: str
    version_name: str


def client(host: str):
    """A KFP client for `host`; a bearer token, where the cluster needs one, from KFP_TOKEN."""
    import kfp

    return kfp.Client(host=host, existing_token=os.environ.get("KFP_TOKEN") or None)


def check_cron(expression: str) -> str:
    """KFP's cron has 6 fields, seconds first (`0 0 3 * * 1`); a 5-field one is refused."""
    fields = expression.split()
    if len(fields) != 6:
        raise FersynthError(
            f"schedule cron {expression!r}: KFP needs 6 fields (seconds minutes hours day month weekday), "
            f"got {len(fields)}"
        )
    return expression


def without_caching(package: Path, target: Path) -> Path:
    """A copy of a compiled pipeline with caching off in every task: the recurring run's
    version (a version referenced by a run keeps its compiled caching options)."""
    import yaml

    documents = list(yaml.safe_load_all(Path(package).read_text()))

    def walk(node):
        if isinstance(node, dict):
            if "taskInfo" in node and "componentRef" in node:
                node["cachingOptions"] = {"enableCache": False}
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(documents[0])
    target.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return target


def upload(kfp_client, package: Path, pipeline_name: str, version_name: str) -> Uploaded:
    """Upload `package` as version `version_name` of pipeline `pipeline_name` (created if new)."""
    if not Path(package).is_file():
        raise FersynthError(f"{package}: compiled pipeline not found (python -m pipelines compile)")
    pipeline_id = kfp_client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline = kfp_client.upload_pipeline(str(package), pipeline_name=pipeline_name)
        pipeline_id = pipeline.pipeline_id
    version = kfp_client.upload_pipeline_version(
        str(package), pipeline_version_name=version_name, pipeline_id=pipeline_id
    )
    log.info("uploaded %s version %s", pipeline_name, version_name)
    return Uploaded(pipeline_id, version.pipeline_version_id, version_name)


def _experiment_id(kfp_client, name: str) -> str:
    return kfp_client.create_experiment(name).experiment_id  # returns the existing one by name


def start_run(
    kfp_client, uploaded: Uploaded, params: dict[str, Any], run_name: str, enable_caching: bool = True
) -> str:
    """One run of an uploaded version; its run id."""
    run = kfp_client.run_pipeline(
        experiment_id=_experiment_id(kfp_client, EXPERIMENT),
        job_name=run_name,
        pipeline_id=uploaded.pipeline_id,
        version_id=uploaded.version_id,
        params=params,
        enable_caching=enable_caching,
    )
    return run.run_id


def schedule(kfp_client, uploaded: Uploaded, name: str, cron: str, params: dict[str, Any]) -> dict[str, Any]:
    """Create the recurring run `name` of an uploaded version (upload the `without_caching`
    package for it: retraining must see the newest data), replacing one of that name; at
    most one run at a time, no catch-up of missed runs."""
    check_cron(cron)
    experiment_id = _experiment_id(kfp_client, EXPERIMENT)
    replaced = []
    token = ""
    while True:
        page = kfp_client.list_recurring_runs(experiment_id=experiment_id, page_size=100, page_token=token)
        for existing in page.recurring_runs or []:
            if existing.display_name == name:
                kfp_client.delete_recurring_run(existing.recurring_run_id)
                replaced.append(existing.recurring_run_id)
        token = page.next_page_token
        if not token:
            break
    created = kfp_client.create_recurring_run(
        experiment_id=experiment_id,
        job_name=name,
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        pipeline_id=uploaded.pipeline_id,
        version_id=uploaded.version_id,
        params=params,
    )
    return {"recurring_run_id": created.recurring_run_id, "replaced": replaced, "cron": cron}
