"""Running on a cluster: how a launcher's environment becomes one world of ranks, preemption signals,
resharding a checkpoint for another number of ranks, and rank-reduced run statistics.

Called from the entry points (``hptransfer.train``) and the engine layer (``hptransfer.backend``);
``hptransfer.step`` never sees launchers.
"""
