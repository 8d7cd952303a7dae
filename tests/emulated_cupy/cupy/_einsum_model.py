"""What CuPy 14.2's einsum allocates inside, as a function of the operands' shapes and strides.

NumPy's einsum (which the emulation computes with) loops over the operands in place; CuPy's
(cupy/linalg/_einsum.py) rewrites a two-operand einsum as a batched matrix product:
1. labels found in one operand only (not in the output, not in the other operand) are summed
   out first, each sum a new array;
2. a pair of operands with no contracted label is multiplied elementwise into a new array of
   the broadcast shape;
3. otherwise the pair's first array (CuPy contracts the last two operands first, and takes
   the later one first) is transposed to (batch, kept, contracted), the other to (batch,
   contracted, kept), each reshaped to three axes, and `matmul` makes a C-contiguous copy of
   each one that is not C-contiguous after that transpose; the product is one new array, the
   result, whose axes the final transpose only permutes (a view).
This model returns the bytes of those temporaries (1, 2 and 3's copies; not the result, which
the emulation counts as the returned array). It covers explicit '->' specs with at most one
appearance of a label per operand and no '...'; for anything else it returns None.
"""
import math


def _c_contiguous(shape, strides, itemsize):
    expected = itemsize
    for n, s in zip(reversed(shape), reversed(strides)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _c_strides(shape, itemsize):
    out, step = [], itemsize
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


def temporaries(spec, operands, itemsize):
    """Bytes CuPy's einsum allocates and frees inside for `spec` on operands (shape, strides)."""
    spec = spec.replace(" ", "")
    if "->" not in spec or "." in spec:
        return None
    inputs, output = spec.split("->")
    subs = inputs.split(",")
    if len(subs) != len(operands) or any(len(set(s)) != len(s) for s in subs):
        return None
    size = {}
    for sub, (shape, _) in zip(subs, operands):
        size.update(zip(sub, shape))
    ops = [(list(sub), tuple(shape), tuple(strides)) for sub, (shape, strides) in zip(subs, operands)]
    temp = 0

    for i, (sub, shape, strides) in enumerate(ops):                       # 1. unary sums
        elsewhere = set(output).union(*(set(o[0]) for j, o in enumerate(ops) if j != i))
        keep = [label for label in sub if label in elsewhere]
        if len(keep) < len(sub):
            new_shape = tuple(size[label] for label in keep)
            if len(ops) > 1:              # (with one operand the sum is the result itself)
                temp += math.prod(new_shape) * itemsize
            ops[i] = (keep, new_shape, _c_strides(new_shape, itemsize))

    # CuPy contracts the last two operands first (its path pairs are sorted high to low), then
    # the result with each earlier operand; the first array of each pair is the later operand
    current, pending = ops[-1], ops[:-1]
    while pending:
        (sub0, shape0, strides0), (sub1, shape1, strides1) = current, pending.pop()
        others = set(output).union(*(set(o[0]) for o in pending))
        shared = set(sub0) & set(sub1)
        batch, contract = shared & others, shared - (shared & others)
        if not contract:                                                  # 2. elementwise product
            labels = sub0 + [label for label in sub1 if label not in sub0]
        else:                                                             # 3. batched matmul
            # arr0 as (batch, kept, contracted), arr1 as (batch, contracted, kept)
            for sub, shape, strides, contracted_last in ((sub0, shape0, strides0, True),
                                                         (sub1, shape1, strides1, False)):
                b = [ax for _, ax in sorted((lab, ax) for ax, lab in enumerate(sub) if lab in batch)]
                c = [ax for _, ax in sorted((lab, ax) for ax, lab in enumerate(sub) if lab in contract)]
                t = [ax for _, ax in sorted((lab, ax) for ax, lab in enumerate(sub) if lab not in shared)]
                order = b + (t + c if contracted_last else c + t)
                if not _c_contiguous([shape[a] for a in order], [strides[a] for a in order], itemsize):
                    temp += math.prod(shape) * itemsize
            labels = sorted(batch) + sorted(set(sub0) - shared) + sorted(set(sub1) - shared)
        new_shape = tuple(size[label] for label in labels)
        if pending:                       # an intermediate product, freed after the next pair
            temp += math.prod(new_shape) * itemsize
        current = (labels, new_shape, _c_strides(new_shape, itemsize))
    return temp
