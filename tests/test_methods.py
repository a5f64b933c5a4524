"""Scoring, grouping and scaling methods on small hand-checked statistics."""

import math

import pytest
import torch

from edgeconv.calibration.stats import LayerStats
from edgeconv.errors import EdgeconvError
from edgeconv.planning.methods import GROUPINGS, SCALINGS, SCORERS, merge_weights
from edgeconv.planning.methods.grouping import average_linkage
from edgeconv.planning.methods.scoring import greedy_logdet


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def make_stats(hidden=2, **sums):
    """LayerStats with the given raw sums; E is taken from `count`."""
    st = LayerStats.zeros(0, len(sums["count"]), hidden)
    for name, value in sums.items():
        setattr(st, name, value if isinstance(value, int) else t(value))
    return st


def random_stats(num=8, hidden=4, seed=0):
    g = gen(seed)
    st = LayerStats.zeros(3, num, hidden)
    st.count = torch.randint(1, 100, (num,), generator=g).double()
    st.weight_sum = st.count * torch.rand(num, generator=g, dtype=torch.float64)
    st.norm_sum = st.count * torch.rand(num, generator=g, dtype=torch.float64)
    st.norm_sq_sum = st.count * torch.rand(num, generator=g, dtype=torch.float64)
    st.reap_sum = st.weight_sum * torch.rand(num, generator=g, dtype=torch.float64)
    st.out_sum = st.count[:, None] * torch.randn(num, hidden, generator=g, dtype=torch.float64)
    a = torch.randn(num, 2 * num, generator=g, dtype=torch.float64)
    st.gram_sum, st.gram_tokens, st.tokens = a @ a.T, 2 * num, 200
    return st


# --- scoring ---------------------------------------------------------------------------------------

# E = 4.  count [10, 40, 20, 30]
#   cp        = weight_sum / count  = [5/10, 8/40, 10/20, 6/30]      = [0.5, 0.2, 0.5, 0.2]
#   ean       = norm_sum             = [30, 40, 20, 90]
#   reap      = reap_sum / count     = [4/10, 12/40, 6/20, 3/30]       = [0.4, 0.3, 0.3, 0.1]
#   mean ||f||^2 = norm_sq_sum / count = [100/10, 80/40, 60/20, 300/30] = [10, 2, 3, 10]
#   acp       = cp * sqrt(4) * mean ||f||^2 = [0.5*2*10, 0.2*2*2, 0.5*2*3, 0.2*2*10] = [10, 0.8, 3, 4]
SCORING = dict(
    count=[10, 40, 20, 30],
    weight_sum=[5, 8, 10, 6],
    norm_sum=[30, 40, 20, 90],
    norm_sq_sum=[100, 80, 60, 300],
    reap_sum=[4, 12, 6, 3],
)


@pytest.mark.parametrize(
    "method, k, expected",
    [
        ("frequency", 2, [1, 3]),
        ("cp", 2, [0, 2]),  # 0 and 2 tie at 0.5, both kept in id order
        ("cp", 3, [0, 2, 1]),  # 1 and 3 tie at 0.2: the lower id wins
        ("ean", 2, [3, 1]),
        ("reap", 2, [0, 1]),  # the mean, not the sum (the sum [4, 12, 6, 3] would keep [1, 2])
        ("acp", 2, [0, 3]),
        ("acp", 4, [0, 3, 2, 1]),
    ],
)
def test_simple_scorers(method, k, expected):
    ranking = SCORERS.get(method)(make_stats(**SCORING), k, gen())
    assert ranking.selected == expected
    assert list(ranking.scores) == [method]


def test_score_vectors_are_recorded():
    st = make_stats(**SCORING)
    assert SCORERS.get("acp")(st, 1, gen()).scores["acp"] == pytest.approx([10, 0.8, 3, 4])
    assert SCORERS.get("reap")(st, 1, gen()).scores["reap"] == pytest.approx([0.4, 0.3, 0.3, 0.1])
    assert SCORERS.get("ean")(st, 1, gen()).scores["ean"] == [30, 40, 20, 90]
    assert SCORERS.get("frequency")(st, 1, gen()).scores["frequency"] == [10, 40, 20, 30]


def test_random_scorer_is_seeded():
    st = make_stats(**SCORING)
    rand = SCORERS.get("random")
    first = rand(st, 2, gen(7))
    assert first == rand(st, 2, gen(7))
    assert first.selected == sorted(range(4), key=lambda i: -first.scores["random"][i])[:2]
    assert len({tuple(rand(st, 2, gen(s)).selected) for s in range(20)}) > 1


# E = 3: experts 0 and 1 are identical (same Gram rows, same ACP), expert 2 is orthogonal and less important.
#   count [10, 10, 5], cp = 0.5 for all, mean ||f||^2 = [10, 10, 4]  ->  ACP = 0.5*sqrt3*[10, 10, 4] = a*[5, 5, 2]
#   cosine C = [[1,1,0],[1,1,0],[0,0,1]], K = a*[[5,5,0],[5,5,0],[0,0,2]], lambda = mean(diag K)/k = (12a/3)/2 = 2a
#   step 1: d^2 = diag K + lambda = a*[7, 7, 4]          -> expert 0 (tie with 1: lower id), gain log 7a
#   step 2: d_1^2 = 7a - (5a)^2/(7a) = 24a/7 ~ 3.43a < d_2^2 = 4a -> expert 2, gain log 4a
A = math.sqrt(3)
TWINS = dict(
    count=[10, 10, 5],
    weight_sum=[5, 5, 2.5],
    norm_sq_sum=[100, 100, 20],
    gram_sum=[[4, 4, 0], [4, 4, 0], [0, 0, 1]],
    gram_tokens=1,
)


def test_do_acp_drops_a_redundant_twin_where_frequency_keeps_both():
    st = make_stats(**TWINS)
    ranking = SCORERS.get("do-acp")(st, 2, gen())
    assert ranking.selected == [0, 2]
    assert ranking.scores["acp"] == pytest.approx([5 * A, 5 * A, 2 * A])
    # chosen: gain at its step; unchosen expert 1: its gain at the last step
    assert ranking.scores["do_acp_gain"] == pytest.approx([math.log(7 * A), math.log(24 * A / 7), math.log(4 * A)])
    assert SCORERS.get("frequency")(st, 2, gen()).selected == [0, 1]
    assert SCORERS.get("acp")(st, 2, gen()).selected == [0, 1]


# E = 4: count [10, 10, 10, 0], cp = 0.5, sqrt(E) = 2, so ACP = mean ||f||^2 = [4, 3, 2, 0].
#   Gram = diag(2, 3, 1, 0)-scaled cosine with C_01 = 0.9: G = [[4, 5.4, 0, 0], [5.4, 9, 0, 0], [0, 0, 1, 0], 0]
#   (stored as gram_sum = 2G with gram_tokens = 2). Expert 3 never produced output: zero diagonal, C_33 = 1.
#   K_01 = sqrt(4*3)*0.9 = 0.9*sqrt12, K_01^2 = 9.72; lambda = mean(4, 3, 2, 0)/2 = 1.125
#   step 1: d^2 = [5.125, 4.125, 3.125, 1.125]                   -> 0, gain log 5.125
#   step 2: d_1^2 = 4.125 - 9.72/5.125 = 2.22841 < d_2^2 = 3.125 -> 2 (ACP alone would take 1)
#   step 3: expert 2 is orthogonal to everything: d_1^2 = 2.22841 > d_3^2 = 1.125 -> 1
def diverse_stats():
    g = [[4, 5.4, 0, 0], [5.4, 9, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    return make_stats(
        count=[10, 10, 10, 0],
        weight_sum=[5, 5, 5, 0],
        norm_sq_sum=[40, 30, 20, 0],
        gram_sum=[[2 * v for v in row] for row in g],
        gram_tokens=2,
    )


def test_do_acp_hand_computed():
    st = diverse_stats()
    d1 = 4.125 - 9.72 / 5.125
    two = SCORERS.get("do-acp")(st, 2, gen())
    assert two.selected == [0, 2]
    assert two.scores["acp"] == pytest.approx([4, 3, 2, 0])
    assert two.scores["do_acp_gain"] == pytest.approx([math.log(5.125), math.log(d1), math.log(3.125), math.log(1.125)])
    assert SCORERS.get("do-acp")(st, 3, gen()).selected == [0, 2, 1]
    assert SCORERS.get("acp")(st, 2, gen()).selected == [0, 1]


def test_greedy_matches_brute_force_log_det():
    g = gen(3)
    a = torch.randn(7, 9, generator=g, dtype=torch.float64)
    kernel, lam, k = a @ a.T, 0.3, 5
    chosen, gains = greedy_logdet(kernel, k, lam)

    def logdet(ids):
        return float(torch.logdet(kernel[ids][:, ids] + lam * torch.eye(len(ids), dtype=torch.float64)))

    expected, prev = [], 0.0
    for _ in range(k):  # naive greedy on log det(K_S + lambda I)
        best = max((i for i in range(7) if i not in expected), key=lambda i: logdet(expected + [i]))
        expected.append(best)
        ld = logdet(expected)
        assert gains[best] == pytest.approx(ld - prev)
        prev = ld
    assert chosen == expected


def test_do_acp_on_all_zero_stats_is_defined():
    st = LayerStats.zeros(0, 5, 2)
    ranking = SCORERS.get("do-acp")(st, 3, gen())
    assert ranking.selected == [0, 1, 2]
    assert all(math.isfinite(v) for v in ranking.scores["do_acp_gain"])


@pytest.mark.parametrize("k", [0, 5, -1])
def test_k_out_of_range(k):
    with pytest.raises(EdgeconvError, match=rf"k={k} .*E=4.*choose K between 1 and 4"):
        SCORERS.get("do-acp")(make_stats(**SCORING), k, gen())


# --- grouping --------------------------------------------------------------------------------------


def test_none_keeps_each_expert_and_refuses_merging():
    st = make_stats(count=[5, 50, 1, 9, 0])
    assert GROUPINGS.get("none")(st, [3, 1], 2, gen()) == [[3], [1]]
    with pytest.raises(EdgeconvError, match="K = groups"):
        GROUPINGS.get("none")(st, [3, 1, 0], 2, gen())


def test_k_smaller_than_groups():
    st = make_stats(count=[5, 50, 1, 9, 0])
    for name in GROUPINGS:
        with pytest.raises(EdgeconvError, match=r"K=2 experts cannot form 3 groups; choose K >= groups"):
            GROUPINGS.get(name)(st, [0, 1], 3, gen(), weights=torch.zeros(2, 3))


# counts [50, 40, 30, 20, 10]: centres are 0 and 1. Outputs (Gram = V V^T):
#   v0 = [1, 0, 0], v1 = [0, 3, 0], v2 = [0.1, 1, 0] (cos with v1 0.995, with v0 0.0995),
#   v3 = [1, 0.5, 0] (cos with v0 0.894, with v1 0.447; the raw Gram would pick v1: 1.5 > 1),
#   v4 = [0, 1, 0.5] (cos with v1 0.89, with v0 0)  ->  {0, 3} and {1, 2, 4}
# selected order [4, 3, 2, 1, 0]: group {1, 2, 4} leads with 1 at position 3, before 0 at position 4.
def test_dominant():
    v = t([[1, 0, 0], [0, 3, 0], [0.1, 1, 0], [1, 0.5, 0], [0, 1, 0.5]])
    st = make_stats(count=[50, 40, 30, 20, 10], gram_sum=(v @ v.T).tolist(), gram_tokens=1)
    assert GROUPINGS.get("dominant")(st, [4, 3, 2, 1, 0], 2, gen()) == [[1, 2, 4], [0, 3]]


# Mean outputs at angles 0, 10, 90, 80, 40 degrees, with magnitudes that cosine distance must ignore.
#   d = 1 - cos(angle): merges (0,1) at 0.0152 (tie with (2,3): lower ids first), then (2,3),
#   then 4 joins {0,1}: average (1-cos40 + 1-cos30)/2 = 0.184 < {2,3}: (1-cos50 + 1-cos40)/2 = 0.296.
#   counts [10, 20, 30, 40, 50]: {0,1,4} -> [4, 1, 0], {2,3} -> [3, 2]; 3 comes first in `selected`.
def test_output_cluster():
    angles, mags = [0, 10, 90, 80, 40], [1, 5, 2, 0.5, 3]
    count = [10, 20, 30, 40, 50]
    rad = [math.radians(a) for a in angles]
    out = [[c * m * math.cos(r), c * m * math.sin(r)] for r, m, c in zip(rad, mags, count)]
    st = make_stats(count=count, out_sum=out)
    assert GROUPINGS.get("output-cluster")(st, [0, 1, 2, 3, 4], 2, gen()) == [[3, 2], [4, 1, 0]]


def test_average_linkage_matches_scipy():
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    distance = pytest.importorskip("scipy.spatial.distance")
    for seed in range(5):
        x = torch.randn(12, 3, generator=gen(seed), dtype=torch.float64)
        d = torch.cdist(x, x)
        ours = average_linkage(d, 4)
        tree = hierarchy.linkage(distance.squareform(d.numpy(), checks=False), "average")
        ref = hierarchy.fcluster(tree, 4, "maxclust")
        same = lambda labels: {frozenset(i for i in range(12) if labels[i] == c) for c in set(labels)}  # noqa: E731
        assert same(ours) == same(list(ref))


# Two well-separated blobs: {0, 1, 4} near the origin, {2, 3} near (10, 10), whatever the seed.
def test_weight_cluster():
    st = make_stats(count=[10, 20, 30, 40, 50])
    w = torch.tensor([[0, 0], [0.1, 0], [10, 10], [10, 10.2], [0, 0.2]])
    for seed in range(10):
        assert GROUPINGS.get("weight-cluster")(st, [0, 1, 2, 3, 4], 2, gen(seed), weights=w) == [[3, 2], [4, 1, 0]]


def test_weight_cluster_degenerate_and_missing_weights():
    st = make_stats(count=[1, 2, 3, 4])
    # identical rows: k-means++ and Lloyd still give every group a member
    cluster, same = GROUPINGS.get("weight-cluster"), torch.zeros(4, 3)
    assert cluster(st, [0, 1, 2, 3], 4, gen(), weights=same) == [[0], [1], [2], [3]]
    assert sorted(map(len, cluster(st, [0, 1, 2, 3], 3, gen(), weights=same))) == [1, 1, 2]
    with pytest.raises(EdgeconvError, match="needs the selected experts' weights"):
        GROUPINGS.get("weight-cluster")(st, [0, 1, 2], 2, gen())


def test_random_grouping():
    st = make_stats(count=[1, 2, 3, 4, 5])
    rand = GROUPINGS.get("random")
    parts = rand(st, [0, 1, 2, 3, 4], 2, gen(1))
    assert parts == rand(st, [0, 1, 2, 3, 4], 2, gen(1))
    assert sorted(map(len, parts)) == [2, 3]
    assert sorted(sum(parts, [])) == [0, 1, 2, 3, 4]
    assert len({str(rand(st, [0, 1, 2, 3, 4], 2, gen(s))) for s in range(20)}) > 1


def test_merge_weights():
    st = make_stats(count=[10, 30, 0, 0])
    assert merge_weights(st, [0, 1]) == pytest.approx([0.25, 0.75])
    assert merge_weights(st, [2, 3]) == [0.5, 0.5]


# --- scaling ---------------------------------------------------------------------------------------


def test_scalings():
    # cp per group: (5 + 9) / (10 + 30) = 0.35, 4 / 20 = 0.2, never routed -> 0
    st = make_stats(count=[10, 30, 20, 0], weight_sum=[5, 9, 4, 0])
    groups = [[0, 1], [2], [3]]
    assert SCALINGS.get("cp")(st, groups) == pytest.approx([0.35, 0.2, 0.0])
    assert SCALINGS.get("uniform")(st, groups) == pytest.approx([1 / 3] * 3)


# --- registries ------------------------------------------------------------------------------------


def test_registry_names():
    assert SCORERS.names() == sorted(["random", "frequency", "cp", "ean", "reap", "acp", "do-acp"])
    assert GROUPINGS.names() == sorted(["none", "weight-cluster", "output-cluster", "dominant", "random"])
    assert SCALINGS.names() == ["cp", "uniform"]


@pytest.mark.parametrize(
    "registry, typo, suggestion",
    [(SCORERS, "doacp", "do-acp"), (GROUPINGS, "dominent", "dominant"), (SCALINGS, "uniforn", "uniform")],
)
def test_unknown_names(registry, typo, suggestion):
    with pytest.raises(EdgeconvError, match=f"did you mean '{suggestion}'.*known .*: {', '.join(registry.names())}"):
        registry.get(typo)


def test_every_method_gives_valid_output():
    st = random_stats(num=8)
    weights = torch.randn(8, 16, generator=gen(5))
    for name, score in SCORERS.items():
        for k in (1, 4, 8):
            ranking = score(st, k, gen())
            assert len(set(ranking.selected)) == k and all(0 <= e < 8 for e in ranking.selected), name
            assert all(len(v) == 8 and all(math.isfinite(x) for x in v) for v in ranking.scores.values()), name
        selected = score(st, 6, gen()).selected
        for gname, group in GROUPINGS.items():
            g = 6 if gname == "none" else 3
            parts = group(st, selected, g, gen(), weights=weights[: len(selected)])
            assert len(parts) == g and all(parts) and sorted(sum(parts, [])) == sorted(selected), (name, gname)
            for p in parts:
                assert sum(merge_weights(st, p)) == pytest.approx(1.0)
            for sname, scale in SCALINGS.items():
                scales = scale(st, parts)
                assert len(scales) == g and all(math.isfinite(s) for s in scales), sname
