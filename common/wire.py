"""What travels between server and sites: the records a message carries, and the typed contract of each.

A train or evaluate request carries ``adapter`` (an ArrayRecord of adapter tensors, by name) and
``plan`` (:class:`TrainPlan` or :class:`EvaluatePlan`). Replies carry ``status`` (:class:`SiteStatus`),
``metrics`` (:class:`TrainReport` or :class:`EvaluationReport`) and, from training in the clear, ``adapter``.

Under secure aggregation a trained reply carries ``masked`` (one ArrayRecord) and the next round's
``secagg`` keys instead of ``adapter``; the SecAgg+ steps exchange ``secagg`` records and reply with
a ``status`` of state ``ok`` (see ``common.secure_aggregation.records``).

When the server ends a run early it sends each site a :class:`RunEnded` request (message type
:data:`RUN_ENDED`, a ``plan`` record only); the site answers with a ``status`` of state ``ok``.

Every scalar key on the wire is spelled here and nowhere else: field ``a_fingerprint`` travels as
``a-fingerprint``. ``from_record`` checks a record once, where it arrives, and raises
:class:`WireError` naming the record, the field and what was expected; past that edge, code holds
typed values. Plans carry :data:`PROTOCOL_VERSION`, and a site refuses a plan of another version
rather than guess what its fields mean.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar, get_type_hints

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import SType

ADAPTER = "adapter"
SECAGG = "secagg"
MASKED = "masked"
PLAN = "plan"
METRICS = "metrics"
STATUS = "status"

#: Bumped whenever a record's keys, types or meaning change, so that a server and a site of
#: different releases refuse each other plainly instead of misreading a field.
PROTOCOL_VERSION = 4  # 2: TrainPlan.proximal_mu (FedProx); 3: TrainPlan.site_* (site-level DP); 4: RunEnded

#: The message type of :class:`RunEnded`: the server tells a site the run is over (early stopping).
RUN_ENDED = "train.run_ended"


class WireError(ValueError):
    """A record that breaks the contract; the message names the record, the field and what was expected."""


class ProtocolMismatch(WireError):
    """The server speaks another version of the contract; the message says which side to upgrade."""


class SiteNoise(Enum):
    """Site-level DP in a train plan: off, or who adds the Gaussian noise to the sum of clipped updates."""

    OFF = "off"
    DISTRIBUTED = "distributed"  # each site adds a share before masking (the operator never sees the sum without)
    SERVER = "server"  # the site only clips; the server adds the noise (the operator is trusted)


class SiteState(Enum):
    """What a site did with a request, as its ``status`` record says."""

    TRAINED = "trained"
    REFUSED = "refused"
    DECLINED = "declined"  # asked to evaluate, but the site does not share its metrics
    EVALUATED = "evaluated"
    OK = "ok"  # a secure-aggregation step done


def _wire_key(name: str) -> str:
    """The key a field travels under: kebab-case, as Flower's own records spell theirs."""
    return name.replace("_", "-")


_EXPECTED = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}

R = TypeVar("R", bound="_Record")


def _decode(kind: type[Any], value: Any) -> Any:
    """``value`` as ``kind``, or TypeError / ValueError: an integer is a number, but a boolean is neither."""
    if isinstance(kind, type) and issubclass(kind, Enum):
        return kind(value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    fits = {
        bool: isinstance(value, bool),
        int: number and isinstance(value, int),
        float: number,
        str: isinstance(value, str),
    }
    if not fits[kind]:
        raise TypeError(value)
    return kind(value)


def _expected(kind: type) -> str:
    if isinstance(kind, type) and issubclass(kind, Enum):
        return "one of " + ", ".join(repr(m.value) for m in kind)
    return _EXPECTED[kind]


@dataclass(frozen=True)
class _Record:
    """One record's contract: a frozen dataclass whose fields are the record's keys (see :func:`_wire_key`)."""

    #: The name the record goes by in a message's RecordDict.
    RECORD: ClassVar[str]

    @classmethod
    def _where(cls) -> str:
        return f"{cls.__name__} ({cls.RECORD!r} record)"

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The record's keys, in field order."""
        return tuple(_wire_key(f.name) for f in dataclasses.fields(cls))

    def _values(self) -> dict[str, Any]:
        values = {_wire_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v.value if isinstance(v, Enum) else v for k, v in values.items()}

    @classmethod
    def from_record(cls: type[R], record: Mapping[str, Any]) -> R:
        """The typed record; WireError if a field is missing or of the wrong type (extra keys are ignored)."""
        hints = get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            key, kind = _wire_key(f.name), hints[f.name]
            if key not in record:
                raise WireError(f"{cls._where()}: field {key!r} is missing, expected {_expected(kind)}")
            try:
                values[f.name] = _decode(kind, record[key])
            except (TypeError, ValueError):
                value = record[key]
                raise WireError(
                    f"{cls._where()}: field {key!r} is {value!r} ({type(value).__name__}), expected {_expected(kind)}"
                ) from None
        return cls(**values)

    @classmethod
    def from_content(cls: type[R], content: RecordDict) -> R:
        """The record out of a message's content; WireError if the message carries none."""
        if cls.RECORD not in content:
            raise WireError(f"{cls._where()}: the message carries no such record (it has {sorted(content)})")
        return cls.from_record(content[cls.RECORD])


@dataclass(frozen=True)
class _ConfigContract(_Record):
    """A contract carried as a ConfigRecord (plans, statuses)."""

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(self._values())


@dataclass(frozen=True)
class _MetricContract(_Record):
    """A contract carried as a MetricRecord (reports: numbers only)."""

    def to_record(self) -> MetricRecord:
        return MetricRecord(self._values())


@dataclass(frozen=True)
class _Plan(_ConfigContract):
    """A request's plan: checked for its protocol version before anything else, since another
    version may name or mean its fields differently."""

    RECORD = PLAN

    @classmethod
    def from_record(cls: type[R], record: Mapping[str, Any]) -> R:
        theirs = record.get(_wire_key("protocol_version"))
        if theirs is None:
            raise ProtocolMismatch(
                f"server speaks an unversioned fedtune wire protocol (before {PROTOCOL_VERSION}), "
                f"this site {PROTOCOL_VERSION}: upgrade fedtune on the server"
            )
        if isinstance(theirs, int) and not isinstance(theirs, bool) and theirs != PROTOCOL_VERSION:
            side = "this site" if theirs > PROTOCOL_VERSION else "the server"
            raise ProtocolMismatch(
                f"server speaks fedtune wire protocol {theirs}, this site {PROTOCOL_VERSION}: upgrade fedtune on {side}"
            )
        return super().from_record(record)


@dataclass(frozen=True)
class TrainPlan(_Plan):
    """What the server asks of a site for one round of training: public settings, never data."""

    run_id: str
    round: int
    total_rounds: int
    local_steps: int
    batch_size: int
    lr: float
    optimizer: str
    dp: bool
    target_epsilon: float  # the run's privacy budget; each site calibrates its own noise to it
    delta: float
    max_grad_norm: float
    a_fingerprint: str = ""  # digest of the frozen A matrices under FFA-LoRA; "" when A trains
    secure_aggregation: bool = False
    proximal_mu: float = 0.0  # FedProx: weight of mu/2 * ||w - w_global||^2 in the site's objective (0: off)
    site_noise: SiteNoise = SiteNoise.OFF  # site-level DP (DP-FedAvg): off, or who adds the noise
    site_clip_norm: float = 0.0  # S: the L2 bound a site clips its update to under site-level DP
    site_noise_multiplier: float = 0.0  # z: noise std in any revealed sum >= z * S
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class EvaluatePlan(_Plan):
    """What the server asks of a site for an evaluation of the global adapter."""

    round: int
    a_fingerprint: str = ""
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class RunEnded(_Plan):
    """The server's word that run ``run_id`` is over after round ``round`` (early stopping, say): the site
    then refuses every further train request of that run, so no more of its privacy budget is spent on it.
    Its reply is a ``status`` of state ``ok``."""

    run_id: str
    round: int  # the last round trained
    reason: str = ""
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class TrainReport(_MetricContract):
    """All a trained reply's metrics hold: public plan values and the site's DP accounting.

    The training loss is not here on purpose: it is computed on raw records without noise, so
    the DP guarantee does not cover it.
    """

    RECORD = METRICS

    num_examples: int  # the site's weight in the federated mean
    steps: int
    epsilon_spent: float  # by this site so far in the run, its ledger says (inf without DP)
    noise_multiplier: float
    sample_rate: float


@dataclass(frozen=True)
class EvaluationReport(_MetricContract):
    """A site's metrics on its own validation split, by name (``loss``, ``accuracy``, ``num-examples``...).

    A mapping rather than named fields: which metrics exist depends on the task
    (``common.evaluation``), and the contract should not change with each task. What it does fix:
    names are strings and values real numbers, held as floats, read-only.
    """

    RECORD = METRICS

    metrics: Mapping[str, float]

    def __post_init__(self) -> None:
        checked = {}
        for name, value in self.metrics.items():
            try:
                checked[str(name)] = _decode(float, value)
            except (TypeError, ValueError):
                raise WireError(
                    f"{self._where()}: metric {name!r} is {value!r} ({type(value).__name__}), "
                    f"expected {_expected(float)}"
                ) from None
        object.__setattr__(self, "metrics", MappingProxyType(checked))

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        raise TypeError("an evaluation report's keys are its metrics' names: see EvaluationReport.metrics")

    def to_record(self) -> MetricRecord:
        return MetricRecord(dict(self.metrics))

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EvaluationReport:
        return cls(record)


@dataclass(frozen=True)
class SiteStatus(_ConfigContract):
    """Who answered and what it did; ``reason`` says why it refused or declined (sent verbatim)."""

    RECORD = STATUS

    site_id: str
    state: SiteState
    reason: str = ""


def array_of(values: np.ndarray) -> Array:
    """``Array(values)`` with the same bytes (``.npy``), built in one copy.

    Flower's constructor runs ``np.save`` into a growing ``BytesIO``, which costs 10 ms for a
    masked vector of a million 64-bit values (odd-sized buffers grow by copying) against
    0.3 ms here; a site sends one every round.
    """
    a = np.ascontiguousarray(values)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(a))
    data = b"".join((header.getvalue(), a.data.cast("B")))
    return Array(dtype=str(a.dtype), shape=tuple(a.shape), stype=SType.NUMPY, data=data)


def to_array_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: array_of(np.asarray(v, dtype=np.float32)) for k, v in state.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def array_record_nbytes(record: ArrayRecord) -> int:
    """Bytes of tensor payload (serialised array data) in an ArrayRecord."""
    return sum(len(a.data) for a in record.values())


def payload_nbytes(content: RecordDict) -> int:
    """Tensor bytes in a message's content (configs and metrics are a few hundred bytes on top)."""
    return sum(array_record_nbytes(r) for r in content.array_records.values())


def flatten_adapter(state: dict[str, np.ndarray]) -> np.ndarray:
    """All tensors as one float32 vector, in sorted name order (the secure-aggregation layout)."""
    return np.concatenate([np.asarray(state[k], dtype=np.float32).ravel() for k in sorted(state)])


def unflatten_adapter(vector: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten_adapter`, with names and shapes taken from ``like``."""
    expected = sum(int(np.size(like[k])) for k in like)
    if vector.shape != (expected,):
        raise ValueError(f"vector of shape {vector.shape} does not fit the adapter's {expected} values")
    out, offset = {}, 0
    for k in sorted(like):
        size = int(np.size(like[k]))
        out[k] = vector[offset : offset + size].reshape(np.shape(like[k])).astype(np.float32)
        offset += size
    return out
