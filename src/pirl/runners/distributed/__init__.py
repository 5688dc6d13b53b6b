"""Scale-out: Ray env / rollout / learner workers and a torch.distributed learner.

The placement modes are described in :mod:`pirl.runners.placement`.  The package holds, by role:

- :mod:`~pirl.runners.distributed.noise`: split-invariant sampling (the chain noise of all N
  envs drawn in the sampler's own order, so any split of the envs gives the local run's chains);
- :mod:`~pirl.runners.distributed.stages`: env slices / stages and :func:`collect_staged`, the
  pipelined rollout over them;
- :mod:`~pirl.runners.distributed.remote`: Ray plumbing (:class:`WorkerError`, fail-fast
  :func:`get_all`, :class:`WorkerSpec`);
- :mod:`~pirl.runners.distributed.rollout_workers`: :class:`EnvWorker`, :class:`RolloutWorker`;
- :mod:`~pirl.runners.distributed.learner`: :class:`DataParallelRLTrainer` (DDP / FSDP2),
  :class:`LearnerWorker`, :class:`ColocatedWorker`;
- :mod:`~pirl.runners.distributed.launch`: the driver's :class:`DistributedTrainer` and
  :func:`trainer_from_config`;
- :mod:`~pirl.runners.distributed.preflight`: :func:`check_cluster`, the checks of a placement
  against the cluster that run before any work (resources, env split, simulator on the nodes).
"""

from pirl.runners.distributed.launch import DistributedTrainer, trainer_from_config
from pirl.runners.distributed.learner import (ColocatedWorker, DataParallelRLTrainer,
                                              LearnerWorker)
from pirl.runners.distributed.preflight import (check_cluster, check_resources,
                                                placement_resources)
from pirl.flow.common import chain_dtype
from pirl.runners.distributed.noise import (ChainNoise, draw_chain_noise,
                                            sample_with_noise)
from pirl.runners.distributed.remote import (EnvSpec, WorkerError, WorkerSpec, cpu_state,
                                             get_all)
from pirl.runners.distributed.rollout_workers import EnvWorker, RolloutWorker
from pirl.runners.distributed.stages import (EnvSlice, LocalStage, RemoteStage, Stage,
                                             StepResult, cat_results, cat_rollouts,
                                             collect_staged, slice_reset_kwargs)

__all__ = ["ChainNoise", "ColocatedWorker", "DataParallelRLTrainer", "DistributedTrainer",
           "EnvSlice", "EnvSpec", "EnvWorker", "LearnerWorker", "LocalStage", "RemoteStage",
           "RolloutWorker", "Stage", "StepResult", "WorkerError", "WorkerSpec", "cat_results",
           "cat_rollouts", "chain_dtype", "check_cluster", "check_resources", "collect_staged",
           "cpu_state", "draw_chain_noise", "get_all", "placement_resources", "sample_with_noise",
           "slice_reset_kwargs", "trainer_from_config"]
