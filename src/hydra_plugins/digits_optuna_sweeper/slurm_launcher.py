"""Trials as SLURM jobs (`hydra/launcher=slurm`): Hydra's submitit launcher, with no result ever lost.

Ours because the upstream `launch` returns `[job.results()[0] for job in jobs]`: the first job that ends
without a result (cancelled, timed out, killed for memory, its node failed) raises out of the whole batch,
and the trials of that batch that finished are never told to the study.
"""

import contextlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf

from digits.errors import JobsRefusedError
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

log = logging.getLogger(__name__)
EXECUTOR_KEYS = ("submitit_folder", "max_num_timeout")  # go to the executor itself, not to sbatch


class JobLostError(RuntimeError):
    """A SLURM job ended without a result; the message carries the scheduler's state for it."""


class DigitsSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        executor = submitit.AutoExecutor(
            cluster="slurm",
            folder=self.params["submitit_folder"],
            slurm_max_num_timeout=self.params["max_num_timeout"],
        )
        queue_keys = set(OmegaConf.structured(BaseQueueConf).keys())
        sbatch = {k if k in queue_keys else f"slurm_{k}": v for k, v in self.params.items() if k not in EXECUTOR_KEYS}
        executor.update_parameters(**sbatch)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        args = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's refusal; we say it once
                jobs = executor.map_array(self, *zip(*args, strict=True))
        except submitit.core.utils.FailedJobError as err:
            refusal = next((line for line in str(err).splitlines() if "error" in line), str(err).strip())
            raise JobsRefusedError(f"the cluster refused the trials' jobs: {refusal}") from None
        return [self._result(job, overrides) for job, overrides in zip(jobs, job_overrides, strict=True)]

    @staticmethod
    def _result(job: Any, overrides: Sequence[str]) -> JobReturn:
        import submitit

        try:
            return job.results()[0]
        except submitit.core.utils.UncompletedJobError:
            said = [line.split("error: ", 1)[1] for line in _read(job.paths.stderr) if "slurmstepd" in line]
            why = f" ({said[0]})" if said else ""
            lost = JobLostError(f"SLURM job {job.job_id} ended {job.state} without a result{why}")
            return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=lost)


def _read(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []
