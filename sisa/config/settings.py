"""The config schema: frozen dataclasses, one per section, each field declared with its role.

Every section validates itself in ``__post_init__`` and says how to fix a bad value.
Each field says how it bears on an existing store (:mod:`sisa.config.fields`: part of
the recipe, fixed at creation, or free to change). Loading from YAML is
:mod:`sisa.config.loader`; the recipe built from these fields is :func:`sisa.store.digests.recipe`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sisa.config.fields import FIXED, FREE, RECIPE, field_roles, setting
from sisa.config.rules import choice as _choice
from sisa.config.rules import require as _require

__all__ = [
    "FIELD_ROLES",
    "AggregateConfig",
    "BackboneConfig",
    "DataConfig",
    "ModelConfig",
    "PartitionConfig",
    "ResourcesConfig",
    "SisaConfig",
    "TrainConfig",
    "UnlearnConfig",
    "graph_form",
]

DATASETS = ("fashion-mnist", "npz", "csv", "idx", "parquet")
OPTIMIZERS = ("adam", "sgd")
EPOCH_SCHEDULES = ("recalibrated", "constant")
PRECISIONS = ("fp32", "bf16")
PARTITION_STRATEGIES = ("uniform", "distribution-aware")
SLICE_ORDERS = ("hashed", "probability")
GRAPH_KINDS = ("none", "ring", "random")  # partition.graph: none, ring:k or random:k (sisa.partition.graph)
AGGREGATE_METHODS = ("mean", "vote", "weighted", "combiner")
AGGREGATE_BACKENDS = ("auto", "vmap", "loop")
UNLEARN_POLICIES = ("exclude", "serve-clean", "serve-stale")
MISSING_DOMAIN_ACTIONS = ("rebind", "refuse")
BACKBONE_SOURCES = ("none", "pretrained", "core")
ADAPTERS = ("none", "head", "lora")
# CPU kernel levels of `resources.cpu_isa`: `native` pins nothing (each node's own best
# kernels); the others pin ATen, MKL and oneDNN (sisa.train.domain holds the switches).
CPU_ISAS = ("native", "avx2", "baseline")
# Ray resources that have their own task option (num_cpus, num_gpus, memory): never in resources.custom.
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


@dataclass(frozen=True)
class DataConfig:
    """Where training and test data come from.

    Attributes:
        dataset: ``fashion-mnist`` (built in), ``npz``, ``csv``, ``idx`` or ``parquet``
            (needs pyarrow: ``pip install sisa[data]``).
        train: Path of the training file (npz/csv) or IDX images file.
        test: Path of the test file (npz/csv) or IDX images file.
        train_labels: IDX labels file for ``train`` (``idx`` only).
        test_labels: IDX labels file for ``test`` (``idx`` only).
        root: Directory holding the Fashion-MNIST files (default: the Debian
            package's directory, then a download cache).
        num_classes: Number of classes; labels must lie in ``[0, num_classes)``.
        label_column: CSV / Parquet column holding the label.
        id_column: CSV / Parquet column holding the sample id (default: row number).
        feature_columns: Parquet columns holding the features: one column of arrays
            (a tensor per row) or several scalar columns, stacked in this order; default:
            every column but the label and id columns.
        train_limit: Use only the first N training samples (quick runs, tests).
        test_limit: Use only the first N test samples.
    """

    # Where data is read from is free: what a store holds is the samples themselves.
    dataset: str = setting("fashion-mnist", role=FREE)
    train: str | None = setting(None, role=FREE)
    test: str | None = setting(None, role=FREE)
    train_labels: str | None = setting(None, role=FREE)
    test_labels: str | None = setting(None, role=FREE)
    root: str | None = setting(None, role=FREE)
    # The stored labels were checked against it, and it sizes every model's output layer: another value is
    # another task (a new store); fixed, which also keeps it out of the recipe, so no stored key changes.
    num_classes: int = setting(10, role=FIXED)
    label_column: str = setting("label", role=FREE)
    id_column: str | None = setting(None, role=FREE)
    feature_columns: tuple[str, ...] | None = setting(None, role=FREE)
    train_limit: int | None = setting(None, role=FREE)
    test_limit: int | None = setting(None, role=FREE)

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, DATASETS)
        _require(self.num_classes >= 2, f"data.num_classes={self.num_classes} must be >= 2")
        _require(
            self.feature_columns is None or (self.dataset == "parquet" and len(self.feature_columns) > 0),
            f"data.feature_columns={self.feature_columns} names the feature columns of a parquet file: set "
            "data.dataset: parquet, or drop it (csv takes every column but the label and id columns)",
        )
        if self.dataset in ("npz", "csv", "idx", "parquet"):
            _require(self.train is not None, f"data.dataset={self.dataset!r} needs data.train=PATH")
        if self.dataset == "idx":
            _require(self.train_labels is not None, "data.dataset='idx' needs data.train_labels=PATH")
        for name in ("train_limit", "test_limit"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"data.{name}={value} must be >= 1 or null")


@dataclass(frozen=True)
class ModelConfig:
    """Which network each shard trains.

    Attributes:
        name: ``mlp``, ``cnn``, or ``"package.module:callable"`` returning an
            ``nn.Module``; the callable is called as
            ``f(input_shape=..., num_classes=..., **options)``: each entry of ``options``
            is a keyword argument of its own.
        hidden: Hidden layer widths of the MLP, or the fully connected width(s) of the CNN.
        channels: Convolution channels of the CNN.
        dropout: Dropout probability before the output layer.
        options: Extra keyword arguments for a custom callable, spread into its call.
        adapter: What each shard trains on a shared backbone (``backbone.source`` other than
            none): ``none`` (no backbone: the whole network), ``head`` (a head on the
            backbone's features) or ``lora`` (low-rank adapters on backbone layers, plus a head).
        rank: The LoRA rank (``lora`` only).
        alpha: The LoRA scale numerator: adapters add ``alpha / rank`` times their product.
        targets: Names of the backbone layers that get LoRA adapters (``lora`` only; empty: every
            linear and convolution layer).
    """

    name: str = setting("mlp", role=RECIPE)
    hidden: tuple[int, ...] = setting((128,), role=RECIPE)
    channels: tuple[int, ...] = setting((32, 64), role=RECIPE)
    dropout: float = setting(0.0, role=RECIPE)
    options: dict[str, Any] = setting(role=RECIPE, factory=dict)
    adapter: str = setting("none", role=RECIPE)
    rank: int = setting(4, role=RECIPE)
    alpha: float = setting(8.0, role=RECIPE)
    targets: tuple[str, ...] = setting((), role=RECIPE)

    def __post_init__(self) -> None:
        _require(
            self.name in ("mlp", "cnn") or ":" in self.name,
            f"model.name={self.name!r} is unknown; use 'mlp', 'cnn' or 'package.module:callable'",
        )
        _require(all(h >= 1 for h in self.hidden), f"model.hidden={self.hidden} must be positive")
        _require(all(c >= 1 for c in self.channels), f"model.channels={self.channels} must be positive")
        _require(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        _choice("model.adapter", self.adapter, ADAPTERS)
        _require(self.rank >= 1, f"model.rank={self.rank} must be >= 1 (the LoRA rank)")
        _require(self.alpha > 0 and math.isfinite(self.alpha), f"model.alpha={self.alpha} must be > 0 and finite")
        _require(
            self.adapter == "lora" or not self.targets,
            "model.targets names the backbone layers that get LoRA adapters; set model.adapter: lora or remove it",
        )


@dataclass(frozen=True)
class BackboneConfig:
    """A frozen network shared by every shard; each shard trains only a head or adapters on it.

    A backbone that never saw deletable data can serve every shard without breaking
    exactness: a deletion retrains only the per-shard part (``model.adapter``).

    Attributes:
        source: ``none`` (default: each shard trains ``model`` whole), ``pretrained``
            (``name`` is a ``package.module:callable`` returning the user's pretrained
            ``nn.Module``, e.g. weights loaded from a local file), or ``core`` (sisa trains
            ``name`` once on the store's core set: ids declared at ingest, never deletable).
        name: ``mlp`` or ``cnn`` (the built-in networks without their output layer; with
            ``source: core`` only) or ``package.module:callable``, called as
            ``f(input_shape=..., **options)``; the module maps a batch of samples to features.
        options: Keyword arguments of the callable.
        hidden: Fully connected widths of a built-in backbone (after the CNN's convolutions).
        channels: Convolution channels of the built-in ``cnn`` backbone.
        epochs: Epochs of the core-set training (``source: core``); the optimizer, learning
            rate and batch size are the ``train`` section's.
    """

    # Its settings and its weights' digest are in the recipe.
    source: str = setting("none", role=RECIPE)
    name: str | None = setting(None, role=RECIPE)
    options: dict[str, Any] = setting(role=RECIPE, factory=dict)
    hidden: tuple[int, ...] = setting((128,), role=RECIPE)
    channels: tuple[int, ...] = setting((32, 64), role=RECIPE)
    epochs: int = setting(10, role=RECIPE)

    def __post_init__(self) -> None:
        _choice("backbone.source", self.source, BACKBONE_SOURCES)
        if self.source == "pretrained":
            _require(
                self.name is not None and ":" in self.name,
                f"backbone.source: pretrained needs backbone.name: 'package.module:callable' returning your "
                f"pretrained nn.Module; got {self.name!r}",
            )
        if self.source == "core":
            _require(
                self.name is not None and (self.name in ("mlp", "cnn") or ":" in self.name),
                f"backbone.source: core needs backbone.name: mlp, cnn or 'package.module:callable' (the network "
                f"sisa trains on the core set); got {self.name!r}",
            )
        _require(all(h >= 1 for h in self.hidden), f"backbone.hidden={self.hidden} must be positive")
        _require(all(c >= 1 for c in self.channels), f"backbone.channels={self.channels} must be positive")
        _require(self.epochs >= 1, f"backbone.epochs={self.epochs} must be >= 1")

    @property
    def enabled(self) -> bool:
        """Whether the shards share a backbone."""
        return self.source != "none"


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe of every shard.

    Attributes:
        epochs: Epochs an unsliced model would train for.
        epoch_schedule: ``recalibrated`` trains each of the R stages for
            ``max(1, round(2 * epochs / (R + 1)))`` epochs (2R/(R+1) x epochs in all,
            the paper's recalibration, same compute as unsliced training);
            ``constant`` trains every stage for ``epochs`` epochs.
        batch_size: Mini-batch size.
        optimizer: ``adam`` or ``sgd``.
        lr: Learning rate.
        weight_decay: L2 penalty.
        momentum: SGD momentum (ignored by Adam).
        precision: ``fp32`` (default) or ``bf16``: forward and loss under
            ``torch.autocast(dtype=torch.bfloat16)`` on the shard's device (CPU or CUDA);
            weights and optimizer state stay fp32. Part of the recipe: bf16 gives other
            (still bit-reproducible) weights.
    """

    epochs: int = setting(10, role=RECIPE)
    epoch_schedule: str = setting("recalibrated", role=RECIPE)
    batch_size: int = setting(64, role=RECIPE)
    optimizer: str = setting("adam", role=RECIPE)
    lr: float = setting(1e-3, role=RECIPE)
    weight_decay: float = setting(0.0, role=RECIPE)
    momentum: float = setting(0.9, role=RECIPE)
    precision: str = setting("fp32", role=RECIPE)

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, f"train.epochs={self.epochs} must be >= 1")
        _choice("train.epoch_schedule", self.epoch_schedule, EPOCH_SCHEDULES)
        _require(self.batch_size >= 1, f"train.batch_size={self.batch_size} must be >= 1")
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _require(self.lr > 0 and math.isfinite(self.lr), f"train.lr={self.lr} must be > 0 and finite")
        _require(
            self.weight_decay >= 0 and math.isfinite(self.weight_decay),
            f"train.weight_decay={self.weight_decay} must be >= 0 and finite",
        )
        _require(0 <= self.momentum < 1, f"train.momentum={self.momentum} must be in [0, 1)")
        _choice("train.precision", self.precision, PRECISIONS)

    def stage_epochs(self, slices: int) -> int:
        """Epochs each of the ``slices`` stages trains for.

        Args:
            slices: Number of slices R of a shard.

        Returns:
            The per-stage epoch count under the configured schedule.
        """
        if self.epoch_schedule == "constant":
            return self.epochs
        return max(1, round(2 * self.epochs / (slices + 1)))


def graph_form(spec: str) -> tuple[str, int]:
    """``partition.graph`` parsed: ``("none", 0)``, ``("ring", k)`` or ``("random", k)`` with k >= 1.

    Raises:
        ConfigError: On any other form, naming the allowed ones (``k < shards`` is checked with the shards).
    """
    allowed = "none, ring:k or random:k (k: how many other shards each shard trains with, 1 <= k < shards)"
    _require(isinstance(spec, str), f"partition.graph={spec!r} must be a string: {allowed}")
    if spec == "none":
        return "none", 0
    kind, sep, count = spec.partition(":")
    ok = sep == ":" and kind in GRAPH_KINDS[1:] and count.isascii() and count.isdigit() and int(count) >= 1
    _require(ok, f"partition.graph={spec!r} is not allowed; use {allowed}")
    return kind, int(count)


@dataclass(frozen=True)
class PartitionConfig:
    """How samples are assigned to shards and slices.

    Attributes:
        strategy: ``uniform``: a pure function of (seed, sample id).
            ``distribution-aware``: SISA's Algorithm 1, shards filled in order of rising
            deletion probability so each expects about the same number of deletion
            requests (see docs/sharding.md); needs a deletion prior.
        probabilities: Deletion prior file for ``distribution-aware``: a ``.csv`` with
            the header ``id,probability`` or an ``.npz`` with arrays ``ids`` and
            ``probability``. ``Ensemble.ingest(..., probabilities=...)`` overrides it;
            without either, ingest refuses with the fix (the CLI needs the file).
        bound: The bound C on each shard's expected number of deletions
            (``distribution-aware`` only; > 0). Unset: total mass / shards, and the
            last shard takes the rest. Set: it must cut the data into exactly
            ``shards`` shards, or ingest says how many it yields.
        slice_order: ``hashed``: each sample's slice is an independent hashed draw.
            ``probability``: within each shard, an ingest's samples are sorted by
            deletion probability (rising) and cut into R equal slices, so the samples
            most likely to be deleted sit in the last slice and their deletion retrains
            only the last stages (the paper's "partition and order data"). Needs a
            deletion prior, with either strategy.
        graph: Shard graph (docs/sharding.md, "Shard graphs"): ``none`` (each shard trains
            on its own slices), ``ring:k`` (shard s also trains on the slices of shards
            s+1..s+k mod S) or ``random:k`` (on those of k other shards drawn from the
            seed). A deletion retrains every shard that trained on the id; 1 <= k < shards.
    """

    # Where samples live: the partition is persisted at ingest.
    strategy: str = setting("uniform", role=FIXED)
    # Read only at ingest; every placement is persisted, so another file (one covering data to add) moves nothing.
    probabilities: str | None = setting(None, role=FREE)
    bound: float | None = setting(None, role=FIXED)
    slice_order: str = setting("hashed", role=FIXED)
    # Which shards' slices each shard trains on. Not in the recipe: the manifests (so every checkpoint key)
    # cover the ids a shard trains on, links included, so `none` keeps every key of a store made before it.
    graph: str = setting("none", role=FIXED)

    def __post_init__(self) -> None:
        _choice("partition.strategy", self.strategy, PARTITION_STRATEGIES)
        _choice("partition.slice_order", self.slice_order, SLICE_ORDERS)
        graph_form(self.graph)
        aware = self.strategy == "distribution-aware"
        _require(
            self.bound is None or (self.bound > 0 and math.isfinite(self.bound)),
            f"partition.bound={self.bound} must be > 0 and finite (an expected number of deletions per shard), or null",
        )
        _require(
            aware or self.bound is None,
            "partition.bound only applies to partition.strategy: distribution-aware; set that strategy or remove it",
        )
        _require(
            aware or self.slice_order == "probability" or self.probabilities is None,
            "partition.probabilities only applies to partition.strategy: distribution-aware or "
            "partition.slice_order: probability; set one of them or remove it",
        )

    @property
    def uses_prior(self) -> bool:
        """Whether placement reads a deletion prior (shards by Algorithm 1, or slices by probability)."""
        return self.strategy == "distribution-aware" or self.slice_order == "probability"


@dataclass(frozen=True)
class AggregateConfig:
    """How shard predictions are combined.

    Attributes:
        method: ``mean`` of probabilities (default), label ``vote``, ``weighted`` mean by
            shard size, or ``combiner``: per-shard, per-class weights over the shards'
            log-probabilities, fitted (deterministically) on the core set, so it needs
            ``backbone.source: core``. It is refitted whenever a live model changes and
            never outlives the models it was fitted on (see :mod:`sisa.train.combiner`).
        backend: ``vmap`` (one batched forward over stacked weights), ``loop``
            (one forward per shard), or ``auto`` (measured choice per device and batch).
    """

    method: str = setting("mean", role=FREE)
    backend: str = setting("auto", role=FREE)

    def __post_init__(self) -> None:
        _choice("aggregate.method", self.method, AGGREGATE_METHODS)
        _choice("aggregate.backend", self.backend, AGGREGATE_BACKENDS)


@dataclass(frozen=True)
class UnlearnConfig:
    """What happens between a deletion request and the end of its retrain.

    Attributes:
        policy: ``exclude`` (default): a shard whose live model saw a deleted id leaves
            the ensemble the instant the request is journaled, until it is retrained.
            ``serve-clean``: it serves, in the same instant, its last stage checkpoint
            that never saw a deleted id (trained on the slices before the first one
            holding one), until the retrain finishes; no leak, a weaker model of fewer slices. A
            shard whose first slice holds a deleted id has no such checkpoint and leaves.
            ``serve-stale``: it keeps serving its old model until the retrain finishes;
            predictions in that window still carry the deleted samples' influence (and
            can leak their membership), so use it only where availability outweighs that.
    """

    policy: str = setting("exclude", role=FREE)

    def __post_init__(self) -> None:
        _choice("unlearn.policy", self.policy, UNLEARN_POLICIES)


@dataclass(frozen=True)
class ResourcesConfig:
    """What each shard's Ray task may use.

    Attributes:
        cpus_per_shard: Ray ``num_cpus`` of a shard task.
        gpus_per_shard: Ray ``num_gpus`` of a shard task; fractions pack shards on
            one GPU; 0 trains on the CPU.
        threads_per_shard: torch intra-op threads; part of the recipe, because
            results differ in the last bits between thread counts.
        max_retries: Resubmissions of a shard task whose worker or node died; each
            resumes after the last stage the driver received.
        custom: Ray custom resources each shard task requires, e.g. ``{sisa_worker: 1}``
            to run shards only on nodes started with ``--resources='{"sisa_worker": N}'``
            (see docs/cluster.md). Placement only: not part of the recipe.
        stream_slices: Ship each slice to the object store as its own object; the
            task fetches slice r when stage r starts (and prefetches r+1 while it
            trains), and the driver holds one slice at a time instead of a whole
            shard. For large shards; the bytes are the same either way.
        max_shards_in_flight: At most this many shard tasks submitted at once (0 = all).
            Bounds what the driver node's object store holds to that many shards'
            data; 0 lets an autoscaler see the whole demand at once.
        cpu_isa: CPU kernel level every shard worker is pinned to before torch loads
            (``ATEN_CPU_CAPABILITY``, ``MKL_CBWR``, ``ONEDNN_MAX_CPU_ISA``), so that x86-64
            nodes of different generations train bit-identical weights: ``avx2`` (default,
            any x86-64 CPU since 2013-2015), ``baseline`` (no SIMD kernels: slowest, for
            pre-AVX2 nodes) or ``native`` (each node's best kernels: faster convolutions,
            but a shard can then be retrained and verified only on nodes like the one that
            trained it). Part of the recipe. See docs/cluster.md, "What verify proves".
        on_missing_domain: What a retrain does when no node of the shard's determinism
            domain is available: ``rebind`` (default) retrains the shard from scratch in an
            available domain, so a deletion still completes exactly (its certificate says
            ``rebound``); ``refuse`` stops with an error naming the domain it needs, and the
            request stays pending until such a node joins. ``verify`` never rebinds.
    """

    cpus_per_shard: float = setting(1.0, role=FREE)
    gpus_per_shard: float = setting(0.0, role=RECIPE)  # through the device: 0 trains on the CPU, > 0 on CUDA
    threads_per_shard: int = setting(1, role=RECIPE)
    max_retries: int = setting(3, role=FREE)
    custom: dict[str, float] = setting(role=FREE, factory=dict)
    stream_slices: bool = setting(False, role=FREE)
    max_shards_in_flight: int = setting(0, role=FREE)
    cpu_isa: str = setting("avx2", role=RECIPE)
    on_missing_domain: str = setting("rebind", role=FREE)

    def __post_init__(self) -> None:
        _require(
            self.cpus_per_shard > 0 and math.isfinite(self.cpus_per_shard),
            f"resources.cpus_per_shard={self.cpus_per_shard} must be > 0 and finite",
        )
        _require(
            0 <= self.gpus_per_shard <= 1 or float(self.gpus_per_shard).is_integer(),
            f"resources.gpus_per_shard={self.gpus_per_shard} must be a fraction in [0, 1] or a whole number",
        )
        _require(
            self.threads_per_shard >= 1,
            f"resources.threads_per_shard={self.threads_per_shard} must be >= 1",
        )
        _require(self.max_retries >= 0, f"resources.max_retries={self.max_retries} must be >= 0")
        _require(
            self.max_shards_in_flight >= 0,
            f"resources.max_shards_in_flight={self.max_shards_in_flight} must be >= 0 (0 submits every shard at once)",
        )
        _choice("resources.cpu_isa", self.cpu_isa, CPU_ISAS)
        _choice("resources.on_missing_domain", self.on_missing_domain, MISSING_DOMAIN_ACTIONS)
        for name, amount in self.custom.items():
            where = f"resources.custom.{name}"
            _require(
                isinstance(name, str) and name.strip() == name and name != "",
                f"resources.custom key {name!r} must be a non-empty resource name without surrounding spaces",
            )
            _require(
                name not in RAY_BUILTIN_RESOURCES,
                f"{where}: {name} is a Ray built-in resource; set it with resources.cpus_per_shard or "
                f"resources.gpus_per_shard, and use custom only for your own node labels such as sisa_worker",
            )
            _require(
                isinstance(amount, (int, float)) and not isinstance(amount, bool),
                f"{where}={amount!r} must be a number, e.g. 1",
            )
            _require(
                math.isfinite(amount) and amount > 0 and (amount <= 1 or float(amount).is_integer()),
                f"{where}={amount} must be a fraction in (0, 1] or a whole number (Ray's rule for resource amounts)",
            )

    @property
    def device(self) -> str:
        """``cuda`` when shards get a GPU share, else ``cpu``."""
        return "cuda" if self.gpus_per_shard > 0 else "cpu"


@dataclass(frozen=True)
class SisaConfig:
    """Everything that defines a SISA ensemble.

    Attributes:
        seed: Root seed of the partition and of every training stage.
        shards: Number of shards S.
        slices: Number of slices R per shard.
    """

    # Where samples live (the partition is persisted at ingest); the seed also seeds every stage.
    seed: int = setting(0, role=FIXED)
    shards: int = setting(8, role=FIXED)
    slices: int = setting(4, role=FIXED)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)

    def __post_init__(self) -> None:
        _require(0 <= self.seed < 2**63, f"seed={self.seed} must be in [0, 2**63)")
        _require(1 <= self.shards <= 4096, f"shards={self.shards} must be in [1, 4096]")
        _require(1 <= self.slices <= 1024, f"slices={self.slices} must be in [1, 1024]")
        kind, links = graph_form(self.partition.graph)
        _require(
            kind == "none" or links < self.shards,
            f"partition.graph={self.partition.graph!r} links each shard to {links} others, and there are "
            f"{self.shards - 1} other shards: use k in [1, {self.shards - 1}]"
            + (" (or none)" if self.shards > 1 else "; with one shard only none is allowed"),
        )
        _require(
            not self.backbone.enabled or self.model.adapter != "none",
            f"backbone.source: {self.backbone.source} shares a frozen backbone, so each shard trains only a "
            "per-shard part: set model.adapter: head (a head on the backbone's features) or lora (low-rank "
            "adapters on backbone layers, plus a head)",
        )
        _require(
            self.aggregate.method != "combiner" or self.backbone.source == "core",
            f"aggregate.method: combiner is fitted on the core set, and backbone.source is {self.backbone.source}: "
            "set backbone.source: core (with backbone.name and model.adapter, and core ids at ingest), or choose "
            "aggregate.method: mean, vote or weighted",
        )
        _require(
            self.backbone.enabled or self.model.adapter == "none",
            f"model.adapter: {self.model.adapter} adapts a shared backbone, and backbone.source is none: set "
            "backbone.source: pretrained or core (with backbone.name), or model.adapter: none",
        )


# Every leaf field by dotted name with its role (recipe, fixed, free), read from the fields' metadata;
# building it here refuses, at import, a field declared without a role.
FIELD_ROLES: Mapping[str, str] = MappingProxyType(field_roles(SisaConfig))
