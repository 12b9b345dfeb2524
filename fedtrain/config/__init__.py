"""Typed run configuration: dataclasses by section, TOML loading, ``--set`` overrides and
validation.

Every field has a one-line docstring under it; ``__post_init__`` validates and names the key and
the allowed values in its message. Errors a user can cause raise :class:`ConfigError`.

- :mod:`~fedtrain.config.run`: ``[run]``, ``[model]``, ``[data]``, ``[train]``
- :mod:`~fedtrain.config.strategy`: ``[strategy]``
- :mod:`~fedtrain.config.transport`: ``[transport]``, ``[storage]``, ``[round]``,
  ``[reliability]``, ``[faults]``
- :mod:`~fedtrain.config.simulation`: ``[simulation]`` and its silo profiles
- :mod:`~fedtrain.config.root`: :class:`Config`, all sections together
- :mod:`~fedtrain.config.validate`: rules across sections (asking the strategy registry)
- :mod:`~fedtrain.config.load`: TOML, overrides, packaged examples, the config hash
"""

from __future__ import annotations

from fedtrain.config.errors import ConfigError
from fedtrain.config.load import (
    apply_overrides,
    config_from_dict,
    config_sha256,
    config_to_dict,
    load_config,
    packaged_example,
)
from fedtrain.config.root import Config
from fedtrain.config.run import DataSection, ModelSection, RunSection, TrainSection
from fedtrain.config.simulation import SiloProfile, SimulationSection
from fedtrain.config.strategy import StrategySection
from fedtrain.config.transport import (
    FaultsSection,
    ReliabilitySection,
    RoundSection,
    StorageSection,
    TransportSection,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataSection",
    "FaultsSection",
    "ModelSection",
    "ReliabilitySection",
    "RoundSection",
    "RunSection",
    "SiloProfile",
    "SimulationSection",
    "StorageSection",
    "StrategySection",
    "TrainSection",
    "TransportSection",
    "apply_overrides",
    "config_from_dict",
    "config_sha256",
    "config_to_dict",
    "load_config",
    "packaged_example",
]
