"""Frozen configuration dataclasses, loaded from YAML with dotted ``key=value`` overrides.

Every section validates itself in ``__post_init__`` and says how to fix a bad value;
unknown keys are rejected with the list of allowed ones, so a typo never silently
falls back to a default. A config file may also hold sections of higher layers
(:data:`OTHER_SECTIONS`: ``evaluate``), which :func:`config_from_dict` sets aside for
them; :func:`build_config`, :func:`config_tree` and :func:`read_config_file` are the
pieces those layers load their own sections with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sisa.config.rules import choice as _choice
from sisa.config.rules import load_yaml as _load_yaml
from sisa.config.rules import require as _require
from sisa.errors import ConfigError

__all__ = [
    "FIELD_ROLES",
    "FIXED",
    "FREE",
    "OTHER_SECTIONS",
    "RECIPE",
    "AggregateConfig",
    "BackboneConfig",
    "DataConfig",
    "ModelConfig",
    "PartitionConfig",
    "ResourcesConfig",
    "SisaConfig",
    "TrainConfig",
    "UnlearnConfig",
    "build_config",
    "config_fields",
    "config_from_dict",
    "config_to_dict",
    "config_tree",
    "fixed_changes",
    "load_config",
    "read_config_file",
]

DATASETS = ("fashion-mnist", "npz", "csv", "idx", "parquet")
OPTIMIZERS = ("adam", "sgd")
EPOCH_SCHEDULES = ("recalibrated", "constant")
PRECISIONS = ("fp32", "bf16")
PARTITION_STRATEGIES = ("uniform", "distribution-aware")
SLICE_ORDERS = ("hashed", "probability")
AGGREGATE_METHODS = ("mean", "vote", "weighted")
AGGREGATE_BACKENDS = ("auto", "vmap", "loop")
UNLEARN_POLICIES = ("exclude", "serve-clean", "serve-stale")
MISSING_DOMAIN_ACTIONS = ("rebind", "refuse")
BACKBONE_SOURCES = ("none", "pretrained", "core")
ADAPTERS = ("none", "head", "lora")
# Ray resources that have their own task option (num_cpus, num_gpus, memory): never in resources.custom.
# CPU kernel levels of `resources.cpu_isa`: `native` pins nothing (each node's own best
# kernels); the others pin ATen, MKL and oneDNN (sisa.train.domain holds the switches).
CPU_ISAS = ("native", "avx2", "baseline")
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
# Top-level sections of a config file that belong to a higher layer, not to SisaConfig: the loader sets
# them aside unread (that layer loads and validates them), so they never reach a store or a shard task.
# `evaluate`: the harness's settings, sisa.evaluate.settings.load_evaluate_config.
OTHER_SECTIONS = ("evaluate",)


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

    dataset: str = "fashion-mnist"
    train: str | None = None
    test: str | None = None
    train_labels: str | None = None
    test_labels: str | None = None
    root: str | None = None
    num_classes: int = 10
    label_column: str = "label"
    id_column: str | None = None
    feature_columns: tuple[str, ...] | None = None
    train_limit: int | None = None
    test_limit: int | None = None

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
    """

    name: str = "mlp"
    hidden: tuple[int, ...] = (128,)
    channels: tuple[int, ...] = (32, 64)
    dropout: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    adapter: str = "none"
    rank: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = ()

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

    def recipe(self) -> dict[str, Any]:
        """This section as it enters the recipe: the adapter keys only when an adapter is set.

        Leaving them out of a plain model's recipe keeps the checkpoint keys of stores from
        before adapters existed.
        """
        out = config_to_dict(self)
        if self.adapter == "none":
            for name in ("adapter", "rank", "alpha", "targets"):
                del out[name]
        elif self.adapter == "head":
            for name in ("rank", "alpha", "targets"):
                del out[name]  # a head has no LoRA: these cannot change its bytes
        return out


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

    source: str = "none"
    name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    hidden: tuple[int, ...] = (128,)
    channels: tuple[int, ...] = (32, 64)
    epochs: int = 10

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

    epochs: int = 10
    epoch_schedule: str = "recalibrated"
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    precision: str = "fp32"

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
    """

    strategy: str = "uniform"
    probabilities: str | None = None
    bound: float | None = None
    slice_order: str = "hashed"

    def __post_init__(self) -> None:
        _choice("partition.strategy", self.strategy, PARTITION_STRATEGIES)
        _choice("partition.slice_order", self.slice_order, SLICE_ORDERS)
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
        method: ``mean`` of probabilities (default), label ``vote``, or
            ``weighted`` mean by shard size.
        backend: ``vmap`` (one batched forward over stacked weights), ``loop``
            (one forward per shard), or ``auto`` (measured choice per device and batch).
    """

    method: str = "mean"
    backend: str = "auto"

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

    policy: str = "exclude"

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

    cpus_per_shard: float = 1.0
    gpus_per_shard: float = 0.0
    threads_per_shard: int = 1
    max_retries: int = 3
    custom: dict[str, float] = field(default_factory=dict)
    stream_slices: bool = False
    max_shards_in_flight: int = 0
    cpu_isa: str = "avx2"
    on_missing_domain: str = "rebind"

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

    seed: int = 0
    shards: int = 8
    slices: int = 4
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
        _require(
            not self.backbone.enabled or self.model.adapter != "none",
            f"backbone.source: {self.backbone.source} shares a frozen backbone, so each shard trains only a "
            "per-shard part: set model.adapter: head (a head on the backbone's features) or lora (low-rank "
            "adapters on backbone layers, plus a head)",
        )
        _require(
            self.backbone.enabled or self.model.adapter == "none",
            f"model.adapter: {self.model.adapter} adapts a shared backbone, and backbone.source is none: set "
            "backbone.source: pretrained or core (with backbone.name), or model.adapter: none",
        )

    def recipe(self, backbone: str | None = None) -> dict[str, Any]:
        """The settings that determine a shard's weights, bit for bit.

        Args:
            backbone: Digest of the shared backbone's weights (``backbone.source`` other than
                none); it enters the recipe, so a changed backbone changes every checkpoint key.

        Returns:
            A JSON-able dict; its digest is part of every checkpoint key, so a
            checkpoint is never reused under another recipe.

        Raises:
            ConfigError: If the config has a backbone and no digest is given (or the reverse).
        """
        _require(
            (backbone is not None) == self.backbone.enabled,
            "a recipe with a shared backbone needs the backbone's digest (and one without takes none)",
        )
        train = config_to_dict(self.train)
        if train["precision"] == "fp32":
            # The default is left out, so recipes (and checkpoint keys) from before the key existed still match.
            del train["precision"]
        recipe = {
            "seed": self.seed,
            "model": self.model.recipe(),
            "train": train,
            "threads": self.resources.threads_per_shard,
            "device": self.resources.device,
        }
        if self.resources.cpu_isa != "native":
            # Stores from before the key existed trained natively; leaving native out keeps their keys.
            recipe["cpu_isa"] = self.resources.cpu_isa
        if backbone is not None:
            recipe["backbone"] = {**config_to_dict(self.backbone), "digest": backbone}
        return recipe

    def recipe_digest(self, backbone: str | None = None) -> str:
        """Hex SHA-256 of the canonical JSON of :meth:`recipe` (``backbone``: the backbone's digest)."""
        blob = json.dumps(self.recipe(backbone), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


# How each config field bears on an existing store. Every leaf field of SisaConfig is listed
# (tests/config/test_config.py walks the dataclasses and fails on one that is not), so a new field
# must be placed here, in the recipe or in the fixed set, before it can ship.
RECIPE = "recipe"  # changes the trained bytes: part of SisaConfig.recipe(), so every checkpoint key covers it
FIXED = "fixed"  # decided when the store is created; Ensemble.reconfigure (and `sisa train k=v`) refuses a change
FREE = "free"  # neither: changing it on an existing store retrains nothing and moves nothing
FIELD_ROLES: dict[str, str] = {
    # where samples live (the partition is persisted at ingest); seed also seeds every stage
    "seed": FIXED,
    "shards": FIXED,
    "slices": FIXED,
    "partition.strategy": FIXED,
    "partition.bound": FIXED,
    "partition.slice_order": FIXED,
    # read only at ingest; every placement is persisted, so another file (one covering data to add) moves nothing
    "partition.probabilities": FREE,
    # the labels stored were checked against it, and it sizes every model's output layer: another value
    # is another task (a new store); refusing it also keeps it out of the recipe, so no stored key changes
    "data.num_classes": FIXED,
    # where data is read from; what is stored is the samples themselves
    "data.dataset": FREE,
    "data.train": FREE,
    "data.test": FREE,
    "data.train_labels": FREE,
    "data.test_labels": FREE,
    "data.root": FREE,
    "data.label_column": FREE,
    "data.id_column": FREE,
    "data.feature_columns": FREE,
    "data.train_limit": FREE,
    "data.test_limit": FREE,
    "model.name": RECIPE,
    "model.hidden": RECIPE,
    "model.channels": RECIPE,
    "model.dropout": RECIPE,
    "model.options": RECIPE,
    "model.adapter": RECIPE,
    "model.rank": RECIPE,
    "model.alpha": RECIPE,
    "model.targets": RECIPE,
    # the shared backbone: its settings and its weights' digest are in the recipe
    "backbone.source": RECIPE,
    "backbone.name": RECIPE,
    "backbone.options": RECIPE,
    "backbone.hidden": RECIPE,
    "backbone.channels": RECIPE,
    "backbone.epochs": RECIPE,
    "train.epochs": RECIPE,
    "train.epoch_schedule": RECIPE,
    "train.batch_size": RECIPE,
    "train.optimizer": RECIPE,
    "train.lr": RECIPE,
    "train.weight_decay": RECIPE,
    "train.momentum": RECIPE,
    "train.precision": RECIPE,
    "aggregate.method": FREE,
    "aggregate.backend": FREE,
    "unlearn.policy": FREE,
    "resources.cpus_per_shard": FREE,
    "resources.gpus_per_shard": RECIPE,  # through the device: 0 trains on the CPU, > 0 on CUDA
    "resources.threads_per_shard": RECIPE,
    "resources.max_retries": FREE,
    "resources.custom": FREE,
    "resources.stream_slices": FREE,
    "resources.max_shards_in_flight": FREE,
    "resources.cpu_isa": RECIPE,
    "resources.on_missing_domain": FREE,
}


def config_fields(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of a config dataclass by dotted name (``train.lr``), with its value.

    Mappings (``model.options``, ``resources.custom``) are leaves, not walked into.
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(config_fields(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def fixed_changes(old: SisaConfig, new: SisaConfig) -> list[str]:
    """The fields fixed at a store's creation (:data:`FIELD_ROLES`) that differ between two configs.

    A field missing from :data:`FIELD_ROLES` counts as fixed, so an unclassified field is refused, never let slip.
    """
    before, after = config_fields(old), config_fields(new)
    return [name for name in before if FIELD_ROLES.get(name, FIXED) == FIXED and before[name] != after[name]]


T = TypeVar("T")

# Scalar annotation -> (whether a YAML value is one, what the message calls it, the conversion).
# A bool is never taken for a number.
_SCALARS: dict[type, tuple[Callable[[Any], bool], str, Callable[[Any], Any]]] = {
    bool: (lambda v: isinstance(v, bool), "true or false", lambda v: v),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", lambda v: v),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number", float),
    str: (lambda v: isinstance(v, str), "a string", lambda v: v),
}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping of keys, got {value!r}")
        return build_config(hint, value, where + ".")  # type: ignore[arg-type]
    if origin is tuple:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    scalar = _SCALARS.get(hint) if isinstance(hint, type) else None
    if scalar is not None:
        accepts, kind, convert = scalar
        if not accepts(value):
            raise ConfigError(f"{where} must be {kind}, got {value!r}")
        return convert(value)
    return value


def build_config(cls: type[T], raw: Mapping[str, Any], prefix: str = "") -> T:
    """Build and validate a config dataclass (sections nested) from a mapping of plain data.

    Other layers build their own sections with it (``sisa.evaluate.settings``), so every
    config is checked the same way.

    Args:
        cls: The frozen dataclass.
        raw: Its keys, as found in a YAML file; missing keys take the defaults.
        prefix: Dotted path of ``raw`` in the file (``"evaluate."``), for the messages.

    Returns:
        The validated instance.

    Raises:
        ConfigError: On unknown keys (with the allowed ones), wrong types, or values out of range.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"allowed here: {', '.join(prefix + n for n in names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - defensive: field mismatch
        raise ConfigError(f"bad config under {prefix or 'top level'}: {exc}") from exc


def _apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value, e.g. shards=8 or train.lr=0.01")
    key, _, text = override.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key part")
    try:
        value = _load_yaml(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({exc})") from exc
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def config_tree(raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A deep copy of a whole config mapping as plain data, with dotted overrides applied; nothing validated.

    Args:
        raw: Nested mapping as found in a YAML file.
        overrides: Dotted ``key=value`` strings applied on top, values parsed as YAML.

    Returns:
        The new tree (``raw`` is not changed).

    Raises:
        ConfigError: If ``raw`` is not a mapping of plain data, or an override is malformed.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of keys (as in a YAML file), got {type(raw).__name__}")
    try:
        tree: dict[str, Any] = json.loads(json.dumps(dict(raw)))  # deep copy, JSON-able only
    except (TypeError, ValueError) as exc:  # YAML dates, sets, binary, or NaN keys
        raise ConfigError(
            f"a config value is not plain data ({exc}); quote dates and use numbers, strings, lists"
        ) from exc
    for override in overrides:
        _apply_override(tree, override)
    return tree


def config_from_dict(raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> SisaConfig:
    """Build a validated :class:`SisaConfig` from a nested mapping.

    A top-level key of :data:`OTHER_SECTIONS` (``evaluate``) is set aside unread and unchecked:
    it belongs to a higher layer, which validates it itself. Any other unknown key is refused.
    So a stored config from before ``evaluate`` left :class:`SisaConfig` still loads.

    Args:
        raw: Nested mapping as found in a YAML file.
        overrides: Dotted ``key=value`` strings applied on top, values parsed as YAML.

    Returns:
        The frozen config.

    Raises:
        ConfigError: On unknown keys, wrong types, or values out of range.
    """
    tree = config_tree(raw, overrides)
    for name in OTHER_SECTIONS:
        tree.pop(name, None)
    return build_config(SisaConfig, tree)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Turn a config dataclass into plain JSON-able dicts and lists."""
    out = dataclasses.asdict(cfg)
    return typing.cast(dict[str, Any], json.loads(json.dumps(out)))


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The top-level mapping of a YAML config file, unvalidated (``{}`` for ``None`` or an empty file).

    Raises:
        ConfigError: If the file is missing, not UTF-8, not YAML, or not a mapping at the top level.
    """
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise ConfigError(f"config file {p} {what}; pass an existing YAML file")
    try:
        raw = _load_yaml(p.read_text()) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p} is not UTF-8 text ({exc}); pass a YAML file") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return dict(raw)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SisaConfig:
    """Load a YAML config file and apply dotted overrides.

    The file's ``evaluate:`` section (and an ``evaluate.*`` override) is not part of
    :class:`SisaConfig` and is ignored here, unchecked: only ``sisa evaluate`` reads it, through
    :func:`sisa.evaluate.settings.load_evaluate_config`. (The ``sisa`` command line checks it on
    every command that reads a config file, so a typo there still fails fast.)

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: ``key=value`` strings such as ``shards=8`` or ``train.lr=0.01``.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: If the file is missing, not YAML, or holds bad keys or values.
    """
    return config_from_dict(read_config_file(path), overrides)
