"""Data parallel training over MPI: a communicator, flat gradient buckets, and the exact average.

Under `mpiexec -n N` every rank holds the whole model and draws the very batch one process would
draw (the same seeded Batcher); rank r keeps rows [r*B/N, (r+1)*B/N) of it. Each rank's loss is a
mean over its own targets, so its gradient is weighted by n_r / n (its share of the batch's
counted targets) before the sum over ranks: the result is the gradient of the global mean, the
single-process gradient, whatever the ranks' token counts (SFT batches with -100 labels differ).

Gradients travel in a few flat buckets (contiguous arrays of a few layers each, ~25 MB), summed in
place by MPI Allreduce: one call per bucket, not per tensor. With overlap the model's backward calls
back after each layer (from the top), and a bucket's non-blocking Iallreduce starts as soon as its
last layer is done, while the layers below are still being differentiated (PyTorch DDP's scheme).
ZeRO-1 (npllama.train.zero) reduce-scatters the same buckets instead.

Outside MPI (no PMI_RANK / PMI_SIZE / OMPI_COMM_WORLD_SIZE in the environment) `World.from_env()`
is a one-process world and mpi4py is never imported.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np

from npllama.backend import get_array_module, is_cupy
from npllama.errors import NpllamaError

BUCKET_BYTES = 25 * 2 ** 20            # PyTorch DDP's default bucket cap
_ENV_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
_ENV_RANK = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


class DistributedError(NpllamaError, RuntimeError):
    """A multi-process run that cannot go on (mpi4py missing, ranks that disagree, a batch that does not split).

    everywhere=True: every rank raises the same error at the same point, so only rank 0 prints it
    and the ranks exit together; otherwise the failing rank prints it and aborts the whole job."""

    def __init__(self, message: str, everywhere: bool = True) -> None:
        super().__init__(message)
        self.everywhere = everywhere


def _env_int(names: tuple[str, ...]) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v is not None and v.strip().isdigit():
            return int(v)
    return None


def _waiter(req: Any) -> Callable[[], None]:
    """wait() for an MPI request, carrying the request (so that it can be tested for progress)."""
    def wait() -> None:
        req.Wait()
    wait.request = req                        # type: ignore[attr-defined]
    return wait


class World:
    """The ranks of this job: rank, size and the collectives the trainer uses (no-ops in a one-process world)."""

    def __init__(self, comm: Any = None, mpi: Any = None) -> None:
        self.comm, self.MPI = comm, mpi
        self.rank = 0 if comm is None else comm.Get_rank()
        self.size = 1 if comm is None else comm.Get_size()
        self.nccl: Any = None            # a cupy.cuda.nccl communicator, made on first CuPy use where available
        self._comm_stream: Any = None    # the CUDA stream non-blocking NCCL calls run on

    @classmethod
    def from_env(cls) -> World:
        """The MPI world when launched by mpiexec (mpi4py imported only then), else a one-process world."""
        size = _env_int(_ENV_SIZE)
        if size is None:
            return cls()
        try:
            from mpi4py import MPI
        except ImportError:
            rank = _env_int(_ENV_RANK) or 0
            raise DistributedError(f"launched under mpiexec with {size} rank(s) (rank {rank}), but mpi4py is not "
                                   f"installed for {sys.executable}: pip install 'npllama[mpi]'") from None
        world = cls(MPI.COMM_WORLD, MPI)
        if world.size > 1:
            world._abort_on_uncaught()
        return world

    def _abort_on_uncaught(self) -> None:
        """An exception nobody catches ends every rank (MPI_Abort), not just this one while the rest wait forever."""
        previous = sys.excepthook

        def hook(kind: type, value: BaseException, tb: Any) -> None:
            previous(kind, value, tb)
            sys.stderr.flush()
            if not issubclass(kind, KeyboardInterrupt):
                self.comm.Abort(1)
        sys.excepthook = hook

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that logs, evaluates and writes."""
        return self.rank == 0

    # ------------------------------------------------------------------ collectives on arrays
    def _host(self, buf: Any) -> Any:
        return buf if not is_cupy(buf) else get_array_module(buf).asnumpy(buf)

    def allreduce_(self, buf: Any) -> None:
        """buf <- sum over ranks, in place."""
        if self.size == 1:
            return
        if is_cupy(buf):
            if self._nccl_for(buf):
                self._nccl_allreduce(buf)
                return
            host = self._host(buf)
            self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
            buf.set(host)
            return
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def iallreduce_(self, buf: Any) -> Callable[[], None]:
        """Start buf <- sum over ranks (in place); returns wait(), which completes it."""
        if self.size == 1:
            return lambda: None
        if is_cupy(buf):
            if self._nccl_for(buf):
                nccl, _, kind = self._nccl_args(buf)
                return self._on_comm_stream(lambda st: self.nccl.allReduce(buf.data.ptr, buf.data.ptr, buf.size,
                                                                           kind, nccl.NCCL_SUM, st))
            host = self._host(buf)
            req = self.comm.Iallreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)

            def wait_host() -> None:
                req.Wait()
                buf.set(host)
            wait_host.request = req           # type: ignore[attr-defined]
            return wait_host
        return _waiter(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM))

    def ireduce_scatter_(self, buf: Any, out: Any) -> Callable[[], None]:
        """Start out <- rank's block of sum over ranks of buf (len(buf) == size * len(out)); returns wait()."""
        if self.size == 1:
            out[...] = buf
            return lambda: None
        if is_cupy(buf):
            if self._nccl_for(buf):
                nccl, _, kind = self._nccl_args(buf)
                return self._on_comm_stream(lambda st: self.nccl.reduceScatter(buf.data.ptr, out.data.ptr, out.size,
                                                                               kind, nccl.NCCL_SUM, st))
            host, hout = self._host(buf), np.empty(out.shape, dtype=out.dtype)
            req = self.comm.Ireduce_scatter_block(host, hout, op=self.MPI.SUM)

            def wait_host() -> None:
                req.Wait()
                out.set(hout)
            wait_host.request = req           # type: ignore[attr-defined]
            return wait_host
        return _waiter(self.comm.Ireduce_scatter_block(buf, out, op=self.MPI.SUM))

    def allgather_(self, buf: Any) -> None:
        """In place: block r of buf (len(buf) == size * block) comes from rank r, on every rank."""
        if self.size == 1:
            return
        if is_cupy(buf):
            if self._nccl_for(buf):            # in place: rank r's block already sits at its offset
                nccl, stream, kind = self._nccl_args(buf)
                n = buf.size // self.size
                self.nccl.allGather(buf[self.rank * n:].data.ptr, buf.data.ptr, n, kind, stream)
                return
            host = self._host(buf)
            self.comm.Allgather(self.MPI.IN_PLACE, host)
            buf.set(host)
            return
        self.comm.Allgather(self.MPI.IN_PLACE, buf)

    def bcast_(self, buf: Any, root: int = 0) -> None:
        """buf <- root's buf, in place."""
        if self.size == 1:
            return
        if is_cupy(buf):
            if self._nccl_for(buf):
                nccl, stream, kind = self._nccl_args(buf)
                self.nccl.bcast(buf.data.ptr, buf.size, kind, root, stream)
                return
            host = self._host(buf)
            self.comm.Bcast(host, root=root)
            buf.set(host)
            return
        self.comm.Bcast(buf, root=root)

    def sum(self, x: float) -> float:
        """A float summed over ranks (float64)."""
        if self.size == 1:
            return float(x)
        a = np.array([x], dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)
        return float(a[0])

    # ------------------------------------------------------------------ objects and control
    def allgather_obj(self, obj: Any) -> list:
        """Every rank's obj, in rank order (small objects: hashes, settings)."""
        return [obj] if self.size == 1 else self.comm.allgather(obj)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.size > 1:
            self.comm.Barrier()

    def abort(self, code: int) -> None:
        """End the whole job now with `code` (every rank), as after an error on one rank only."""
        if self.size > 1:
            self.comm.Abort(code)
        sys.exit(code)

    # ------------------------------------------------------------------ NCCL (one GPU per rank)
    def _nccl_for(self, buf: Any) -> bool:
        """True when buf can go through NCCL (cupy.cuda.nccl importable on every rank); decided once, together."""
        if self.nccl is None:
            try:
                from cupy.cuda import nccl
                have = nccl.get_unique_id() if self.rank == 0 else True
            except Exception:              # no NCCL in this CuPy build (or the emulation): host buffers
                nccl, have = None, None
            every = self.comm.allgather(have is not None)
            uid = self.comm.bcast(have if self.rank == 0 else None, root=0)
            self.nccl = False
            if all(every):                 # NcclCommunicator() is itself collective: only when all can
                try:
                    made = nccl.NcclCommunicator(self.size, uid, self.rank)
                except Exception:          # e.g. two ranks on one GPU, which NCCL refuses
                    made = None
                if all(self.comm.allgather(made is not None)):
                    self.nccl = made
        return self.nccl is not False

    def _nccl_args(self, buf: Any) -> tuple[Any, int, int]:
        """(the nccl module, the current stream, buf's NCCL dtype): NCCL runs in the compute stream's order."""
        from cupy.cuda import nccl
        import cupy
        kind = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}[buf.dtype]
        return nccl, cupy.cuda.get_current_stream().ptr, kind

    def _on_comm_stream(self, launch: Callable[[int], None]) -> Callable[[], None]:
        """Run an NCCL call on a stream of its own, after the work queued so far (the gradients it reads), so
        that it overlaps the backward still running on the compute stream; wait() makes the compute stream wait."""
        import cupy
        if self._comm_stream is None:
            self._comm_stream = cupy.cuda.Stream(non_blocking=True)
        ready = cupy.cuda.Event()
        ready.record(cupy.cuda.get_current_stream())
        self._comm_stream.wait_event(ready)
        launch(self._comm_stream.ptr)
        done = cupy.cuda.Event()
        done.record(self._comm_stream)
        return lambda: cupy.cuda.get_current_stream().wait_event(done)

    def _nccl_allreduce(self, buf: Any) -> None:
        nccl, stream, kind = self._nccl_args(buf)
        self.nccl.allReduce(buf.data.ptr, buf.data.ptr, buf.size, kind, nccl.NCCL_SUM, stream)

    def use_local_gpu(self) -> None:
        """One GPU per rank: rank i of a node takes device i % (devices on the node)."""
        if self.size == 1:
            return
        import cupy
        local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED).Get_rank()
        cupy.cuda.Device(local % cupy.cuda.runtime.getDeviceCount()).use()


# ---------------------------------------------------------------------- the command line's world
def cli_world() -> World:
    """World.from_env() for the CLI: when mpi4py is missing only rank 0 says so (every rank exits 2)."""
    try:
        return World.from_env()
    except DistributedError:
        if (_env_int(_ENV_RANK) or 0) != 0:
            sys.stderr = open(os.devnull, "w")
        raise


@contextlib.contextmanager
def rank_errors(world: World) -> Iterator[None]:
    """Run a CLI command on every rank: only rank 0 prints; an error on some ranks only ends the whole job.

    An error that every rank raises at the same point (DistributedError(everywhere=True)) is reported by
    rank 0 and the ranks exit together. Any other error may be one rank's alone (a file missing on one
    node): that rank prints it (other ranks after a short pause, so that rank 0's line wins when all
    fail alike) and MPI_Abort ends every rank, rather than leaving them waiting in a collective."""
    if world.size == 1:
        yield
        return
    if not world.is_main:
        sys.stdout = open(os.devnull, "w")
    try:
        yield
    except DistributedError as e:
        if e.everywhere:
            if not world.is_main:
                sys.stderr = open(os.devnull, "w")
            raise
        _abort_with(world, e)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        _abort_with(world, e)


def _abort_with(world: World, e: BaseException) -> None:
    from npllama.cli import _user_error
    msg = _user_error(e) if isinstance(e, Exception) else None
    text = f"error: {msg}" if msg is not None else f"internal error: {type(e).__name__}: {e}"
    if not world.is_main:
        time.sleep(2.0)
        text = f"rank {world.rank}: {text}"
    print(f"npllama: {text}", file=sys.stderr, flush=True)
    time.sleep(0.5)   # let mpiexec forward the line: an abort at once can tear the job down before it does
    world.abort(2 if msg is not None else 1)


# ---------------------------------------------------------------------- agreement before step 1
def fingerprint(**parts: Any) -> dict[str, str]:
    """A short hash per part (JSON-able values), to compare across ranks."""
    return {k: hashlib.blake2b(json.dumps(v, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
            for k, v in parts.items()}


def tokens_fingerprint(tokens: Any, windows: int = 64, width: int = 4096) -> dict[str, Any]:
    """Length plus a hash of evenly spaced windows of a token array (a memmap is only read there)."""
    n = len(tokens)
    h = hashlib.blake2b(digest_size=8)
    for i in range(windows):
        a = (n - width) * i // max(windows - 1, 1) if n > width else 0
        h.update(np.ascontiguousarray(tokens[a:a + width]).tobytes())
    return {"tokens": n, "dtype": str(np.asarray(tokens[:0]).dtype), "sample": h.hexdigest()}


def examples_fingerprint(examples: Any) -> dict[str, Any]:
    """Count plus a hash of every token id and label of encoded conversations (npllama.train.sft.Example)."""
    h = hashlib.blake2b(digest_size=8)
    for e in examples:
        h.update(np.int64(len(e.ids)).tobytes())
        h.update(np.ascontiguousarray(e.ids, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(e.labels, dtype=np.int64).tobytes())
    return {"examples": len(examples), "hash": h.hexdigest()}


def weights_fingerprint(model: Any, windows: int = 8, width: int = 1024) -> str:
    """A hash of evenly spaced windows of every frozen weight (those that train are rank 0's on every rank)."""
    h = hashlib.blake2b(digest_size=8)
    for name, p in model.params.items():
        if name in model.trainable:
            continue
        flat, n = p.reshape(-1), int(p.size)
        h.update(name.encode())
        for i in range(windows):
            a = (n - width) * i // max(windows - 1, 1) if n > width else 0
            w = flat[a:a + width]
            h.update(np.ascontiguousarray(w if not is_cupy(w) else get_array_module(w).asnumpy(w)).tobytes())
    return h.hexdigest()


def check_agreement(world: World, **parts: Any) -> None:
    """Stop every rank with one clear line (from rank 0) when the ranks disagree on any part."""
    mine = fingerprint(**parts)
    every = world.allgather_obj(mine)
    for key in mine:
        ranks = [r for r, fp in enumerate(every) if fp.get(key) != every[0].get(key)]
        if ranks:
            raise DistributedError(f"MPI ranks disagree on the {key.replace('_', ' ')}: rank {ranks[0]} differs from "
                                   f"rank 0; start every rank with the same arguments and files")


def check_batch(world: World, batch_size: int) -> None:
    """--batch-size is the global micro-batch: it must split evenly over the ranks."""
    if batch_size % world.size:
        raise DistributedError(f"--batch-size {batch_size} does not split over {world.size} MPI ranks: give a multiple "
                               f"of {world.size} (each rank takes batch_size / ranks rows of the global batch)")


# ---------------------------------------------------------------------- buckets
def backward_groups(model: Any, names: list[str]) -> list[list[str]]:
    """`names` grouped as the backward completes them: the head and final norm, each layer from the top, the embedding."""
    c = model.config
    want = set(names)
    top = ["model.norm.weight"] + ([] if c.tie_word_embeddings else ["lm_head.weight"])
    groups = [[n for n in top if n in want]]
    for i in reversed(range(c.num_hidden_layers)):
        pre = f"model.layers.{i}."
        groups.append([n for n in names if n.startswith(pre)])
    groups.append([n for n in names if n == "model.embed_tokens.weight"])
    seen = {n for g in groups for n in g}
    groups.append([n for n in names if n not in seen])   # anything else (never, for a Llama): last
    return [g for g in groups if g]


class Bucket:
    """One flat array holding several gradients back to back (padded to a multiple of the ranks)."""

    def __init__(self, names: list[str], shapes: dict[str, tuple], xp: Any, dtype: Any, ranks: int) -> None:
        self.names = names
        self.slots: dict[str, tuple[int, int, tuple]] = {}
        off = 0
        for n in names:
            size = int(np.prod(shapes[n]))
            self.slots[n] = (off, off + size, tuple(shapes[n]))
            off += size
        self.numel = off
        self.padded = -(-off // ranks) * ranks
        self.flat = xp.zeros(self.padded, dtype=dtype)
        self.filled: set[str] = set()

    def view(self, name: str, flat: Any = None) -> Any:
        a, b, shape = self.slots[name]
        return (self.flat if flat is None else flat)[a:b].reshape(shape)

    def add(self, name: str, g: Any, scale: float) -> None:
        v = self.view(name)
        v += g if scale == 1.0 else g * scale
        self.filled.add(name)

    @property
    def nbytes(self) -> int:
        return int(self.flat.nbytes)


def make_buckets(model: Any, names: list[str], ranks: int, cap: int = BUCKET_BYTES) -> list[Bucket]:
    """Whole backward groups (layers) per bucket, each bucket closed once it reaches `cap` bytes."""
    shapes = {n: tuple(model.params[n].shape) for n in names}
    item = np.dtype(model.dtype).itemsize
    buckets, cur, size = [], [], 0
    for g in backward_groups(model, names):
        cur += g
        size += sum(int(np.prod(shapes[n])) for n in g) * item
        if size >= cap:
            buckets.append(cur)
            cur, size = [], 0
    if cur:
        buckets.append(cur)
    return [Bucket(b, shapes, model.xp, model.dtype, ranks) for b in buckets]


class DataParallel:
    """The rank's share of each micro-batch, its gradients summed over ranks in buckets; see the module docstring.

    loss_and_grads(model, ids, targets, scale, last) runs one micro-batch: this rank's rows, gradients
    weighted and accumulated into the buckets; on the last micro-batch of a step the buckets are reduced
    and the step's gradients returned (views into the buckets, or with ZeRO-1 this rank's shards)."""

    def __init__(self, world: World, model: Any, names: list[str], overlap: bool = True, zero: int = 0,
                 bucket_bytes: int = BUCKET_BYTES) -> None:
        self.world, self.model, self.overlap, self.zero = world, model, bool(overlap), int(zero)
        self.names = list(names)
        self.buckets = make_buckets(model, self.names, world.size, bucket_bytes)
        self.where = {n: b for b in self.buckets for n in b.names}
        self.pending: list[Callable[[], None]] = []
        self.shards: list[Any] = []          # ZeRO-1: this rank's reduced block of each bucket
        if self.zero:
            self.shards = [model.xp.zeros(b.padded // world.size, dtype=model.dtype) for b in self.buckets]
        self.comm_wait = 0.0                 # seconds blocked in communication (not hidden behind compute)
        self.comm_bytes = 0
        self._fresh = True
        self._last = False
        self._scale = 1.0

    # ------------------------------------------------------------------ batches
    def rows(self, B: int) -> slice:
        """This rank's rows of a global micro-batch of B rows."""
        n = self.world.size
        check_batch(self.world, B)
        return slice(self.world.rank * B // n, (self.world.rank + 1) * B // n)

    # ------------------------------------------------------------------ one micro-batch
    def loss_and_grads(self, model: Any, ids: Any, targets: Any, scale: float, last: bool,
                       ignore_index: int = -100) -> tuple[float, dict[str, Any] | None]:
        """Global micro-batch in, this rank's rows computed; -> (the global batch's loss, gradients or None)."""
        r = self.rows(ids.shape[0])
        counted = targets != ignore_index
        n_all = int(counted.sum())
        n_mine = int(counted[r].sum())
        w = n_mine / n_all if n_all else 1.0 / self.world.size
        for b in self.buckets:
            if self._fresh:                  # a new optimizer step: empty buckets
                b.flat[...] = 0
            b.filled.clear()                 # names this micro-batch has delivered
        self._fresh = False
        self._last, self._scale = last, w * scale
        hook = self._on_grads if self.overlap else None
        loss, grads = model.loss_and_grads(ids[r], targets[r], ignore_index=ignore_index, on_grads=hook,
                                           rows=(r.start, r.stop, ids.shape[0]))   # LoRA dropout: the batch's masks
        for n in self.names:                 # whatever no callback delivered (overlap off, or a model without it)
            b = self.where[n]
            if n not in b.filled:
                b.add(n, grads[n], self._scale)
                if last and len(b.filled) == len(b.names):
                    self._launch(b)
        del grads
        loss = self.world.sum(float(loss) * w)
        if not last:
            return loss, None
        t = time.perf_counter()
        for wait in self.pending:
            wait()
        self.pending = []
        self.comm_wait += time.perf_counter() - t
        self._fresh = True
        if self.zero:
            return loss, {f"bucket{i}": s for i, s in enumerate(self.shards)}
        return loss, {n: self.where[n].view(n) for n in self.names}

    def _on_grads(self, grads: dict[str, Any]) -> None:
        """The backward's callback: a layer's gradients are final; bucket them, start a full bucket's reduction."""
        for n, g in grads.items():
            b = self.where.get(n)
            if b is not None:
                b.add(n, g, self._scale)
                if self._last and len(b.filled) == len(b.names):
                    self._launch(b)
        for wait in self.pending:        # MPI moves non-blocking collectives on only inside MPI calls: poke them
            req = getattr(wait, "request", None)
            if req is not None:
                req.Test()

    def _launch(self, b: Bucket) -> None:
        i = self.buckets.index(b)
        self.comm_bytes += b.nbytes
        if self.zero:
            self.pending.append(self.world.ireduce_scatter_(b.flat, self.shards[i]))
        else:
            self.pending.append(self.world.iallreduce_(b.flat))

    # ------------------------------------------------------------------ clipping across shards
    def clip_grad_norm(self, G: dict[str, Any], max_norm: float) -> float:
        """The global gradient norm (clipped in place to max_norm when > 0), the same on every rank."""
        from npllama.train.clip import clip_grad_norm, grad_norm
        if not self.zero:                    # every rank holds the whole reduced gradient
            return clip_grad_norm(G, max_norm) if max_norm > 0 else grad_norm(G)
        first = next(iter(G.values()))
        xp, dt = get_array_module(first), first.dtype.type
        local = sum(float(xp.vdot(g, g)) for g in G.values())
        total = float(np.sqrt(self.world.sum(local)))
        if max_norm > 0:                      # torch's coefficient, in the gradients' dtype (clip.py)
            coef = dt(max_norm) / (dt(total) + dt(1e-6))
            coef = min(coef, dt(1.0)) if not np.isnan(coef) else coef
            for g in G.values():
                g *= coef
        return total


class Parallel:
    """How a Trainer runs over the ranks of `world`: ZeRO stage (0 or 1), overlap, bucket size."""

    def __init__(self, world: World, zero: int = 0, overlap: bool = True, bucket_bytes: int = BUCKET_BYTES) -> None:
        if zero not in (0, 1):
            raise DistributedError(f"--zero {zero}: only 0 (replicated optimizer) and 1 (sharded moments) exist")
        self.world, self.zero, self.overlap, self.bucket_bytes = world, zero, overlap, bucket_bytes

    def attach(self, model: Any, opt: Any, batch_size: int) -> tuple[DataParallel, Any]:
        """Buckets for the optimizer's parameters that train, rank 0's weights on every rank; -> (dp, optimizer)."""
        check_batch(self.world, batch_size)
        names = [n for n in model.params if n in model.trainable and n in opt.params]
        dp = DataParallel(self.world, model, names, self.overlap, self.zero, self.bucket_bytes)
        for b in dp.buckets:                  # one set of weights: rank 0's (as DDP does at start)
            for n in b.names:
                b.view(n)[...] = model.params[n]
            self.world.bcast_(b.flat)
            for n in b.names:
                model.params[n][...] = b.view(n)
        if self.zero:
            from npllama.train.zero import ZeroOptimizer
            opt = ZeroOptimizer(opt, self.world, dp.buckets, {n: model.params[n] for n in names})
        return dp, opt


__all__ = ["BUCKET_BYTES", "DataParallel", "Parallel", "cli_world", "rank_errors", "DistributedError", "World", "check_agreement", "check_batch",
           "examples_fingerprint", "fingerprint", "make_buckets", "tokens_fingerprint", "weights_fingerprint"]
