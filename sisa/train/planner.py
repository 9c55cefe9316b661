"""The planner: which stages of which shards need training, the jobs for them, and their commit.

A stage counts as done only when its stored checkpoint key is exactly what training
now would produce (recipe, shard, stage, the ids it trained on, its parent, its
determinism domain), so the plan after a crash, a deletion or an ``add`` retrains
exactly the stale stages. The planner also owns the schema of the stage records it
commits. It works on a :class:`~sisa.store.database.Store` and a config; the
:class:`~sisa.ensemble.Ensemble` facade and the unlearning layer both drive it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from sisa.config.settings import SisaConfig
from sisa.errors import DomainUnavailableError, NotTrainedError, StoreError
from sisa.partition.placement import check_shard_sizes
from sisa.store.database import Store
from sisa.store.digests import checkpoint_key, manifest_digest
from sisa.train import backbone as backbones
from sisa.train import combiner, runner_choice
from sisa.train.backbone import Backbone
from sisa.train.core import train_core_in_domain
from sisa.train.domain import Domain, domain_id, missing_reason, unavailable_message
from sisa.train.jobs import ShardJob, StageResult
from sisa.train.slices import StoredSlices

__all__ = ["FitReport", "Planner", "stage_record"]

log = logging.getLogger(__name__)

Progress = Callable[[StageResult], None]


@dataclass
class FitReport:
    """What one :meth:`Planner.fit` (``Ensemble.fit``) call trained.

    Attributes:
        trained: Shard -> stages trained in this call.
        skipped: Shards whose live model was already current.
        empty: Shards with no samples (after deletions), which have no model.
        seconds: Wall time of the call.
        stage_seconds: Sum of per-stage training times (compute spent).
        retries: Shard tasks that lost their worker or node and were resubmitted from
            the last stage received (each a dict: shard, after_stage, attempt, error).
        rebound: Shard -> why it was retrained from scratch in another determinism
            domain (no node of its own was available; ``resources.on_missing_domain``):
            ``{"from_domain": id, "to_domain": id, "reason": text}``.
        runner: Where the stages trained: ``ray``, ``local`` (one process on this machine, no Ray)
            or ``parallel`` (pinned processes side by side on this machine;
            :func:`sisa.train.orchestrator.plan_runner`); None when nothing needed training.
    """

    trained: dict[int, list[int]] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: float = 0.0
    retries: list[dict[str, Any]] = field(default_factory=list)
    rebound: dict[int, dict[str, Any]] = field(default_factory=dict)
    runner: str | None = None


def stage_record(result: StageResult) -> dict[str, Any]:
    """The stored record of a trained stage: what its checkpoint is provably made of.

    ``n_samples x epochs`` is the stage's work in sample-epochs and ``seconds`` its compute
    time; certificates sum both over the stages a deletion retrained.
    """
    return {
        "shard": result.shard,
        "stage": result.stage,
        "key": result.key,
        "sha256": result.sha256,
        "weights": result.weights,
        "manifest": result.manifest,
        **({"slices": result.slices} if result.slices else {}),
        "parent": result.parent,
        "n_samples": result.n_samples,
        "epochs": result.epochs,
        "seconds": round(result.seconds, 4),
        "domain": result.domain,
        # on a GPU: the device index, its memory, the allocator cap in force and the stage's peak
        **({"gpu": result.gpu} if result.gpu else {}),
    }


class Planner:
    """Plans, builds and commits the training of one store's shards.

    Attributes:
        store: The store trained into.
        config: The config training follows (``Ensemble.reconfigure`` replaces it).
        address: Ray address (``local``: this machine without Ray; None: ``RAY_ADDRESS``, else the
            plan decides between the local runner and a local Ray instance, see
            :func:`sisa.train.orchestrator.choose_runner`).
    """

    def __init__(self, store: Store, config: SisaConfig, address: str | None = None) -> None:
        """Plan for ``store`` under ``config``; jobs run on ``address``."""
        self.store = store
        self.config = config
        self.address = address
        self._backbone: Backbone | None = None  # the stored backbone, loaded once (by digest)

    # -------------------------------------------------------------- the shared backbone
    def backbone(self, txn: Any) -> Backbone | None:
        """The stored backbone, loaded once and checked; see :func:`sisa.train.backbone.load_stored`."""
        self._backbone = backbones.load_stored(self.store, self.config, txn, self._backbone)
        return self._backbone

    def ensure_backbone(self) -> Backbone | None:
        """Make the stored backbone the one the config names now (:func:`sisa.train.backbone.ensure_stored`).

        Returns:
            The backbone (None when the config shares none).
        """
        if not self.config.backbone.enabled:
            return None
        self._backbone = backbones.ensure_stored(self.store, self.config, self._backbone, train_core_in_domain)
        return self._backbone

    def slice_counts(self, txn: Any) -> list[int]:
        """Number of slices of each shard (R, plus one per ``add`` that touched it)."""
        return self.store.slice_counts(txn, self.config.shards, self.config.slices)

    def shard_slices(self, txn: Any, shard: int) -> list[np.ndarray]:
        """The sorted ids each stage of ``shard`` trains on, slice by slice, as read in ``txn``.

        Its own slices, or under a shard graph the union of its group's (``Store.training_slices``).
        """
        return self.store.training_slices(txn, shard)

    def shard_job(
        self,
        txn: Any,
        shard: int,
        start_stage: int = 0,
        slice_ids: Sequence[np.ndarray] | None = None,
        *,
        snapshot: bool = False,
        domain: str | None = None,
    ) -> ShardJob:
        """The job that trains ``shard`` from ``start_stage`` on its current samples.

        The job's slices are lazy (:class:`~sisa.train.slices.StoredSlices`): each is
        read from the store when the trainer or the orchestrator asks for it, not here.

        Args:
            txn: Read transaction (for the slice ids and the parent checkpoint).
            shard: Shard index.
            start_stage: Stages to take from the store (0 = from scratch).
            slice_ids: The shard's slice ids when the caller has read them already, in
                ``txn`` or while holding the writer lock.
            snapshot: Load the slices from ``txn`` itself (which must then stay open
                until they are loaded) instead of one short transaction per slice.
            domain: Determinism domain the job must run in; default: its parent
                checkpoint's (none from scratch). A replay for ``verify`` names the live model's.

        Returns:
            The job, with the stage ``start_stage`` checkpoint as parent when > 0.
        """
        # From txn, not a fresh meta read: that opens a transaction of its own, which in a
        # reader may reopen a compacted store and so end the snapshot ``txn`` belongs to.
        shape = tuple(self.store.meta(txn)["feature_shape"])
        ids = self.shard_slices(txn, shard) if slice_ids is None else slice_ids
        slices = StoredSlices(self.store, shard, ids, shape, txn if snapshot else None)
        parent = self.store.stage_record(txn, shard, start_stage) if start_stage > 0 else None
        if start_stage > 0 and parent is None:
            raise StoreError(f"shard {shard}: stage {start_stage} has no checkpoint to resume from")
        return ShardJob(
            config=self.config,
            shard=shard,
            slices=slices,
            start_stage=start_stage,
            parent=self.store.checkpoint(txn, parent) if parent else None,
            parent_key=parent["key"] if parent else None,
            input_shape=shape,
            num_classes=self.config.data.num_classes,
            slice_sizes=slices.sizes,
            domain=domain if domain is not None else domain_id(parent),
            backbone=self.backbone(txn),
        )

    def shard_jobs(
        self,
        plan: Sequence[tuple[int, int]],
        slice_ids: Mapping[int, Sequence[np.ndarray]] | None = None,
        snapshot: Any = None,
        domains: Mapping[int, str] | None = None,
    ) -> Iterator[ShardJob]:
        """Jobs for ``(shard, start_stage)`` pairs, each built when the consumer asks for it.

        The orchestrator pulls the next job only when it submits it, so the driver
        holds the parent checkpoint of one shard at a time (and, through the lazy
        slices, its samples only while they are shipped or trained on).

        Args:
            plan: Shards to train and the stage each starts after.
            slice_ids: Shard -> its slice ids, where the caller planned with them
                (saves reading them again); others are read here.
            snapshot: An open read transaction to build and load every job from (it must
                stay open until the jobs are consumed); None: short transactions.
            domains: Shard -> the domain its job must run in, where not its parent's.

        Yields:
            One job per pair, in order.
        """
        known, bound = slice_ids or {}, domains or {}
        for shard, start_stage in plan:
            if snapshot is not None:
                yield self.shard_job(
                    snapshot, shard, start_stage, known.get(shard), snapshot=True, domain=bound.get(shard)
                )
                continue
            with self.store.read() as txn:
                job = self.shard_job(txn, shard, start_stage, known.get(shard), domain=bound.get(shard))
            yield job  # outside the transaction: the consumer commits stages meanwhile

    def predicted_seconds(
        self, plan: Sequence[tuple[int, int]], slices: Mapping[int, Sequence[np.ndarray]], txn: Any = None
    ) -> list[float] | None:
        """Predicted compute seconds of each planned ``(shard, start_stage)``, from what this store measured.

        Every stage record holds its compute seconds and sample-epochs; their ratio over the
        store times the work of each restart (:func:`sisa.train.runner_choice.predict_seconds`).

        Args:
            plan: The plan.
            slices: Shard -> its slices' ids now.
            txn: A read transaction to use (a caller's snapshot); default: a new one.

        Returns:
            One number per plan entry, or None when the store has no trained stage to measure by.
        """
        if txn is None:
            with self.store.read() as own:
                return self.predicted_seconds(plan, slices, own)
        records = [r for shard in range(self.config.shards) for r in self.store.stage_records(txn, shard)]
        rate = runner_choice.seconds_per_sample_epoch(records)
        if rate is None:
            return None
        sizes = {shard: [len(part) for part in slices[shard]] for shard, _ in plan}
        epochs = {shard: self.config.train.stage_epochs(len(sizes[shard])) for shard, _ in plan}
        return runner_choice.predict_seconds(plan, sizes, epochs, rate)

    def valid_stages(self, txn: Any, shard: int, slice_ids: list[np.ndarray]) -> tuple[int, dict[str, Any] | None]:
        """Last stage whose stored checkpoint is exactly what training now would produce, and its record.

        A stage counts only in the domain of the stage before it: a chain never mixes domains.
        """
        recipe = self.store.recipe_digest(txn, self.config)
        parent: dict[str, Any] | None = None
        for stage in range(1, len(slice_ids) + 1):
            record = self.store.stage_record(txn, shard, stage)
            if record is None or (parent is not None and domain_id(record) != domain_id(parent)):
                return stage - 1, parent
            expected = checkpoint_key(
                recipe,
                shard,
                stage,
                manifest_digest(slice_ids[:stage]),
                parent["key"] if parent else None,
                domain_id(record),
            )
            if record["key"] != expected:
                return stage - 1, parent
            parent = record
        return len(slice_ids), parent

    def fit(
        self, progress: Progress | None = None, *, shards: Sequence[int] | None = None, refresh_backbone: bool = True
    ) -> FitReport:
        """Train every shard stage whose checkpoint is missing or stale, in parallel on Ray (or without it).

        Without an address, the plan's measured costs pick the runner: one local process, pinned
        local processes side by side, or Ray (:func:`sisa.train.orchestrator.plan_runner`); the
        report says which (``runner``).

        Resumes each shard from its last valid stage, so re-running after a crash
        (or after new data) redoes only what is needed.

        Args:
            progress: Called after each stage is committed (e.g. to advance a progress bar).
            shards: Train only these shards (an apply of chosen requests); default: all.
            refresh_backbone: First make the stored backbone the one the config names now
                (:meth:`ensure_backbone`: call a pretrained callable, retrain a core backbone whose
                inputs changed). A deletion's retrain passes False: it runs on the stored backbone,
                so a weights file replaced meanwhile never turns a deletion into a full retrain.

        Returns:
            What was trained.

        Raises:
            NotTrainedError: If the store holds no samples.
            ConfigError: At the first fit, if a shard holds fewer samples than slices (or none).
            DomainUnavailableError: Under ``resources.on_missing_domain: refuse``, when no node
                of a shard's determinism domain is available.
        """
        from sisa.train import orchestrator  # the one Ray import; keeps predict/status Ray-free

        started = time.perf_counter()
        cfg, store, report = self.config, self.store, FitReport()
        if store.meta().get("feature_shape") is None:
            raise NotTrainedError(f"store {store.path} holds no samples; ingest data before fit")
        if refresh_backbone:
            self.ensure_backbone()
        plan, total_slices, all_slices = self._stale(report, shards)
        commit, unavailable = self._committer(report, total_slices, progress), self._rebinder(report)
        jobs = self.shard_jobs(plan, dict(enumerate(all_slices)))
        processes = None
        if plan:
            seconds = self.predicted_seconds(plan, dict(enumerate(all_slices)))
            choice = orchestrator.plan_runner(self.address, len(plan), seconds, cfg.resources)
            report.runner, processes = choice.runner, choice.processes
            log.info("training %d shard(s) on the %s runner", len(plan), report.runner)
        retries = orchestrator.execute(
            self.address, jobs, commit, unavailable, runner=report.runner, processes=processes
        )
        for shard, info in report.rebound.items():
            with store.read() as txn:
                info["to_domain"] = domain_id(store.stage_record(txn, shard, 1))
        report.retries = [asdict(r) for r in retries]
        if cfg.aggregate.method == "combiner":
            # The live set may have changed: store the combiner of the models now live (a no-op when it is stored).
            combiner.refit_live(store, cfg)
        report.seconds = time.perf_counter() - started
        log.info("fit: trained %s, skipped %s in %.1fs", report.trained, report.skipped, report.seconds)
        return report

    def _stale(
        self, report: FitReport, shards: Sequence[int] | None
    ) -> tuple[list[tuple[int, int]], dict[int, int], list[list[np.ndarray]]]:
        """The plan of a fit: ``(shard, stages still valid)`` of each shard to train, from one snapshot.

        Empty and up-to-date shards go into ``report`` instead.

        Returns:
            The plan, each planned shard's number of slices, and every shard's slice ids.

        Raises:
            ConfigError: At the first fit, if a shard holds fewer samples than slices (or none).
        """
        cfg, store = self.config, self.store
        plan: list[tuple[int, int]] = []
        total_slices: dict[int, int] = {}
        with store.read() as txn:
            live = store.live(txn)
            all_slices = [self.shard_slices(txn, shard) for shard in range(cfg.shards)]
            # Before the first training, a shard smaller than R is a configuration mistake;
            # after deletions it is a fact to handle (an empty shard simply has no model).
            if not store.meta(txn).get("trained"):
                check_shard_sizes(cfg, [sum(len(s) for s in slice_ids) for slice_ids in all_slices])
            for shard, slice_ids in enumerate(all_slices):
                if shards is not None and shard not in shards:
                    continue
                if sum(len(s) for s in slice_ids) == 0:
                    report.empty.append(shard)
                    continue
                done, parent = self.valid_stages(txn, shard, slice_ids)
                if done == len(slice_ids) and shard in live and parent and live[shard]["key"] == parent["key"]:
                    report.skipped.append(shard)
                    continue
                # All stages valid but no live pointer (retired by a deletion that touched
                # only later data, say): replay the last stage, which re-derives the same bytes.
                plan.append((shard, min(done, len(slice_ids) - 1)))
                total_slices[shard] = len(slice_ids)
        return plan, total_slices, all_slices

    def _committer(
        self, report: FitReport, total_slices: Mapping[int, int], progress: Progress | None
    ) -> Callable[[StageResult], None]:
        """What commits each stage a fit receives (one write transaction each), counted in ``report``."""
        store = self.store

        def commit(result: StageResult) -> None:
            record, last = stage_record(result), result.stage == total_slices[result.shard]
            sealed = store.seal_checkpoint(result.checkpoint, record["key"])  # its key is committed first

            def change(txn: Any) -> None:
                store.commit_stage(txn, record, sealed, last)
                store.put_meta(txn, trained=True)  # from now on, small shards come from deletions

            store.write(change)
            report.trained.setdefault(result.shard, []).append(result.stage)
            report.stage_seconds += result.seconds
            if progress is not None:
                progress(result)

        return commit

    def _rebinder(self, report: FitReport) -> Callable[[ShardJob, list[Domain]], ShardJob]:
        """What a fit does with a job whose determinism domain has no node: refuse, or rebind it (in ``report``)."""
        cfg, store = self.config, self.store

        def unavailable(job: ShardJob, available: list[Domain]) -> ShardJob:
            with store.read() as txn:
                needed = (store.stage_record(txn, job.shard, job.start_stage) or {}).get("domain")
            if cfg.resources.on_missing_domain == "refuse":
                raise DomainUnavailableError(unavailable_message(job.shard, needed, job.domain or "?", available))
            # Rebind: from scratch wherever nodes exist; stage 1's key names the new domain, so
            # committing it drops every stage of the old chain (they descend from another domain).
            reason = missing_reason(needed, job.domain or "?", available)
            log.info("rebinding shard %d (retraining it from scratch): %s", job.shard, reason)
            report.rebound[job.shard] = {"from_domain": job.domain, "reason": reason}
            return replace(job, start_stage=0, parent=None, parent_key=None, domain=None)

        return unavailable
