"""
What an ablation plan's seeds say: a cell's stable score over its seeds, contrasts between cells with p-values
(Holm-adjusted for a family) and the smallest difference each detects, where one more seed will land. ablate.py
uses it for its tables, from each seed's eval.json (every item's 0/1 score).

The design is crossed: every seed of every cell answers the same questions. A stable score is linear in the item
scores (weight k_t / n_t per item of task t, k_t = 1 / (T (1 - chance_t))), so per task its mean over S seeds and
n questions has the variance of a two-way random layout, seeds x questions,
    var_seed / S + var_question / n + var_interaction / (S n)  =  (MS_seed + MS_question - MS_resid) / (S n).
Each seed's score already averages its own interaction with these questions, so the seeds' spread holds the third
term and the questions add only their main effect, (MS_question - MS_resid) / (S n) floored at 0 (adding the
variance of the per-question means counts the interaction twice: that test rejected far fewer than 5 % of equal
cells). Seeds act on every task at once, so the seed part comes from the seeds' stable scores; each task has its
own questions, so the question parts add up with weights k_t^2. In a cell's mean they include the questions'
difficulty (the interval is about the populations of seeds and of questions); in a contrast, only what sets the
cells apart question by question.

A plan is one model, cells fixed and seeds random (seed s of every cell shares its text stage), additive:
Y[c, s] = mu_c + b_s + e[c, s]. A contrast sum_c a_c mean_s Y[c, s] has the seed part sigma_e^2 sum_c a_c^2 / S,
sigma_e^2 the pooled two-way residual, whose f = (C - 1)(S - 1) df all contrasts share (a paired test has S - 1:
with 3 seeds 2, t_0.975 = 4.30; 4 cells x 3 seeds give 6, t_0.975 = 2.45). With C = 2 it is the paired test. It
assumes sphericity, every pair of cells differing seed by seed with the same variance: where one cell's own seed
noise has twice the others' sd, 8.5-9 % of its equal contrasts were rejected and 2-3 % of the others' (simulation,
4 cells x 3 seeds). A cell that lacks a seed of the plan's seed set (running, failed) is outside the model; a
contrast involving it is a paired test over the seeds its cells share (f = S - 1), which assumes no sphericity.
With one shared seed only the questions' part is left: the interval is about the questions given that seed.

Degrees of freedom. The variance V sums independent terms v_j = c_j MS_j: the seed part (f df) and per task
MS_question (n - 1) and MS_resid ((S - 1)(n - 1)). Satterthwaite's 1 / nu = sum_j (v_j / V)^2 / df_j is liberal with
few seeds, a spread low by chance both shrinking the se and raising the df (exact integration, the question part
known: up to 7.8 % of equal cells rejected at f = 2, 6.4 % at 3, 5.9 % at 4); exponent 1, a harmonic mean, is
conservative (down to 3.7 % at f = 2). Here the exponent is 1 + (1 - v_j / V)^4: 1 for a term that holds all of V,
near 2 for a small one. It holds 4.5-6.0 % at f = 2, 4.4-5.2 % at 3, 4.4-5.0 % at 4 and 6 whatever the questions'
share, and the power at the stated mde is 78-80 % at f = 2, 79-80 % from 3. At f = 1 (2 seeds) none of the three
holds: up to 10 %. Power and mde are exact for a t statistic with that se and df (noncentral t, integrated over
the chi-square of its variance).
"""

import dataclasses
import math

import numpy as np

NORMAL_DF = 1e6  # past this many degrees of freedom Student's t is taken as normal (their tails differ by < 1e-6)


def centered(accuracy, chance):
    """Accuracy rescaled so that chance is 0 and all right is 1."""
    return (accuracy - chance) / (1.0 - chance)


# -----------------------------------------------------------------------------
# Student's t, the noncentral t, Holm


def _betainc(a, b, x, y, swapped=False):
    """Regularized incomplete beta I_x(a, b), y = 1 - x (passed to keep its precision): the continued fraction by
    modified Lentz, on the side where it converges fast (x < (a + 1) / (a + b + 2)), the other by symmetry."""
    if x <= 0.0 or y <= 0.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2) and not swapped:
        return 1.0 - _betainc(b, a, y, x, swapped=True)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)) / a
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    total = d
    for m in range(1, 100_000):
        for term in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # the even step, then the odd
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d, c = 1.0 + term * d, 1.0 + term / c
            d, c = 1.0 / (d if abs(d) > tiny else tiny), (c if abs(c) > tiny else tiny)
            total *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * total


def t_p_value(t, df):
    """Two-sided p of Student's t with df > 0 degrees of freedom (any real df): I_{df / (df + t^2)}(df / 2, 1 / 2)."""
    t, df = abs(float(t)), float(df)
    if not df > 0:
        raise ValueError(f'degrees of freedom must be positive, not {df}')
    if df > NORMAL_DF or math.isinf(t):
        return math.erfc(t / math.sqrt(2))
    return min(1.0, _betainc(df / 2, 0.5, df / (df + t * t), t * t / (df + t * t)))


def t_quantile(q, df):
    """The q quantile of Student's t with df > 0 degrees of freedom (any real df), by bisection on t_p_value."""
    if not 0 < q < 1:
        raise ValueError(f'a quantile needs 0 < q < 1, not {q}')
    if q <= 0.5:
        return 0.0 if q == 0.5 else -t_quantile(1 - q, df)
    tail, lo, hi = 2 * (1 - q), 0.0, 1.0  # tail: the two-sided p at the quantile
    while t_p_value(hi, df) > tail:
        lo, hi = hi, 2 * hi
    while lo < (lo + hi) / 2 < hi:  # down to the last bit
        lo, hi = ((lo + hi) / 2, hi) if t_p_value((lo + hi) / 2, df) > tail else (lo, (lo + hi) / 2)
    return lo


_erfc = np.frompyfunc(math.erfc, 1, 1)


def _upper_normal(x):  # Q(x) = P(Z > x), elementwise
    return 0.5 * np.asarray(_erfc(np.asarray(x) / math.sqrt(2)), dtype=np.float64)


def _power(ncp, df, crit):
    """P(|T'| > crit) for T' = (Z + ncp) / W, W = sqrt(chi2_df / df): E_W[Q(crit W - ncp) + Q(crit W + ncp)].
    The trapezoid rule over y = log W: the density there, exp(df y - df e^(2y) / 2), is smooth and dies off on
    both sides, where the rule converges geometrically; the grid reaches a density e^-40 below its peak."""
    if df > NORMAL_DF:
        return float(_upper_normal(crit - ncp) + _upper_normal(crit + ncp))
    reach = math.sqrt(40 / df)  # the log-density falls by df y^2 or more on either side of its peak at y = 0
    step = min(0.02, 0.25 / math.sqrt(2 * df))
    y = np.arange(-(reach + 40 / df), reach + step, step)
    log_density = df * y - df * np.exp(2 * y) / 2
    weight = np.exp(log_density - log_density.max())
    w = crit * np.exp(y)
    return float(np.sum(weight * (_upper_normal(w - ncp) + _upper_normal(w + ncp))) / np.sum(weight))


def power(ncp, df, alpha=0.05):
    """Power of the two-sided level-alpha t test with df degrees of freedom (real) when the true effect is ncp
    standard errors: the statistic is noncentral t."""
    return _power(abs(ncp), df, t_quantile(1 - alpha / 2, df))


def mde(se, df, target=0.8, alpha=0.05):
    """The smallest effect that the two-sided level-alpha t test finds with probability target, given its standard
    error se and df: mde(1, 2) = 5.653, mde(1, 4) = 3.761 (the central-t sum t_0.975 + t_0.8 falls short of 80 %)."""
    if target <= alpha:
        return 0.0
    crit = t_quantile(1 - alpha / 2, df)
    lo, hi = 0.0, crit + 1.0
    while _power(hi, df, crit) < target:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-10 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _power(mid, df, crit) < target else (lo, mid)
    return se * (lo + hi) / 2


def holm(pvalues):
    """Holm's step-down adjusted p-values of a family, in the order given: the i-th smallest times (m - i + 1),
    made monotone, at most 1. Rejecting those below alpha keeps the family-wise error at alpha."""
    p = [float(v) for v in pvalues]
    adjusted, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(sorted(range(len(p)), key=p.__getitem__)):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


# -----------------------------------------------------------------------------
# one checkpoint's scores: a task's accuracy and a stable score, with bootstrap intervals over its items


def bootstrap_means(scores, n_boot, rng):
    """n_boot bootstrap resamples of the mean of scores."""
    scores = np.asarray(scores, dtype=np.float64)
    return scores[rng.integers(0, len(scores), size=(n_boot, len(scores)))].mean(axis=1)


def interval(samples):
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def task_result(modality, scores, chance, rng, n_boot=1000, **extra):
    """One task's accuracy, centered accuracy and interval; a task with no item left has none of them (not 0)."""
    if not len(scores):
        return dict(modality=modality, accuracy=None, chance=chance, centered=None, n=0, ci95=None, scores=[],
                    **extra)
    acc = float(np.mean(scores))
    boots = centered(bootstrap_means(scores, n_boot, rng), chance)
    return dict(modality=modality, accuracy=acc, chance=chance, centered=centered(acc, chance), n=len(scores),
                ci95=interval(boots), scores=[float(s) for s in scores], **extra)


def stable_score(tasks, modality, rng, n_boot=1000):
    """Mean centered accuracy over the tasks of one modality, with a bootstrap interval that resamples each task."""
    chosen = [t for t in tasks.values() if t['modality'] == modality and t['n']]
    if not chosen:
        return None, None
    boots = np.mean([centered(bootstrap_means(t['scores'], n_boot, rng), t['chance']) for t in chosen], axis=0)
    return float(np.mean([t['centered'] for t in chosen])), interval(boots)


# -----------------------------------------------------------------------------
# the crossed model, on arrays


def crossed(ys, chances, weights, pooled=False):
    """
    The array-level core. ys: per task, item scores [..., C, S, n_t] (cells, seeds, items; leading axes are
    independent replicates, e.g. simulation trials), the same seeds and items along every cell; chances: per task;
    weights: C coefficients a_c (summing to 0 for a contrast; [1] for one cell's mean). pooled: the seed part from
    the two-way cells x seeds residual of all C cells (the plan model), else from the seed-to-seed spread of
    sum_c a_c Y[c, s] itself (a paired test, or a cell's own seeds). Returns (value, seed part, question part, df)
    over the leading axes, the variance being the sum of the two parts; df is inf where it is 0.
    """
    a = np.asarray(weights, dtype=np.float64)
    k = [1.0 / (len(ys) * (1.0 - c)) for c in chances]  # a task's centering weight in the stable score
    scores = sum(k_t * (np.mean(y, axis=-1, dtype=np.float64) - c) for y, c, k_t in zip(ys, chances, k))  # Y[c, s]
    cells, seeds = scores.shape[-2:]
    combined = np.einsum('c,...cs->...s', a, scores)
    value = combined.mean(axis=-1)
    seed_part, question_part, terms = np.zeros(value.shape), np.zeros(value.shape), []  # terms: (c_j MS_j, df_j)
    if seeds > 1:
        if pooled:
            resid = (scores - scores.mean(axis=-1, keepdims=True) - scores.mean(axis=-2, keepdims=True)
                     + scores.mean(axis=(-2, -1), keepdims=True))
            df_seed = (cells - 1) * (seeds - 1)
            seed_part = np.sum(resid ** 2, axis=(-2, -1)) / df_seed * np.sum(a ** 2) / seeds
        else:
            df_seed = seeds - 1
            seed_part = np.var(combined, axis=-1, ddof=1) / seeds
        terms.append((seed_part, df_seed))
    for y, k_t in zip(ys, k):
        n = y.shape[-1]
        if n < 2:
            continue
        d = np.einsum('c,...csn->...sn', a, y)  # the combination, item by item: [..., S, n]
        per_item = d.mean(axis=-2)
        grand = per_item.mean(axis=-1, keepdims=True)
        ms_item = seeds * np.sum((per_item - grand) ** 2, axis=-1) / (n - 1)
        scale = k_t ** 2 / (seeds * n)
        if seeds == 1:  # no interaction to take out: the questions' whole spread
            question_part = question_part + scale * ms_item
            terms.append((scale * ms_item, n - 1))
            continue
        per_seed = d.mean(axis=-1)
        ss_total = np.sum((d - grand[..., None]) ** 2, axis=(-2, -1))
        ss_seed = n * np.sum((per_seed - grand) ** 2, axis=-1)
        ms_resid = (ss_total - ss_seed - (n - 1) * ms_item) / ((seeds - 1) * (n - 1))
        kept = ms_item > ms_resid  # the question component floored at 0: its terms drop out of the df too
        question_part = question_part + np.where(kept, scale * (ms_item - ms_resid), 0.0)
        terms += [(np.where(kept, scale * ms_item, 0.0), n - 1),
                  (np.where(kept, scale * ms_resid, 0.0), (seeds - 1) * (n - 1))]
    df = _df(seed_part + question_part, terms)
    return tuple(np.asarray(x, dtype=np.float64)[()] for x in (value, seed_part, question_part, df))  # 0-d: scalars


def _df(variance, terms):
    """1 / df = sum_j share_j^(1 + (1 - share_j)^4) / df_j, share_j = |c_j MS_j| / variance (the docstring says why);
    inf where the variance is 0."""
    inverse = np.zeros(np.shape(variance))
    with np.errstate(divide='ignore', invalid='ignore'):
        for part, df in terms:
            share = np.where(variance > 0, np.abs(part) / np.where(variance > 0, variance, 1.0), 0.0)
            inverse = inverse + share ** (1 + (1 - np.minimum(share, 1)) ** 4) / df  # > 1: MS_q - MS_r near 0
        return np.where(inverse > 0, 1 / np.where(inverse > 0, inverse, 1.0), np.inf)


# -----------------------------------------------------------------------------
# eval.json in, estimates out


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A cell mean (model 'cell') or a contrast (model 'plan': the pooled two-way model; 'paired': the contrast's
    own seeds), its standard error, degrees of freedom, 95 % interval, two-sided p and exact 80 % mde (None for a
    cell mean), and how many seeds it used."""
    value: float
    se: float
    df: float
    ci95: tuple
    p: float | None
    mde: float | None
    seeds: int
    model: str


def _estimate(value, variance, df, seeds, model):
    value, se, df = float(value), math.sqrt(max(float(variance), 0.0)), float(df)
    contrast = model != 'cell'
    if se == 0:  # identical seeds and items: nothing to judge against
        return Estimate(value, 0.0, df, (value, value), (1.0 if value == 0 else 0.0) if contrast else None,
                        0.0 if contrast else None, seeds, model)
    half = t_quantile(0.975, df) * se
    return Estimate(value, se, df, (value - half, value + half), t_p_value(value / se, df) if contrast else None,
                    mde(se, df) if contrast else None, seeds, model)


def task_names(run, modality, key='tasks'):
    return sorted(k for k, t in run[key].items() if t['modality'] == modality and t['n'])


def seed_score(run, modality, key='tasks', n=None):
    """One seed's stable score (run: its eval.json), from the first n items per task: the mean over the modality's
    tasks of the centered accuracy."""
    return float(np.mean([centered(np.mean(run[key][k]['scores'][:n]), run[key][k]['chance'])
                          for k in task_names(run, modality, key)]))


def _arrays(cells, modality, key):
    """cells: per cell its eval.json per seed (the same seeds in the same order) -> (per task [C, S, n], chances)."""
    names = task_names(cells[0][0], modality, key)
    if not names:
        raise ValueError(f'no {modality} tasks with items under {key!r}')
    ys, chances = [], []
    for name in names:
        tasks = [run[key][name] for runs in cells for run in runs]
        if len({len(t['scores']) for t in tasks}) > 1:
            raise ValueError(f'{name}: seeds or cells were asked different numbers of items')
        ys.append(np.array([t['scores'] for t in tasks], dtype=np.float64).reshape(len(cells), len(cells[0]), -1))
        chances.append(float(tasks[0]['chance']))
    return ys, chances


def cell_mean(runs, modality, key='tasks'):
    """A cell's stable score over its seeds (runs: each seed's eval.json): the seeds' variance / S plus the questions'
    main effect (their difficulty included: the interval is about the populations of seeds and of questions), df as
    the module says. One seed: the questions' part alone, MS_question / n, about the questions given that seed."""
    ys, chances = _arrays([list(runs)], modality, key)
    value, seed_part, question_part, df = crossed(ys, chances, [1.0])
    return _estimate(value, seed_part + question_part, df, len(runs), 'cell')


class PlanModel:
    """
    One model for a plan. results: {cell: {seed: eval.json}}. It holds the cells that have every seed of the plan's
    seed set: of the cells' own seed sets, the one that gives the pooled residual the most degrees of freedom
    (C - 1)(S - 1), where C counts the cells that have all of it (ties: more cells, so fewer contrasts are paired).
    A cell's other seeds are left out of the model. Without 2 such cells and 2 seeds there is no model, and every
    contrast is paired.
    """

    def __init__(self, results, modality, key='tasks'):
        self.results, self.modality, self.key = results, modality, key
        have = {cell: set(seeds) for cell, seeds in results.items() if seeds}
        best, self.seeds, self.cells = (0, 0), [], []
        for candidate in {frozenset(seeds) for seeds in have.values()}:
            inside = [cell for cell, seeds in have.items() if candidate <= seeds]
            rank = ((len(inside) - 1) * (len(candidate) - 1), len(inside))
            if rank > best or (rank == best and sorted(candidate) < self.seeds):  # the last for a fixed choice
                best, self.seeds, self.cells = rank, sorted(candidate), inside
        if best[0] == 0:
            self.seeds, self.cells = [], []
        if self.cells:
            self._ys, self._chances = _arrays([[results[c][s] for s in self.seeds] for c in self.cells], modality, key)

    def contrast(self, weights):
        """weights: {cell: coefficient}, summing to 0 ({A: 1, B: -1}: A minus B). Every cell in the model: the plan's
        pooled seed part with (C - 1)(S - 1) df; otherwise a paired test over the seeds its cells share. Both add the
        question part of the contrast's item-by-item differences; df as the module says."""
        if set(weights) - set(self.results):
            raise ValueError(f'no such cell: {sorted(set(weights) - set(self.results))}')
        weights = {cell: float(a) for cell, a in weights.items() if a}
        if not weights or abs(sum(weights.values())) > 1e-9 * sum(map(abs, weights.values())):
            raise ValueError(f'a contrast needs coefficients that sum to 0, not {weights}')
        if all(cell in self.cells for cell in weights):
            a = [weights.get(cell, 0.0) for cell in self.cells]
            value, seed_part, question_part, df = crossed(self._ys, self._chances, a, pooled=True)
            return _estimate(value, seed_part + question_part, df, len(self.seeds), 'plan')
        shared = set.intersection(*(set(self.results[cell]) for cell in weights))
        if not shared:
            raise ValueError(f'{sorted(weights)} share no seed')
        seeds = sorted(shared)
        ys, chances = _arrays([[self.results[c][s] for s in seeds] for c in weights], self.modality, self.key)
        value, seed_part, question_part, df = crossed(ys, chances, list(weights.values()))
        return _estimate(value, seed_part + question_part, df, len(seeds), 'paired')


def scored(runs):
    """Whether a cell has finished seeds with stable scores (a text-only plan's eval.json has none)."""
    return bool(runs) and runs[0]['vision_stable_score'] is not None


def new_seed_interval(scores):
    """
    Where one more seed's score will land, from the scores of a cell's seeds: the 95 % prediction interval
    mean ± t(n - 1) · sd · sqrt(1 + 1/n), normal spread between seeds assumed. It is about a rerun on the same
    questions: the seeds' spread around their mean. The mean's interval (cell_mean) is about the population of
    questions as well, and the questions' sampling error is shared by every seed, so absent from that spread: where
    it dominates, the new seed's interval is the narrower. None for fewer than 2 seeds.
    """
    n = len(scores)
    if n < 2:
        return None
    half = t_quantile(0.975, n - 1) * float(np.std(scores, ddof=1)) * math.sqrt(1 + 1 / n)
    return [float(np.mean(scores)) - half, float(np.mean(scores)) + half]
