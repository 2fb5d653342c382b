"""Log message → template id, with drain3.

Two modes, two classes:
- `TemplateMiner` (training): drain3 learns templates from messages (`learn`), then `freeze()`
  returns the `TemplateSet` a model is trained with.
- `TemplateSet` (serving, and the second pass of training): matches messages against the frozen
  set only (drain3 `match`, which never creates or changes a cluster). A message matching no
  learned template gets `UNKNOWN_TEMPLATE_ID`: the vocabulary of a trained model never grows.

Ids: 0 is "unknown template"; learned templates are 1..K in the order drain3 created them, so the
model's vocabulary size is K + 1. The set serialises to plain JSON (`to_json`/`from_json`, no
pickle); `fingerprint` is a sha256 over the configuration and the templates, for the bundle to pin.

Masking happens before drain3 sees a message: numbers, IPs, hex and UUIDs become `<NUM>`, `<IP>`,
`<HEX>`, `<UUID>` (configurable, plus custom regexes). Matching is cached by the masked message:
after masking, HDFS's 222k lines have only a few thousand distinct strings, and drain3's tree
search is the expensive part.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Literal

import orjson
from drain3 import TemplateMiner as Drain3Miner
from drain3.drain import LogCluster
from drain3.masking import MaskingInstruction
from drain3.template_miner_config import TemplateMinerConfig
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

logger = logging.getLogger(__name__)

TEMPLATE_SET_VERSION = 1
UNKNOWN_TEMPLATE_ID = 0
UNKNOWN_TEMPLATE = "<unknown template>"

# Built-in masks, applied in the order listed in TemplateConfig.masks. The look-arounds keep a mask
# from biting into a longer alphanumeric token (drain3's own examples use the same guards).
BUILTIN_MASKS: dict[str, str] = {
    "uuid": (
        r"(?<![0-9A-Za-z])[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
        r"(?![0-9A-Za-z])"
    ),
    "ip": r"(?<![0-9A-Za-z.])\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?::\d{1,5})?(?![0-9A-Za-z])",
    "hex": r"(?<![0-9A-Za-z])0[xX][0-9a-fA-F]+(?![0-9A-Za-z])",
    "num": r"(?<![0-9A-Za-z])[-+]?\d+(?:\.\d+)?(?![0-9A-Za-z])",
}


class TemplateConfigError(Exception):
    """A template configuration or template set that cannot be used; one sentence for the operator."""


class CustomMask(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str  # the message shows <NAME>
    pattern: str


class TemplateConfig(BaseModel):
    """drain3 and masking settings. Frozen and JSON-serialisable: it travels in the template set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    masks: tuple[Literal["uuid", "ip", "hex", "num"], ...] = ("uuid", "ip", "hex", "num")
    custom_masks: tuple[CustomMask, ...] = ()  # applied before the built-in ones
    sim_th: float = 0.4
    depth: int = 4
    max_children: int = 100
    extra_delimiters: tuple[str, ...] = ()
    parametrize_numeric_tokens: bool = True
    # drain3 match: "fallback" searches all same-length templates when the tree search misses
    match_strategy: Literal["never", "fallback", "always"] = "fallback"
    min_template_count: int = 1  # templates seen fewer times in training are left out of the set
    match_cache_size: int = 100_000  # distinct masked messages remembered by TemplateSet.match

    @model_validator(mode="after")
    def _check(self) -> TemplateConfig:
        if not 0.0 < self.sim_th <= 1.0:
            raise ValueError("sim_th must be in (0, 1]")
        if self.depth < 3:
            raise ValueError("depth must be at least 3")
        if self.max_children < 2 or self.min_template_count < 1 or self.match_cache_size < 0:
            raise ValueError("max_children must be >= 2, min_template_count >= 1, match_cache_size >= 0")
        return self


def make_template_config(**fields: Any) -> TemplateConfig:
    """TemplateConfig(**fields) with validation errors as one TemplateConfigError sentence."""
    try:
        return TemplateConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "template configuration"
        raise TemplateConfigError(f"invalid template setting {where}: {err['msg']}.") from None


def _drain3(config: TemplateConfig) -> Drain3Miner:
    mc = TemplateMinerConfig()
    mc.drain_sim_th = config.sim_th
    mc.drain_depth = config.depth
    mc.drain_max_children = config.max_children
    mc.drain_max_clusters = None  # eviction would renumber the vocabulary under a trained model
    mc.drain_extra_delimiters = list(config.extra_delimiters)
    mc.parametrize_numeric_tokens = config.parametrize_numeric_tokens
    mc.mask_prefix, mc.mask_suffix = "<", ">"
    instructions = []
    for m in config.custom_masks:
        instructions.append(_instruction(m.pattern, m.name))
    for name in config.masks:
        instructions.append(_instruction(BUILTIN_MASKS[name], name.upper()))
    mc.masking_instructions = instructions
    return Drain3Miner(persistence_handler=None, config=mc)


def _instruction(pattern: str, name: str) -> MaskingInstruction:
    try:
        return MaskingInstruction(pattern, name)
    except Exception as e:  # re.error
        raise TemplateConfigError(f"mask {name!r} pattern {pattern!r} does not compile: {e}.") from None


class TemplateMiner:
    """Training mode: learns templates from messages with drain3."""

    def __init__(self, config: TemplateConfig | None = None):
        self.config = config or TemplateConfig()
        self._miner = _drain3(self.config)
        self.n_learned = 0

    def learn(self, message: str) -> None:
        self._miner.add_log_message(message)
        self.n_learned += 1

    def freeze(self) -> TemplateSet:
        """The learned templates (those seen at least min_template_count times) as a TemplateSet."""
        clusters = sorted(self._miner.drain.clusters, key=lambda c: c.cluster_id)
        kept = [c for c in clusters if c.size >= self.config.min_template_count]
        if len(kept) < len(clusters):
            logger.info(
                "left out %d of %d templates seen fewer than %d times",
                len(clusters) - len(kept),
                len(clusters),
                self.config.min_template_count,
            )
        return TemplateSet(
            self.config,
            [(c.cluster_id, c.get_template(), c.size) for c in kept],
        )


class TemplateSet:
    """Serving mode: a frozen set of templates; `match` never learns."""

    def __init__(self, config: TemplateConfig, templates: list[tuple[int, str, int]]):
        """templates: (drain3 cluster id, template text, training count), in id order 1..K."""
        self.config = config
        self._miner = _drain3(config)
        drain = self._miner.drain
        self._texts: list[str] = [UNKNOWN_TEMPLATE]
        self._counts: list[int] = [0]
        self._cluster_to_id: dict[int, int] = {}
        # Rebuild drain3's prefix tree from the template texts alone (no pickled state).
        for cluster_id, text, count in templates:
            cluster = LogCluster(drain.get_content_as_tokens(text), cluster_id)
            cluster.size = count
            drain.id_to_cluster[cluster_id] = cluster
            drain.add_seq_to_prefix_tree(drain.root_node, cluster)
            self._cluster_to_id[cluster_id] = len(self._texts)
            self._texts.append(text)
            self._counts.append(count)
        drain.clusters_counter = max(self._cluster_to_id, default=0)
        self._cache: dict[str, int] = {}
        self._strategy = config.match_strategy
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def vocab_size(self) -> int:
        """Number of ids, the unknown-template id included (K + 1)."""
        return len(self._texts)

    def template(self, template_id: int) -> str:
        return self._texts[template_id]

    def templates(self) -> list[str]:
        """Template text by id; index 0 is the unknown template."""
        return list(self._texts)

    def mask(self, message: str) -> str:
        return self._miner.masker.mask(message)

    def match(self, message: str) -> int:
        """Template id of a message; UNKNOWN_TEMPLATE_ID when no learned template matches."""
        masked = self._miner.masker.mask(message)
        hit = self._cache.get(masked)
        if hit is not None:
            self.cache_hits += 1
            return hit
        self.cache_misses += 1
        cluster = self._miner.drain.match(masked, self._strategy)
        tid = UNKNOWN_TEMPLATE_ID if cluster is None else self._cluster_to_id[cluster.cluster_id]
        if self.config.match_cache_size:
            if len(self._cache) >= self.config.match_cache_size:
                self._cache.clear()  # cheap bound; the working set refills within a few lines
            self._cache[masked] = tid
        return tid

    # -- serialisation ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": TEMPLATE_SET_VERSION,
            "unknown_id": UNKNOWN_TEMPLATE_ID,
            "config": self.config.model_dump(mode="json"),
            "templates": [
                {"id": tid, "drain_cluster_id": cid, "template": self._texts[tid], "count": self._counts[tid]}
                for cid, tid in self._cluster_to_id.items()
            ],
        }

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2)

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of configuration and templates."""
        return hashlib.sha256(orjson.dumps(self.to_json(), option=orjson.OPT_SORT_KEYS)).hexdigest()

    @classmethod
    def from_json(cls, d: Any) -> TemplateSet:
        if not isinstance(d, dict):
            raise TemplateConfigError("the template set must be a JSON object.")
        version = d.get("version")
        if version != TEMPLATE_SET_VERSION:
            raise TemplateConfigError(
                f"the template set has version {version!r}; this stream-detector reads version {TEMPLATE_SET_VERSION}."
            )
        if d.get("unknown_id") != UNKNOWN_TEMPLATE_ID:
            raise TemplateConfigError(
                f"the template set's unknown-template id is {d.get('unknown_id')!r}, expected {UNKNOWN_TEMPLATE_ID}."
            )
        try:
            config = TemplateConfig(**d["config"])
            rows = [
                (int(t["id"]), int(t["drain_cluster_id"]), str(t["template"]), int(t["count"])) for t in d["templates"]
            ]
        except ValidationError as e:
            err = e.errors()[0]
            raise TemplateConfigError(
                f"the template set has an invalid setting {'.'.join(map(str, err['loc']))}: {err['msg']}."
            ) from None
        except (KeyError, TypeError, ValueError) as e:
            raise TemplateConfigError(f"the template set is malformed ({e!r}).") from None
        if [r[0] for r in rows] != list(range(1, len(rows) + 1)):
            raise TemplateConfigError("the template set's ids must run 1..K in order.")
        if len({r[1] for r in rows}) != len(rows):
            raise TemplateConfigError("the template set lists a drain3 cluster id twice.")
        return cls(config, [(cid, text, count) for _, cid, text, count in rows])

    @classmethod
    def from_bytes(cls, data: bytes) -> TemplateSet:
        try:
            return cls.from_json(orjson.loads(data))
        except orjson.JSONDecodeError as e:
            raise TemplateConfigError(f"the template set is not valid JSON ({e}).") from None
