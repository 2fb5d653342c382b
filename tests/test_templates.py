"""Template mining (training) and match-only template sets (serving)."""

from __future__ import annotations

import orjson
import pytest

from stream_detector.logs.templates import (
    UNKNOWN_TEMPLATE,
    UNKNOWN_TEMPLATE_ID,
    TemplateConfigError,
    TemplateMiner,
    TemplateSet,
    make_template_config,
)

# Message patterns of a small made-up service; {b} block, {ip} address, {n} number.
PATTERNS = [
    "Receiving block blk_{b} src: /{ip} dest: /{ip}",
    "Received block blk_{b} of size {n} from /{ip}",
    "PacketResponder {n} for block blk_{b} terminating",
    "Deleting block blk_{b} file /data/{n}/current/blk_{b}",
    "Verification succeeded for blk_{b}",
]


def make_line(rng, pattern: str) -> str:
    ip = lambda: f"10.{rng.integers(0, 256)}.{rng.integers(0, 256)}.{rng.integers(1, 255)}:{rng.integers(1024, 65535)}"  # noqa: E731
    out = pattern
    while "{ip}" in out:
        out = out.replace("{ip}", ip(), 1)
    b = str(int(rng.integers(-(2**62), 2**62)))
    return out.replace("{b}", b).replace("{n}", str(int(rng.integers(0, 10**8))))


def corpus(rng, n: int = 400) -> tuple[list[str], list[int]]:
    which = rng.integers(0, len(PATTERNS), size=n)
    return [make_line(rng, PATTERNS[k]) for k in which], which.tolist()


def mined(rng, **cfg) -> tuple[TemplateSet, list[str], list[int]]:
    lines, which = corpus(rng)
    miner = TemplateMiner(make_template_config(**cfg))
    for line in lines:
        miner.learn(line)
    return miner.freeze(), lines, which


def test_mining_finds_one_template_per_pattern_with_masks(rng):
    ts, lines, which = mined(rng)
    assert ts.vocab_size == len(PATTERNS) + 1
    assert ts.template(UNKNOWN_TEMPLATE_ID) == UNKNOWN_TEMPLATE
    ids = [ts.match(line) for line in lines]
    assert UNKNOWN_TEMPLATE_ID not in ids
    # the mapping pattern -> id is one-to-one
    pairs = set(zip(which, ids))
    assert len(pairs) == len(PATTERNS) and len({i for _, i in pairs}) == len(PATTERNS)
    texts = ts.templates()
    assert "Receiving block blk_<NUM> src: /<IP> dest: /<IP>" in texts
    assert "Verification succeeded for blk_<NUM>" in texts


def test_serving_match_puts_new_patterns_under_unknown_and_never_grows(rng):
    ts, _, _ = mined(rng)
    before = ts.to_bytes()
    fresh = make_line(rng, PATTERNS[1])
    assert ts.match(fresh) != UNKNOWN_TEMPLATE_ID
    for novel in [
        "Exception in receiveBlock for block blk_12 java.io.EOFException",
        "Received block blk_5 of size 9 from /10.0.0.1:9 twice",  # one token longer than the template
        "Verification FAILED for blk_77",  # same length, a constant token differs
        "",
    ]:
        assert ts.match(novel) == UNKNOWN_TEMPLATE_ID, novel
    assert ts.vocab_size == len(PATTERNS) + 1
    assert ts.to_bytes() == before


def test_json_round_trip_keeps_ids_and_fingerprint(rng):
    ts, lines, _ = mined(rng)
    data = ts.to_bytes()
    doc = orjson.loads(data)  # plain JSON, no pickle
    assert doc["unknown_id"] == 0 and [t["id"] for t in doc["templates"]] == list(range(1, ts.vocab_size))
    back = TemplateSet.from_bytes(data)
    assert back.fingerprint == ts.fingerprint
    assert [back.match(x) for x in lines] == [ts.match(x) for x in lines]
    assert back.templates() == ts.templates()


def test_fingerprint_changes_with_masking_config(rng):
    a, _, _ = mined(rng)
    b = TemplateSet(make_template_config(masks=("num",)), [(1, "Verification succeeded for blk_<NUM>", 3)])
    c = TemplateSet(make_template_config(), [(1, "Verification succeeded for blk_<NUM>", 3)])
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3


def test_masking_is_configurable(rng):
    lines = [f"user=u{int(rng.integers(0, 10**6))} logged in from 10.1.2.{i % 250}" for i in range(50)]
    miner = TemplateMiner(make_template_config(custom_masks=[{"name": "USER", "pattern": r"(?<=user=)\w+"}], masks=("ip",)))
    for line in lines:
        miner.learn(line)
    ts = miner.freeze()
    assert ts.templates()[1:] == ["user=<USER> logged in from <IP>"]
    assert ts.mask("user=bob logged in from 10.1.2.3:80") == "user=<USER> logged in from <IP>"


def test_min_template_count_sends_rare_templates_to_unknown(rng):
    lines, _ = corpus(rng, 200)
    miner = TemplateMiner(make_template_config(min_template_count=3))
    for line in lines + ["Rare event for blk_1", "Rare event for blk_2"]:
        miner.learn(line)
    ts = miner.freeze()
    assert ts.vocab_size == len(PATTERNS) + 1
    assert ts.match("Rare event for blk_3") == UNKNOWN_TEMPLATE_ID


def test_match_cache_gives_the_same_answers_as_no_cache(rng):
    ts, lines, _ = mined(rng)
    uncached = TemplateSet.from_json({**ts.to_json(), "config": {**ts.to_json()["config"], "match_cache_size": 0}})
    cached = TemplateSet.from_json({**ts.to_json(), "config": {**ts.to_json()["config"], "match_cache_size": 3}})
    probe = lines + ["Verification FAILED for blk_77"] * 3
    assert [cached.match(x) for x in probe] == [uncached.match(x) for x in probe]
    assert cached.cache_hits > 0 and uncached.cache_hits == 0


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: {**d, "version": 7}, "version 7"),
        (lambda d: {**d, "unknown_id": 5}, "unknown-template id"),
        (lambda d: {**d, "templates": list(reversed(d["templates"]))}, "must run 1..K"),
        (lambda d: {**d, "templates": [{"id": 1}]}, "malformed"),
        (lambda d: {**d, "config": {**d["config"], "sim_th": 3}}, "sim_th"),
        (lambda d: [d], "JSON object"),
    ],
)
def test_bad_template_set_is_refused_in_one_sentence(rng, mutate, reason):
    ts, _, _ = mined(rng)
    with pytest.raises(TemplateConfigError) as e:
        TemplateSet.from_json(mutate(ts.to_json()))
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_bad_config_is_one_sentence():
    with pytest.raises(TemplateConfigError, match="depth"):
        make_template_config(depth=2)
    with pytest.raises(TemplateConfigError, match="does not compile"):
        TemplateMiner(make_template_config(custom_masks=[{"name": "X", "pattern": "(["}]))
    with pytest.raises(TemplateConfigError, match="masks"):
        make_template_config(masks=("mac",))
