import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SeedLifecycleStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEED_STAGE_UNKNOWN: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_DORMANT: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_GERMINATED: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_TRAINING: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_BLENDING: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_SHADOWING: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_PROBATIONARY: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_FOSSILIZED: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_CULLED: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_EMBARGOED: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_RESETTING: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_TERMINATED: _ClassVar[SeedLifecycleStage]

class SeedLifecycleGate(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEED_GATE_UNKNOWN: _ClassVar[SeedLifecycleGate]
    SEED_GATE_G0_SANITY: _ClassVar[SeedLifecycleGate]
    SEED_GATE_G1_TRAINING_READINESS: _ClassVar[SeedLifecycleGate]
    SEED_GATE_G2_GRADIENT_HEALTH: _ClassVar[SeedLifecycleGate]
    SEED_GATE_G3_CONTRIBUTION: _ClassVar[SeedLifecycleGate]
    SEED_GATE_G4_PROBATION: _ClassVar[SeedLifecycleGate]
    SEED_GATE_G5_RESET: _ClassVar[SeedLifecycleGate]

class CommandType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_UNSPECIFIED: _ClassVar[CommandType]
    COMMAND_SEED: _ClassVar[CommandType]
    COMMAND_ROLLBACK: _ClassVar[CommandType]
    COMMAND_OPTIMIZER: _ClassVar[CommandType]
    COMMAND_CIRCUIT_BREAKER: _ClassVar[CommandType]
    COMMAND_PAUSE: _ClassVar[CommandType]
    COMMAND_EMERGENCY: _ClassVar[CommandType]
    COMMAND_WAIT: _ClassVar[CommandType]

class SeedOperation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEED_OP_UNSPECIFIED: _ClassVar[SeedOperation]
    SEED_OP_GERMINATE: _ClassVar[SeedOperation]
    SEED_OP_FOSSILIZE: _ClassVar[SeedOperation]
    SEED_OP_CULL: _ClassVar[SeedOperation]
    SEED_OP_CANCEL: _ClassVar[SeedOperation]

class BlendMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLEND_MODE_UNSPECIFIED: _ClassVar[BlendMode]
    BLEND_MODE_CONVEX: _ClassVar[BlendMode]
    BLEND_MODE_RESIDUAL: _ClassVar[BlendMode]
    BLEND_MODE_CHANNEL: _ClassVar[BlendMode]
    BLEND_MODE_CONFIDENCE: _ClassVar[BlendMode]

class PolicyAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_ACTION_UNSPECIFIED: _ClassVar[PolicyAction]
    POLICY_ACTION_WAIT: _ClassVar[PolicyAction]
    POLICY_ACTION_GERMINATE: _ClassVar[PolicyAction]
    POLICY_ACTION_FOSSILIZE: _ClassVar[PolicyAction]
    POLICY_ACTION_CULL: _ClassVar[PolicyAction]
    POLICY_ACTION_ADJUST_LR: _ClassVar[PolicyAction]
    POLICY_ACTION_PAUSE: _ClassVar[PolicyAction]

class FieldReportOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FIELD_REPORT_OUTCOME_UNSPECIFIED: _ClassVar[FieldReportOutcome]
    FIELD_REPORT_OUTCOME_SUCCESS: _ClassVar[FieldReportOutcome]
    FIELD_REPORT_OUTCOME_NEUTRAL: _ClassVar[FieldReportOutcome]
    FIELD_REPORT_OUTCOME_REGRESSION: _ClassVar[FieldReportOutcome]
    FIELD_REPORT_OUTCOME_ABORTED: _ClassVar[FieldReportOutcome]

class MessagePriority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_PRIORITY_UNSPECIFIED: _ClassVar[MessagePriority]
    MESSAGE_PRIORITY_LOW: _ClassVar[MessagePriority]
    MESSAGE_PRIORITY_NORMAL: _ClassVar[MessagePriority]
    MESSAGE_PRIORITY_HIGH: _ClassVar[MessagePriority]
    MESSAGE_PRIORITY_CRITICAL: _ClassVar[MessagePriority]

class TelemetryLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TELEMETRY_LEVEL_UNSPECIFIED: _ClassVar[TelemetryLevel]
    TELEMETRY_LEVEL_DEBUG: _ClassVar[TelemetryLevel]
    TELEMETRY_LEVEL_INFO: _ClassVar[TelemetryLevel]
    TELEMETRY_LEVEL_WARNING: _ClassVar[TelemetryLevel]
    TELEMETRY_LEVEL_ERROR: _ClassVar[TelemetryLevel]
    TELEMETRY_LEVEL_CRITICAL: _ClassVar[TelemetryLevel]

class HealthStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTH_STATUS_UNSPECIFIED: _ClassVar[HealthStatus]
    HEALTH_STATUS_HEALTHY: _ClassVar[HealthStatus]
    HEALTH_STATUS_DEGRADED: _ClassVar[HealthStatus]
    HEALTH_STATUS_UNHEALTHY: _ClassVar[HealthStatus]
    HEALTH_STATUS_CRITICAL: _ClassVar[HealthStatus]

class BlueprintTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLUEPRINT_TIER_UNSPECIFIED: _ClassVar[BlueprintTier]
    BLUEPRINT_TIER_SAFE: _ClassVar[BlueprintTier]
    BLUEPRINT_TIER_EXPERIMENTAL: _ClassVar[BlueprintTier]
    BLUEPRINT_TIER_HIGH_RISK: _ClassVar[BlueprintTier]

class EmergencyLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMERGENCY_LEVEL_UNSPECIFIED: _ClassVar[EmergencyLevel]
    EMERGENCY_LEVEL_NOTICE: _ClassVar[EmergencyLevel]
    EMERGENCY_LEVEL_ELEVATED: _ClassVar[EmergencyLevel]
    EMERGENCY_LEVEL_CONSERVATIVE: _ClassVar[EmergencyLevel]
    EMERGENCY_LEVEL_HALT: _ClassVar[EmergencyLevel]

class CircuitBreakerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CIRCUIT_STATE_UNSPECIFIED: _ClassVar[CircuitBreakerState]
    CIRCUIT_STATE_CLOSED: _ClassVar[CircuitBreakerState]
    CIRCUIT_STATE_OPEN: _ClassVar[CircuitBreakerState]
    CIRCUIT_STATE_HALF_OPEN: _ClassVar[CircuitBreakerState]

class CatalogueChangeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CATALOGUE_CHANGE_UNSPECIFIED: _ClassVar[CatalogueChangeKind]
    CATALOGUE_CHANGE_ADDED: _ClassVar[CatalogueChangeKind]
    CATALOGUE_CHANGE_UPDATED: _ClassVar[CatalogueChangeKind]
    CATALOGUE_CHANGE_QUARANTINED: _ClassVar[CatalogueChangeKind]
    CATALOGUE_CHANGE_REMOVED: _ClassVar[CatalogueChangeKind]

class BusMessageType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUS_MESSAGE_TYPE_UNSPECIFIED: _ClassVar[BusMessageType]
    BUS_MESSAGE_TYPE_SYSTEM_STATE: _ClassVar[BusMessageType]
    BUS_MESSAGE_TYPE_ADAPTATION_COMMAND: _ClassVar[BusMessageType]
    BUS_MESSAGE_TYPE_FIELD_REPORT: _ClassVar[BusMessageType]
    BUS_MESSAGE_TYPE_TELEMETRY: _ClassVar[BusMessageType]
    BUS_MESSAGE_TYPE_POLICY_UPDATE: _ClassVar[BusMessageType]
    BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL: _ClassVar[BusMessageType]
    BUS_MESSAGE_TYPE_CATALOGUE_CHANGE: _ClassVar[BusMessageType]
    BUS_MESSAGE_TYPE_DECISION_RECORD: _ClassVar[BusMessageType]
SEED_STAGE_UNKNOWN: SeedLifecycleStage
SEED_STAGE_DORMANT: SeedLifecycleStage
SEED_STAGE_GERMINATED: SeedLifecycleStage
SEED_STAGE_TRAINING: SeedLifecycleStage
SEED_STAGE_BLENDING: SeedLifecycleStage
SEED_STAGE_SHADOWING: SeedLifecycleStage
SEED_STAGE_PROBATIONARY: SeedLifecycleStage
SEED_STAGE_FOSSILIZED: SeedLifecycleStage
SEED_STAGE_CULLED: SeedLifecycleStage
SEED_STAGE_EMBARGOED: SeedLifecycleStage
SEED_STAGE_RESETTING: SeedLifecycleStage
SEED_STAGE_TERMINATED: SeedLifecycleStage
SEED_GATE_UNKNOWN: SeedLifecycleGate
SEED_GATE_G0_SANITY: SeedLifecycleGate
SEED_GATE_G1_TRAINING_READINESS: SeedLifecycleGate
SEED_GATE_G2_GRADIENT_HEALTH: SeedLifecycleGate
SEED_GATE_G3_CONTRIBUTION: SeedLifecycleGate
SEED_GATE_G4_PROBATION: SeedLifecycleGate
SEED_GATE_G5_RESET: SeedLifecycleGate
COMMAND_UNSPECIFIED: CommandType
COMMAND_SEED: CommandType
COMMAND_ROLLBACK: CommandType
COMMAND_OPTIMIZER: CommandType
COMMAND_CIRCUIT_BREAKER: CommandType
COMMAND_PAUSE: CommandType
COMMAND_EMERGENCY: CommandType
COMMAND_WAIT: CommandType
SEED_OP_UNSPECIFIED: SeedOperation
SEED_OP_GERMINATE: SeedOperation
SEED_OP_FOSSILIZE: SeedOperation
SEED_OP_CULL: SeedOperation
SEED_OP_CANCEL: SeedOperation
BLEND_MODE_UNSPECIFIED: BlendMode
BLEND_MODE_CONVEX: BlendMode
BLEND_MODE_RESIDUAL: BlendMode
BLEND_MODE_CHANNEL: BlendMode
BLEND_MODE_CONFIDENCE: BlendMode
POLICY_ACTION_UNSPECIFIED: PolicyAction
POLICY_ACTION_WAIT: PolicyAction
POLICY_ACTION_GERMINATE: PolicyAction
POLICY_ACTION_FOSSILIZE: PolicyAction
POLICY_ACTION_CULL: PolicyAction
POLICY_ACTION_ADJUST_LR: PolicyAction
POLICY_ACTION_PAUSE: PolicyAction
FIELD_REPORT_OUTCOME_UNSPECIFIED: FieldReportOutcome
FIELD_REPORT_OUTCOME_SUCCESS: FieldReportOutcome
FIELD_REPORT_OUTCOME_NEUTRAL: FieldReportOutcome
FIELD_REPORT_OUTCOME_REGRESSION: FieldReportOutcome
FIELD_REPORT_OUTCOME_ABORTED: FieldReportOutcome
MESSAGE_PRIORITY_UNSPECIFIED: MessagePriority
MESSAGE_PRIORITY_LOW: MessagePriority
MESSAGE_PRIORITY_NORMAL: MessagePriority
MESSAGE_PRIORITY_HIGH: MessagePriority
MESSAGE_PRIORITY_CRITICAL: MessagePriority
TELEMETRY_LEVEL_UNSPECIFIED: TelemetryLevel
TELEMETRY_LEVEL_DEBUG: TelemetryLevel
TELEMETRY_LEVEL_INFO: TelemetryLevel
TELEMETRY_LEVEL_WARNING: TelemetryLevel
TELEMETRY_LEVEL_ERROR: TelemetryLevel
TELEMETRY_LEVEL_CRITICAL: TelemetryLevel
HEALTH_STATUS_UNSPECIFIED: HealthStatus
HEALTH_STATUS_HEALTHY: HealthStatus
HEALTH_STATUS_DEGRADED: HealthStatus
HEALTH_STATUS_UNHEALTHY: HealthStatus
HEALTH_STATUS_CRITICAL: HealthStatus
BLUEPRINT_TIER_UNSPECIFIED: BlueprintTier
BLUEPRINT_TIER_SAFE: BlueprintTier
BLUEPRINT_TIER_EXPERIMENTAL: BlueprintTier
BLUEPRINT_TIER_HIGH_RISK: BlueprintTier
EMERGENCY_LEVEL_UNSPECIFIED: EmergencyLevel
EMERGENCY_LEVEL_NOTICE: EmergencyLevel
EMERGENCY_LEVEL_ELEVATED: EmergencyLevel
EMERGENCY_LEVEL_CONSERVATIVE: EmergencyLevel
EMERGENCY_LEVEL_HALT: EmergencyLevel
CIRCUIT_STATE_UNSPECIFIED: CircuitBreakerState
CIRCUIT_STATE_CLOSED: CircuitBreakerState
CIRCUIT_STATE_OPEN: CircuitBreakerState
CIRCUIT_STATE_HALF_OPEN: CircuitBreakerState
CATALOGUE_CHANGE_UNSPECIFIED: CatalogueChangeKind
CATALOGUE_CHANGE_ADDED: CatalogueChangeKind
CATALOGUE_CHANGE_UPDATED: CatalogueChangeKind
CATALOGUE_CHANGE_QUARANTINED: CatalogueChangeKind
CATALOGUE_CHANGE_REMOVED: CatalogueChangeKind
BUS_MESSAGE_TYPE_UNSPECIFIED: BusMessageType
BUS_MESSAGE_TYPE_SYSTEM_STATE: BusMessageType
BUS_MESSAGE_TYPE_ADAPTATION_COMMAND: BusMessageType
BUS_MESSAGE_TYPE_FIELD_REPORT: BusMessageType
BUS_MESSAGE_TYPE_TELEMETRY: BusMessageType
BUS_MESSAGE_TYPE_POLICY_UPDATE: BusMessageType
BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL: BusMessageType
BUS_MESSAGE_TYPE_CATALOGUE_CHANGE: BusMessageType
BUS_MESSAGE_TYPE_DECISION_RECORD: BusMessageType

class HardwareContext(_message.Message):
    __slots__ = ("device_type", "device_id", "total_memory_gb", "available_memory_gb", "temperature_celsius", "utilization_percent", "compute_capability")
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    device_type: str
    device_id: str
    total_memory_gb: float
    available_memory_gb: float
    temperature_celsius: float
    utilization_percent: float
    compute_capability: int
    def __init__(self, device_type: _Optional[str] = ..., device_id: _Optional[str] = ..., total_memory_gb: _Optional[float] = ..., available_memory_gb: _Optional[float] = ..., temperature_celsius: _Optional[float] = ..., utilization_percent: _Optional[float] = ..., compute_capability: _Optional[int] = ...) -> None: ...

class LayerDescriptor(_message.Message):
    __slots__ = ("layer_id", "kind", "width", "depth", "parameter_count")
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    layer_id: str
    kind: str
    width: int
    depth: int
    parameter_count: int
    def __init__(self, layer_id: _Optional[str] = ..., kind: _Optional[str] = ..., width: _Optional[int] = ..., depth: _Optional[int] = ..., parameter_count: _Optional[int] = ...) -> None: ...

class SlotDescriptor(_message.Message):
    __slots__ = ("slot_id", "layer_id", "width", "kind")
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    slot_id: str
    layer_id: str
    width: int
    kind: str
    def __init__(self, slot_id: _Optional[str] = ..., layer_id: _Optional[str] = ..., width: _Optional[int] = ..., kind: _Optional[str] = ...) -> None: ...

class HostTopology(_message.Message):
    __slots__ = ("layers", "slots")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerDescriptor]
    slots: _containers.RepeatedCompositeFieldContainer[SlotDescriptor]
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerDescriptor, _Mapping]]] = ..., slots: _Optional[_Iterable[_Union[SlotDescriptor, _Mapping]]] = ...) -> None: ...

class SeedState(_message.Message):
    __slots__ = ("seed_id", "stage", "gradient_norm", "learning_rate", "layer_depth", "metrics", "age_epochs", "risk_score", "slot_id", "blueprint_id", "blend_mode", "age_steps")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SEED_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_NORM_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LAYER_DEPTH_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    AGE_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    RISK_SCORE_FIELD_NUMBER: _ClassVar[int]
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    BLEND_MODE_FIELD_NUMBER: _ClassVar[int]
    AGE_STEPS_FIELD_NUMBER: _ClassVar[int]
    seed_id: str
    stage: SeedLifecycleStage
    gradient_norm: float
    learning_rate: float
    layer_depth: int
    metrics: _containers.ScalarMap[str, float]
    age_epochs: int
    risk_score: float
    slot_id: str
    blueprint_id: str
    blend_mode: BlendMode
    age_steps: int
    def __init__(self, seed_id: _Optional[str] = ..., stage: _Optional[_Union[SeedLifecycleStage, str]] = ..., gradient_norm: _Optional[float] = ..., learning_rate: _Optional[float] = ..., layer_depth: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., age_epochs: _Optional[int] = ..., risk_score: _Optional[float] = ..., slot_id: _Optional[str] = ..., blueprint_id: _Optional[str] = ..., blend_mode: _Optional[_Union[BlendMode, str]] = ..., age_steps: _Optional[int] = ...) -> None: ...

class SystemStatePacket(_message.Message):
    __slots__ = ("version", "current_epoch", "validation_accuracy", "validation_loss", "timestamp_ns", "hardware_context", "training_metrics", "seed_states", "packet_id", "global_step", "training_loss", "source_subsystem", "training_run_id", "experiment_name", "topology", "blueprint_ids")
    class TrainingMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_NS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TRAINING_METRICS_FIELD_NUMBER: _ClassVar[int]
    SEED_STATES_FIELD_NUMBER: _ClassVar[int]
    PACKET_ID_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_STEP_FIELD_NUMBER: _ClassVar[int]
    TRAINING_LOSS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SUBSYSTEM_FIELD_NUMBER: _ClassVar[int]
    TRAINING_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_IDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    current_epoch: int
    validation_accuracy: float
    validation_loss: float
    timestamp_ns: int
    hardware_context: HardwareContext
    training_metrics: _containers.ScalarMap[str, float]
    seed_states: _containers.RepeatedCompositeFieldContainer[SeedState]
    packet_id: str
    global_step: int
    training_loss: float
    source_subsystem: str
    training_run_id: str
    experiment_name: str
    topology: HostTopology
    blueprint_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., current_epoch: _Optional[int] = ..., validation_accuracy: _Optional[float] = ..., validation_loss: _Optional[float] = ..., timestamp_ns: _Optional[int] = ..., hardware_context: _Optional[_Union[HardwareContext, _Mapping]] = ..., training_metrics: _Optional[_Mapping[str, float]] = ..., seed_states: _Optional[_Iterable[_Union[SeedState, _Mapping]]] = ..., packet_id: _Optional[str] = ..., global_step: _Optional[int] = ..., training_loss: _Optional[float] = ..., source_subsystem: _Optional[str] = ..., training_run_id: _Optional[str] = ..., experiment_name: _Optional[str] = ..., topology: _Optional[_Union[HostTopology, _Mapping]] = ..., blueprint_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class CommandSeedOperation(_message.Message):
    __slots__ = ("operation", "blueprint_id", "parameters", "slot_id", "blend_mode", "alpha_ramp_steps")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    BLEND_MODE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_RAMP_STEPS_FIELD_NUMBER: _ClassVar[int]
    operation: SeedOperation
    blueprint_id: str
    parameters: _containers.ScalarMap[str, float]
    slot_id: str
    blend_mode: BlendMode
    alpha_ramp_steps: int
    def __init__(self, operation: _Optional[_Union[SeedOperation, str]] = ..., blueprint_id: _Optional[str] = ..., parameters: _Optional[_Mapping[str, float]] = ..., slot_id: _Optional[str] = ..., blend_mode: _Optional[_Union[BlendMode, str]] = ..., alpha_ramp_steps: _Optional[int] = ...) -> None: ...

class CommandOptimizerAdjustment(_message.Message):
    __slots__ = ("optimizer_id", "hyperparameters")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    OPTIMIZER_ID_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    optimizer_id: str
    hyperparameters: _containers.ScalarMap[str, float]
    def __init__(self, optimizer_id: _Optional[str] = ..., hyperparameters: _Optional[_Mapping[str, float]] = ...) -> None: ...

class CommandCircuitBreaker(_message.Message):
    __slots__ = ("desired_state", "rationale")
    DESIRED_STATE_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    desired_state: CircuitBreakerState
    rationale: str
    def __init__(self, desired_state: _Optional[_Union[CircuitBreakerState, str]] = ..., rationale: _Optional[str] = ...) -> None: ...

class AdaptationCommand(_message.Message):
    __slots__ = ("version", "command_id", "command_type", "target_seed_id", "execution_deadline_ms", "issued_at", "issued_by", "seed_operation", "optimizer_adjustment", "circuit_breaker", "annotations", "signature", "nonce", "training_run_id")
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_TYPE_FIELD_NUMBER: _ClassVar[int]
    TARGET_SEED_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    ISSUED_BY_FIELD_NUMBER: _ClassVar[int]
    SEED_OPERATION_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_ADJUSTMENT_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_BREAKER_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TRAINING_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    version: int
    command_id: str
    command_type: CommandType
    target_seed_id: str
    execution_deadline_ms: int
    issued_at: _timestamp_pb2.Timestamp
    issued_by: str
    seed_operation: CommandSeedOperation
    optimizer_adjustment: CommandOptimizerAdjustment
    circuit_breaker: CommandCircuitBreaker
    annotations: _containers.ScalarMap[str, str]
    signature: str
    nonce: str
    training_run_id: str
    def __init__(self, version: _Optional[int] = ..., command_id: _Optional[str] = ..., command_type: _Optional[_Union[CommandType, str]] = ..., target_seed_id: _Optional[str] = ..., execution_deadline_ms: _Optional[int] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., issued_by: _Optional[str] = ..., seed_operation: _Optional[_Union[CommandSeedOperation, _Mapping]] = ..., optimizer_adjustment: _Optional[_Union[CommandOptimizerAdjustment, _Mapping]] = ..., circuit_breaker: _Optional[_Union[CommandCircuitBreaker, _Mapping]] = ..., annotations: _Optional[_Mapping[str, str]] = ..., signature: _Optional[str] = ..., nonce: _Optional[str] = ..., training_run_id: _Optional[str] = ...) -> None: ...

class FieldReport(_message.Message):
    __slots__ = ("report_id", "command_id", "training_run_id", "seed_id", "blueprint_id", "outcome", "metrics", "observation_window_epochs", "issued_at", "tamiyo_policy_version", "follow_up_actions", "notes", "action")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_WINDOW_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    TAMIYO_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_UP_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    report_id: str
    command_id: str
    training_run_id: str
    seed_id: str
    blueprint_id: str
    outcome: FieldReportOutcome
    metrics: _containers.ScalarMap[str, float]
    observation_window_epochs: int
    issued_at: _timestamp_pb2.Timestamp
    tamiyo_policy_version: str
    follow_up_actions: _containers.RepeatedScalarFieldContainer[str]
    notes: str
    action: PolicyAction
    def __init__(self, report_id: _Optional[str] = ..., command_id: _Optional[str] = ..., training_run_id: _Optional[str] = ..., seed_id: _Optional[str] = ..., blueprint_id: _Optional[str] = ..., outcome: _Optional[_Union[FieldReportOutcome, str]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., observation_window_epochs: _Optional[int] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tamiyo_policy_version: _Optional[str] = ..., follow_up_actions: _Optional[_Iterable[str]] = ..., notes: _Optional[str] = ..., action: _Optional[_Union[PolicyAction, str]] = ...) -> None: ...

class DecisionRecord(_message.Message):
    __slots__ = ("decision_id", "command_id", "training_run_id", "packet", "action", "log_prob", "value_estimate", "policy_version", "issued_at", "head_choices", "head_log_probs", "final_command_type", "risk_reason", "slot_id", "blueprint_id")
    class HeadChoicesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class HeadLogProbsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PACKET_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    VALUE_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    HEAD_CHOICES_FIELD_NUMBER: _ClassVar[int]
    HEAD_LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    FINAL_COMMAND_TYPE_FIELD_NUMBER: _ClassVar[int]
    RISK_REASON_FIELD_NUMBER: _ClassVar[int]
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    command_id: str
    training_run_id: str
    packet: SystemStatePacket
    action: PolicyAction
    log_prob: float
    value_estimate: float
    policy_version: str
    issued_at: _timestamp_pb2.Timestamp
    head_choices: _containers.ScalarMap[str, int]
    head_log_probs: _containers.ScalarMap[str, float]
    final_command_type: CommandType
    risk_reason: str
    slot_id: str
    blueprint_id: str
    def __init__(self, decision_id: _Optional[str] = ..., command_id: _Optional[str] = ..., training_run_id: _Optional[str] = ..., packet: _Optional[_Union[SystemStatePacket, _Mapping]] = ..., action: _Optional[_Union[PolicyAction, str]] = ..., log_prob: _Optional[float] = ..., value_estimate: _Optional[float] = ..., policy_version: _Optional[str] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., head_choices: _Optional[_Mapping[str, int]] = ..., head_log_probs: _Optional[_Mapping[str, float]] = ..., final_command_type: _Optional[_Union[CommandType, str]] = ..., risk_reason: _Optional[str] = ..., slot_id: _Optional[str] = ..., blueprint_id: _Optional[str] = ...) -> None: ...

class PolicyUpdate(_message.Message):
    __slots__ = ("version", "policy_id", "training_run_id", "issued_at", "tamiyo_policy_version", "payload", "payload_sha256", "parent_version", "architecture_version", "sequence", "registry_digest", "signature", "nonce", "validation_metrics")
    class ValidationMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    TAMIYO_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_METRICS_FIELD_NUMBER: _ClassVar[int]
    version: int
    policy_id: str
    training_run_id: str
    issued_at: _timestamp_pb2.Timestamp
    tamiyo_policy_version: str
    payload: bytes
    payload_sha256: str
    parent_version: str
    architecture_version: str
    sequence: int
    registry_digest: str
    signature: str
    nonce: str
    validation_metrics: _containers.ScalarMap[str, float]
    def __init__(self, version: _Optional[int] = ..., policy_id: _Optional[str] = ..., training_run_id: _Optional[str] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tamiyo_policy_version: _Optional[str] = ..., payload: _Optional[bytes] = ..., payload_sha256: _Optional[str] = ..., parent_version: _Optional[str] = ..., architecture_version: _Optional[str] = ..., sequence: _Optional[int] = ..., registry_digest: _Optional[str] = ..., signature: _Optional[str] = ..., nonce: _Optional[str] = ..., validation_metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class MetricPoint(_message.Message):
    __slots__ = ("name", "value", "unit", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    unit: str
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ..., unit: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TelemetryEvent(_message.Message):
    __slots__ = ("description", "level", "attributes", "name")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    description: str
    level: TelemetryLevel
    attributes: _containers.ScalarMap[str, str]
    name: str
    def __init__(self, description: _Optional[str] = ..., level: _Optional[_Union[TelemetryLevel, str]] = ..., attributes: _Optional[_Mapping[str, str]] = ..., name: _Optional[str] = ...) -> None: ...

class SystemHealth(_message.Message):
    __slots__ = ("status", "summary", "indicators")
    class IndicatorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    INDICATORS_FIELD_NUMBER: _ClassVar[int]
    status: HealthStatus
    summary: str
    indicators: _containers.ScalarMap[str, float]
    def __init__(self, status: _Optional[_Union[HealthStatus, str]] = ..., summary: _Optional[str] = ..., indicators: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TelemetryPacket(_message.Message):
    __slots__ = ("packet_id", "timestamp", "source_subsystem", "level", "metrics", "events", "system_health", "priority", "training_run_id")
    PACKET_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SUBSYSTEM_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_HEALTH_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TRAINING_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    packet_id: str
    timestamp: _timestamp_pb2.Timestamp
    source_subsystem: str
    level: TelemetryLevel
    metrics: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    events: _containers.RepeatedCompositeFieldContainer[TelemetryEvent]
    system_health: SystemHealth
    priority: MessagePriority
    training_run_id: str
    def __init__(self, packet_id: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source_subsystem: _Optional[str] = ..., level: _Optional[_Union[TelemetryLevel, str]] = ..., metrics: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[TelemetryEvent, _Mapping]]] = ..., system_health: _Optional[_Union[SystemHealth, _Mapping]] = ..., priority: _Optional[_Union[MessagePriority, str]] = ..., training_run_id: _Optional[str] = ...) -> None: ...

class BlueprintParameterBounds(_message.Message):
    __slots__ = ("min_value", "max_value")
    MIN_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_FIELD_NUMBER: _ClassVar[int]
    min_value: float
    max_value: float
    def __init__(self, min_value: _Optional[float] = ..., max_value: _Optional[float] = ...) -> None: ...

class BlueprintDescriptor(_message.Message):
    __slots__ = ("blueprint_id", "name", "tier", "description", "allowed_parameters", "risk", "stage", "quarantine", "host_kinds", "revision")
    class AllowedParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: BlueprintParameterBounds
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[BlueprintParameterBounds, _Mapping]] = ...) -> None: ...
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    QUARANTINE_FIELD_NUMBER: _ClassVar[int]
    HOST_KINDS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    blueprint_id: str
    name: str
    tier: BlueprintTier
    description: str
    allowed_parameters: _containers.MessageMap[str, BlueprintParameterBounds]
    risk: float
    stage: int
    quarantine: bool
    host_kinds: _containers.RepeatedScalarFieldContainer[str]
    revision: int
    def __init__(self, blueprint_id: _Optional[str] = ..., name: _Optional[str] = ..., tier: _Optional[_Union[BlueprintTier, str]] = ..., description: _Optional[str] = ..., allowed_parameters: _Optional[_Mapping[str, BlueprintParameterBounds]] = ..., risk: _Optional[float] = ..., stage: _Optional[int] = ..., quarantine: _Optional[bool] = ..., host_kinds: _Optional[_Iterable[str]] = ..., revision: _Optional[int] = ...) -> None: ...

class CatalogueChange(_message.Message):
    __slots__ = ("kind", "blueprint_id", "descriptor", "issued_at", "revision")
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    kind: CatalogueChangeKind
    blueprint_id: str
    descriptor: BlueprintDescriptor
    issued_at: _timestamp_pb2.Timestamp
    revision: int
    def __init__(self, kind: _Optional[_Union[CatalogueChangeKind, str]] = ..., blueprint_id: _Optional[str] = ..., descriptor: _Optional[_Union[BlueprintDescriptor, _Mapping]] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class EmergencySignal(_message.Message):
    __slots__ = ("version", "level", "reason", "origin", "triggered_at", "monotonic_time_ms", "training_run_id", "attributes", "signal_id")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    TRIGGERED_AT_FIELD_NUMBER: _ClassVar[int]
    MONOTONIC_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_ID_FIELD_NUMBER: _ClassVar[int]
    version: int
    level: EmergencyLevel
    reason: str
    origin: str
    triggered_at: _timestamp_pb2.Timestamp
    monotonic_time_ms: int
    training_run_id: str
    attributes: _containers.ScalarMap[str, str]
    signal_id: str
    def __init__(self, version: _Optional[int] = ..., level: _Optional[_Union[EmergencyLevel, str]] = ..., reason: _Optional[str] = ..., origin: _Optional[str] = ..., triggered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., monotonic_time_ms: _Optional[int] = ..., training_run_id: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ..., signal_id: _Optional[str] = ...) -> None: ...

class BusEnvelope(_message.Message):
    __slots__ = ("message_type", "payload", "attributes", "priority", "message_id", "trace_id", "published_at_ns")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MESSAGE_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_NS_FIELD_NUMBER: _ClassVar[int]
    message_type: BusMessageType
    payload: bytes
    attributes: _containers.ScalarMap[str, str]
    priority: MessagePriority
    message_id: str
    trace_id: str
    published_at_ns: int
    def __init__(self, message_type: _Optional[_Union[BusMessageType, str]] = ..., payload: _Optional[bytes] = ..., attributes: _Optional[_Mapping[str, str]] = ..., priority: _Optional[_Union[MessagePriority, str]] = ..., message_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., published_at_ns: _Optional[int] = ...) -> None: ...
