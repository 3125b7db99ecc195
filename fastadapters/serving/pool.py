"""The adapter pool: many registered adapters, a bounded set of them resident in the bank.

    pool = AdapterPool(bank, max_slots=16, budget_bytes=64 << 20)
    pool.register("math", "adapters/math")      # a fastadapters folder (any type) or a PEFT LoRA folder
    pool.register("chat", state_dict, LoraConfig(...))
    pool.pin("math")                            # never evicted
    engine = Engine(bank, pool=pool, ...)       # requests name registered adapters; the engine acquires them

Registering keeps a host copy (checked against the model at once: a bad file or an adapter for another base
model is refused there, and the pool is unchanged). `acquire(name)` makes the adapter resident (loaded into
the bank under "name@version") and counts one user; `release` drops the user. When a load needs room
(`max_slots` adapters, or `budget_bytes` of adapter weights), the least recently used adapter that is not
pinned and has no user is evicted; when none can be, `acquire` returns None and the caller waits (the
engine holds such requests until a running one finishes: nothing deadlocks, since a request holds at most
one adapter). Registering a name again makes a new version: users of the old one keep it until they
release it (then it is evicted), and later acquisitions get the new one.

Not yet: loads cost as much as rebuilding the bank's stacked layers (AdapterBank.add), not only the
adapter's own rows.
"""

import threading
from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor

from fastadapters.bank import AdapterBank


@dataclass
class _Entry:
    config: object
    state: dict  # host copy, as registered
    version: int
    nbytes: int  # the adapter's weights in the bank (model dtype)


class AdapterPool:
    """Registered adapters and the resident set in `bank` (see the module docstring)."""

    def __init__(self, bank, *, max_slots: int | None = None, budget_bytes: int | None = None):
        if not isinstance(bank, AdapterBank):
            bank = getattr(bank, "fastadapters_bank", None) or AdapterBank(bank)
        for name, value in (("max_slots", max_slots), ("budget_bytes", budget_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
        self.bank = bank
        self.max_slots, self.budget_bytes = max_slots, budget_bytes
        self._entries: dict[str, _Entry] = {}
        self._resident: OrderedDict[str, list] = OrderedDict()  # bank name -> [name, version, nbytes, users]
        self._pinned: set[str] = set()
        self._lock = threading.RLock()
        self.stats = {"hits": 0, "misses": 0, "loads": 0, "evictions": 0}

    def register(self, name: str, path_or_state, config=None) -> int:
        """Registers (or re-registers: a new version) an adapter; returns its version (1, 2, ...)."""
        if not isinstance(name, str) or not name or "@" in name:
            raise ValueError(f"adapter name must be a non-empty str without '@', got {name!r}")
        if isinstance(path_or_state, str):
            if config is not None:
                raise ValueError("config is read from the adapter folder; pass it only with a state dict")
            config, state = self.bank.read(path_or_state)
            source = path_or_state
        elif isinstance(path_or_state, dict):
            if config is None:
                raise ValueError(f"adapter {name!r}: a state dict needs its config")
            state, source = dict(path_or_state), "state"
        else:
            raise TypeError(
                f"path_or_state must be a folder path or a state dict, got {type(path_or_state).__name__}"
            )
        adapter = self.bank._adapter(name, state, config, source)  # every check the bank makes on add
        nbytes = sum(t.numel() * t.element_size() for t in _tensors(adapter))
        if self.budget_bytes is not None and nbytes > self.budget_bytes:
            raise ValueError(
                f"adapter {name!r} needs {nbytes} bytes, more than the pool's budget_bytes "
                f"({self.budget_bytes})"
            )
        with self._lock:
            old = self._entries.get(name)
            version = 1 if old is None else old.version + 1
            self._entries[name] = _Entry(config, state, version, nbytes)
            if old is not None:
                self._evict_unused(f"{name}@{old.version}")
            return version

    def unregister(self, name: str) -> None:
        """Forgets `name`: it is evicted now, or when its last running request releases it."""
        self._check(name)
        with self._lock:
            del self._entries[name]
            self._pinned.discard(name)
            for key in [k for k, slot in self._resident.items() if slot[0] == name]:
                self._evict_unused(key)

    def names(self) -> list[str]:
        """The registered adapters."""
        return list(self._entries)

    def version(self, name: str) -> int:
        """The current version of `name`."""
        self._check(name)
        return self._entries[name].version

    def resident(self) -> list[str]:
        """The bank names ("name@version") loaded now, least recently used first."""
        with self._lock:
            return list(self._resident)

    def pin(self, name: str) -> None:
        """Keeps `name` resident once loaded (it is never evicted while pinned)."""
        self._check(name)
        self._pinned.add(name)

    def unpin(self, name: str) -> None:
        self._check(name)
        self._pinned.discard(name)

    def acquire(self, name: str) -> str | None:
        """Makes `name`'s current version resident and counts one user; returns its bank name, or None when
        no room can be made now (every resident adapter is pinned or in use)."""
        self._check(name)
        with self._lock:
            entry = self._entries[name]
            key = f"{name}@{entry.version}"
            slot = self._resident.get(key)
            if slot is not None:
                self.stats["hits"] += 1
                slot[3] += 1
                self._resident.move_to_end(key)
                return key
            while not self._fits(entry.nbytes):
                victim = next(
                    (k for k, (n, v, _, users) in self._resident.items()
                     if users == 0 and not (n in self._pinned and v == self.version(n))),
                    None,
                )  # fmt: skip
                if victim is None:
                    return None
                self._evict(victim)
            self.stats["misses"] += 1
            self.bank.add(key, entry.state, entry.config, source=f"pool {name} v{entry.version}")
            self.stats["loads"] += 1
            self._resident[key] = [name, entry.version, entry.nbytes, 1]
            return key

    def release(self, key: str) -> None:
        """Drops one user of the resident adapter `key` (from acquire); an old version with no user left is
        evicted."""
        with self._lock:
            slot = self._resident.get(key)
            if slot is None:
                return
            slot[3] = max(slot[3] - 1, 0)
            self._evict_unused(key)

    def _fits(self, nbytes: int) -> bool:
        if self.max_slots is not None and len(self._resident) >= self.max_slots:
            return False
        used = sum(s[2] for s in self._resident.values())
        return self.budget_bytes is None or used + nbytes <= self.budget_bytes

    def _evict_unused(self, key: str) -> None:
        slot = self._resident.get(key)
        entry = None if slot is None else self._entries.get(slot[0])
        if slot is not None and slot[3] == 0 and (entry is None or entry.version != slot[1]):
            self._evict(key)

    def _evict(self, key: str) -> None:
        del self._resident[key]
        self.bank.remove(key)
        self.stats["evictions"] += 1

    def _check(self, name) -> None:
        if name not in self._entries:
            raise ValueError(f"unknown adapter {name!r}; registered adapters: {list(self._entries)}")


def _tensors(adapter) -> list[Tensor]:
    out = []
    for a, b in adapter.lora.values():
        out += [a, b]
    for _, down, up, _, _ in adapter.bottleneck.values():
        out += [down, up]
    for key, value in adapter.prefix.values():
        out += [key, value]
    return out
