"""How a launcher's environment becomes one world of ranks, and which device each rank trains on.

What each launcher leaves in a rank's environment, and what :func:`discover` reads:

- ``torchrun`` (also with ``--nnodes`` and a rendezvous), ``deepspeed`` (its local runner and, per
  node, its pdsh runner), or a user's own exports: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT`` (torchrun adds ``LOCAL_WORLD_SIZE`` and ``GROUP_RANK``, DeepSpeed
  ``LOCAL_SIZE`` and ``CROSS_RANK``). These win whenever ``RANK`` is set, also inside a SLURM job.
- ``srun`` directly, and ``deepspeed --launcher slurm`` (which runs ``srun -n N python train.py``):
  no ``RANK``; ``SLURM_PROCID``, ``SLURM_NTASKS`` (``SLURM_STEP_NUM_TASKS`` in a step), ``SLURM_LOCALID``,
  ``SLURM_NODEID``, ``SLURM_STEP_TASKS_PER_NODE``, the node list (``SLURM_STEP_NODELIST``,
  ``SLURM_JOB_NODELIST`` or ``SLURM_NODELIST``, compressed as ``node[01-04,07]``) and ``SLURM_JOB_ID``.
  The world is formed from them: rank 0 runs on the first host of the list, which becomes
  MASTER_ADDR; MASTER_PORT comes from the environment, else from the job id (:func:`slurm_port`).
  Without this DeepSpeed's ``init_distributed`` falls back to MPI discovery (and mpi4py).
- nothing: one process.

:func:`export` writes the discovered world back as the ``env://`` variables torch and DeepSpeed
read, so every launcher reaches ``init_process_group`` the same way.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from hptransfer.errors import LaunchError

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500  # torch's and DeepSpeed's default
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000  # a job's port: 15000 + job id mod 20000


@dataclass(frozen=True)
class World:
    """This process's place among the ranks, as the launcher described it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: Optional[int] = None  # ranks on this node, where the launcher says
    node_rank: Optional[int] = None
    launcher: str = "none"  # torchrun | deepspeed | environment | srun | none
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    note: str = ""  # e.g. the SLURM job and node list, for the log
    warning: str = ""  # what may keep the world from forming, said before the rendezvous waits


# ----------------------------------------------------------------------------- SLURM lists
_HOSTLIST_ITEM = re.compile(r"([^\[\]]*)\[([^\[\]]*)\]")


def expand_hostlist(hostlist: str) -> list:
    """The host names of a SLURM host list, in order: ``node[01-03,07]`` -> node01 node02 node03 node07;
    ``a[1-2],b3`` -> a1 a2 b3; ``rack[1-2]-n[1-2]`` -> rack1-n1 rack1-n2 rack2-n1 rack2-n2 (every bracket of a
    name expands, the last fastest, as ``scontrol show hostnames`` prints them). A range keeps its first
    bound's zero padding (``[08-10]`` -> 08 09 10). ValueError on a malformed list."""
    hosts, depth, start = [], 0, 0
    for i, ch in enumerate(hostlist + ","):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"host list {hostlist!r}: nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"host list {hostlist!r}: ']' without '['")
        elif depth == 0 and (ch == "," or ch.isspace()):
            item = hostlist[start:i]
            start = i + 1
            if item:
                hosts.extend(_expand_item(item, hostlist))
    if depth:
        raise ValueError(f"host list {hostlist!r}: '[' without ']'")
    return hosts


def _expand_item(item: str, hostlist: str) -> list:
    names = [""]
    pos = 0
    for m in _HOSTLIST_ITEM.finditer(item):
        if m.start() != pos:
            break
        values = _expand_ranges(m.group(2), hostlist)
        names = [n + m.group(1) + v for n in names for v in values]
        pos = m.end()
    tail = item[pos:]
    if "[" in tail or "]" in tail:
        raise ValueError(f"host list {hostlist!r}: cannot read {item!r}")
    return [n + tail for n in names]


def _expand_ranges(ranges: str, hostlist: str) -> list:
    out = []
    for part in ranges.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"host list {hostlist!r}: bad range {part!r} (expected N or N-M)")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"host list {hostlist!r}: range {part!r} runs backwards")
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def hostnames(hostlist: str) -> list:
    """The hosts of a SLURM host list: ``scontrol show hostnames`` where scontrol is installed (SLURM's own
    reading), else :func:`expand_hostlist`."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            done = subprocess.run([scontrol, "show", "hostnames", hostlist], capture_output=True, text=True,
                                  timeout=60, check=True)
            hosts = done.stdout.split()
            if hosts:
                return hosts
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("scontrol show hostnames %s failed (%s): expanding the list ourselves", hostlist, e)
    return expand_hostlist(hostlist)


def expand_tasks_per_node(spec: str) -> list:
    """SLURM's tasks per node, ``2(x3),1`` -> [2, 2, 2, 1]. ValueError on a malformed value."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"tasks per node {spec!r}: cannot read {part!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def slurm_port(job_id: Optional[str]) -> int:
    """MASTER_PORT of a SLURM job when none is given: 15000 + job id mod 20000, the same on every rank
    of the job and different between most jobs sharing a node (two steps of one job running at once on
    one node must set MASTER_PORT themselves)."""
    digits = re.sub(r"\D", "", job_id or "")
    return SLURM_PORT_BASE + int(digits) % SLURM_PORT_SPAN if digits else DEFAULT_PORT


# ----------------------------------------------------------------------------- discovery
def _int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> Optional[int]:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def discover(env: Optional[Mapping[str, str]] = None) -> World:
    """This process's :class:`World`, from its launcher's environment (see the module docstring)."""
    env = os.environ if env is None else env
    if "RANK" in env:
        launcher = ("torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed" if "CROSS_RANK" in env
                    else "environment")
        return World(rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE", 1),
                     local_rank=_int(env, "LOCAL_RANK", 0),
                     local_world_size=_int(env, "LOCAL_WORLD_SIZE", _int(env, "LOCAL_SIZE")),
                     node_rank=_int(env, "GROUP_RANK", _int(env, "CROSS_RANK", _int(env, "NODE_RANK"))),
                     launcher=launcher, master_addr=env.get("MASTER_ADDR"), master_port=_int(env, "MASTER_PORT"))
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        return _slurm_world(env)
    return World()


def _slurm_world(env: Mapping[str, str]) -> World:
    """The world of an ``srun`` step (also ``deepspeed --launcher slurm``, which is srun underneath)."""
    size = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS"))
    rank, node = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NODEID")
    if not 0 <= rank < size:
        raise LaunchError(f"SLURM_PROCID={rank} is outside SLURM_NTASKS={size}")
    nodelist = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(k)), "")
    addr = env.get("MASTER_ADDR")
    if not addr and size > 1:
        if not nodelist:
            raise LaunchError(f"srun started {size} tasks but neither SLURM_STEP_NODELIST, SLURM_JOB_NODELIST nor "
                              f"SLURM_NODELIST names the nodes; set MASTER_ADDR to the host of rank 0")
        try:
            addr = hostnames(nodelist)[0]
        except (ValueError, IndexError) as e:
            raise LaunchError(f"SLURM node list {nodelist!r}: {e}") from None
    per_node = None
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec and node is not None:
        try:
            counts = expand_tasks_per_node(spec)
            per_node = counts[node] if node < len(counts) else None
        except ValueError as e:
            log.warning("%s: ranks per node unknown", e)
    port = _int(env, "MASTER_PORT", slurm_port(env.get("SLURM_JOB_ID")))
    note = f"SLURM job {env.get('SLURM_JOB_ID', '?')}, nodes {nodelist or '?'}"
    warning = ""
    if size > 1 and "SLURM_STEP_NUM_TASKS" not in env:  # srun sets it; an sbatch script's own shell does not
        warning = (f"SLURM_NTASKS={size} and no SLURM_STEP_NUM_TASKS: if this process was not started by srun (e.g. "
                   f"python run directly in an sbatch script), the other ranks never come and the start fails after "
                   f"train.dist_timeout_s; start it with srun")
    return World(rank=rank, world_size=size, local_rank=_int(env, "SLURM_LOCALID", 0), local_world_size=per_node,
                 node_rank=node, launcher="srun", master_addr=addr, master_port=port, note=note, warning=warning)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export(world: World, env=None) -> None:
    """Write ``world`` as the ``env://`` variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT,
    LOCAL_WORLD_SIZE, NODE_RANK) where the launcher did not set them. A lone process gets 127.0.0.1 and a
    free port, so DeepSpeed runs without any launcher too."""
    env = os.environ if env is None else env
    addr = world.master_addr or ("127.0.0.1" if world.world_size == 1 else None)
    if addr is None:
        raise LaunchError(f"{world.world_size} ranks ({world.launcher}) but MASTER_ADDR is not set: set it to the host "
                          f"of rank 0")
    values = {"RANK": world.rank, "WORLD_SIZE": world.world_size, "LOCAL_RANK": world.local_rank,
              "MASTER_ADDR": addr,
              "MASTER_PORT": world.master_port or (_free_port() if world.world_size == 1 else DEFAULT_PORT),
              "LOCAL_WORLD_SIZE": world.local_world_size, "NODE_RANK": world.node_rank}
    for name, value in values.items():
        if value is not None and not env.get(name):
            env[name] = str(value)


def require_deepspeed(world: World, ds_config: Optional[str]) -> None:
    """Several processes without a DeepSpeed config would each train alone into the same out_dir: refuse."""
    if world.world_size > 1 and not ds_config:
        how = {"srun": "srun started", "torchrun": "torchrun started", "deepspeed": "the deepspeed launcher started"}
        raise LaunchError(f"{how.get(world.launcher, 'the environment names')} {world.world_size} processes "
                          f"(WORLD_SIZE={world.world_size}) but --deepspeed_config is missing, so each would train "
                          f"alone into the same out_dir: add --deepspeed_config configs/ds/zero2_bf16.json (or another "
                          f"configs/ds/*.json), or start one process")


# ----------------------------------------------------------------------------- device
def cuda_problem(index: int = 0) -> Optional[str]:
    """Why CUDA device ``index`` cannot train here (no device, an old driver, a torch built without kernels
    for this GPU), or None when a kernel runs on it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    if not torch.cuda.is_available():
        return (f"torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda or 'none'}; CUDA_VISIBLE_DEVICES={visible})")
    count = torch.cuda.device_count()
    if index >= count:
        return (f"local rank {index} but {count} GPU(s) visible (CUDA_VISIBLE_DEVICES={visible}): start at most "
                f"{count} ranks per node")
    try:  # a kernel launch and a read: fails on a driver too old for this torch or a GPU it has no kernels for
        (torch.ones(1, device=f"cuda:{index}") + 1).cpu()
    except RuntimeError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return f"a test kernel on cuda:{index} failed: {lines[0] if lines else type(e).__name__}"
    return None


def resolve_device(requested: str, world: World) -> tuple:
    """(device, why the GPU was not taken or None) for ``train.device`` (auto | cuda | cpu) on this rank.
    ``cuda`` without a usable GPU is a LaunchError (before anything is written); ``auto`` falls back to the
    CPU. Each rank takes the GPU of its local rank, or the only one it sees (``--gpus-per-task=1``)."""
    if requested == "cpu":
        return torch.device("cpu"), None
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = 0 if visible == 1 else world.local_rank
    problem = cuda_problem(index)
    if problem is None:
        return torch.device("cuda", index), None
    if requested == "cuda":
        raise LaunchError(f"--device cuda (train.device): no usable GPU for rank {world.rank} on "
                          f"{socket.gethostname()}: {problem}. Fix the driver / CUDA build, or train on the CPU "
                          f"with --device cpu")
    return torch.device("cpu"), problem


# ----------------------------------------------------------------------------- the log's head
def rank_record(world: World, device: torch.device, cpu_fallback: Optional[str] = None) -> dict:
    """What the log's head says about one rank (all-gathered): host, device, pid, why it is not on a GPU."""
    name = "cpu"
    if device.type == "cuda":
        name = f"{device} ({torch.cuda.get_device_name(device)})"
    return {"rank": world.rank, "local_rank": world.local_rank, "host": socket.gethostname(), "device": name,
            "pid": os.getpid(), "fallback": cpu_fallback}


def log_world(world: World, records: list, communication: Optional[str], timeout_s: int) -> None:
    """The log's head: world size, ranks per node, launcher, communication backend, and every rank's host and
    device (``records``: every rank's :func:`rank_record`); a banner when ranks fell back to the CPU."""
    by_host: dict = {}
    for r in sorted(records, key=lambda r: r["rank"]):
        by_host.setdefault(r["host"], []).append(r)
    counts = sorted({len(ranks) for ranks in by_host.values()})
    per_node = str(counts[0]) if len(counts) == 1 else ", ".join(str(len(r)) for r in by_host.values())
    hosts = []
    for host, ranks in by_host.items():
        devices = ", ".join(f"{r['rank']}: {r['device']}" for r in ranks)
        hosts.append(f"{host}: {len(ranks)} rank(s) [{devices}]")
    log.info("world: %d rank(s), %s per node, launcher %s%s, communication %s, collective timeout %d s "
             "(train.dist_timeout_s)\n  %s", len(records), per_node, world.launcher,
             f" ({world.note})" if world.note else "", communication or "none (one process)", timeout_s,
             "\n  ".join(hosts))
    fell_back = [r for r in records if r["fallback"]]
    if fell_back and len(records) > 1:  # several ranks meant GPUs: say it where nobody can miss it
        log.warning("!" * 72 + "\n  %d OF %d RANKS TRAIN ON THE CPU: train.device=auto found no usable GPU (rank %d: "
                    "%s).\n  Pass --device cuda to make a missing GPU an error.\n" + "!" * 72, len(fell_back),
                    len(records), fell_back[0]["rank"], fell_back[0]["fallback"])
    elif fell_back:
        log.info("device: cpu (train.device=auto: %s)", fell_back[0]["fallback"])


# ----------------------------------------------------------------------------- failed collectives
# gloo raises plain RuntimeErrors ("[.../gloo/...] Timed out waiting 2000ms for recv", "Application timeout
# caused pair closure", "Connection closed by peer"); NCCL and the store raise torch.distributed.DistError.
_COLLECTIVE_FAILURE = re.compile(r"gloo|pair closure|Connection (closed|reset) by peer|NCCL")


def collective_failure(exc: BaseException, timeout_s: int) -> Optional[str]:
    """A one-line message naming this rank when ``exc`` is a collective that failed (timed out after
    ``timeout_s`` = train.dist_timeout_s, or lost its peer); None for any other error."""
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", ())
    if not (isinstance(exc, dist_error) or (isinstance(exc, RuntimeError) and _COLLECTIVE_FAILURE.search(str(exc)))):
        return None
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        world = discover()
        rank, size = world.rank, world.world_size
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    what = lines[-1] if lines else type(exc).__name__
    return (f"rank {rank} of {size} on {socket.gethostname()} (pid {os.getpid()}): a collective (or the start-up "
            f"rendezvous) did not complete within train.dist_timeout_s={timeout_s} s ({what}). Another rank "
            f"stopped, hung or died: its own log says which and where")
