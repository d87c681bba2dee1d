"""Data-parallel runs on ``torch.distributed``: ``torchrun`` (or ``accelerate launch``) starts N copies of one
command and each copy is a rank.

Every rank reads the same checkpoint and runs the same layers; it calibrates on its own contiguous slice of the
calibration batches. Each statistic is a sum (or a max) over tokens, so it is reduced across ranks before any
decision reads it, and every rank then decides the same thing. Solves that cost more than they communicate
(GPTQ per expert) are spread over ranks by contiguous blocks and their results gathered. Rank 0 alone writes
the output and prints; the other ranks print nothing unless they fail.

Single process (no ``WORLD_SIZE`` > 1 in the environment) every method here is the identity and costs nothing,
so the passes call them unconditionally and there is one code path.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from moecompress.errors import UserError

R = TypeVar("R")
T = TypeVar("T")

# How long a rank waits in a collective for a peer that neither answers nor dies (a dead peer is noticed at once:
# its sockets close). Long enough for rank 0's verification and evaluation between two recipe steps of a large
# model; MOECOMPRESS_DIST_TIMEOUT (seconds) overrides it.
DEFAULT_TIMEOUT_S = 3600


BUCKET = 1 << 25  # elements per all-reduce (256 MiB of float64)


class RankFailure(BaseException):
    """Another rank stopped (died, was killed, or failed) while this one waited for it. A BaseException, like
    KeyboardInterrupt, so no ``except Exception`` on the way swallows it; cleanup handlers still run."""


@dataclass
class World:
    """This process's place in a data-parallel run (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    calibrated: dict[str, list[int]] = field(default_factory=dict)  # consumer → real tokens per rank
    solve_seconds: float = 0.0  # spent in spread solves on this rank

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- slicing ------------------------------------------------------------------------------------------
    def block(self, n: int, rank: int | None = None) -> range:
        """The contiguous block of `n` items that `rank` (default: this rank) owns; blocks differ by ≤ 1 item."""
        r = self.rank if rank is None else rank
        return range(r * n // self.size, (r + 1) * n // self.size)

    def shard_batches(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], what: str
                      ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """This rank's calibration batches and the number of real tokens before them in the whole set.

        Every rank holds the whole (identical) batch list, so slicing needs no communication; the real tokens
        each rank calibrates on are recorded under `what` for the report and provenance.
        """
        batches = list(batches)
        blocks = [self.block(len(batches), r) for r in range(self.size)]
        tokens = [sum(int(m.sum()) for _, m in batches[b.start : b.stop]) for b in blocks]
        self.calibrated[what] = tokens
        own = blocks[self.rank]
        return batches[own.start : own.stop], sum(tokens[: self.rank])

    # ---- collectives --------------------------------------------------------------------------------------
    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def all_reduce_(self, tensors: Sequence[torch.Tensor], op: str = "sum") -> None:
        """Reduce tensors in place across ranks (sum or max): tensors of one dtype travel flattened together, in
        buckets of at most BUCKET elements, so a layer's hundreds of small sums cost a few collectives and the
        extra memory stays bounded."""
        if not self.distributed or not tensors:
            return
        import torch.distributed as dist

        red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        dev = self._comm_device()
        with torch.inference_mode():  # statistics are often inference tensors; writing into them needs the mode
            self._reduce_groups(list(by_dtype.values()), red, dev)

    def _reduce_groups(self, groups: list[list[torch.Tensor]], red: Any, dev: torch.device) -> None:
        import torch.distributed as dist

        for bucket in (b for group in groups for b in _buckets(group)):
            flat = torch.cat([t.detach().reshape(-1).to(dev) for t in bucket])
            self._call(dist.all_reduce, flat, op=red)
            start = 0
            for t in bucket:
                t.copy_(flat[start : start + t.numel()].view(t.shape).to(t.device))
                start += t.numel()

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank (pickled: for small or irregular things)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        self._call(dist.all_gather_object, out, obj)
        return out

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (e.g. a statistics cache every rank can read)."""
        t = torch.tensor([0.0 if flag else 1.0], dtype=torch.float64)
        self.all_reduce_([t], "max")
        return bool(t.item() == 0.0)

    def spread(self, n: int, solve: Callable[[range], list[R]]) -> list[R]:
        """Results of `n` independent jobs: each rank solves its contiguous block, every rank gets all results.

        `solve(block)` returns the results of the jobs in `block`, in order. Time spent here is recorded per
        rank (the report's solve split).
        """
        t0 = time.perf_counter()
        mine = solve(self.block(n)) if len(self.block(n)) else []
        self.solve_seconds += time.perf_counter() - t0
        if not self.distributed:
            return mine
        return [r for part in self.gather(mine) for r in part]

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # gloo / NCCL: a peer's connection closed or the collective timed out
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise RankFailure(f"rank {self.rank}: lost another rank of the {self.size}-process run ({first}); "
                              "stopping. Nothing was published at --out; rerun the same command.") from exc

    # ---- run-level helpers --------------------------------------------------------------------------------
    def check_same(self, fingerprint: str, what: str) -> None:
        """Refuse to start when the ranks were given different commands (model paths, recipes, options)."""
        if not self.distributed:
            return
        prints = self.gather(fingerprint)
        odd = [r for r, p in enumerate(prints) if p != prints[0]]
        if odd:
            raise UserError(f"rank(s) {', '.join(map(str, odd))} started with a different {what} than rank 0; "
                            "every rank of a torchrun launch must get the same command, model and recipe")

    def summary(self) -> dict[str, Any]:
        """What the report and provenance record (a collective: every rank calls it at the same point)."""
        per_rank = self.gather((round(self.solve_seconds, 3), round(peak_rss_mb(), 1)))
        info: dict[str, Any] = {"world_size": self.size}
        if self.distributed:
            info["backend"] = self.backend
            info["calibration_tokens_by_rank"] = dict(self.calibrated)
            info["solve_seconds_by_rank"] = [s for s, _ in per_rank]
            info["peak_rss_mb_by_rank"] = [m for _, m in per_rank]
        return info

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            self._call(dist.barrier)


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of `tensors` of at most BUCKET elements together (a larger tensor travels alone)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and size + t.numel() > BUCKET:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


_WORLD = World()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def world() -> World:
    """The world of this process (rank 0 of 1 until ``init_from_env`` joins a launched run)."""
    return _WORLD


def launched_size() -> int:
    """WORLD_SIZE as torchrun / accelerate launch set it (1 when not launched)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(argv: Sequence[str] | None = None, device: str | None = None) -> World:
    """Join the process group a launcher prepared (env:// rendezvous), once per process.

    The backend follows the device: NCCL when CUDA is available and not refused (``--device cpu``), gloo
    otherwise. Ranks then check they were given the same command line (recipe files compared by content).
    """
    global _WORLD
    size = launched_size()
    if size <= 1 or _WORLD.distributed:
        return _WORLD
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device or "auto").lower() != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    timeout = timedelta(seconds=float(os.environ.get("MOECOMPRESS_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
    _WORLD = World(rank=rank, size=size, local_rank=local, backend=backend)
    _stop_cleanly_on_sigterm(_WORLD)
    if argv is not None:
        _WORLD.check_same(command_fingerprint(argv), "command line, model or recipe")
    return _WORLD


def shutdown() -> None:
    """Leave the process group (end of a launched run)."""
    global _WORLD
    if _WORLD.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _WORLD = World()


def command_fingerprint(argv: Sequence[str]) -> str:
    """The command line with every argument that names a file replaced by a hash of its content (a recipe
    with the same path but other content on another node differs) and every folder holding a config.json
    by a hash of that config."""
    h = hashlib.sha256()
    for arg in argv:
        h.update(arg.encode())
        p = Path(arg)
        try:
            if p.is_file() and p.stat().st_size < (64 << 20):
                h.update(hashlib.sha256(p.read_bytes()).digest())
            elif (p / "config.json").is_file():
                h.update(hashlib.sha256((p / "config.json").read_bytes()).digest())
        except OSError:
            continue
    return h.hexdigest()


def _stop_cleanly_on_sigterm(w: World) -> None:
    """torchrun stops the surviving ranks with SIGTERM when one fails: turn it into an exception so temp
    folders are removed on the way out, and say in one line why this rank stopped."""

    def handler(signum: int, frame: Any) -> None:
        raise RankFailure(f"rank {w.rank}: stopped by the launcher (another rank of the {w.size}-process run "
                          "failed); nothing was published at --out; rerun the same command.")

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a test runner thread): leave the default
        print("moecompress: SIGTERM handler not installed (not the main thread)", file=sys.stderr)
