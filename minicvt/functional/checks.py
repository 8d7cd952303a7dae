"""Input validation shared by the layer functions: a wrong shape or dtype is a ValueError
that names the layer and says what was expected and what arrived."""


def check_ndim(layer, name, a, ndim, layout):
    if a.ndim != ndim:
        raise ValueError(f"{layer}: {name} must be {ndim}-D {layout}, got shape {tuple(a.shape)}")


def check_float(layer, *named):
    """All arrays must share one floating dtype (float32 or float64): mixing would promote
    float32 to float64 silently, so it is refused instead."""
    dtypes = {n: a.dtype for n, a in named if a is not None}
    for n, dt in dtypes.items():
        if dt.kind != "f":
            raise ValueError(f"{layer}: {n} must be float32 or float64, got {dt}")
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}={dt}" for n, dt in dtypes.items())
        raise ValueError(f"{layer}: all arrays must have the same dtype, got {listed}")


def check_shape(layer, name, a, expected):
    """expected is a tuple where None means 'any size'."""
    ok = a.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, a.shape))
    if not ok:
        want = ", ".join("*" if e is None else str(e) for e in expected)
        want = f"({want},)" if len(expected) == 1 else f"({want})"   # written as Python writes tuples
        raise ValueError(f"{layer}: {name} must have shape {want}, got {tuple(a.shape)}")


def pair(v, what="value"):
    """An int or a pair of ints -> (vertical, horizontal)."""
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f"{what} must be an int or a pair of ints, got {v!r}")
    return v


def check_cache(layer, cache, kind):
    """A backward reads only a cache of its own forward's type. The fast kernels' caches for
    the same layer hold other arrays in the same places (the centred input where the reference
    keeps xhat, im2col's columns in another order): a forward run with one set of kernels and its
    backward with the other (minicvt.kernels) is refused here instead of giving wrong gradients."""
    if not isinstance(cache, kind):
        raise TypeError(f"{layer}_backward: got a {type(cache).__name__}, not the {kind.__name__} its forward "
                        f"makes; run a forward and its backward with the same set of kernels (minicvt.kernels)")
