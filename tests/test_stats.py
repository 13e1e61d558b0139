"""stats.py: Student's t, the mean and paired difference over seeds, a new seed's interval, the detectable effect."""
import numpy as np
import pytest

import eval as ev
import stats


def cell(rng, accuracies, items=200, tasks=4):
    """One eval.json per seed: `tasks` vision tasks with 4 answers each, every item right with the seed's accuracy."""
    return [{'tasks': {f't{k}': dict(modality='vision', chance=0.25, n=items,
                                     scores=list((rng.random(items) < a).astype(float))) for k in range(tasks)}}
            for a in accuracies]


def test_student_t_matches_its_tables():
    for df, q975 in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228), (30, 2.042), (10 ** 6, 1.960)):
        assert stats.t_quantile(0.975, df) == pytest.approx(q975, abs=1e-3)
    assert stats.t_quantile(0.8, 2) == pytest.approx(1.061, abs=1e-3)
    assert stats.t_p_value(2.0, 5) == pytest.approx(0.1019, abs=1e-4)
    assert stats.t_p_value(-2.0, 5) == stats.t_p_value(2.0, 5) and stats.t_p_value(0.0, 3) == 1.0
    assert stats.t_p_value(1.96, 2000) == pytest.approx(0.05, abs=1e-3)


def test_over_seeds_pairs_seeds_and_adds_the_questions():
    rng = np.random.default_rng(0)
    a = cell(rng, [0.6])
    assert stats.over_seeds(a, 'vision', baseline=a) == (0.0, [0.0, 0.0], 1.0)
    better, worse = cell(rng, [0.9]), cell(rng, [0.3])
    diff, ci, p = stats.over_seeds(better, 'vision', baseline=worse)
    assert diff == pytest.approx(stats.seed_score(better[0], 'vision') - stats.seed_score(worse[0], 'vision'))
    assert p < 0.001 and ci[0] < diff < ci[1]
    mean, ci, p = stats.over_seeds(better, 'vision')  # one seed: the questions' interval, normal
    se = stats.item_se(better, 'vision')
    assert p is None and ci[1] - mean == pytest.approx(1.96 * se, rel=1e-3)
    assert mean == pytest.approx(np.mean([ev.centered(np.mean(t['scores']), 0.25) for t in better[0]['tasks'].values()]))
    # three seeds: t(2) over sqrt(sd^2 / 3 + se_items^2), when the seeds dominate
    three = cell(rng, [0.5, 0.7, 0.9])
    mean, ci, _ = stats.over_seeds(three, 'vision')
    values = [stats.seed_score(r, 'vision') for r in three]
    se = np.sqrt(np.var(values, ddof=1) / 3 + stats.item_se(three, 'vision') ** 2)
    assert mean == pytest.approx(np.mean(values)) and ci[1] - mean == pytest.approx(4.303 * se, rel=1e-3)
    # seeds that disagree by as much as the cells differ: no difference claimed
    assert stats.over_seeds(better + worse, 'vision', baseline=worse + better)[2] > 0.5
    with pytest.raises(ValueError, match='the same seeds'):
        stats.over_seeds(better, 'vision', baseline=worse + worse)


def test_the_paired_test_over_three_seeds_keeps_its_5_percent_and_its_80_percent_power():
    rng = np.random.default_rng(1)
    seed_sd, trials = 0.04, 300
    null = [stats.over_seeds(cell(rng, 0.6 + rng.normal(0, seed_sd, 3)), 'vision',
                             baseline=cell(rng, 0.6 + rng.normal(0, seed_sd, 3)))[2] < 0.05 for _ in range(trials)]
    assert np.mean(null) < 0.08  # a bootstrap over the 3 seeds rejects about 1 time in 4 here
    # a true difference of the size `detectable` states is found about 4 times in 5
    probe = [cell(rng, 0.6 + rng.normal(0, seed_sd, 3)) for _ in range(2)]
    item_sd = stats.item_se(probe[0], 'vision', probe[1])
    # in stable score units, where a seed's accuracy spread is seed_sd / (1 - chance); accuracy moves by 3/4 of it
    effect = stats.detectable(seed_sd / 0.75 * np.sqrt(2), item_sd, 3)
    found = [stats.over_seeds(cell(rng, 0.6 + 0.75 * effect + rng.normal(0, seed_sd, 3)), 'vision',
                              baseline=cell(rng, 0.6 + rng.normal(0, seed_sd, 3)))[2] < 0.05 for _ in range(trials)]
    assert 0.68 < np.mean(found) < 0.92


def test_a_new_seed_lands_in_the_stated_interval_95_times_in_100():
    lo, hi = stats.new_seed_interval([0.4, 0.5, 0.6])
    assert (lo + hi) / 2 == pytest.approx(0.5) and hi - 0.5 == pytest.approx(4.303 * 0.1 * np.sqrt(4 / 3), rel=1e-4)
    assert stats.new_seed_interval([0.5]) is None
    rng = np.random.default_rng(3)
    for n in (3, 5, 14):
        draws = rng.normal(0.5, 0.05, size=(4000, n + 1))
        inside = [lo <= d[-1] <= hi for d in draws for lo, hi in [stats.new_seed_interval(d[:-1])]]
        assert 0.935 < np.mean(inside) < 0.965
