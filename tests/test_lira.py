"""LiRA: its statistics against hand computations, and the benchmark script end to end at toy size."""

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from lightning_unlearn.evaluation.lira import balanced_keep, lira_scores, logit_confidence, roc_summary

ROOT = Path(__file__).resolve().parents[1]


def _logpdf(x: float, mean: float, std: float) -> float:
    return -((x - mean) ** 2) / (2 * std**2) - math.log(std * math.sqrt(2 * math.pi))


def test_logit_confidence_is_log_odds_of_the_label():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.2]])
    labels = torch.tensor([0, 2, 0])
    phi = logit_confidence(logits, labels)
    for i in range(3):
        p = torch.softmax(logits[i].double(), 0)[labels[i]].item()
        assert phi[i].item() == pytest.approx(math.log(p / (1 - p)), rel=1e-12)
    # exact where 1 - p underflows: z_y - logsumexp(other z) = 60 - log(2)
    assert logit_confidence(torch.tensor([[60.0, 0.0, 0.0]]), torch.tensor([0])).item() == pytest.approx(
        60 - math.log(2)
    )


def test_balanced_keep_holds_each_candidate_in_half_the_shadows():
    keep = balanced_keep(6, 50, seed=3)
    assert keep.shape == (6, 50) and (keep.sum(0) == 3).all()
    assert torch.equal(keep, balanced_keep(6, 50, seed=3)) and not torch.equal(keep, balanced_keep(6, 50, seed=4))
    assert 10 < int(keep[0].sum()) < 40  # each shadow holds about half the pool
    with pytest.raises(ValueError, match="num_shadows"):
        balanced_keep(1, 5, 0)


def test_online_scores_equal_the_gaussian_likelihood_ratio_by_hand():
    g = torch.Generator().manual_seed(0)
    shadows, pool = 6, 4
    phi = torch.randn(shadows, pool, generator=g, dtype=torch.float64) * 2
    keep = balanced_keep(shadows, pool, seed=1)
    phi[keep] += 3.0  # models that trained on a candidate are more confident on it
    target = torch.tensor([3.5, -0.2, 1.0, 8.0], dtype=torch.float64)
    online = lira_scores(phi, keep, target)
    fixed = lira_scores(phi, keep, target, fixed_variance=True)
    all_in = [phi[k, i].item() for k in range(shadows) for i in range(pool) if keep[k, i]]
    all_out = [phi[k, i].item() for k in range(shadows) for i in range(pool) if not keep[k, i]]
    for i in range(pool):
        ins = [phi[k, i].item() for k in range(shadows) if keep[k, i]]
        outs = [phi[k, i].item() for k in range(shadows) if not keep[k, i]]
        x, m_in, m_out = target[i].item(), statistics.median(ins), statistics.median(outs)
        expected = _logpdf(x, m_in, statistics.pstdev(ins)) - _logpdf(x, m_out, statistics.pstdev(outs))
        assert online[i].item() == pytest.approx(expected, rel=1e-9)
        pooled = _logpdf(x, m_in, statistics.pstdev(all_in)) - _logpdf(x, m_out, statistics.pstdev(all_out))
        assert fixed[i].item() == pytest.approx(pooled, rel=1e-9)
    # odd counts: the median is the middle value (3 IN of 7 shadows → 4 OUT: the mean of the two middle ones)
    keep7 = balanced_keep(7, 2, seed=0)
    phi7 = torch.arange(14, dtype=torch.float64).reshape(7, 2) ** 1.5
    score = lira_scores(phi7, keep7, torch.zeros(2))
    ins = [phi7[k, 0].item() for k in range(7) if keep7[k, 0]]
    outs = [phi7[k, 0].item() for k in range(7) if not keep7[k, 0]]
    expected = _logpdf(0.0, statistics.median(ins), statistics.pstdev(ins)) - _logpdf(
        0.0, statistics.median(outs), statistics.pstdev(outs)
    )
    assert score[0].item() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="OUT"):
        lira_scores(phi, torch.ones_like(keep), target)


def test_a_target_that_memorised_its_members_is_found_and_the_shadow_check_sees_it():
    g = torch.Generator().manual_seed(7)
    shadows, pool = 16, 400
    keep = balanced_keep(shadows, pool, seed=2)
    difficulty = torch.randn(pool, generator=g, dtype=torch.float64) * 5  # per-candidate offsets LiRA calibrates away
    phi = difficulty + torch.randn(shadows, pool, generator=g, dtype=torch.float64) + 3.0 * keep
    member = torch.rand(pool, generator=g) < 0.5
    target = difficulty + torch.randn(pool, generator=g, dtype=torch.float64) + 3.0 * member
    score = lira_scores(phi, keep, target)
    assert roc_summary(score[member], score[~member])["auc"] > 0.9
    # the global threshold on φ alone is blinded by the per-candidate offsets
    assert roc_summary(target[member], target[~member])["auc"] < 0.8
    bench = load_lira()
    check = bench.shadow_check(phi, keep)
    assert check["online"]["auc"] > 0.9 and check["online_fixed_variance"]["auc"] > 0.6
    assert bench.shadow_check(phi[:3], keep[:3]) is None


def test_roc_summary_by_hand():
    members = torch.tensor([5.0, 4.0, 0.5, -1.0])
    nonmembers = torch.arange(100, dtype=torch.float64) / 100  # 0.00 .. 0.99
    out = roc_summary(members, nonmembers)
    # pairs member > non-member: 100 + 100 + 50 (0.5 beats 0.00..0.49) + 0, tie 0.5 = 0.50 counts half
    assert out["auc"] == pytest.approx((100 + 100 + 50 + 0.5 + 0) / 400)
    # FPR <= 1 %: threshold above 0.98 admits one non-member (0.99): 2 of 4 members caught
    assert out["tpr_at_fpr"] == 0.5
    assert roc_summary(members, nonmembers, fpr=0.6)["tpr_at_fpr"] == 0.75
    with pytest.raises(ValueError, match="non-empty"):
        roc_summary(members, torch.empty(0))


def load_lira():
    spec = importlib.util.spec_from_file_location("lira", ROOT / "benchmarks" / "lira.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_runs_end_to_end_resumes_and_refuses_another_runs_results(poisoned_run, retrained_run, tmp_path):
    bench = load_lira()
    out, work = tmp_path / "lira.json", tmp_path / "work"
    args = ["--before", str(poisoned_run), "--retrained", str(retrained_run), "--after", f"copy={retrained_run}"]
    toy = ["--shadows", "4", "--epochs", "1", "--pool", "600", "--out", str(out), "--work", str(work)]
    results = bench.main([*args, *toy])
    assert set(results["targets"]) == {"before", "after: copy", "retrained"}
    assert results["pool"] == {"forget": 200, "nonmembers": 200, "filler": 200}
    for target in results["targets"].values():
        for attack in ("online", "online_fixed_variance", "global_threshold"):
            assert 0.0 <= target[attack]["auc"] <= 1.0 and 0.0 <= target[attack]["tpr_at_fpr"] <= 1.0
    assert results["targets"]["after: copy"]["online"] == results["targets"]["retrained"]["online"]
    assert set(results["shadow_check"]) == {"online", "online_fixed_variance"}
    assert len(list(work.glob("shadow_*.pt"))) == 4
    assert "TPR" in out.with_suffix(".md").read_text()
    # resumed: the shadows are read back, not trained again, and give the same numbers
    stamps = {p: p.stat().st_mtime_ns for p in work.glob("shadow_*.pt")}
    assert bench.main([*args, *toy]) == json.loads(out.read_text()) == results
    assert stamps == {p: p.stat().st_mtime_ns for p in work.glob("shadow_*.pt")}
    # another configuration's results are not replaced without --overwrite
    with pytest.raises(SystemExit, match="--overwrite"):
        bench.main([*args, *toy[:2], "--epochs", "2", *toy[4:]])
    assert bench.main(["--tables", "--out", str(out)]) == results
    with pytest.raises(SystemExit, match="no such target model"):
        bench.main([*args, "--after", str(tmp_path / "missing.ckpt"), *toy, "--overwrite"])
