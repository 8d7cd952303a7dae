"""Optimisers, with PyTorch's update rules, and gradient clipping.

Each optimiser updates `param.data` in place from `param.grad`; it never touches gradients
(that is `zero_grad`'s job) and it holds its state (momentum, Adam moments) per parameter
name, so `state_dict()` can be checkpointed as plain arrays. `lr` is an attribute the training
loop sets every step (from `schedules.cosine_lr`).
"""
from .backend import get_array_module, to_device, to_numpy


def decays(name, param):
    """Weight decay applies to weight matrices and kernels only: not to norms' scales and
    shifts, biases (all 1-D) or the class token (as the official CvT recipe)."""
    return param.data.ndim > 1 and not name.endswith("cls_token")


class Optimizer:
    def __init__(self, named_params, lr, weight_decay=0.0):
        self.params = list(named_params)                 # [(name, Parameter)]
        if not self.params:
            raise ValueError(f"{type(self).__name__}: no parameters to optimise")
        self.lr, self.weight_decay = lr, weight_decay
        self.steps = 0
        self.state = {}                                  # {"<kind>.<param name>": array}

    def _buffer(self, kind, name, like):
        key = f"{kind}.{name}"
        if key not in self.state:
            self.state[key] = get_array_module(like).zeros_like(like)
        return self.state[key]

    def state_dict(self):
        """Host copies of the state plus the step count, ready for np.savez."""
        sd = {k: to_numpy(v) for k, v in self.state.items()}
        sd["steps"] = self.steps
        return sd

    def load_state_dict(self, sd):
        sd = dict(sd)
        self.steps = int(sd.pop("steps"))
        names = {n for n, _ in self.params}
        for key in sd:
            if key.split(".", 1)[1] not in names:
                raise ValueError(f"{type(self).__name__}: state for unknown parameter {key!r}")
        self.state = {k: to_device(v) for k, v in sd.items()}


class SGD(Optimizer):
    """SGD with momentum (PyTorch's form, no dampening) and optional Nesterov:
        g = grad + wd * w          (L2 decay, for weights that decay)
        b = momentum * b + g       (b = g on the first step)
        w -= lr * (g + momentum * b if nesterov else b)
    """

    def __init__(self, named_params, lr, momentum=0.9, nesterov=False, weight_decay=0.0):
        super().__init__(named_params, lr, weight_decay)
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov needs momentum > 0")
        self.momentum, self.nesterov = momentum, nesterov

    def step(self):
        for name, p in self.params:
            g = p.grad
            if self.weight_decay and decays(name, p):
                g = g + self.weight_decay * p.data
            if self.momentum:
                first = f"momentum.{name}" not in self.state
                b = self._buffer("momentum", name, p.data)
                if first:
                    b[...] = g
                else:
                    b *= self.momentum
                    b += g
                g = g + self.momentum * b if self.nesterov else b
            p.data -= self.lr * g
        self.steps += 1


class AdamW(Optimizer):
    """Adam with decoupled weight decay (PyTorch's AdamW):
        w -= lr * wd * w
        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
        w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    def __init__(self, named_params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05):
        super().__init__(named_params, lr, weight_decay)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)

    def step(self):
        self.steps += 1
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1 ** self.steps, 1.0 - b2 ** self.steps   # bias corrections
        for name, p in self.params:
            xp = get_array_module(p.data)
            if self.weight_decay and decays(name, p):
                p.data *= 1.0 - self.lr * self.weight_decay
            m = self._buffer("exp_avg", name, p.data)
            v = self._buffer("exp_avg_sq", name, p.data)
            m *= b1
            m += (1.0 - b1) * p.grad
            v *= b2
            v += (1.0 - b2) * p.grad * p.grad
            p.data -= (self.lr / c1) * m / (xp.sqrt(v / c2) + self.eps)


def clip_grad_norm(params, max_norm):
    """Scale all gradients together so their global L2 norm is at most max_norm; returns the
    norm before clipping (a device scalar: reading it would wait for the GPU, so it is left
    to the caller). The scale is computed on the device, so clipping needs no host sync."""
    params = list(params)
    xp = get_array_module(params[0].grad)
    norm = xp.sqrt(sum((p.grad.astype(xp.float64) ** 2).sum() for p in params))
    scale = xp.minimum(1.0, max_norm / (norm + 1e-6))
    for p in params:
        p.grad *= scale.astype(p.grad.dtype)
    return norm


def make_optimizer(tc, model):
    """The optimiser a run's settings name (tc: a TrainConfig) over every parameter of model."""
    params = list(model.named_parameters())
    if tc.optimizer == "sgd":
        return SGD(params, tc.lr, momentum=tc.momentum, nesterov=tc.nesterov, weight_decay=tc.weight_decay)
    return AdamW(params, tc.lr, weight_decay=tc.weight_decay)
