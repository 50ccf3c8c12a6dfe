"""The Ray engine: the local engine's extraction, spread over the worker actors of a Ray cluster (Ray Data).

driver   read records with the same readers (same doc_ids, same skipped records) → blocks of `buffer_size`
         readable records (the local engine's read-ahead buffers), each with its own range of part ids and,
         on resume, the doc_ids of its already committed documents (blocks with nothing left are not sent)
workers  `map_batches(BlockWorker, batch_size=1)` on a pool of `workers` actors: each loads the model once,
         runs `run.Extraction.parts` on a block (the local engine's code path) and commits every part into the
         shared OUTPUT/ itself (files renamed into place, then `_parts/NNNNNN.done`)
driver   `run.finish` folds the committed parts into the final files, exactly as after a local run

A block's part ids and its parts depend on its records alone, so running a block again (Ray's retry after a
worker died, or the worker's own retry after an exception) rewrites the same parts: no document is lost or
stored twice. A block that fails twice is reported; its committed parts stay and `--resume` does the rest.
Blocks lost with their worker (Ray restarts an actor on its own node, which may be gone) run once more on a new
pool, which starts as soon as one worker is up, before the run reports anything.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa

from extractor.core import runtime
from extractor.core.models import BUNDLED_ALIASES, load_model
from extractor.corpus.config import RunConfig
from extractor.corpus.extraction import Extraction, expected_records, limited
from extractor.corpus.manifest import base_manifest, finish
from extractor.corpus.progress import Progress
from extractor.corpus.readers import SourceRecord
from extractor.corpus.storage import OutputFolder
from extractor.errors import UserError

log = logging.getLogger("extractor.ray")

INSTALL_HINT = "the ray engine needs Ray: pip install 'attention-extractor[ray]'"
ATTEMPTS = 2  # tries per block: the worker retries once after an exception, Ray once after a crash
FAULT_ENV = "EXTRACTOR_RAY_FAULT"  # test hook, see `Fault`
START_SECONDS = 600  # most seconds for every worker of the pool to start and load the model
BLOCK_NODES = "ray_block_nodes"  # manifest provenance: block_id → the Ray node id whose worker ran it
PAUSE_SECONDS = 300.0  # Fault 'pause' by default: long enough for a test to act, short enough to end on its own


def check_available() -> None:
    """Ray is an optional extra: say how to install it before anything is written."""
    require_ray()


def require_ray() -> ModuleType:
    """Import Ray (an optional extra), or tell the user how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the engine runs on Ray Data
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return ray


# -- blocks ------------------------------------------------------------------------------------------------
@dataclass
class Block:
    """A slice of the corpus that one worker processes in one go; its parts are numbered from `first_part_id`
    and stay below `first_part_id + max_parts`, so blocks never write to each other's parts."""

    block_id: int  # position in the corpus: block k holds the records of the local engine's k-th buffer
    first_part_id: int
    max_parts: int
    records: list[SourceRecord]
    done: frozenset[int] = frozenset()  # doc_ids committed by an interrupted run (they still fill the buffer)

    @property
    def todo(self) -> bool:
        return any(r.doc_id not in self.done for r in self.records)

    def row(self) -> dict[str, Any]:
        """As a Ray Data row (records as one JSON string: one column type, whatever the records hold)."""
        records = [[r.doc_id, r.source, r.line, r.text, r.reason] for r in self.records]
        return {"block_id": self.block_id, "first_part_id": self.first_part_id, "max_parts": self.max_parts,
                "records": json.dumps(records), "done": json.dumps(sorted(self.done))}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Block:
        records = [SourceRecord(*fields) for fields in json.loads(row["records"])]
        return cls(int(row["block_id"]), int(row["first_part_id"]), int(row["max_parts"]), records,
                   frozenset(json.loads(row["done"])))

    def describe(self) -> str:
        return f"block {self.block_id} (doc_id {self.records[0].doc_id}–{self.records[-1].doc_id})"


def split_blocks(
    records: Iterable[SourceRecord], size: int, first_part_id: int, done: Collection[int]
) -> Iterator[Block]:
    """The corpus cut where the local engine drains its buffer: after every `size` readable records, committed
    ones included, so every batch is planned as in an uninterrupted run (`Block.todo`: work is left).

    Skipped records stay in stream order, so they ride on the same part as in a local run. A block yields at
    most one part per readable record plus one part of trailing skipped records: `size + 1` part ids each,
    numbered from `first_part_id` (past every committed part) for the blocks with work, in order.
    """
    max_parts = size + 1
    sent = 0

    def block(block_id: int, records: list[SourceRecord]) -> Block:
        nonlocal sent
        ids = frozenset(r.doc_id for r in records if r.doc_id in done)
        cut = Block(block_id, first_part_id + sent * max_parts, max_parts, records, ids)
        sent += cut.todo
        return cut

    pending: list[SourceRecord] = []
    readable = block_id = 0
    for record in records:
        pending.append(record)
        readable += record.text is not None
        if readable == size:
            yield block(block_id, pending)
            pending, readable, block_id = [], 0, block_id + 1
    if pending:
        yield block(block_id, pending)


# -- workers -----------------------------------------------------------------------------------------------
@dataclass
class Fault:
    """Test hook, set through `EXTRACTOR_RAY_FAULT` on the driver (a JSON object, or a list of them): the
    worker on block `block` (-1: any block) fails right after committing that block's first part, `times` times
    in all (counted with marker files in `markers`, so a restarted actor sees earlier failures). `kind`: 'raise'
    an exception, 'exit' the process (a crash), or 'pause' for `seconds` (meanwhile a test kills its node or
    starts a second driver). `node_resource`: only on a node that offers this custom resource.
    """

    block: int
    times: int
    markers: str
    kind: str = "raise"
    node_resource: str | None = None
    seconds: float = PAUSE_SECONDS

    def applies(self, block: Block, node_resources: dict[str, float]) -> bool:
        return self.block in (-1, block.block_id) and (
            self.node_resource is None or self.node_resource in node_resources)

    @classmethod
    def parse(cls, spec: str | None) -> list[Fault]:
        faults = json.loads(spec) if spec else []
        return [cls(**fault) for fault in (faults if isinstance(faults, list) else [faults])]

    def trip(self, block_id: int) -> None:
        """Fail as `kind` says; the marker file holds the worker's PID and the block's id ("PID BLOCK")."""
        folder = Path(self.markers)
        folder.mkdir(parents=True, exist_ok=True)
        failures = len(list(folder.iterdir()))
        if failures >= self.times:
            return
        (folder / f"failure-{failures}").write_text(f"{os.getpid()} {block_id}")
        if self.kind == "exit":
            os._exit(1)
        if self.kind == "pause":
            time.sleep(self.seconds)
            return
        raise RuntimeError(f"injected fault {failures + 1} of {self.times}")


class BlockWorker:
    """A Ray Data actor: loads the model once, then runs the local engine's `Extraction` on each block and
    commits the parts into the shared output folder itself."""

    def __init__(self, config: dict[str, Any], fault: str | None = None) -> None:
        self.config = RunConfig(**config)
        self.faults = Fault.parse(fault)
        self.load_seconds, self.provenance, self.unusable = 0.0, "{}", ""
        self.node_id = require_ray().get_runtime_context().get_node_id()
        runtime.configure(self.config.threads)
        started = time.time()
        try:
            loaded = load_model(self.config.model, self.config.device, self.config.dtype, self.config.atol)
            self.extraction = Extraction(self.config, loaded)  # checks what needs the model (layers, pairs)
        except Exception as exc:  # noqa: BLE001 - Ray would keep only "the actor died"; the driver shows this
            self.unusable = str(exc) if isinstance(exc, UserError) else describe(exc)
            return
        self.load_seconds = time.time() - started
        self.provenance = json.dumps(loaded.provenance, default=str)
        self.folder = OutputFolder(self.config.output, attach=True)

    def __call__(self, batch: pa.Table) -> dict[str, list[Any]]:
        """One block in (`batch_size=1`), one summary row out; `error` is '' unless both attempts failed, and
        `unusable` says why this worker could not even load the model."""
        assert batch.num_rows == 1, "map_batches must hand over one block at a time"
        block = Block.from_row(batch.to_pylist()[0])
        documents, tokens, error = 0, 0, ""
        for attempt in range(1, 1 + (0 if self.unusable else ATTEMPTS)):
            try:
                documents, tokens = self.run_block(block)
                error = ""
                break
            except Exception as exc:  # noqa: BLE001 - reported per block; the other blocks go on
                error = describe(exc)
                log.warning("%s failed (try %d of %d)", block.describe(), attempt, ATTEMPTS, exc_info=True)
        return {"block_id": [block.block_id], "documents": [documents], "tokens": [tokens], "error": [error],
                "unusable": [self.unusable], "provenance": [self.provenance],
                "load_seconds": [self.load_seconds], "node_id": [self.node_id]}

    def run_block(self, block: Block) -> tuple[int, int]:
        """Commit the parts of `block`; a second run rewrites the same part ids with the same documents."""
        documents = tokens = 0
        try:
            for part in self.extraction.parts(block.records, block.first_part_id, block.done):
                offset = part.part_id - block.first_part_id
                assert 0 <= offset < block.max_parts, f"part {part.part_id} outside block {block.block_id}"
                self.folder.submit(part)
                documents += len(part.documents)
                tokens += part.state.get("n_tokens", 0)
                for fault in self.faults:
                    if fault.applies(block, self.node_resources()):
                        self.folder.flush()  # fail with a committed part behind us: "part-way"
                        fault.trip(block.block_id)
        finally:
            self.folder.flush()
        return documents, tokens


    def node_resources(self) -> dict[str, float]:
        """The resources the node running this worker offers (for `Fault.node_resource`)."""
        nodes = require_ray().nodes()
        return next((dict(n["Resources"]) for n in nodes if n["NodeID"] == self.node_id), {})


def describe(exc: BaseException) -> str:
    """'ErrorType: first line of the message', for one-line reports."""
    message = str(exc).strip().splitlines()
    return type(exc).__name__ + (f": {message[0]}" if message else "")


# -- driver ------------------------------------------------------------------------------------------------
def worker_config(config: RunConfig, output: Path) -> dict[str, Any]:
    """The config a worker runs: absolute paths (a worker's working folder is not the driver's) and a plain
    'cuda' device (Ray gives each GPU actor its own GPU, numbered 0 inside the actor)."""
    model = config.model
    if model not in BUNDLED_ALIASES and Path(model).expanduser().is_dir():
        model = str(Path(model).expanduser().resolve())
    device = "cuda" if config.device.startswith("cuda") else config.device
    update = {"output": str(output.resolve()), "model": model, "device": device}
    return config.model_copy(update=update).model_dump()


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send what native code writes to file descriptor 2 to /dev/null meanwhile (Python's own errors still
    surface as exceptions): Ray's C++ core prints start-up log lines there that no Python setting reaches."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextmanager
def ray_session(ray: ModuleType, address: str | None) -> Iterator[None]:
    """Use the Ray instance this process already joined, or join `address` (None: $RAY_ADDRESS, a cluster
    started on this machine with `ray start`, else a new local instance) and leave it at the end."""
    if ray.is_initialized():
        yield
        return
    try:
        # log_to_driver off, and the driver's own core worker quiet: a lost node or worker is reported once by the
        # engine, not by Ray's logs (RAY_BACKEND_LOG_LEVEL, read when the core worker starts, can override this)
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        with native_stderr_silenced():  # the core worker announces that log level on stderr as it starts
            ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, gRPC errors, depending on the address
        where = f"at '{address}'" if address else "(no address: a local instance)"
        raise UserError(
            f"cannot start or reach the Ray cluster {where} ({str(exc).splitlines()[0].rstrip('.')}); start "
            "one with `ray start --head` and pass --address auto or HOST:PORT"
        ) from exc
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def data_settings(ray: ModuleType) -> Iterator[None]:
    """Our own progress line instead of Ray Data's bars and info lines; a block whose worker keeps crashing is
    reported at the end, with the other blocks done, instead of aborting every block in flight."""
    context = ray.data.DataContext.get_current()
    data_log = logging.getLogger("ray.data")
    saved = context.enable_progress_bars, context.max_errored_blocks, context.wait_for_min_actors_s, data_log.level
    # Every worker has loaded its model before the first block is handed out (blocks spread over all nodes), and
    # a pool the cluster cannot hold fails with a timeout instead of waiting forever.
    context.enable_progress_bars, context.max_errored_blocks, context.wait_for_min_actors_s = False, -1, START_SECONDS
    data_log.setLevel(logging.CRITICAL)  # a failed block or a lost node is reported by the engine, in one line
    try:
        with warnings.catch_warnings():
            # max_restarts, max_task_retries: no named parameter yet (by default Ray retries crashes forever)
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            yield
    finally:
        context.enable_progress_bars, context.max_errored_blocks, context.wait_for_min_actors_s = saved[:3]
        data_log.setLevel(saved[3])


def block_results(
    ray: ModuleType, config: RunConfig, output: Path, blocks: list[Block], fresh_pool: bool = False
) -> Iterator[dict[str, Any]]:
    """The summary row of every block whose worker returned, in completion order. `fresh_pool`: blocks lost with
    their worker run again, so the pool starts as soon as one worker is up (a lost node's share never comes)."""
    dataset = ray.data.from_items([b.row() for b in blocks], override_num_blocks=len(blocks))
    # One block in flight per actor: a crash then costs only the block it was running its retry.
    size = min(config.workers, len(blocks))
    pool = ray.data.ActorPoolStrategy(min_size=1 if fresh_pool else size, max_size=size, max_tasks_in_flight_per_actor=1)
    results = dataset.map_batches(
        BlockWorker,
        fn_constructor_kwargs={"config": worker_config(config, output), "fault": os.environ.get(FAULT_ENV)},
        batch_size=1,
        batch_format="pyarrow",
        compute=pool,
        num_cpus=config.threads or 1,
        num_gpus=1 if config.device.startswith("cuda") else 0,
        resources=config.worker_resources or None,
        max_restarts=-1,  # a crashed worker comes back (loading the model again) ...
        max_task_retries=ATTEMPTS - 1,  # ... and its block runs once more
    )
    try:
        yield from results.iter_rows()
    except Exception as exc:  # noqa: BLE001 - Ray's own failures (lost nodes, object store ...)
        raise UserError(f"the Ray run stopped ({describe(exc)}); committed blocks are kept: run the same "
                        "command with --resume to finish") from exc


@dataclass
class Outcome:
    """What the driver learns from the workers' summary rows."""

    provenances: list[dict[str, Any]]
    failed: list[str]
    load_seconds: float = 0.0


def run_blocks(
    ray: ModuleType, config: RunConfig, folder: OutputFolder, manifest: dict[str, Any],
    blocks: dict[int, Block], progress: Progress,
) -> Outcome:
    """Run every block; record the workers' provenance in the manifest as soon as the first block is done."""
    outcome = Outcome([manifest["provenance"]] if "weights_sha256" in manifest["provenance"] else [], [])
    returned = run_round(ray, config, folder, manifest, list(blocks.values()), progress, outcome)
    lost = [b for b in blocks.values() if b.block_id not in returned]
    if lost:  # Ray restarts a dead actor where it was: a lost node's blocks would never run, so a new pool, once
        print(f"warning: {len(lost)} block(s) lost with their worker (a crash, or a lost node); running them once "
              "more on a new pool", file=sys.stderr)
        returned |= run_round(ray, config, folder, manifest, lost, progress, outcome, fresh_pool=True)
    outcome.failed += [f"{b.describe()}: its worker died {ATTEMPTS} times, then {ATTEMPTS} times on a new pool"
                       for b in blocks.values() if b.block_id not in returned]
    return outcome


def run_round(
    ray: ModuleType, config: RunConfig, folder: OutputFolder, manifest: dict[str, Any], blocks: list[Block],
    progress: Progress, outcome: Outcome, fresh_pool: bool = False,
) -> set[int]:
    """Run `blocks` on one pool, folding each returned block into `outcome` and the manifest; the ids of the
    blocks whose worker returned (with or without an error)."""
    returned: set[int] = set()
    by_id = {b.block_id: b for b in blocks}
    for row in block_results(ray, config, folder.path, blocks, fresh_pool):
        if row["unusable"]:
            raise UserError(row["unusable"])
        block = by_id[row["block_id"]]
        returned.add(block.block_id)
        if row["error"]:
            outcome.failed.append(f"{block.describe()}: {row['error']}")
        progress.update(int(row["documents"]), int(row["tokens"]))
        outcome.load_seconds = max(outcome.load_seconds, float(row["load_seconds"]))
        outcome.provenances.append(json.loads(row["provenance"]))
        if "weights_sha256" not in manifest["provenance"]:
            manifest["provenance"] = {**outcome.provenances[-1], **block_nodes(manifest["provenance"])}
        if not row["error"]:  # which node committed the block (a resumed run keeps the earlier run's entries)
            manifest["provenance"].setdefault(BLOCK_NODES, {})[str(block.block_id)] = row["node_id"]
        folder.write_manifest(manifest)
    return returned


def block_nodes(provenance: dict[str, Any]) -> dict[str, Any]:
    """The `BLOCK_NODES` entry of a provenance, if it has one."""
    return {BLOCK_NODES: provenance[BLOCK_NODES]} if BLOCK_NODES in provenance else {}


def same_model(provenances: list[dict[str, Any]]) -> None:
    """Every worker (and a resumed run's first parts) must have loaded the same weights."""
    digests = sorted({str(p.get("weights_sha256")) for p in provenances})
    if len(digests) > 1:
        raise UserError(
            f"workers loaded different weights for model '{provenances[0].get('model')}' (sha256 "
            f"{', '.join(d[:12] for d in digests)}); give every node the same model files, then rerun with "
            "--overwrite"
        )


def run(
    config: RunConfig, folder: OutputFolder, records: Iterable[SourceRecord], quiet: bool = False,
    loaded: object = None, after_part: object = None,
) -> dict[str, Any]:
    """A corpus run on Ray: `folder` is locked, prepared (and cleaned on resume) and closed by the caller; the
    driver holds its lock for the whole run. `loaded` and `after_part` are the local engine's (workers load
    their own model)."""
    ray = require_ray()
    started = time.time()
    done = folder.committed_doc_ids()
    cuts = split_blocks(limited(records, config.limit), config.buffer_size, folder.next_part_id(), done)
    blocks = {b.block_id: b for b in cuts if b.todo}
    previous = (folder.read_manifest() or {}).get("provenance") or {}
    # Provenance comes from the workers (the driver need not load the model); until then, a resumed run's.
    manifest = base_manifest(config, previous or {"model": config.model}, started)
    outcome = Outcome([], [])
    try:
        with ray_session(ray, config.address) if blocks else nullcontext(), data_settings(ray):
            folder.write_manifest(manifest)
            total = expected_records(config)
            progress = Progress(None if total is None else max(total - len(done), 0), quiet)
            try:
                if blocks:
                    outcome = run_blocks(ray, config, folder, manifest, blocks, progress)
            finally:
                progress.close()
    finally:
        folder.flush()
    same_model(outcome.provenances)
    if outcome.failed:
        more = "; …" if len(outcome.failed) > 3 else ""
        raise UserError(
            f"{len(outcome.failed)} of {len(blocks)} blocks failed ({'; '.join(outcome.failed[:3])}{more}); "
            "every other block is committed: run the same command with --resume to finish"
        )
    if "weights_sha256" not in manifest["provenance"] and done:
        # Everything was committed before this run and no provenance was recorded: ask the model itself.
        model = load_model(config.model, "cpu", config.dtype, config.atol).provenance
        manifest["provenance"] = {**model, **block_nodes(manifest["provenance"])}
    return finish(folder, manifest, started, outcome.load_seconds)
