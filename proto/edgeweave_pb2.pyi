from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "quantized", "scale", "zero_point", "orig_dtype")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINT_FIELD_NUMBER: _ClassVar[int]
    ORIG_DTYPE_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    quantized: bool
    scale: float
    zero_point: int
    orig_dtype: str
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., quantized: _Optional[bool] = ..., scale: _Optional[float] = ..., zero_point: _Optional[int] = ..., orig_dtype: _Optional[str] = ...) -> None: ...

class Resources(_message.Message):
    __slots__ = ("total_memory", "available_memory", "cpu_count", "arch", "system", "accelerators", "backends", "memory_budget", "disk_free", "cpu_load", "cpu_cores")
    TOTAL_MEMORY_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    ACCELERATORS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_FIELD_NUMBER: _ClassVar[int]
    CPU_LOAD_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    total_memory: int
    available_memory: int
    cpu_count: int
    arch: str
    system: str
    accelerators: _containers.RepeatedScalarFieldContainer[str]
    backends: _containers.RepeatedScalarFieldContainer[str]
    memory_budget: int
    disk_free: int
    cpu_load: float
    cpu_cores: float
    def __init__(self, total_memory: _Optional[int] = ..., available_memory: _Optional[int] = ..., cpu_count: _Optional[int] = ..., arch: _Optional[str] = ..., system: _Optional[str] = ..., accelerators: _Optional[_Iterable[str]] = ..., backends: _Optional[_Iterable[str]] = ..., memory_budget: _Optional[int] = ..., disk_free: _Optional[int] = ..., cpu_load: _Optional[float] = ..., cpu_cores: _Optional[float] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("name", "node_id", "version", "resources", "uptime_s", "jobs", "secure", "data_port", "cluster")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    name: str
    node_id: str
    version: str
    resources: Resources
    uptime_s: float
    jobs: _containers.RepeatedScalarFieldContainer[str]
    secure: bool
    data_port: int
    cluster: str
    def __init__(self, name: _Optional[str] = ..., node_id: _Optional[str] = ..., version: _Optional[str] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., uptime_s: _Optional[float] = ..., jobs: _Optional[_Iterable[str]] = ..., secure: _Optional[bool] = ..., data_port: _Optional[int] = ..., cluster: _Optional[str] = ...) -> None: ...

class ProfileRequest(_message.Message):
    __slots__ = ("matmul_size", "budget_s", "layer", "backend", "prompt_tokens", "kv_tokens", "shards")
    MATMUL_SIZE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    matmul_size: int
    budget_s: float
    layer: LayerShape
    backend: str
    prompt_tokens: int
    kv_tokens: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardShare]
    def __init__(self, matmul_size: _Optional[int] = ..., budget_s: _Optional[float] = ..., layer: _Optional[_Union[LayerShape, _Mapping]] = ..., backend: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., kv_tokens: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardShare, _Mapping]]] = ...) -> None: ...

class ShardShare(_message.Message):
    __slots__ = ("n_kv_heads", "mlp_columns")
    N_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    MLP_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    n_kv_heads: int
    mlp_columns: int
    def __init__(self, n_kv_heads: _Optional[int] = ..., mlp_columns: _Optional[int] = ...) -> None: ...

class ShardTiming(_message.Message):
    __slots__ = ("n_kv_heads", "mlp_columns", "attn_decode_s", "mlp_decode_s")
    N_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    MLP_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ATTN_DECODE_S_FIELD_NUMBER: _ClassVar[int]
    MLP_DECODE_S_FIELD_NUMBER: _ClassVar[int]
    n_kv_heads: int
    mlp_columns: int
    attn_decode_s: float
    mlp_decode_s: float
    def __init__(self, n_kv_heads: _Optional[int] = ..., mlp_columns: _Optional[int] = ..., attn_decode_s: _Optional[float] = ..., mlp_decode_s: _Optional[float] = ...) -> None: ...

class LayerShape(_message.Message):
    __slots__ = ("hidden", "intermediate", "n_q_heads", "n_kv_heads", "head_dim", "projections", "attention_bias", "qk_norm", "float_dtype")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    INTERMEDIATE_FIELD_NUMBER: _ClassVar[int]
    N_Q_HEADS_FIELD_NUMBER: _ClassVar[int]
    N_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    PROJECTIONS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BIAS_FIELD_NUMBER: _ClassVar[int]
    QK_NORM_FIELD_NUMBER: _ClassVar[int]
    FLOAT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    hidden: int
    intermediate: int
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    projections: _containers.RepeatedCompositeFieldContainer[ProjectionLayout]
    attention_bias: bool
    qk_norm: bool
    float_dtype: str
    def __init__(self, hidden: _Optional[int] = ..., intermediate: _Optional[int] = ..., n_q_heads: _Optional[int] = ..., n_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., projections: _Optional[_Iterable[_Union[ProjectionLayout, _Mapping]]] = ..., attention_bias: _Optional[bool] = ..., qk_norm: _Optional[bool] = ..., float_dtype: _Optional[str] = ...) -> None: ...

class ProjectionLayout(_message.Message):
    __slots__ = ("kind", "bits", "block", "offset")
    KIND_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    kind: str
    bits: int
    block: int
    offset: bool
    def __init__(self, kind: _Optional[str] = ..., bits: _Optional[int] = ..., block: _Optional[int] = ..., offset: _Optional[bool] = ...) -> None: ...

class ProfileReply(_message.Message):
    __slots__ = ("matmul_gflops", "memory_bandwidth_gbps", "disk_read_mbps", "threads", "layer_decode_s", "layer_prefill_s", "prompt_tokens", "kv_tokens", "layer_file_bytes", "layer_held_bytes", "layer_kernel", "layer_runs", "layer_profile_s", "layer_attn_decode_s", "layer_mlp_decode_s", "shard_attn_decode_s", "shard_mlp_decode_s", "shard_mlp_columns", "layer_ring", "shard_timings")
    MATMUL_GFLOPS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BANDWIDTH_GBPS_FIELD_NUMBER: _ClassVar[int]
    DISK_READ_MBPS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    LAYER_DECODE_S_FIELD_NUMBER: _ClassVar[int]
    LAYER_PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYER_HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYER_KERNEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_RUNS_FIELD_NUMBER: _ClassVar[int]
    LAYER_PROFILE_S_FIELD_NUMBER: _ClassVar[int]
    LAYER_ATTN_DECODE_S_FIELD_NUMBER: _ClassVar[int]
    LAYER_MLP_DECODE_S_FIELD_NUMBER: _ClassVar[int]
    SHARD_ATTN_DECODE_S_FIELD_NUMBER: _ClassVar[int]
    SHARD_MLP_DECODE_S_FIELD_NUMBER: _ClassVar[int]
    SHARD_MLP_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    LAYER_RING_FIELD_NUMBER: _ClassVar[int]
    SHARD_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    matmul_gflops: float
    memory_bandwidth_gbps: float
    disk_read_mbps: float
    threads: int
    layer_decode_s: float
    layer_prefill_s: float
    prompt_tokens: int
    kv_tokens: int
    layer_file_bytes: int
    layer_held_bytes: int
    layer_kernel: str
    layer_runs: int
    layer_profile_s: float
    layer_attn_decode_s: float
    layer_mlp_decode_s: float
    shard_attn_decode_s: float
    shard_mlp_decode_s: float
    shard_mlp_columns: int
    layer_ring: int
    shard_timings: _containers.RepeatedCompositeFieldContainer[ShardTiming]
    def __init__(self, matmul_gflops: _Optional[float] = ..., memory_bandwidth_gbps: _Optional[float] = ..., disk_read_mbps: _Optional[float] = ..., threads: _Optional[int] = ..., layer_decode_s: _Optional[float] = ..., layer_prefill_s: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., kv_tokens: _Optional[int] = ..., layer_file_bytes: _Optional[int] = ..., layer_held_bytes: _Optional[int] = ..., layer_kernel: _Optional[str] = ..., layer_runs: _Optional[int] = ..., layer_profile_s: _Optional[float] = ..., layer_attn_decode_s: _Optional[float] = ..., layer_mlp_decode_s: _Optional[float] = ..., shard_attn_decode_s: _Optional[float] = ..., shard_mlp_decode_s: _Optional[float] = ..., shard_mlp_columns: _Optional[int] = ..., layer_ring: _Optional[int] = ..., shard_timings: _Optional[_Iterable[_Union[ShardTiming, _Mapping]]] = ...) -> None: ...

class ShardChunk(_message.Message):
    __slots__ = ("name", "sha256", "size", "offset", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    size: int
    offset: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutShardReply(_message.Message):
    __slots__ = ("sha256", "size", "already_present")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    already_present: bool
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ..., already_present: _Optional[bool] = ...) -> None: ...

class HasShardsRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class HasShardsReply(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, present: _Optional[_Iterable[str]] = ...) -> None: ...

class ShardRef(_message.Message):
    __slots__ = ("name", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("job_id", "kind", "config_json", "shards", "memory_budget")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kind: str
    config_json: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardRef]
    memory_budget: int
    def __init__(self, job_id: _Optional[str] = ..., kind: _Optional[str] = ..., config_json: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardRef, _Mapping]]] = ..., memory_budget: _Optional[int] = ...) -> None: ...

class LoadReply(_message.Message):
    __slots__ = ("job_id", "details_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    details_json: str
    def __init__(self, job_id: _Optional[str] = ..., details_json: _Optional[str] = ...) -> None: ...

class UnloadRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class UnloadReply(_message.Message):
    __slots__ = ("job_id", "stats_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATS_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    stats_json: str
    def __init__(self, job_id: _Optional[str] = ..., stats_json: _Optional[str] = ...) -> None: ...

class JobStatsRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobStatsReply(_message.Message):
    __slots__ = ("job_id", "stats_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATS_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    stats_json: str
    def __init__(self, job_id: _Optional[str] = ..., stats_json: _Optional[str] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("job_id", "seq", "op", "layer", "position", "session", "tensors", "rows", "lease")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    seq: int
    op: str
    layer: int
    position: int
    session: str
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    rows: _containers.RepeatedCompositeFieldContainer[BatchRow]
    lease: str
    def __init__(self, job_id: _Optional[str] = ..., seq: _Optional[int] = ..., op: _Optional[str] = ..., layer: _Optional[int] = ..., position: _Optional[int] = ..., session: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., rows: _Optional[_Iterable[_Union[BatchRow, _Mapping]]] = ..., lease: _Optional[str] = ...) -> None: ...

class BatchRow(_message.Message):
    __slots__ = ("session", "position", "length")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    session: str
    position: int
    length: int
    def __init__(self, session: _Optional[str] = ..., position: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("seq", "tensors", "compute_s", "stall_s", "error_code", "error_message")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    STALL_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    compute_s: float
    stall_s: float
    error_code: int
    error_message: str
    def __init__(self, seq: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., compute_s: _Optional[float] = ..., stall_s: _Optional[float] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("status", "cpu_load", "available_memory", "rss", "jobs", "shard_store_bytes", "shard_store_max", "sessions")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CPU_LOAD_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    RSS_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    SHARD_STORE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARD_STORE_MAX_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    status: str
    cpu_load: float
    available_memory: int
    rss: int
    jobs: _containers.RepeatedScalarFieldContainer[str]
    shard_store_bytes: int
    shard_store_max: int
    sessions: int
    def __init__(self, status: _Optional[str] = ..., cpu_load: _Optional[float] = ..., available_memory: _Optional[int] = ..., rss: _Optional[int] = ..., jobs: _Optional[_Iterable[str]] = ..., shard_store_bytes: _Optional[int] = ..., shard_store_max: _Optional[int] = ..., sessions: _Optional[int] = ...) -> None: ...

class EchoMessage(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
