"""The whole run config: one :class:`Config` of typed sections."""

from __future__ import annotations

from dataclasses import dataclass, field

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

__all__ = ["Config"]


@dataclass(kw_only=True, slots=True)
class Config:
    """A whole run: every section, checked across sections when made."""

    run: RunSection = field(default_factory=RunSection)
    """Run identity, length and evaluation cadence."""
    model: ModelSection = field(default_factory=ModelSection)
    """Model architecture."""
    data: DataSection = field(default_factory=DataSection)
    """Corpus, tokenizer and silo partitioning."""
    train: TrainSection = field(default_factory=TrainSection)
    """Silo-local (inner) training."""
    strategy: StrategySection = field(default_factory=StrategySection)
    """Outer algorithm."""
    transport: TransportSection = field(default_factory=TransportSection)
    """Update encoding on the wire."""
    storage: StorageSection = field(default_factory=StorageSection)
    """Where run outputs are stored."""
    round: RoundSection = field(default_factory=RoundSection)
    """When a round closes."""
    simulation: SimulationSection = field(default_factory=SimulationSection)
    """Simulated silos: engine, hardware and network."""
    reliability: ReliabilitySection = field(default_factory=ReliabilitySection)
    """Update validation limits and quarantine."""
    faults: FaultsSection = field(default_factory=FaultsSection)
    """Faults injected into simulated silos (testing and research)."""

    def __post_init__(self) -> None:
        from fedtrain.config.validate import check_config

        check_config(self)

    def silo_names(self) -> list[str]:
        """Silo names in canonical order (silo0, silo1, ...)."""
        return [f"silo{i}" for i in range(self.data.silos)]

    def silo_profiles(self) -> list[SiloProfile]:
        """One profile per silo, in silo order."""
        if not self.simulation.profiles:
            return [SiloProfile() for _ in range(self.data.silos)]
        out: list[SiloProfile] = []
        for p in self.simulation.profiles:
            out.extend([p] * p.count)
        return out

    def round_tokens(self) -> int:
        """Tokens all silos process in one full DiLoCo round."""
        return self.data.silos * self.train.inner_steps * self.train.tokens_per_step

    def steps_per_round(self) -> int:
        """Inner steps between two commits: H (DiLoCo), H/P (streaming), K (ZO), 1 (DDP)."""
        from fedtrain.strategies.registry import spec_for

        return spec_for(self).steps_per_round(self)

    def total_inner_steps(self) -> int:
        """Inner steps each silo takes over the whole run (length of the LR schedule)."""
        per_step = self.data.silos * self.train.tokens_per_step
        by_budget = -(-self.run.token_budget // per_step) if self.run.token_budget else 0
        by_rounds = self.run.rounds * self.steps_per_round()
        candidates = [s for s in (by_budget, by_rounds) if s > 0]
        return min(candidates)
