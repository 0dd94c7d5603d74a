"""Entry point: ``python -m cluster.render +task=test models=tiny``.

Set-up then run: compose and validate the config, prepare inputs and weights, render on Ray,
print and save the summary. Expected failures print one line and exit non-zero.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cluster import storage
from cluster.config import CONF_DIR, DEMO_DIR, JobConfig, job_from_config
from cluster.preflight import check_before_work, demo_to_build, gpu_problem, in_ray_job_copy
from cluster.sweep import REJECTED
from musetalk.layout import ModelLayout
from musetalk.testing.tiny_models import ensure_tiny_models
from shards.errors import ConfigError, FarmError, Flagged, InputError, Interrupted

logger = logging.getLogger("cluster.render")


def prepare(job: JobConfig) -> None:
    """Build the demo clip and tiny weights when asked for and missing; fetch real weights when allowed; a
    URI ``models.dir`` is only checked (workers copy it per node).

    The demo is only ever built in the bundled directory (``media/``): inputs elsewhere are the user's,
    and the generators refuse directories holding files they did not make.
    """
    if build := demo_to_build(job):
        from musetalk.testing.demo_media import ensure_demo_media  # imports OpenCV and PyAV: only when needed

        logger.info("building the demo clip in %s", DEMO_DIR)
        ensure_demo_media(DEMO_DIR)
        for path in build:
            if not path.exists():
                raise InputError(
                    f"{path} not found: the demo builder makes only demo.mp4, demo.wav, demo_2997.mp4 and demo_2997.wav in {DEMO_DIR}"
                )
    if storage.is_remote(job.pipeline.models_dir):
        from cluster.weights import check_remote_weights  # imports torch: after the cheap refusals above

        check_remote_weights(
            job.pipeline, sync=job.gate.sync
        )  # workers fetch them per node; nothing built here
        return
    if job.pipeline.tiny:
        ensure_tiny_models(Path(job.pipeline.models_dir))
    elif job.download:
        from musetalk.download import download  # imports huggingface_hub: only when fetching

        download(ModelLayout.at(job.pipeline.models_dir))
    from musetalk.models import check_weights  # imports torch: after the cheap refusals above

    check_weights(job.pipeline)
    if job.gate.sync:  # the lip-sync scorer: fail before rendering, not after (qa.sync=false needs none)
        layout = ModelLayout.at(job.pipeline.models_dir, tiny=job.pipeline.tiny)
        layout.require(layout.syncnet, "SyncNet weights for qa.sync (or set qa.sync=false)")


def render(cfg: DictConfig, sweep: bool = False) -> dict:
    """Run one job from a composed config; returns the summary as a dict.

    Cheap checks first (config, output, inputs: seconds, no models, no Ray), then weights, then the render.
    A run of a ``sweep`` is first put on the sweep's footing (:func:`cluster.sweep.on_footing`).
    """
    job = job_from_config(cfg)
    check_before_work(job)
    _check_cluster(job)
    prepare(job)
    from cluster.driver import run_job  # imports the models' code: only once the job is known to be sound

    if job.cluster.require_gpus:
        check_cluster_gpus(job)
    warmup = {}
    if sweep:
        from cluster.sweep import on_footing

        job, warmup = on_footing(job)
    summary = run_job(job)
    for line in summary.lines():
        print(line)
    # fail_on_flag travels with the metrics: a sweep's table lists a flagged run as failing the gate
    return {**json.loads(summary.to_json()), "fail_on_flag": job.gate.fail_on_flag, **warmup}


def check_cluster_gpus(job: JobConfig) -> None:
    """Join the job's Ray cluster and refuse to render when ``cluster.require_gpus`` finds no GPU in an
    embedded one (a joined cluster may still gain GPU nodes: the driver asks for them and waits)."""
    import ray

    from cluster.session import connect, joined

    connect(job.cluster)
    gpus = ray.cluster_resources().get("GPU", 0)
    if problem := gpu_problem(job.cluster.require_gpus, gpus, can_grow=joined(job.cluster)):
        raise ConfigError(problem)


def _check_cluster(job: JobConfig) -> None:
    """A cluster to join must answer before anything is written (ClusterError names the address)."""
    from cluster.session import check_reachable  # imports Ray: after the cheap refusals above

    check_reachable(job.cluster)


def main() -> None:
    """``python -m cluster.render [-m] [overrides]``: Hydra's command line, with the overrides Hydra would
    refuse (a misspelt or removed key, a value its grammar cannot read, a missing group option; for every
    run of a ``-m`` sweep) reported first as one ``error:`` line, exit code 2."""
    from cluster.overrides import check_command_line

    try:
        check_command_line(sys.argv[1:])
    except ConfigError as err:
        _fail(err)
    _hydra_main()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = render(cfg, sweep=HydraConfig.get().mode == RunMode.MULTIRUN)
    except KeyboardInterrupt:
        _fail(Interrupted("interrupted; nothing was written to the output"))
    except ConfigError as err:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            _fail(err)
        # One refused combination of a sweep (e.g. a setting that does nothing there): recorded for the
        # sweep table, and the other runs go on; the sweep exits non-zero at its end.
        logger.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        (out_dir / REJECTED).write_text(json.dumps({"error": str(err), "exit_code": err.exit_code}))
        return
    except FarmError as err:
        _fail(err)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    if summary["flagged"] and summary["fail_on_flag"]:
        flagged = Flagged(f"{summary['output']} flagged by the quality gate: {'; '.join(summary['flags'])}")
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            _fail(flagged)  # the output, its summary and QA sheet are written
        logger.error("%s", flagged)  # a sweep goes on; its table lists the run as flagged
    if in_ray_job_copy(out_dir):
        logger.warning(
            "metrics.json and Hydra's logs are in %s, inside Ray's temporary copy of the working directory; "
            "set MUSETALK_OUTPUT_ROOT (or output.root) to keep them",
            out_dir,
        )


def _fail(err: FarmError) -> None:
    """One line on stderr and the error's exit code; a second Ctrl-C while exiting is ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Hydra's log file; before Hydra runs there is none, and Python's last-resort handler would repeat it.
    if logger.hasHandlers():
        logger.error("%s", err)
    print(f"error: {err}", file=sys.stderr)
    sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
