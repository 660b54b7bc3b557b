"""The attack contract (``Attack`` in s2l_plugin.audit.mia.engine, stated in docs/hooks.md): every
registered attack meets it, registration refuses what breaks it, and the engine runs an attack that
has only the simple form ``score(pipeline, images, captions)`` exactly as the contract says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from s2l_plugin.hooks import hookimpl
from s2l_plugin.hooks.manager import collect, make_plugin_manager

from s2l_plugin.audit.mia import audit_membership
from s2l_plugin.audit.mia.engine import MEMBER, NONMEMBER, attack_problem, score_shard
from s2l_plugin.errors import ConfigError, InputError, PluginError

# Parametrized over the registry itself: a newly registered built-in is checked without editing this file.
REGISTERED = collect("attacks", make_plugin_manager(load_entry_points=False))


def _plugin(*attacks):
    class Plugin:
        @hookimpl
        def register_attacks(self, register):
            for attack in attacks:
                register(attack)

    return Plugin()


def _pm(*attacks):
    return make_plugin_manager(load_entry_points=False, extra_plugins=[_plugin(*attacks)])


@pytest.fixture(scope="module")
def tiny():
    """The random-init testbed-architecture pipeline (16 px, the test testbed's size), built once here."""
    from s2l_plugin.testbed import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def sets(test_testbed):
    """Three members and three non-members of the test testbed (16 px, captioned)."""
    return test_testbed.members("seven")[:3], test_testbed.nonmembers("seven")[:3]


def _items(sets):
    members, nonmembers = sets
    return [((MEMBER, i), r) for i, r in enumerate(members)] + [((NONMEMBER, i), r) for i, r in enumerate(nonmembers)]


class _SimpleOnly:
    """``attack`` seen through its simple form only (no score_encoded), as a plugin attack is."""

    def __init__(self, attack):
        self.name = attack.name
        self.needs_reference = attack.needs_reference
        self.score = attack.score


# -- every registered attack ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_registered_attack_meets_the_contract(name):
    attack = REGISTERED[name]
    assert attack_problem(attack) is None
    assert attack.name == name and callable(attack.score)
    assert isinstance(getattr(attack, "needs_reference", False), bool)
    assert isinstance(getattr(attack, "params", {}), dict)


@pytest.mark.parametrize("form", ["engine", "simple"])
@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_registered_attack_gives_one_finite_score_per_image(name, form, tiny, sets):
    """Through the engine (the fast form when the attack has it) and through its simple form ``score``."""
    attack = REGISTERED[name] if form == "engine" else _SimpleOnly(REGISTERED[name])
    items = _items(sets)
    reference = tiny if getattr(attack, "needs_reference", False) else None
    part = score_shard(tiny, items, [attack], reference=reference, seed=0, batch_size=4, progress=False)
    scores = part.scores[name]
    assert scores.shape == (len(items),) and scores.dtype == np.float64 and np.all(np.isfinite(scores))
    assert [tuple(k) for k in part.keys] == [k for k, _ in items]


# -- registration ---------------------------------------------------------------------------------


class _Attack:
    def __init__(self, name="mine", **attrs):
        self.name = name
        for key, value in attrs.items():
            setattr(self, key, value)


def _scores(self, pipeline, images, captions, **kwargs):
    return torch.zeros(len(captions))


@pytest.mark.parametrize(
    ("attack", "rule"),
    [
        (_Attack(), "missing score or score_encoded"),
        (_Attack(score=3), "missing score or score_encoded"),
        (_Attack(score=lambda *a, **k: None, needs_reference="yes"), "needs_reference must be True or False, got 'yes'"),
        (_Attack(score=lambda *a, **k: None, needs_reference=1), "needs_reference must be True or False, got 1"),
        (_Attack(score=lambda *a, **k: None, needs_reference=None), "needs_reference must be True or False, got None"),
    ],
    ids=["no-score", "score-not-callable", "needs-reference-str", "needs-reference-int", "needs-reference-none"],
)
def test_registration_refuses_what_breaks_the_contract_in_one_line_naming_the_plugin(attack, rule):
    plugin = _plugin(attack)
    pm = make_plugin_manager(load_entry_points=False, extra_plugins=[plugin])
    with pytest.raises(PluginError) as info:
        collect("attacks", pm)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"plugin {pm.get_name(plugin)!r}, hook register_attacks: ")
    assert message.endswith(f"is not a attack ({rule})")


def test_registration_accepts_either_form():
    simple = _Attack("simple", score=lambda pipeline, images, captions: [0.0] * len(captions))
    fast = _Attack("fast", score_encoded=lambda batch, reference=None: torch.zeros(batch.size), needs_reference=True)
    attacks = collect("attacks", _pm(simple, fast))
    assert attacks["simple"] is simple and attacks["fast"] is fast


def test_an_attack_object_that_breaks_the_contract_is_refused_before_any_work(tiny, sets):
    with pytest.raises(ConfigError, match=r"is not an attack \(missing score or score_encoded\)"):
        audit_membership(tiny, *sets, [_Attack("nothing")], progress=False)


# -- what the simple form gets and must return ------------------------------------------------------


class _Recorder:
    """A simple-form attack recording its calls; scores = mean pixel value (any finite numbers do)."""

    needs_reference = False

    def __init__(self, name="recorder", *, scribble=False):
        self.name = name
        self.scribble = scribble
        self.calls = []

    def score(self, pipeline, images, captions, **kwargs):
        self.calls.append({"pipeline": pipeline, "images": images.clone(), "captions": captions, **kwargs})
        if self.scribble:
            images.mul_(0)  # its own copy: no other attack sees the change
        return [float(i) for i in range(len(captions))]


def test_simple_form_gets_the_documented_arguments(tiny, sets):
    recorder, after = _Recorder(scribble=True), _Recorder("after")
    items = _items(sets)
    part = score_shard(tiny, items, [recorder, after, REGISTERED["loss"]], seed=3, batch_size=4, progress=False)
    assert [len(c["captions"]) for c in recorder.calls] == [4, 2]
    for call in recorder.calls:
        images, captions = call["images"], call["captions"]
        assert call["pipeline"] is tiny
        assert isinstance(images, torch.Tensor) and images.dtype == torch.float32 and images.device.type == "cpu"
        assert images.shape == (len(captions), 3, 16, 16)
        assert isinstance(captions, list) and all(isinstance(c, str) and c for c in captions)
        assert set(call) == {"pipeline", "images", "captions", "seed", "image_seeds", "reference"}
        assert call["seed"] == 3 and call["reference"] is None
        assert len(call["image_seeds"]) == len(captions) and all(isinstance(s, int) for s in call["image_seeds"])
    np.testing.assert_array_equal(part.scores["recorder"], [0, 1, 2, 3, 0, 1])
    # The first attack zeroed its images; the next one got the batch's own.
    for first, second in zip(recorder.calls, after.calls, strict=True):
        assert torch.equal(first["images"], second["images"]) and second["images"].abs().sum() > 0


def test_images_are_in_minus_one_to_one_and_uncaptioned_images_get_an_empty_caption(tiny, sets, tmp_path):
    from PIL import Image

    from s2l_plugin.data import ImageRecord

    members, nonmembers = sets
    recorder = _Recorder()
    path = tmp_path / "white.png"
    Image.new("RGB", (16, 16), (255, 255, 255)).save(path)
    items = [((MEMBER, 0), ImageRecord(path, None)), ((NONMEMBER, 0), nonmembers[0])]
    score_shard(tiny, items, [recorder], batch_size=2, progress=False)
    (call,) = recorder.calls
    assert call["captions"] == ["", nonmembers[0].caption]
    assert torch.equal(call["images"][0], torch.ones(3, 16, 16))
    assert call["images"].min() >= -1 and call["images"].max() <= 1


def test_image_seeds_are_per_image_whatever_the_batch_and_differ_between_attacks(tiny, sets):
    items = _items(sets)
    seeds = {}
    for batch_size in (1, 4, 6):
        a, b = _Recorder("a"), _Recorder("b")
        score_shard(tiny, items, [a, b], seed=0, batch_size=batch_size, progress=False)
        seeds[batch_size] = [s for c in a.calls for s in c["image_seeds"]]
        other = [s for c in b.calls for s in c["image_seeds"]]
        assert len(set(seeds[batch_size])) == len(items) and not set(other) & set(seeds[batch_size])
    assert seeds[1] == seeds[4] == seeds[6]


def test_simple_form_gets_only_the_keyword_arguments_it_names(tiny, sets):
    seen = []

    class OnlySeed:
        name = "only-seed"

        def score(self, pipeline, images, captions, seed):
            seen.append(seed)
            return np.zeros(len(captions))

    class NoKeywords:
        name = "plain"

        def score(self, pipeline, images, captions):
            return torch.arange(len(captions), dtype=torch.float64)

    part = score_shard(tiny, _items(sets), [OnlySeed(), NoKeywords()], seed=7, batch_size=4, progress=False)
    assert seen == [7, 7] and part.scores["plain"].tolist() == [0, 1, 2, 3, 0, 1]


def test_an_attack_that_needs_a_reference_gets_the_base_pipeline_and_is_left_out_without_one(tiny, sets):
    from s2l_plugin.testbed import build_tiny_pipeline

    base = build_tiny_pipeline(seed=1)
    recorder = _Recorder("calibrated")
    recorder.needs_reference = True
    result = audit_membership(tiny, *sets, [recorder], reference=base, n_boot=20, shift_check=False, progress=False)
    assert result.attack("calibrated").member_scores == [0.0, 1.0, 2.0]
    assert recorder.calls and all(c["reference"] is base and c["pipeline"] is tiny for c in recorder.calls)
    with pytest.raises(ConfigError, match="attack 'calibrated' needs a reference"):
        audit_membership(tiny, *sets, [recorder], progress=False)


class _Returns:
    needs_reference = False

    def __init__(self, value):
        self.name = "bad-plugin"
        self.value = value

    def score(self, pipeline, images, captions):
        return self.value(len(captions)) if callable(self.value) else self.value


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (None, "returned None"),
        ("high", "returned a str that is not numbers"),
        (lambda n: [0.0] * (n - 1), r"returned scores of shape \(3,\)"),
        (lambda n: torch.zeros(n, 1), r"returned scores of shape \(4, 1\)"),
        (lambda n: [float("nan")] * n, r"returned scores of shape \(4,\) \(all finite: False\)"),
        (lambda n: [object()] * n, "returned a list that is not numbers"),
    ],
    ids=["none", "str", "short", "column", "nan", "objects"],
)
def test_a_bad_plugins_scores_are_a_one_line_input_error_naming_the_attack(value, said, tiny, sets):
    pm = _pm(_Returns(value))
    with pytest.raises(InputError, match=rf"^attack 'bad-plugin' {said}.*; expected 4 finite scores, one per image") as info:
        audit_membership(tiny, *sets, ["bad-plugin"], batch_size=4, progress=False, pm=pm)
    assert "\n" not in str(info.value)
