"""``s2l audit --query``: per-image p-values against a null and the dataset-level test (s2l_plugin.audit.query).

Calibration is tested where the truth is known: the `test` testbed's held-out images are true
non-members of a LoRA trained on other images; they are scored once on the LoRA (with the base as
reference, the default statistic) and re-split many times into query and null sets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from s2l_plugin.errors import ConfigError


def test_p_value_is_the_nulls_upper_rank():
    from s2l_plugin.audit.query import empirical_p_values

    null = [0.1, 0.2, 0.3, 0.4]
    p = empirical_p_values([0.5, 0.3, 0.0], null)
    assert p.tolist() == [1 / 5, 3 / 5, 5 / 5]  # (1 + #{null >= q}) / (1 + n): ties count against the query
    with pytest.raises(ConfigError):
        empirical_p_values([0.5], [])


def test_dataset_test_is_one_sided_mann_whitney():
    from scipy.stats import mannwhitneyu

    from s2l_plugin.audit.query import dataset_test

    rng = np.random.default_rng(0)
    q, n = rng.normal(1.0, 1.0, 12), rng.normal(0.0, 1.0, 30)
    d = dataset_test(q, n)
    assert d["p_value"] == pytest.approx(mannwhitneyu(q, n, alternative="greater").pvalue)
    assert d["auc"] == pytest.approx(d["u"] / (12 * 30)) and d["n_query"] == 12 and d["n_null"] == 30
    assert d["significant"] == (d["p_value"] < 0.05) and "does not say which images" in d["statement"]
    assert dataset_test(n, q)["p_value"] > 0.5  # lower-scoring queries are never flagged


def test_result_json_has_no_query_key_unless_asked():
    from s2l_plugin.audit.query import query_result
    from s2l_plugin.result import RunResult, from_dict, json_schema, to_dict

    plain = RunResult(kind="audit", audits=[])
    assert "query" not in to_dict(plain)  # results without --query stay byte-identical
    q = query_result("loss", ["a.png", "b.png"], [2.0, 0.0], ["n1", "n2", "n3"], [1.0, 0.5, -1.0])
    assert [im.p_value for im in q.images] == [0.25, 0.75] and q.min_p_value == 0.25
    data = to_dict(RunResult(kind="audit", audits=[], query=q))
    assert from_dict(RunResult, json.loads(json.dumps(data))).query == q
    assert "query" in json_schema()["$defs"]["RunResult"]["properties"]


# -- calibration on the testbed ----------------------------------------------------------------


def _images(folder: Path):
    from s2l_plugin.data import list_image_folder

    return [r for d in sorted(p for p in folder.iterdir() if p.is_dir()) for r in list_image_folder(d)]


@pytest.fixture(scope="module")
def lora(test_testbed, tmp_path_factory):
    """A LoRA trained briefly on the `seven` members, and the base it was trained from."""
    from s2l_plugin.adapters.base import TrainConfig
    from s2l_plugin.hooks.manager import get, make_plugin_manager

    tb = test_testbed
    adapter = get("adapters", "lora", make_plugin_manager(load_entry_points=False))
    config = TrainConfig(prompt=tb.domain("seven").prompt, max_train_steps=4, train_batch_size=8, learning_rate=1e-3, seed=0)
    return adapter.train(tb.pipeline_dir, tb.path / "members" / "seven", config, tmp_path_factory.mktemp("lora") / "artifact")


@pytest.fixture(scope="module")
def heldout_scores(test_testbed, lora):
    """The default statistic (reference) of the 80 held-out images on the LoRA, with the base as reference."""
    import copy

    from s2l_plugin.hooks.manager import get, make_plugin_manager

    from s2l_plugin.audit.query import query_attack, score_query_and_null
    from s2l_plugin.formats.loaders import load_base

    pm = make_plugin_manager(load_entry_points=False)
    base, _ = load_base(str(test_testbed.pipeline_dir))
    target = get("adapters", "lora", pm).load(copy.deepcopy(base), lora)
    held = _images(test_testbed.path / "nonmembers")
    name = query_attack(None, has_reference=True)
    assert name == "reference"
    *_, null_scores, _ = score_query_and_null(target, held[:1], held, name, reference=base, pm=pm, progress=False)
    assert len(null_scores) == 80 and np.unique(null_scores).size == 80
    return null_scores


def test_true_nonmembers_are_flagged_at_the_nominal_rate(heldout_scores):
    """Over 2,000 random query/null splits of the held-out images, p < 0.05 for 2-8% of the (non-member) queries."""
    from s2l_plugin.audit.query import empirical_p_values

    rng = np.random.default_rng(0)
    flagged = total = 0
    for _ in range(2000):
        perm = rng.permutation(heldout_scores.size)
        query, null = heldout_scores[perm[:10]], heldout_scores[perm[10:]]
        flagged += int((empirical_p_values(query, null) < 0.05).sum())
        total += query.size
    rate = flagged / total
    assert 0.02 <= rate <= 0.08, rate  # exchangeable: 3/71 = 0.042 expected


def test_nonmember_sets_are_not_flagged_beyond_the_nominal_rate(heldout_scores):
    from s2l_plugin.audit.query import dataset_test

    rng = np.random.default_rng(1)
    for k in (5, 20):
        ps = []
        for _ in range(400):
            perm = rng.permutation(heldout_scores.size)
            ps.append(dataset_test(heldout_scores[perm[:k]], heldout_scores[perm[k:]])["p_value"])
        rate = float(np.mean(np.asarray(ps) < 0.05))
        assert rate <= 0.08, (k, rate)


def test_audit_query_writes_p_values_the_dataset_test_and_every_report(test_testbed, lora, tmp_path, capsys):
    """`s2l audit --query DIR --nonmembers DIR` without --members: no MIA, one row per query image everywhere."""
    from s2l_plugin.cli import main
    from s2l_plugin.result import load_result

    tb = test_testbed
    out = tmp_path / "audit"
    code = main(["audit", "--base", str(tb.pipeline_dir), "--lora", str(lora.path / "pytorch_lora_weights.safetensors"),
                 "--query", str(tb.path / "members" / "seven"), "--nonmembers", str(tb.path / "nonmembers" / "seven"),
                 "--no-memorization", "--out", str(out)])
    assert code == 0
    result = load_result(out)
    q = result.query
    assert q is not None and q.attack == "reference" and len(q.images) == len(tb.members("seven"))
    assert all(a.membership is None for a in result.audits)  # no --members: no MIA
    n = len(q.null_scores)
    assert all(im.p_value == (1 + sum(s >= im.score for s in q.null_scores)) / (1 + n) for im in q.images)
    assert 0 < q.dataset["p_value"] <= 1 and q.dataset["n_query"] == len(q.images)
    csv_rows = (out / "samples" / "query.reference.csv").read_text().splitlines()
    assert csv_rows[0] == "id,score,p_value" and len(csv_rows) == len(q.images) + 1
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, html, capsys.readouterr().out):
        assert "Were these images used?" in text and "does not say which images" in " ".join(text.split())
    assert 'id="table-query"' in html and 'data-json="/query/dataset/p_value"' in html


def test_query_needs_a_null(test_testbed, lora, tmp_path, capsys):
    from s2l_plugin.cli import main

    tb = test_testbed
    code = main(["audit", "--base", str(tb.pipeline_dir), "--lora", str(lora.path / "pytorch_lora_weights.safetensors"),
                 "--query", str(tb.path / "members" / "seven"), "--out", str(tmp_path / "x")])
    assert code == 2 and "expected --nonmembers DIR" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# -- the dataset test on the memorized variant (cached build, ~4 CPU-minutes once) ------------------


@pytest.mark.integration
def test_dataset_test_flags_a_known_member_set_of_the_memorized_variant(load_benchmark):
    from s2l_plugin.audit.mia import from_testbed
    from s2l_plugin.audit.query import query_audit

    bench = load_benchmark("mia_memorized")
    tb = bench.memorized_testbed(bench.TEST_STEPS, 0)
    sets = from_testbed(tb)
    assert len(sets.members) <= 20
    q = query_audit(tb.load_pipeline(), sets.members, sets.nonmembers, progress=False)
    assert q.attack == "loss"  # no base: the plain loss
    assert q.dataset["p_value"] < 0.001, q.dataset
