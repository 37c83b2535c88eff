"""A site's persistent record of the privacy it has spent, one entry per round trained.

The ledger lives on the site's own disk and is the site's authority: training is refused
before it starts when the next round would take epsilon past the site's budget. It is
rewritten atomically after each round, so a crash leaves the previous, valid ledger.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedtune.common.atomic_files import atomic_write_json
from fedtune.common.privacy.accounting import StepGroup, epsilon_spent

LEDGER_VERSION = 1


class PrivacyBudgetExceeded(RuntimeError):
    """Training this round would spend more privacy than the site allows."""


class LedgerError(ValueError):
    """The ledger file is unreadable or inconsistent; it is never overwritten in that state."""


@dataclass(frozen=True)
class LedgerEntry:
    run_id: str
    round: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    epsilon: float
    timestamp: float = field(default_factory=time.time)
    mechanism: str = "dp-sgd"  # or "label-histogram" (one Gaussian release, sample rate 1)


@dataclass
class PrivacyLedger:
    path: Path
    delta: float
    accountant: str = "rdp"
    entries: list[LedgerEntry] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path, delta: float, accountant: str = "rdp") -> PrivacyLedger:
        """Load the ledger at ``path`` (or start an empty one); delta must match what was spent under."""
        path = Path(path)
        if not path.exists():
            return cls(path=path, delta=delta, accountant=accountant)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            entries = [LedgerEntry(**e) for e in raw["entries"]]
            stored_delta, stored_acc = float(raw["delta"]), raw["accountant"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise LedgerError(
                f"{path}: unreadable privacy ledger ({exc}); restore it from backup, never delete it"
            ) from exc
        if stored_delta != delta or stored_acc != accountant:
            raise LedgerError(
                f"{path}: ledger was kept at delta={stored_delta} with the {stored_acc} accountant, "
                f"but this run asks for delta={delta} with {accountant}; budgets cannot be mixed"
            )
        return cls(path=path, delta=delta, accountant=accountant, entries=entries)

    @property
    def history(self) -> list[StepGroup]:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    @property
    def epsilon(self) -> float:
        return epsilon_spent(self.history, self.delta, self.accountant)

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.entries)

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        return epsilon_spent([*self.history, (noise_multiplier, sample_rate, steps)], self.delta, self.accountant)

    def check_budget(self, noise_multiplier: float, sample_rate: float, steps: int, max_epsilon: float) -> float:
        """Epsilon after the planned round, or PrivacyBudgetExceeded if that passes ``max_epsilon``."""
        after = self.epsilon_if(noise_multiplier, sample_rate, steps)
        if after > max_epsilon + 1e-9:
            raise PrivacyBudgetExceeded(
                f"privacy budget exhausted: the next round ({steps} steps, noise {noise_multiplier:.3f}, "
                f"sample rate {sample_rate:.4f}) would take epsilon from {self.epsilon:.3f} to {after:.3f}, "
                f"over this site's limit of {max_epsilon} at delta={self.delta}. Ledger: {self.path}"
            )
        return after

    def record(
        self,
        run_id: str,
        round_: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        mechanism: str = "dp-sgd",
    ) -> LedgerEntry:
        """Append a release that actually happened and persist the ledger atomically."""
        entry = LedgerEntry(
            run_id=run_id,
            round=round_,
            steps=steps,
            sample_rate=sample_rate,
            noise_multiplier=noise_multiplier,
            epsilon=self.epsilon_if(noise_multiplier, sample_rate, steps),
            mechanism=mechanism,
        )
        self.entries.append(entry)
        atomic_write_json(
            self.path,
            {
                "version": LEDGER_VERSION,
                "delta": self.delta,
                "accountant": self.accountant,
                "epsilon": entry.epsilon,
                "entries": [asdict(e) for e in self.entries],
            },
        )
        return entry
