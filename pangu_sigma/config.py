"""The full run config: model / moe / parallel / data / train / optim / checkpoint / logging.

YAML with the paper's field names (Table 1): batch_size, sink_size (train),
expert_parallel, op_level_model_parallel_num (parallel), expert_num_per_dp_dim
(moe), moe_layer_num, num_heads (model), adam_eps (optim). `--set a.b=c`
overrides any field. Every invalid value fails at load with a ConfigError
naming the field, the value and what is valid.
"""
import dataclasses
import os
import re
from dataclasses import dataclass, field, fields

import yaml

from locmoe.config import A2A_GROUPS, MoEConfig, ROUTERS, COMM_BACKENDS
from locmoe.errors import ConfigError
from locmoe.placement import IID_LEVEL1, PLACEMENTS
from pangu_sigma.model.model_config import ModelConfig
from pangu_sigma.model.recompute import RECOMPUTE_LEVELS


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _need(ok, name, value, valid):
    if not ok:
        raise ConfigError(name, value, valid)


@dataclass
class MoESection:
    router: str = "locmoe"
    expert_num_per_dp_dim: int = 8
    capacity_factor: float = 1.25
    # Capacity factor eval routes with (0: capacity_factor, as in training).
    # Switch Transformer evaluates with a larger one (fewer drops).
    eval_capacity_factor: float = 0.0
    # > 0: two-tier exchange; capacity of each (rank, expert on another node) pair; the
    # (rank, node-local expert) pairs keep capacity_factor. 0: one tier.
    remote_capacity_factor: float = 0.0
    # Two tiers, beyond the paper: a token over its pair's slots takes a free slot of its best node-local
    # expert instead of being dropped (locmoe.dispatch.reroute_to_local). LocMoE and Switch only.
    reroute_overflow: bool = False
    aux_loss_coef: float = 0.01
    locality_loss_coef: float = 0.01
    locality_smoothing: float = 1e-4
    num_domain_groups: int = 1
    # Level-1 map: entry d = the expert group of domain d (empty: domain % num_domain_groups).
    # Under data.placement=domain_affine the placement sets each domain's experts instead.
    domain_to_group: list = field(default_factory=list)
    # Level 1 under data.placement=iid: blocks (PanGu-Sigma: each group on contiguous experts),
    # node_striped (every node holds experts of every group; locmoe.placement) or none (every
    # domain may use every expert: a rank's few samples then do not pile its tokens on one
    # domain's experts). Under domain_affine the placement chooses each domain's experts.
    iid_level1: str = "blocks"
    # LocMoE's learned locality bias on the node-local experts' routing scores (locmoe.routers).
    locality_bias: bool = True
    # b = rate * stored parameter, stepped `rate` times as fast as the other parameters (locmoe.config.MoEConfig).
    locality_bias_rate: float = 1.0
    gate_bias: bool = True
    switch_jitter: float = 0.0
    table_seed: int = 1234

    def validate(self):
        _need(self.router in ROUTERS, "moe.router", self.router, f"one of {list(ROUTERS)}")
        _need(self.iid_level1 in IID_LEVEL1, "moe.iid_level1", self.iid_level1,
              f"one of {list(IID_LEVEL1)}")
        _need(_is_int(self.expert_num_per_dp_dim) and self.expert_num_per_dp_dim >= 1,
              "moe.expert_num_per_dp_dim", self.expert_num_per_dp_dim, "an integer >= 1")
        _need(_is_num(self.eval_capacity_factor) and self.eval_capacity_factor >= 0, "moe.eval_capacity_factor",
              self.eval_capacity_factor, "0 (the training moe.capacity_factor) or a number > 0")


@dataclass
class ParallelSection:
    device_target: str = "CPU"
    op_level_model_parallel_num: int = 1
    expert_parallel: int = 1
    devices_per_node: int = 8
    comm_backend: str = "auto"
    comm_overlap_degree: int = 1
    groupwise_a2a: bool = True
    # The communicator of the MoE exchange's inter-node AlltoAll(V): "ep" (the EP group) or "servers"
    # (every rank of the EP group's servers, zero blocks between different EP groups: same bytes),
    # which HCCL's AlltoAll rule on Atlas training needs when an EP group has 1 or 2 devices per server.
    a2a_group: str = "ep"
    # Gradient AllReduce: gradients of one replica group are packed into flat
    # buckets of at most this many MiB (one AllReduce each; a bigger gradient goes
    # alone, unpacked), so the extra copies stay ~2 buckets, not the whole model.
    grad_bucket_mb: float = 256.0
    # HCCL_BUFFSIZE (MB) every HCCL communicator holds twice (send + receive) on Ascend;
    # exported before init() (pangu_sigma.build). CANN's default is 200.
    hccl_buffsize_mb: int = 200
    # A single CPU process may pose as rank `virtual_rank` of a cluster of
    # `virtual_world_size` devices (0 = off): locality loss and byte counts
    # then behave as on that rank. The virtual cluster uses
    # op_level_model_parallel_num, expert_parallel and devices_per_node above.
    virtual_world_size: int = 0
    virtual_rank: int = 0
    # rank: the process is rank `virtual_rank` (batch_size sequences, one token group).
    # cluster: the process is the whole virtual cluster: batch_size * dp sequences
    # routed as dp token groups, each with its own rank's capacity, aux and locality
    # loss, which reproduces a multi-process run of that layout exactly.
    virtual_scope: str = "rank"
    # ZeRO stage 1 (pangu_sigma/parallel/zero.py): each rank keeps and updates
    # only its 1/R slice of the Adam moments of every parameter, R = the size of
    # the parameter's replica group; the updated slices are gathered over it.
    optimizer_shard: bool = False
    # The device count this config is written for (0: any); plan, the launchers and the trainer
    # refuse another (pangu_sigma.config.check_cluster).
    world_size: int = 0

    def validate(self):
        _need(_is_int(self.world_size) and self.world_size >= 0, "parallel.world_size", self.world_size,
              "0 (any) or the device count this config is for")
        _need(self.device_target in ("CPU", "Ascend"), "parallel.device_target", self.device_target,
              "CPU or Ascend")
        for name in ("op_level_model_parallel_num", "expert_parallel", "devices_per_node", "comm_overlap_degree"):
            value = getattr(self, name)
            _need(_is_int(value) and value >= 1, f"parallel.{name}", value, "an integer >= 1")
        _need(self.comm_backend in COMM_BACKENDS, "parallel.comm_backend", self.comm_backend,
              f"one of {list(COMM_BACKENDS)}")
        _need(isinstance(self.groupwise_a2a, bool), "parallel.groupwise_a2a", self.groupwise_a2a, "true or false")
        _need(self.a2a_group in A2A_GROUPS, "parallel.a2a_group", self.a2a_group, f"one of {list(A2A_GROUPS)}")
        _need(_is_num(self.grad_bucket_mb) and self.grad_bucket_mb > 0, "parallel.grad_bucket_mb",
              self.grad_bucket_mb, "a size in MiB > 0 (e.g. 256)")
        _need(_is_int(self.hccl_buffsize_mb) and self.hccl_buffsize_mb >= 1, "parallel.hccl_buffsize_mb",
              self.hccl_buffsize_mb, "an integer number of MB >= 1 (CANN's default 200)")
        _need(_is_int(self.virtual_world_size) and self.virtual_world_size >= 0, "parallel.virtual_world_size",
              self.virtual_world_size, "0 (off) or the device count of the cluster to pose as")
        _need(_is_int(self.virtual_rank) and 0 <= self.virtual_rank < max(1, self.virtual_world_size),
              "parallel.virtual_rank", self.virtual_rank, f"in [0, {max(1, self.virtual_world_size)})")
        _need(self.virtual_scope in ("rank", "cluster"), "parallel.virtual_scope", self.virtual_scope,
              "rank or cluster")
        _need(isinstance(self.optimizer_shard, bool), "parallel.optimizer_shard", self.optimizer_shard,
              "true or false")


@dataclass
class DataSection:
    dataset_dir: str = "output/data"
    shuffle: bool = True
    seed: int = 1234
    # iid: every data-parallel rank reads a block of one permutation of all samples.
    # domain_affine: the ranks of a node read that node's domains (locmoe.placement);
    # every global batch still holds the domains in proportion to their sizes.
    placement: str = "iid"
    # sha256 of every shard against meta.json: true hashes on one rank (rank 0, after init(), the
    # others wait at a barrier); false checks sizes only (run python -m pangu_sigma.data.verify once
    # instead: a pre-training corpus takes longer to hash than the collectives' timeouts allow).
    verify_checksums: bool = True

    def validate(self):
        _need(self.placement in PLACEMENTS, "data.placement", self.placement, f"one of {list(PLACEMENTS)}")
        _need(isinstance(self.dataset_dir, str) and self.dataset_dir, "data.dataset_dir", self.dataset_dir,
              "a folder written by python -m pangu_sigma.data.prepare")
        _need(isinstance(self.shuffle, bool), "data.shuffle", self.shuffle, "true or false")
        _need(_is_int(self.seed), "data.seed", self.seed, "an integer")
        _need(isinstance(self.verify_checksums, bool), "data.verify_checksums", self.verify_checksums,
              "true or false")


@dataclass
class TrainSection:
    batch_size: int = 8          # per data-parallel rank per optimizer step; global batch = batch_size * dp
    # Gradient accumulation (MindFormers' gradient_accumulation_steps): each step's batch_size
    # sequences run as this many micro-batches of batch_size / steps, gradients summed in float32,
    # then one optimizer update (pangu_sigma/training/train_step.py AccumulatingTrainStep).
    gradient_accumulation_steps: int = 1
    sink_size: int = 1           # steps per device loop (data sinking on Ascend); logs flush per sink
    train_steps: int = 100
    precision: str = "auto"      # auto: float32 on CPU, float16 (dynamic loss scale) on Ascend
    loss_scale_init: float = 65536.0
    loss_scale_window: int = 1000
    seed: int = 1234
    output_dir: str = "output/run"
    # A model checkpoint of any layout (e.g. <run>/initial_weights.ckpt of a
    # single-process run) to start from: re-sharded to this rank's TP/EP layout.
    init_checkpoint: str = ""
    # Activation recomputation (pangu_sigma/model/recompute.py): none | attention | block.
    recompute: str = "none"
    # Sequences per optimizer step over all data-parallel ranks (0: not fixed): batch_size x dp must equal it.
    global_batch_size: int = 0

    @property
    def micro_batch_size(self):
        """Sequences per data-parallel rank in one micro-batch (one forward/backward, one routing)."""
        return self.batch_size // self.gradient_accumulation_steps

    def validate(self):
        for name in ("batch_size", "sink_size", "train_steps", "loss_scale_window", "gradient_accumulation_steps"):
            value = getattr(self, name)
            _need(_is_int(value) and value >= 1, f"train.{name}", value, "an integer >= 1")
        _need(self.batch_size % self.gradient_accumulation_steps == 0, "train.gradient_accumulation_steps",
              self.gradient_accumulation_steps, f"a divisor of train.batch_size={self.batch_size} (micro-batches "
              f"of batch_size / gradient_accumulation_steps sequences)")
        _need(self.train_steps % self.sink_size == 0, "train.train_steps", self.train_steps,
              f"a multiple of train.sink_size={self.sink_size}")
        _need(self.precision in ("auto", "float32", "float16"), "train.precision", self.precision,
              "auto, float32 or float16")
        _need(_is_num(self.loss_scale_init) and self.loss_scale_init >= 1, "train.loss_scale_init",
              self.loss_scale_init, "a number >= 1")
        _need(_is_int(self.seed), "train.seed", self.seed, "an integer")
        _need(_is_int(self.global_batch_size) and self.global_batch_size >= 0, "train.global_batch_size",
              self.global_batch_size, "0 (not fixed) or the sequences per step over all data-parallel ranks")
        _need(self.recompute in RECOMPUTE_LEVELS, "train.recompute", self.recompute,
              f"one of {list(RECOMPUTE_LEVELS)}")


@dataclass
class OptimSection:
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    decay_steps: int = 0          # 0: decay over train.train_steps
    adam_eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0        # global-norm clip; 0 disables

    def validate(self):
        _need(_is_num(self.lr) and self.lr > 0, "optim.lr", self.lr, "a number > 0")
        _need(_is_num(self.min_lr) and 0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr,
              f"a number in [0, optim.lr={self.lr}]")
        _need(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps,
              "an integer >= 0")
        _need(_is_int(self.decay_steps) and self.decay_steps >= 0, "optim.decay_steps", self.decay_steps,
              "an integer >= 0")
        _need(_is_num(self.adam_eps) and self.adam_eps > 0, "optim.adam_eps", self.adam_eps, "a number > 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _need(_is_num(value) and 0 <= value < 1, f"optim.{name}", value, "a number in [0, 1)")
        _need(_is_num(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay", self.weight_decay,
              "a number >= 0")
        _need(_is_num(self.grad_clip) and self.grad_clip >= 0, "optim.grad_clip", self.grad_clip,
              "a number >= 0 (0 disables clipping)")


@dataclass
class CheckpointSection:
    save_steps: int = 50          # 0 disables
    keep_last: int = 3

    def validate(self):
        _need(_is_int(self.save_steps) and self.save_steps >= 0, "checkpoint.save_steps", self.save_steps,
              "an integer >= 0 (0 disables)")
        _need(_is_int(self.keep_last) and self.keep_last >= 1, "checkpoint.keep_last", self.keep_last,
              "an integer >= 1")


@dataclass
class LoggingSection:
    log_steps: int = 1
    expert_stats_steps: int = 50

    def validate(self):
        for name in ("log_steps", "expert_stats_steps"):
            value = getattr(self, name)
            _need(_is_int(value) and value >= 1, f"logging.{name}", value, "an integer >= 1")


SECTIONS = {"model": ModelConfig, "moe": MoESection, "parallel": ParallelSection, "data": DataSection,
            "train": TrainSection, "optim": OptimSection, "checkpoint": CheckpointSection,
            "logging": LoggingSection}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoESection = field(default_factory=MoESection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    # ---- derived ---------------------------------------------------------------
    @property
    def num_experts(self):
        return self.moe.expert_num_per_dp_dim * self.parallel.expert_parallel

    @property
    def compute_dtype(self):
        if self.train.precision == "auto":
            return "float16" if self.parallel.device_target == "Ascend" else "float32"
        return self.train.precision

    def moe_config(self, vocab_size=None):
        """The locmoe.MoEConfig of every sparse layer."""
        m = self.moe
        try:
            return MoEConfig(num_experts=self.num_experts, capacity_factor=m.capacity_factor,
                             remote_capacity_factor=m.remote_capacity_factor, router=m.router,
                             reroute_overflow=m.reroute_overflow,
                             aux_loss_coef=m.aux_loss_coef, locality_loss_coef=m.locality_loss_coef,
                             locality_smoothing=m.locality_smoothing, locality_bias=m.locality_bias,
                             locality_bias_rate=m.locality_bias_rate,
                             num_domain_groups=m.num_domain_groups,
                             domain_to_group=tuple(m.domain_to_group) if isinstance(m.domain_to_group, (list, tuple))
                             else m.domain_to_group,
                             gate_bias=m.gate_bias, switch_jitter=m.switch_jitter,
                             vocab_size=self.model.vocab_size if vocab_size is None else vocab_size,
                             table_seed=m.table_seed, expert_parallel=self.parallel.expert_parallel,
                             comm_overlap_degree=self.parallel.comm_overlap_degree,
                             groupwise_a2a=self.parallel.groupwise_a2a, comm_backend=self.parallel.comm_backend,
                             a2a_group=self.parallel.a2a_group)
        except ConfigError as err:  # MoEConfig names fields moe.x; map the parallel ones back
            name = err.field.split(".")[-1]
            section = "parallel" if name in ("expert_parallel", "comm_overlap_degree", "groupwise_a2a",
                                             "comm_backend", "a2a_group") else ("model" if name == "vocab_size" else "moe")
            raise ConfigError(f"{section}.{name}", err.value, err.valid) from None

    def validate(self, world_size=None):
        """world_size: the device count when a command knows it (plan --world-size), for the layout checks."""
        for section in SECTIONS:
            getattr(self, section).validate() if hasattr(getattr(self, section), "validate") else None
        _validate_model(self.model)
        self._validate_layout(world_size)
        m = self.model
        if self.moe.router == "locmoe" and m.moe_layer_num > 0:
            _need(m.hidden_size % self.num_experts == 0, "model.hidden_size", m.hidden_size,
                  f"a multiple of the expert count {self.num_experts} = moe.expert_num_per_dp_dim "
                  f"{self.moe.expert_num_per_dp_dim} x parallel.expert_parallel {self.parallel.expert_parallel} "
                  f"(GrAP gate, eq. 4)")
        self.moe_config(vocab_size=max(1, m.vocab_size))
        return self

    def _validate_layout(self, world_size=None):
        """expert_parallel must divide the data-parallel size when the world size is known here
        (a virtual cluster, or msrun / rank-table variables), before checks that depend on it."""
        par = self.parallel
        world = world_size or par.virtual_world_size or int(os.environ.get("MS_WORKER_NUM") or
                                                            os.environ.get("RANK_SIZE") or 0)
        if world <= 1:
            return
        source = ("--world-size" if world_size else "parallel.virtual_world_size" if par.virtual_world_size
                  else "the launched worker count")
        _need(world % par.op_level_model_parallel_num == 0, "parallel.op_level_model_parallel_num",
              par.op_level_model_parallel_num, f"a divisor of the world size {world} ({source})")
        dp = world // par.op_level_model_parallel_num
        _need(dp % par.expert_parallel == 0, "parallel.expert_parallel", par.expert_parallel,
              f"a divisor of the data-parallel size {dp} (world {world} ({source}) / "
              f"op_level_model_parallel_num {par.op_level_model_parallel_num})")
        if not par.virtual_world_size:
            check_cluster(self, world, source)

    def to_dict(self):
        return dataclasses.asdict(self)


def check_cluster(cfg, world, source):
    """ConfigError unless a launch of `world` devices (named by `source`) is the cluster the config is
    for: parallel.world_size (nodes = world / devices_per_node) and train.global_batch_size."""
    par, train = cfg.parallel, cfg.train
    if par.world_size and world != par.world_size:
        raise ConfigError("parallel.world_size", par.world_size,
                          f"{world}, the device count of {source} ({world // par.devices_per_node} nodes of "
                          f"{par.devices_per_node}); this config is for {par.world_size // par.devices_per_node} "
                          f"nodes: use the config for {world} devices, or --set parallel.world_size={world} "
                          f"with a train.batch_size that keeps train.global_batch_size")
    dp = world // par.op_level_model_parallel_num
    if train.global_batch_size and train.batch_size * dp != train.global_batch_size:
        raise ConfigError("train.global_batch_size", train.global_batch_size,
                          f"{train.batch_size * dp} = train.batch_size {train.batch_size} x dp {dp} on {world} "
                          f"devices ({source}); set train.batch_size="
                          f"{train.global_batch_size / dp:g} or change train.global_batch_size")


def _validate_model(m):
    for name in ("seq_length", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size"):
        value = getattr(m, name)
        _need(_is_int(value) and value >= 1, f"model.{name}", value, "an integer >= 1")
    _need(_is_int(m.vocab_size) and m.vocab_size >= 0, "model.vocab_size", m.vocab_size,
          "an integer >= 0 (0: taken from the dataset's meta.json)")
    _need(_is_int(m.moe_layer_num) and 0 <= m.moe_layer_num <= m.num_layers, "model.moe_layer_num",
          m.moe_layer_num, f"an integer in [0, model.num_layers={m.num_layers}]")
    _need(m.hidden_size % m.num_heads == 0, "model.num_heads", m.num_heads,
          f"a divisor of model.hidden_size={m.hidden_size}")
    _need(_is_num(m.dropout_rate) and 0 <= m.dropout_rate < 1, "model.dropout_rate", m.dropout_rate,
          "a number in [0, 1)")
    _need(_is_num(m.param_init_std) and m.param_init_std > 0, "model.param_init_std", m.param_init_std,
          "a number > 0")


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1's safe loader, reading exponent floats without a dot (1e-3, 5E4) as numbers, as YAML 1.2
    and every user does (YAML 1.1 takes them for strings)."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                  list("-+0123456789."))


def read_yaml(text_or_stream):
    """yaml.safe_load with exponent floats read as numbers (_YamlLoader)."""
    return yaml.load(text_or_stream, Loader=_YamlLoader)


def _parse_override(text):
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError("--set", text, "section.key=value, e.g. train.batch_size=16")
    key, raw = text.split("=", 1)
    try:
        value = read_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def config_from_dict(raw, overrides=(), world_size=None):
    """RunConfig from a nested mapping plus `section.key=value` overrides; validated (for world_size
    devices when given)."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("config", type(raw).__name__, f"a mapping with sections {list(SECTIONS)}")
    merged = {name: dict(raw.get(name) or {}) for name in SECTIONS}
    merged["model"].setdefault("vocab_size", 0)  # run configs take the vocabulary from the dataset
    for name in raw:
        if name not in SECTIONS:
            raise ConfigError(name, raw[name], f"unknown section; valid sections: {list(SECTIONS)}")
        if not isinstance(raw[name] or {}, dict):
            raise ConfigError(name, raw[name], "a mapping of key: value")
    for text in overrides:
        path, value = _parse_override(text)
        if len(path) != 2 or path[0] not in SECTIONS:
            raise ConfigError("--set", text, f"section.key=value with a section in {list(SECTIONS)}")
        merged[path[0]][path[1]] = value
    sections = {}
    for name, cls in SECTIONS.items():
        known = {f.name: f for f in fields(cls)}
        for key, value in merged[name].items():
            if key not in known:
                raise ConfigError(f"{name}.{key}", value, f"unknown key; valid keys: {sorted(known)}")
            default = known[key].default
            if isinstance(default, float) and _is_int(value):
                merged[name][key] = float(value)
        sections[name] = cls(**merged[name])
    return RunConfig(**sections).validate(world_size)


def load_config(path, overrides=(), world_size=None):
    """Read a YAML config file and apply overrides; one-line ConfigError on any problem."""
    if not os.path.isfile(path):
        raise ConfigError("--config", path, "an existing YAML file")
    with open(path, encoding="utf-8") as handle:
        try:
            raw = read_yaml(handle)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError("--config", path, f"valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if raw is None:
        raise ConfigError("--config", path, f"a YAML mapping with sections {list(SECTIONS)}; the file is empty "
                          f"(start from a file in configs/)")
    return config_from_dict(raw, overrides, world_size)
