"""The agent's configuration: one TOML file, validated once, frozen.

A firmware profile (`device.profile`, a file in `agent/firmware-profiles/`,
shipped as package data) holds board defaults for the `runtime`, `camera`, `outbox`, `service` and
`telemetry` sections; the agent file overrides them key by key.

The tables live in `broker` ([local], [uplink]), `tables` (the small ones) and
`pipeline` ([[pipeline]]); `load` reads the file into a `Config`; `preflight`
checks what `run` needs from this machine. Import every name from here.
"""

from __future__ import annotations

from agent.config.broker import DEFAULT_URL, BrokerConfig
from agent.config.load import (
    PROFILE_DIR,
    PROFILE_SECTIONS,
    Config,
    from_dict,
    load,
    load_profile,
    overlay,
    with_data_dir,
)
from agent.config.pipeline import PipelineConfig, StepConfig, TriggerConfig
from agent.config.preflight import preflight
from agent.config.tables import (
    CameraConfig,
    DeviceConfig,
    ModelsConfig,
    OtaConfig,
    OutboxConfig,
    RuntimeConfig,
    ServiceConfig,
    TelemetryConfig,
)
from agent.errors import ConfigError

__all__ = [
    "DEFAULT_URL",
    "PROFILE_DIR",
    "PROFILE_SECTIONS",
    "BrokerConfig",
    "CameraConfig",
    "Config",
    "ConfigError",
    "DeviceConfig",
    "ModelsConfig",
    "OtaConfig",
    "OutboxConfig",
    "PipelineConfig",
    "RuntimeConfig",
    "ServiceConfig",
    "StepConfig",
    "TelemetryConfig",
    "TriggerConfig",
    "from_dict",
    "load",
    "load_profile",
    "overlay",
    "preflight",
    "with_data_dir",
]
