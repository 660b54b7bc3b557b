"""Issue #21's pre-registered data split: control sets and extra non-members from the unused digits."""

from __future__ import annotations


def test_unused_digits_split_as_registered(load_benchmark) -> None:
    exp = load_benchmark("s2l_experiments")
    from s2l_plugin.testbed import Testbed

    tb = Testbed.load(None)
    registered_unused = [78, 82, 77, 83, 81, 82, 81, 79, 74, 80]  # docs/results.md section 6
    for domain, unused in zip(exp.DOMAINS, registered_unused, strict=True):
        split = exp.decide_split(domain)
        used = {s.source_index for s in tb.members(domain)} | {s.source_index for s in tb.nonmembers(domain)}
        assert split["unused"] == unused
        assert len(split["control"]) == exp.DECIDE_K == 40 and len(split["extra"]) == unused - 40
        assert not (set(split["control"]) | set(split["extra"])) & used
        assert not set(split["control"]) & set(split["extra"])
        assert set(split["extra_captions"]) <= set(tb.domain(domain).captions)
        assert split == exp.decide_split(domain)  # seeded: the same every time


def test_pooled_verdict_follows_the_registered_rule(load_benchmark) -> None:
    exp = load_benchmark("s2l_experiments")

    def rec(domain: str, arm: str, delta: float, before: int, after: int) -> dict:
        comps = [{"method": m, "attack": a, "subset": "non-duplicated", "delta_auc": delta, "delta_auc_ci": [delta - 0.01, delta + 0.01],
                  "auc_before": 0.7, "auc_after": 0.7 + delta} for m in exp.DECIDE_METHODS for a in exp.DECIDE_ATTACKS]
        hits = {"base": {"non-duplicated": before, "duplicated": 0, "non-members": 0},
                **{m: {"non-duplicated": after, "duplicated": 0, "non-members": 0} for m in exp.DECIDE_METHODS}}
        return {"cell": {"domain": domain, "arm": arm}, "comparisons": comps, "hits": hits, "n_nonmembers": 88}

    up = [rec(d, "S", 0.05, 1, 3) for d in exp.DOMAINS] + [rec(d, "C", 0.0, 1, 1) for d in exp.DOMAINS]
    assert exp.decide_summary(up)["methods"]["lora"]["verdict"] == "S2L-specific"
    same = [rec(d, "S", 0.05, 1, 3) for d in exp.DOMAINS] + [rec(d, "C", 0.05, 1, 3) for d in exp.DOMAINS]
    assert exp.decide_summary(same)["methods"]["lora"]["verdict"] == "S2L amplifies"
    down = [rec(d, "S", -0.02, 3, 1) for d in exp.DOMAINS] + [rec(d, "C", -0.02, 3, 1) for d in exp.DOMAINS]
    assert exp.decide_summary(down)["methods"]["dreambooth"]["verdict"] == "negative generalizes"
    assert exp.decide_summary(down[:3] + down[10:13])["methods"]["dreambooth"]["verdict"] == (
        "not reached (exploratory on 3 domains: negative generalizes)")
    assert exp.decide_summary(down[:3])["methods"]["dreambooth"]["verdict"].startswith("not reached")
    assert exp.decide_summary(down)["tpr_at_1fpr_resolvable"]["zero"] is False


def test_run_with_a_given_private_set_and_extra_nonmembers(test_testbed, tmp_path) -> None:
    """[data] private_set replaces generation; extra_nonmembers enlarge the audit; references 'all' match both sides."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from s2l_plugin.run import run_experiment
    from s2l_plugin.runconfig import load_run_config

    domain = test_testbed.domains[0].name
    rng = np.random.default_rng(0)
    for kind, n in (("real", 3), ("extra", 2)):
        folder = tmp_path / kind / domain
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{domain}_{9000 + i}.png")
    config = tmp_path / "run.toml"
    config.write_text(f"""
out = "{tmp_path / 'out'}"
base = "{test_testbed.path}"
domains = ["{domain}"]
methods = ["lora"]
report = ["markdown"]
[train]
max_train_steps = 2
train_batch_size = 2
[audit]
attacks = ["loss"]
extraction = 2
extraction_steps = 2
extraction_references = "all"
memorization = false
latent = "sample"
[data]
private_set = "{tmp_path / 'real'}/{{domain}}"
extra_nonmembers = "{tmp_path / 'extra'}/{{domain}}"
""")
    path = run_experiment(load_run_config(config))
    stages = json.loads((tmp_path / "out" / "stages.json").read_text())
    assert f"{domain}/generate" not in stages  # nothing generated: the given set was trained on
    saved = json.loads(Path(path).read_text())
    base = saved["audits"][0]
    n_non = len(test_testbed.nonmembers(domain))
    assert base["membership"]["n_nonmembers"] == n_non + 2
    assert base["membership"]["attacks"][0]["params"]["latent"] == "sample"
    assert base["extraction"]["n_references"] == len(test_testbed.members(domain)) + n_non + 2
