"""The adapters a server knows, which of them are in memory, and loading them safely.

A public name (what a request's ``model`` field says) points at a folder and the digest of its
content. In memory each loaded content is an *instance* under an internal name that includes
the digest, so loading a changed folder under the same name adds a new instance while requests
already running finish on the old one, which is deleted when its last request ends. At most
``max_loaded`` instances stay in memory: the least recently used idle one is unloaded to make
room and loaded again when a request asks for it. Every change to the model happens on the
engine's thread (``Engine.call``), between decoding steps.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import nn

from ..adapter_ops import delete_adapter
from ..adapters.method import MethodConflict, method_for
from ..config import PromptLearningConfig
from ..io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_adapter_config, weights_file


class AdapterError(ValueError):
    """A folder that cannot be served (outside the allowed folder, missing, not safetensors)."""


def folder_digest(folder: Path) -> str:
    """sha256 of the adapter's config and weights, the content a name is served with."""
    h = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        h.update(name.encode() + b"\0")
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def inside(root: Path, path: str) -> Path:
    """``path`` (relative to ``root``, or absolute) resolved with its links, refused unless it
    lies inside ``root``."""
    candidate = Path(path)
    candidate = candidate if candidate.is_absolute() else root / candidate
    try:
        resolved = candidate.resolve(strict=True)
    except (FileNotFoundError, RuntimeError):
        raise AdapterError(f"adapter folder {path!r} does not exist under the adapters folder") from None
    if not resolved.is_relative_to(root.resolve()):
        raise AdapterError(f"adapter folder {path!r} is outside the adapters folder (links are followed)")
    if not resolved.is_dir():
        raise AdapterError(f"{path!r} is not a folder")
    return resolved


@dataclass
class Entry:
    """A public adapter name: its folder and what was read from it."""

    name: str
    path: Path
    digest: str
    method: str
    rank: Optional[int]
    created: int
    routable: bool  # its rows can share a forward pass with other adapters' rows (not soft prompts, not Lily)
    virtual_tokens: int = 0  # soft prompts: positions added in front of every prompt


@dataclass
class Instance:
    """One adapter content in the model's memory."""

    key: str
    entry: Entry
    users: int = 0
    last_used: float = 0.0
    retired: bool = False  # replaced or removed: deleted when its last request ends


def describe(folder: Path, name: str) -> Entry:
    """Read ``folder``'s config and digest; errors name the folder."""
    try:
        weights_file(folder)
        config = read_adapter_config(folder)
    except (ValueError, FileNotFoundError) as err:
        raise AdapterError(str(err)) from None
    rank = getattr(config, "r", None)
    soft_prompt = isinstance(config, PromptLearningConfig)
    return Entry(name, folder, folder_digest(folder), config.peft_type, rank if isinstance(rank, int) else None,
                 int(time.time()), not soft_prompt and method_for(config).rows_independent,
                 config.num_virtual_tokens if soft_prompt else 0)


class Adapters:
    """Known names, loaded instances and the LRU rule; the model's own adapters live in ``model``."""

    def __init__(self, model: nn.Module, root: Optional[Path], max_loaded: int):
        self.model = model
        self.root = root
        self.max_loaded = max(1, max_loaded)
        self.entries: dict[str, Entry] = {}
        self.instances: dict[str, Instance] = {}
        self.current: dict[str, str] = {}  # public name -> key of the instance new requests use

    @staticmethod
    def key_for(entry: Entry) -> str:
        return re.sub(r"\W", "_", entry.name) + "__" + entry.digest[:12]

    def resolve(self, path: str) -> Path:
        """A folder a hot-load request may name: under ``root`` only."""
        if self.root is None:
            raise AdapterError("hot loading is off; start the server with --adapters-dir DIR")
        return inside(self.root, path)

    # ----- run on the engine's thread -------------------------------------------------------------
    def add(self, name: str, folder: Path) -> tuple[Entry, bool]:
        """Serve ``folder`` as ``name``; (entry, whether anything changed). The content is loaded
        now when there is room (so a bad file fails here), else on its first request. Requests
        running on an earlier content of the name finish on it."""
        entry = describe(folder, name)
        old = self.entries.get(name)
        if old is not None and old.digest == entry.digest and old.path == entry.path:
            return old, False
        key = self.key_for(entry)
        if key not in self.instances and self._make_room():
            self._load_instance(key, entry)  # a bad file fails here, adding nothing
        previous = self.current.pop(name, None)
        self.entries[name] = entry
        if key in self.instances:
            self.instances[key].retired = False  # the folder went back to a content still in memory
            self.current[name] = key
        if previous is not None and previous != key:
            self._retire(previous)
        return entry, True

    def remove(self, name: str) -> None:
        """Stop serving ``name``; requests already running on it finish first."""
        self.entries.pop(name)
        key = self.current.pop(name, None)
        if key is not None:
            self._retire(key)

    def acquire(self, name: str) -> Optional[str]:
        """The instance key for a new request on ``name``, loaded again if it was evicted (re-read
        when its folder changed); None while every loaded instance is busy and no room is left."""
        entry = self.entries[name]
        key = self.current.get(name)
        if key is None:
            if not self._make_room():
                return None
            fresh = describe(entry.path, name)
            if fresh.digest != entry.digest:
                self.entries[name] = entry = fresh
            key = self.key_for(entry)
            if not self._load_instance(key, entry):
                return None
            self.current[name] = key
        instance = self.instances[key]
        instance.users += 1
        instance.last_used = time.monotonic()
        return key

    def release(self, key: str) -> None:
        instance = self.instances.get(key)
        if instance is None:
            return
        instance.users -= 1
        if instance.retired and instance.users == 0:
            self._unload(key)

    # ----- helpers -----------------------------------------------------------------------------------
    def _load_instance(self, key: str, entry: Entry) -> bool:
        """Load ``entry`` as ``key``. A module holds adapters of one method, so an adapter of
        another method on the same modules is unloaded first while idle (loaded again on demand);
        False while such adapters are busy."""
        while True:
            try:
                load_adapter(self.model, entry.path, name=key, trainable=False)  # adds nothing if it fails
                break
            except MethodConflict:
                if not self._evict_idle(lambda i: i.entry.method != entry.method):
                    return False
        self.instances[key] = Instance(key, entry, last_used=time.monotonic())
        return True

    def _make_room(self) -> bool:
        while len(self.instances) >= self.max_loaded:
            if not self._evict_idle(lambda i: True):
                return False
        return True

    def _evict_idle(self, eligible) -> bool:
        """Unload the least recently used idle instance that is ``eligible``; False if none is."""
        idle = [i for i in self.instances.values() if i.users == 0 and eligible(i)]
        if not idle:
            return False
        victim = min(idle, key=lambda i: i.last_used)
        if self.current.get(victim.entry.name) == victim.key:
            del self.current[victim.entry.name]
        self._unload(victim.key)
        return True

    def _retire(self, key: str) -> None:
        instance = self.instances.get(key)
        if instance is None:
            return
        instance.retired = True
        if instance.users == 0:
            self._unload(key)

    def _unload(self, key: str) -> None:
        delete_adapter(self.model, key)
        del self.instances[key]

    def loaded(self, name: str) -> bool:
        return name in self.current
