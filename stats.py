"""
What a cell's seeds say: the mean of a stable score over seeds with its 95 % interval, the difference from a
baseline cell paired by seed with its p-value, where one more seed will land, and the difference a plan can detect.
ablate.py uses it for its tables; it reads the eval.json of each seed (every item's score is kept there).

A cell's score has two sources of spread: the run (its seed: data order, initial weights, the encoder's own
pre-training) and the sample of questions it is asked (the same questions for every seed and cell). So the standard
error of a mean over n seeds is sqrt(sd_seeds^2 / n + se_items^2), judged against Student's t with n - 1 degrees
of freedom: with 3 seeds, t(2), 4.30 standard errors for 95 %. (Welch-Satterthwaite's larger df, for the part the
questions add, rejected 6.5 % of equal pairs at 5 % in simulation: a low sample spread of the seeds also raises the
df. A bootstrap over 3 seeds is worse: it has 10 distinct draws of them and takes their spread for the whole, so
when all three differences share a sign, 1 time in 4 for equal cells, its p is near 0; it rejected 24 % of them.)
"""

import math

import numpy as np

from eval import centered


def t_p_value(t, df):
    """Two-sided p of Student's t with integer df, in closed form (Abramowitz and Stegun 26.7.3-4); normal past 1000."""
    t = abs(float(t))
    if df > 1000:
        return math.erfc(t / math.sqrt(2))
    theta = math.atan(t / math.sqrt(df))
    c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2:  # odd: A = 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), the sum to cos^(df-3)
        for k in range(1, (df - 1) // 2):
            term *= 2 * k / (2 * k + 1) * c2
            total += term
        inside = 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    else:  # even: A = sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), the sum to cos^(df-2)
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        inside = math.sin(theta) * total
    return min(1.0, max(0.0, 1.0 - inside))


def t_quantile(q, df):
    """The q quantile of Student's t with integer df, for q in (0.5, 1), by bisection on t_p_value."""
    lo, hi = 0.0, 1e4
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 - t_p_value(mid, df) / 2 < q else (lo, mid)
    return (lo + hi) / 2


def task_names(run, modality):
    return sorted(k for k, t in run['tasks'].items() if t['modality'] == modality and t['n'])


def seed_score(run, modality, n=None):
    """One seed's stable score (run: its eval.json, or a dict with its 'tasks'), from the first n items per task."""
    return float(np.mean([centered(np.mean(run['tasks'][k]['scores'][:n]), run['tasks'][k]['chance'])
                          for k in task_names(run, modality)]))


def item_se(runs, modality, baseline=None, n=None):
    """
    The standard error that the sample of questions adds to a stable score averaged over seeds, or to its difference
    from baseline's paired by seed: per task the variance over items of the item's score averaged over seeds (of the
    difference, for a baseline), scaled by 1/(1 - chance) as centering does, summed and divided by the task count.
    """
    names = task_names(runs[0], modality)
    variances = []
    for name in names:
        scores = np.array([r['tasks'][name]['scores'][:n] for r in runs], dtype=np.float64)
        if baseline is not None:
            scores = scores - np.array([b['tasks'][name]['scores'][:n] for b in baseline], dtype=np.float64)
        per_item = scores.mean(axis=0)
        variances.append(np.var(per_item, ddof=1) / len(per_item) / (1 - runs[0]['tasks'][name]['chance']) ** 2)
    return float(np.sqrt(np.sum(variances)) / len(names))


def scored(runs):
    """Whether a cell has finished seeds with stable scores (a text-only plan's eval.json has none)."""
    return bool(runs) and runs[0]['vision_stable_score'] is not None


def over_seeds(runs, modality, baseline=None):
    """
    A cell's stable score over its seeds (runs: each seed's eval.json), or its difference from a baseline cell's
    paired by seed (the same seeds in the same order: seed s of both shares its text stage and encoders). Returns
    (mean over seeds, its 95 % interval, two-sided p of no difference or None without a baseline), by Student's t on
    sqrt(sd_seeds^2 / n + se_items^2) (this module's docstring says why not a bootstrap).
    """
    if baseline is not None and len(baseline) != len(runs):
        raise ValueError(f'{len(runs)} seeds against {len(baseline)}: a paired comparison needs the same seeds')
    values = np.array([seed_score(r, modality) for r in runs])
    if baseline is not None:
        values = values - np.array([seed_score(b, modality) for b in baseline])
    seed_var = float(np.var(values, ddof=1)) if len(values) > 1 else 0.0
    items = item_se(runs, modality, baseline) ** 2
    se = math.sqrt(seed_var / len(values) + items)
    df = len(values) - 1 if len(values) > 1 else 10 ** 6  # one seed: the questions' error alone, normal
    mean, half = float(values.mean()), t_quantile(0.975, df) * se
    p = None if baseline is None else (1.0 if se == 0 else t_p_value(mean / se, df))
    return mean, [mean - half, mean + half], p


def new_seed_interval(scores):
    """
    Where one more seed's score will land, from the scores of a cell's seeds (asked the same questions): the 95 %
    prediction interval mean ± t(n - 1) · sd · sqrt(1 + 1/n), normal spread between seeds assumed. It is the claim a
    rerun can check, and it is wider than the interval of the mean; None for fewer than 2 seeds.
    """
    n = len(scores)
    if n < 2:
        return None
    half = t_quantile(0.975, n - 1) * float(np.std(scores, ddof=1)) * math.sqrt(1 + 1 / n)
    return [float(np.mean(scores)) - half, float(np.mean(scores)) + half]


def detectable(seed_sd, item_sd, seeds):
    """The smallest paired difference that a two-sided 5 % t test over `seeds` seeds finds with 80 % power, given
    the spread of the difference between seeds (seed_sd) and the questions' standard error (item_sd)."""
    df = seeds - 1
    return (t_quantile(0.975, df) + t_quantile(0.8, df)) * math.sqrt(seed_sd ** 2 / seeds + item_sd ** 2)
