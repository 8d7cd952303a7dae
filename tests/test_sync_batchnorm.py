"""SyncBatchNorm: ranks holding shards of a batch normalise it as one batch (docs/norm.md).

The relation tested throughout: split a batch x into shards x_r along N, one per rank, and give
each rank the matching slice dout_r of the upstream gradient of the whole batch. Then, with
the ranks' all-reduces joined by a ThreadWorld,
- each rank's output and dx are the slices of single-process BatchNorm's on the whole batch;
- the ranks' dgamma and dbeta are shares that SUM to single-process BatchNorm's (the trainer's
  all-reduce of parameter gradients adds them, as for every other parameter);
- every rank's running statistics are single-process BatchNorm's, bit for bit the same on all.
"""
import numpy as np
import pytest

from cvt_tiny import tiny_config
from minicvt import backend, nn
from minicvt import functional as F
from minicvt.collectives import SingleProcess, ThreadWorld
from minicvt.gradcheck import check_function, check_module
from minicvt.models import build_model

# where the batch is cut into shards: equal, unequal, a rank with one image, a rank with none
SPLITS = {"2 equal": [3], "2 unequal": [1], "3 unequal": [1, 4], "3 with an empty rank": [2, 2]}


def _split(a, cuts):
    edges = [0, *cuts, a.shape[0]]
    return [a[i:j] for i, j in zip(edges, edges[1:])]


def _bn_args(rand, C):
    gamma, beta, mean = rand(C), rand(C), rand(C)
    return gamma, beta, mean, mean * mean + 0.5          # running_var > 0


def _allclose(a, b, tol=1e-12):
    a, b = backend.to_numpy(a), backend.to_numpy(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def _equal(a, b):
    np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))


# -- the functional form ------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("world", ["SingleProcess", "ThreadWorld(1)"])
def test_a_world_of_one_is_batchnorm(xp, rand, training, channels_last, world):
    """One rank: the forward and the running statistics bit for bit, the backward to rounding
    (it is written in the compact form, dx = gamma rstd (dout - dbeta/M - xhat dgamma/M))."""
    x = rand(4, 3, 5, 2) * 3 + 7
    x = x.transpose(0, 2, 3, 1).copy() if channels_last else x
    args = _bn_args(rand, 3)
    dout = rand(*x.shape)
    out, cache, (mean, var) = F.batchnorm2d_forward(x, *args, training, channels_last=channels_last)
    grads = F.batchnorm2d_backward(dout, cache)

    def sync(comm):
        s_out, s_cache, s_stats = F.sync_batchnorm2d_forward(x, *args, training, comm, channels_last=channels_last)
        return s_out, s_stats, F.sync_batchnorm2d_backward(dout, s_cache, comm)

    s_out, (s_mean, s_var), s_grads = (sync(SingleProcess()) if world == "SingleProcess"
                                       else ThreadWorld(1).run(sync)[0])
    for a, b in ((out, s_out), (mean, s_mean), (var, s_var)):
        _equal(a, b)
    for a, b in zip(grads, s_grads):
        _allclose(a, b, 1e-14)


def _run_sharded(xs, douts, args, training, channels_last, momentum=0.1):
    """Every rank runs the sync forward and backward on its shard -> per-rank results."""
    world = ThreadWorld(len(xs))

    def rank(comm):
        r = comm.rank
        out, cache, stats = F.sync_batchnorm2d_forward(xs[r], *args, training, comm, momentum,
                                                       channels_last=channels_last)
        return out, stats, F.sync_batchnorm2d_backward(douts[r], cache, comm)

    return world.run(rank)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("split", sorted(SPLITS))
def test_shards_give_batchnorm_of_the_whole_batch(xp, rand, split, channels_last, training):
    x = rand(6, 3, 4, 5) * 2 + 5                         # the whole batch, off-centre
    x = x.transpose(0, 2, 3, 1).copy() if channels_last else x
    dout = rand(*x.shape)
    args = _bn_args(rand, 3)
    out, cache, (mean, var) = F.batchnorm2d_forward(x, *args, training, channels_last=channels_last)
    dx, dgamma, dbeta = F.batchnorm2d_backward(dout, cache)

    cuts = SPLITS[split]
    results = _run_sharded(_split(x, cuts), _split(dout, cuts), args, training, channels_last)
    _allclose(xp.concatenate([r[0] for r in results]), out)
    _allclose(xp.concatenate([r[2][0] for r in results]), dx)
    _allclose(sum(r[2][1] for r in results), dgamma)        # the shares add up to the whole
    _allclose(sum(r[2][2] for r in results), dbeta)
    for r in results:
        _allclose(r[1][0], mean)
        _allclose(r[1][1], var)
        _equal(r[1][0], results[0][1][0])                   # the same bits on every rank: the
        _equal(r[1][1], results[0][1][1])                   # replicas' buffers never drift apart


def test_per_rank_statistics_would_differ(rand):
    """The shards of the test above are far from each other's statistics: BatchNorm on each
    shard alone (what --no-sync-bn does) gives other outputs and other dx, so the equalities
    above can fail, and a sync form that skipped an all-reduce would be caught."""
    x, dout = rand(6, 3, 4, 5) * 2 + 5, rand(6, 3, 4, 5)
    x[:3] += 1.0                                          # the first rank's images are brighter
    args = _bn_args(rand, 3)
    out, cache, _ = F.batchnorm2d_forward(x, *args, True)
    dx = F.batchnorm2d_backward(dout, cache)[0]
    alone = [F.batchnorm2d_forward(s, *args, True) for s in _split(x, [3])]
    dx_alone = np.concatenate([F.batchnorm2d_backward(d, a[1])[0] for d, a in zip(_split(dout, [3]), alone)])
    assert np.abs(np.concatenate([a[0] for a in alone]) - out).max() > 0.1
    assert np.abs(dx_alone - dx).max() > 0.01


def test_one_value_per_rank_is_enough_when_there_are_several(rand):
    """As PyTorch: one value per channel is refused only in a world of one (test_dtypes_and_errors);
    two ranks with one image of 1x1 each make a batch of two."""
    xs, args = [rand(1, 3, 1, 1), rand(1, 3, 1, 1)], _bn_args(rand, 3)
    results = _run_sharded(xs, xs, args, True, False)
    out = F.batchnorm2d_forward(np.concatenate(xs), *args, True)[0]
    _allclose(np.concatenate([r[0] for r in results]), out)


def test_no_all_reduce_in_eval(rand):
    """Eval normalises by the running statistics every rank already holds: no collective, so a
    rank may run it alone (a communicator that refuses to be called proves it)."""
    class Refuses:
        rank, size = 0, 2

        def allreduce(self, array, op="sum"):
            raise AssertionError("eval must not communicate")

    x, args = rand(2, 3, 4, 4), _bn_args(rand, 3)
    out, cache, stats = F.sync_batchnorm2d_forward(x, *args, False, Refuses())
    F.sync_batchnorm2d_backward(rand(*x.shape), cache, Refuses())
    _equal(out, F.batchnorm2d_forward(x, *args, False)[0])


def test_the_combination_of_rank_statistics_does_not_cancel(xp, rand):
    """float32, a mean 10^4 times the spread: the per-rank [count, sum, M2, D] combined as
    Chan et al. keep the variance to float32 rounding (as single-process BatchNorm: 5e-7 here),
    where combining per-rank sums of squares (one all-reduce of [count, sum, sum of squares])
    loses every digit. Without D, the rounding of each rank's mean (6e-5 at 1000) would enter
    the variance at first order: 1e-4 here."""
    x32 = (1000.0 + 0.1 * rand(8, 2, 4, 4)).astype(np.float32)
    args = [a.astype(np.float32) for a in _bn_args(rand, 2)]
    args[3] = xp.zeros(2, dtype=np.float32)                    # running_var 0: momentum 1 shows var
    truth = backend.to_numpy(x32).astype(np.float64).var(axis=(0, 2, 3)) * (x32.size / 2) / (x32.size / 2 - 1)
    results = _run_sharded(_split(x32, [2, 4, 6]), _split(x32, [2, 4, 6]), args, True, False, momentum=1.0)
    var = backend.to_numpy(results[0][1][1])
    assert var.dtype == np.float32
    assert np.abs(var / truth - 1).max() < 3e-6, (var, truth)
    # the one-pass combination on the same shards, in float32, for contrast
    s = [(backend.to_numpy(a).sum(axis=(0, 2, 3)), (backend.to_numpy(a) ** 2).sum(axis=(0, 2, 3)))
         for a in _split(x32, [2, 4, 6])]
    M = np.float32(x32.size / 2)
    naive = (sum(q for _, q in s) / M - (sum(p for p, _ in s) / M) ** 2) * M / (M - 1)
    assert np.abs(naive / truth - 1).max() > 0.5


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_through_three_ranks(rand, training, channels_last):
    """Finite differences in float64 of the sharded layer as one function of (x_0, x_1, x_2,
    gamma, beta): every rank's input moves every rank's output through the statistics."""
    shape = (2, 2, 3, 3) if channels_last else (2, 3, 2, 3)
    xs = [rand(n, *shape[1:]) + 1.0 for n in (2, 1, 3)]
    gamma, beta, mean, var = _bn_args(rand, 3)
    world = ThreadWorld(3)

    def forward(x0, x1, x2, gamma, beta):
        xs = (x0, x1, x2)
        ranks = world.run(lambda comm: F.sync_batchnorm2d_forward(
            xs[comm.rank], gamma, beta, mean, var, training, comm, channels_last=channels_last))
        return np.concatenate([r[0] for r in ranks]), [r[1] for r in ranks]

    def backward(dout, caches):
        douts = _split(dout, [2, 3])
        ranks = world.run(lambda comm: F.sync_batchnorm2d_backward(douts[comm.rank], caches[comm.rank], comm))
        return (*(r[0] for r in ranks), sum(r[1] for r in ranks), sum(r[2] for r in ranks))

    check_function(forward, backward, {"x0": xs[0], "x1": xs[1], "x2": xs[2], "gamma": gamma,
                                       "beta": beta}).assert_ok(1e-7)


# -- the module -----------------------------------------------------------------------------------

class DataParallelBN(nn.Module):
    """A data-parallel step in miniature, for check_module: the whole batch in, its shards to the
    ranks' SyncBatchNorm2d replicas (their weights set from this module's, as a trainer
    broadcasts them), and their gradient shares added into this module's (the trainer's
    all-reduce)."""

    def __init__(self, channels, cuts, **kwargs):
        super().__init__()
        self.world, self.cuts = ThreadWorld(len(cuts) + 1), cuts
        self.weight = nn.Parameter(backend.to_device(np.linspace(0.5, 1.5, channels)))
        self.bias = nn.Parameter(backend.to_device(np.linspace(-1.0, 1.0, channels)))
        self.ranks = [nn.SyncBatchNorm2d(channels, comm, dtype=np.float64, **kwargs) for comm in self.world.comms]

    def forward(self, x):
        shards = _split(x, self.cuts)

        def rank(comm):
            bn = self.ranks[comm.rank]
            bn.weight.data, bn.bias.data = self.weight.data, self.bias.data
            return bn.train(self.training)(shards[comm.rank])

        return np.concatenate(self.world.run(rank))

    def backward(self, dout):
        douts = _split(dout, self.cuts)
        for bn in self.ranks:
            bn.zero_grad()
        dxs = self.world.run(lambda comm: self.ranks[comm.rank].backward(douts[comm.rank]))
        self.weight.grad += sum(bn.weight.grad for bn in self.ranks)
        self.bias.grad += sum(bn.bias.grad for bn in self.ranks)
        return np.concatenate(dxs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_module_on_two_ranks(rand, training):
    module = DataParallelBN(3, [1], channels_last=True).train(training)
    for bn in module.ranks:                     # eval reads the running statistics: not the defaults
        bn.running_mean, bn.running_var = rand(3), rand(3) ** 2 + 0.5
    check_module(module, rand(3, 2, 3, 3) + 2.0).assert_ok(1e-7)


@pytest.mark.usefixtures("both_kernels")
def test_modules_on_shards_equal_one_batchnorm(xp, rand):
    """Two training steps, then eval: outputs, dx, the summed parameter gradients, the buffers
    (num_batches_tracked too) on every rank equal one BatchNorm2d over the whole batch."""
    single = nn.BatchNorm2d(3, dtype=np.float64)
    world = ThreadWorld(2)
    ranks = [nn.SyncBatchNorm2d(3, comm, dtype=np.float64) for comm in world.comms]
    for step in range(2):
        x, dout = rand(5, 3, 4, 4) * 3 + 1, rand(5, 3, 4, 4)
        out = single(x)
        dx = single.backward(dout)
        xs, douts = _split(x, [2]), _split(dout, [2])
        outs = world.run(lambda comm: ranks[comm.rank](xs[comm.rank]))
        dxs = world.run(lambda comm: ranks[comm.rank].backward(douts[comm.rank]))
        _allclose(xp.concatenate(outs), out)
        _allclose(xp.concatenate(dxs), dx)
    for name, p in single.named_parameters():          # gradients accumulated over both steps
        _allclose(sum(dict(bn.named_parameters())[name].grad for bn in ranks), p.grad)
    for bn in ranks:
        for name, b in single.named_buffers():
            _allclose(dict(bn.named_buffers())[name], b)
    x = rand(3, 3, 4, 4)
    _allclose(ranks[1].eval()(x), single.eval()(x))       # eval: alone, no collective


def test_state_dicts_are_interchangeable(rand):
    bn = nn.BatchNorm2d(3, dtype=np.float64)
    bn(rand(4, 3, 2, 2))                                   # buffers away from their defaults
    sync = nn.SyncBatchNorm2d(3, SingleProcess(), dtype=np.float64)
    assert list(sync.state_dict()) == list(bn.state_dict())
    sync.load_state_dict(bn.state_dict())
    back = nn.BatchNorm2d(3, dtype=np.float64)
    back.load_state_dict(sync.state_dict())
    for name, a in bn.state_dict().items():
        _equal(back.state_dict()[name], a)


def test_convert_sync_batchnorm_keeps_parameters_and_buffers(rand):
    model = build_model(tiny_config("dw_bn"), seed=0, dtype=np.float64)
    model(rand(2, 3, 16, 16))                              # running statistics away from 0 and 1
    params = dict(model.named_parameters())
    state = {k: v.copy() for k, v in model.state_dict().items()}
    bns = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    comm = SingleProcess()
    assert nn.convert_sync_batchnorm(model, comm) is model
    converted = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert sorted(converted) == sorted(bns) and len(bns) == 6      # q, k, v in each of 2 stages
    assert all(type(m) is nn.SyncBatchNorm2d and m.comm is comm and m.channels_last for m in converted.values())
    assert all(p is params[name] for name, p in model.named_parameters())   # the same Parameter objects
    assert sorted(model.state_dict()) == sorted(state)
    for name, a in model.state_dict().items():
        _equal(a, state[name])
    lone = nn.convert_sync_batchnorm(nn.BatchNorm2d(3).eval(), comm)
    assert type(lone) is nn.SyncBatchNorm2d and not lone.training


def test_data_parallel_cvt_step_equals_the_single_process_step(rand):
    """A tiny CvT (6 BatchNorms) replicated on 3 ranks, converted to SyncBatchNorm2d, each rank
    given its shard of the batch and its slice of the whole batch's dlogits: the logits are the
    single model's, and the summed parameter gradients and the running statistics too."""
    cfg = tiny_config("dw_bn")
    single = build_model(cfg, seed=0, dtype=np.float64)
    x = rand(5, 3, 16, 16)
    labels = backend.to_device(np.array([0, 2, 1, 1, 0]))
    loss = nn.CrossEntropyLoss()
    logits = single(x)
    loss.forward(logits, labels)
    dlogits = loss.backward(1.0)                            # of the mean over the whole batch
    single.backward(dlogits)

    world = ThreadWorld(3)
    replicas = [nn.convert_sync_batchnorm(build_model(cfg, seed=0, dtype=np.float64), comm)
                for comm in world.comms]
    xs, ds = _split(x, [2, 3]), _split(dlogits, [2, 3])
    logits_r = world.run(lambda comm: replicas[comm.rank](xs[comm.rank]))
    world.run(lambda comm: replicas[comm.rank].backward(ds[comm.rank]))
    _allclose(np.concatenate(logits_r), logits, 1e-10)
    grads = [dict(m.named_parameters()) for m in replicas]
    for name, p in single.named_parameters():
        _allclose(sum(g[name].grad for g in grads), p.grad, 1e-10)
    for m in replicas:
        for name, b in single.named_buffers():
            _allclose(dict(m.named_buffers())[name], b, 1e-10)


# -- the stand-in communicators -------------------------------------------------------------------

def test_thread_world_allreduce_sums_in_rank_order(xp):
    world = ThreadWorld(3)
    arrays = [xp.asarray([1e16, 1.0, 2.0 ** -60]) * (r + 1) for r in range(3)]
    results = world.run(lambda comm: comm.allreduce(arrays[comm.rank]))
    expected = (arrays[0] + arrays[1]) + arrays[2]
    for r in results:
        _equal(r, expected)
    assert world.run(lambda comm: (comm.rank, comm.size)) == [(0, 3), (1, 3), (2, 3)]


def test_thread_world_refuses_what_would_hang_or_corrupt(xp):
    world = ThreadWorld(2)
    with pytest.raises(RuntimeError, match=r"disagree on the collective \(rank 0: allreduce of float64 \(3,\), "
                                           r"rank 1: allreduce of float64 \(4,\)\)"):
        world.run(lambda comm: comm.allreduce(xp.zeros(3 + comm.rank)))
    with pytest.raises(RuntimeError, match=r"rank 0: allreduce of float64 \(2,\), rank 1: finished"):
        world.run(lambda comm: comm.allreduce(xp.zeros(2)) if comm.rank == 0 else None)

    def fails_on_rank_1(comm):
        if comm.rank == 1:
            raise ValueError("rank 1's own error")
        return comm.allreduce(xp.zeros(2))

    with pytest.raises(ValueError, match="rank 1's own error"):
        world.run(fails_on_rank_1)
    with pytest.raises(RuntimeError, match="allreduce called outside ThreadWorld.run"):
        world.comms[0].allreduce(xp.zeros(2))
    with pytest.raises(ValueError, match=r"op must be one of \('sum',\), got 'max'"):
        world.run(lambda comm: comm.allreduce(xp.zeros(2), op="max"))
    assert world.run(lambda comm: float(comm.allreduce(xp.ones(1))[0])) == [2.0, 2.0]   # still usable
    with pytest.raises(ValueError, match="size must be a positive int"):
        ThreadWorld(0)
    one = SingleProcess()
    a = xp.ones(2)
    assert (one.rank, one.size) == (0, 1) and one.allreduce(a) is a
