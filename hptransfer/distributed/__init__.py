"""Running on a cluster: how a launcher's environment becomes one world of ranks, preemption signals,
resharding a checkpoint for another number of ranks, and rank-reduced run statistics.

Called from the entry points (``hptransfer.train``) and the engine layer (``hptransfer.backend``);
``hptransfer.step`` never sees launchers.

- ``launch``: each launcher's environment (torchrun, deepspeed, srun) as one :class:`launch.World`, SLURM
  host lists, the device of each rank (``train.device``), failed collectives named by rank.
- ``signals``: SIGTERM / SIGUSR1 stop every rank after the same step, with a checkpoint (exit status 75).
- ``stats``: ``out_dir/stats.jsonl`` and TensorBoard scalars, reduced over the ranks at log steps.
"""
