"""Models of "On global convergence of ResNets: From finite to infinite width using
linear parameterization" (Barboni, Peyré, Vialard, NeurIPS 2022).

Importing this module has no side effects: no device is chosen, nothing is printed.

The paper's objects, and where they live here
---------------------------------------------
A residual network seen as a neural ODE (paper, Section 2):

    dx/dt = f(t, x),   x(0) = A(image),   prediction = B(x(1)),   t in [0, 1],

integrated with a fixed-step scheme of N steps of size exactly 1/N (`layers` = N).
The residual depends on time through N+1 parameter nodes theta_0..theta_N at
t_k = k/N, linearly interpolated (`linear_coefficients`):

    theta(t) = (1 - s) theta_k + s theta_{k+1},   k = min(floor(tN), N-1),  s = tN - k.

Two residuals are compared (`RKHSField`, `SHLField`):

    RKHS  f(t, x) = W(t) * ReLU(Omega * x)           Omega fixed and random, W(t) trained.
          Linear in the trained W, so interpolating W and running one convolution is the
          same maths as blending the outputs of two convolutions.
    SHL   f(t, x) = (1-s) V_k * ReLU(H_k * x) + s V_{k+1} * ReLU(H_{k+1} * x)
          Both layers trained; the ReLU makes interpolating outputs differ from
          interpolating weights, so the outputs are interpolated, as in the paper.

(`*` is a 3x3 convolution with padding 1 and no bias.) The output layers W and V start
at zero, so the block is exactly the identity at initialisation.

Time-weight schedules
---------------------
`linear`  : the interpolation above on an exact N-step grid.
`release` : what the paper's public release computed, which made its figures: torchdiffeq's
            `step_size=1/N` grid on t=[0, 1], and for RKHS the index k = int(tN - 1) in
            float32 (`release_coefficients`), which extrapolates at half steps.

Both schedules depend only on N and the method, so every evaluation's node pair and
weights are computed once, on the host, when the block is built (`TimeSchedule`). The
fast integrator (`integrate_fixed_grid`) then runs with no host-device synchronisation.
`integrator='torchdiffeq'` keeps the plain `torchdiffeq.odeint` path for comparison.

CIFAR-10 (Figure 3) uses discrete residual blocks in a ResNet18 layout (`CifarResNet`).
The synthetic experiment uses fully connected forms of both residuals on R^q (`DenseRKHSField`,
`DenseSHLField`, last section), integrated by the same `ResidualODEBlock`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ('euler', 'midpoint', 'rk4')
TIME_WEIGHTS = ('release', 'linear')
INTEGRATORS = ('fixed', 'torchdiffeq')

# Stage times c_i of one step, as fractions of the step, in the order torchdiffeq's fixed-grid
# solvers call f. torchdiffeq's `rk4` is the 3/8 rule (rk_common.rk4_alt_step_func).
STAGE_FRACTIONS = {
    'euler': (0.0,),
    'midpoint': (0.0, 0.5),
    'rk4': (0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0),
}

# A stage time is never closer than a third of a step to a node (see STAGE_FRACTIONS), while
# float32 rounding of t moves tN by at most a few N * 2^-23 (< 5e-4 for N <= 1000). Snapping
# within this distance of a node therefore fixes rounding and can never move a real stage.
NODE_SNAP_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------------------------
# Time-weight rules: for an evaluation time t, which nodes (i0, i1) and weights (w0, w1).
# ----------------------------------------------------------------------------------------------

def linear_coefficients(t: float, num_steps: int) -> tuple[int, int, float, float]:
    """Linear interpolation between nodes: theta(t) = w0 theta_i0 + w1 theta_i1.

    k = min(floor(tN), N-1) and s = tN - k, with tN snapped to the nearest integer when it is
    within NODE_SNAP_TOLERANCE of one, so that float noise in t never picks the wrong interval.
    """
    u = float(t) * num_steps
    nearest = round(u)
    if abs(u - nearest) <= NODE_SNAP_TOLERANCE:
        u = float(nearest)
    k = min(max(int(math.floor(u)), 0), num_steps - 1)
    s = u - k
    return k, k + 1, 1.0 - s, s


def release_coefficients(t, num_steps: int, index_shift: int) -> tuple[int, int, float, float]:
    """The paper's release: the node pair and weights it used at evaluation time t.

    t is a float32 time as torchdiffeq passes it. All arithmetic is float32, in the release's
    order, so the result is bit-identical to the release's:
      u = t * N;  k = int(u - shift), shift = 1 for RKHS and 0 for SHL (int() truncates toward
      zero; each type's `release_index_shift`);
      while k < N: weights (1 - u + k) on node k and (u - k) on node k+1; else node N alone.
    For RKHS at t = 0, k = -1: Python's indexing made node -1 the last node, N, with weight 0.
    """
    t32 = torch.as_tensor(t, dtype=torch.float32).detach().cpu().reshape(())
    u = t32 * num_steps
    k = int(u - index_shift) if index_shift else int(u)
    if k >= num_steps:
        return num_steps, num_steps, 1.0, 0.0
    w0 = float((1 - u) + k)
    w1 = float(u - k)
    i0 = k % (num_steps + 1)  # -1 -> N, Python list semantics in the release
    return i0, k + 1, w0, w1


# ----------------------------------------------------------------------------------------------
# Time schedules: every evaluation of one forward pass, computed once on the host.
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TimeSchedule:
    """Every f-evaluation of one ODE solve, in call order.

    step_sizes: dt of each step (Python floats; float32 values for `release`).
    times: evaluation time of each f call (len = steps * stages).
    node_pairs: (i0, i1) per evaluation.  node_weights: (w0, w1) per evaluation.
    """
    method: str
    step_sizes: tuple
    times: tuple
    node_pairs: tuple
    node_weights: tuple

    @property
    def num_evaluations(self) -> int:
        return len(self.times)


def linear_schedule(num_steps: int, method: str) -> TimeSchedule:
    """Exact N-step grid t_n = n/N; stage c of step n uses (1-c) theta_n + c theta_{n+1}."""
    times, pairs, weights = [], [], []
    for n in range(num_steps):
        for c in STAGE_FRACTIONS[method]:
            times.append((n + c) / num_steps)
            pairs.append((n, n + 1))
            weights.append((1.0 - c, c))
    return TimeSchedule(method, (1.0 / num_steps,) * num_steps, tuple(times), tuple(pairs),
                        tuple(weights))


class _RecordCalls(nn.Module):
    """Stands in for f to record when torchdiffeq calls it, and with which step size."""

    def __init__(self):
        super().__init__()
        self.times, self.step_sizes = [], []

    def callback_step(self, t0, y0, dt):
        self.step_sizes.append(float(dt))

    def forward(self, t, y):
        self.times.append(float(t))
        return torch.zeros_like(y)


def torchdiffeq_step_size_calls(num_steps: int, method: str) -> tuple[list, list]:
    """(evaluation times, step sizes) of torchdiffeq's `step_size=1/N` grid on t=[0, 1].

    This is the release's grid, rounding included (for some N, ceil() adds a tiny extra step);
    it is read off torchdiffeq itself so that it follows the installed version exactly.
    """
    import torchdiffeq

    recorder = _RecordCalls()
    torchdiffeq.odeint(recorder, torch.zeros(()), torch.tensor([0.0, 1.0]), method=method,
                       options={'step_size': 1 / num_steps})
    return recorder.times, recorder.step_sizes


def release_schedule(num_steps: int, method: str, index_shift: int) -> TimeSchedule:
    times, step_sizes = torchdiffeq_step_size_calls(num_steps, method)
    coefficients = [release_coefficients(t, num_steps, index_shift) for t in times]
    return TimeSchedule(method, tuple(step_sizes), tuple(times),
                        tuple((c[0], c[1]) for c in coefficients),
                        tuple((c[2], c[3]) for c in coefficients))


def build_schedule(num_steps: int, method: str, time_weights: str, index_shift: int) -> TimeSchedule:
    """The schedule of one solve; index_shift is the residual type's `release_index_shift`."""
    if method not in METHODS:
        raise ValueError(f'method must be one of {METHODS}, got {method!r}')
    if time_weights == 'linear':
        return linear_schedule(num_steps, method)
    if time_weights == 'release':
        return release_schedule(num_steps, method, index_shift)
    raise ValueError(f'time_weights must be one of {TIME_WEIGHTS}, got {time_weights!r}')


# ----------------------------------------------------------------------------------------------
# Fixed-step integration. The arithmetic mirrors torchdiffeq's fixed-grid solvers term by term,
# so that on the same grid and field the two agree to the last bit or nearly.
# ----------------------------------------------------------------------------------------------

def integrate_fixed_grid(field, y0: torch.Tensor, step_sizes, method: str) -> torch.Tensor:
    """Integrate dy/dt = field(e, y) over the given steps and return y(1).

    `field(e, y)` evaluates f at the e-th evaluation of the solve (its time and parameters are
    known from e alone), so no time tensor, and no host-device synchronisation, is involved.
    """
    y, e = y0, 0
    for dt in step_sizes:
        if method == 'euler':
            y = y + dt * field(e, y)
            e += 1
        elif method == 'midpoint':
            f0 = field(e, y)
            y_mid = y + f0 * (0.5 * dt)
            y = y + dt * field(e + 1, y_mid)
            e += 2
        elif method == 'rk4':  # 3/8 rule, as torchdiffeq's rk4
            k1 = field(e, y)
            k2 = field(e + 1, y + dt * k1 * (1 / 3))
            k3 = field(e + 2, y + dt * (k2 - k1 * (1 / 3)))
            k4 = field(e + 3, y + dt * (k1 - k2 + k3))
            y = y + (k1 + 3 * (k2 + k3) + k4) * dt * 0.125
            e += 4
        else:
            raise ValueError(f'method must be one of {METHODS}, got {method!r}')
    return y


# ----------------------------------------------------------------------------------------------
# Residual fields f(t, x)
# ----------------------------------------------------------------------------------------------

class FixedConv2d(nn.Module):
    """A convolution whose weight is a buffer: saved and moved with the model, never trained."""

    def __init__(self, weight: torch.Tensor, stride: int = 1, padding: int = 1):
        super().__init__()
        self.register_buffer('weight', weight)
        self.stride, self.padding = stride, padding
        self.groups = 1  # K when K members are stacked side by side (stack_members)

    def forward(self, x):
        return F.conv2d(x, self.weight, stride=self.stride, padding=self.padding, groups=self.groups)


def random_feature_weight(out_channels: int, in_channels: int, variance: float) -> torch.Tensor:
    """3x3 convolution weight with i.i.d. N(0, variance) entries (uses torch's global RNG)."""
    return torch.randn(out_channels, in_channels, 3, 3) * math.sqrt(variance)


class ResidualField(nn.Module):
    """A residual type: the field f(t, x) of the ODE block, and the parts it brings elsewhere.

    A type is one subclass and one entry in RESIDUALS; nothing else names it. The subclass sets:

      name                   its key in RESIDUALS and the value of --model.
      release_index_shift    the release's node index rule, k = int(tN) - shift (RKHS 1, SHL 0;
                             see release_coefficients).
      __init__(dim, dim_int, num_steps, time_weights)
                             builds its N+1 parameter nodes (call super().__init__ first).
      reference(x, nodes)    the paper's formula, plainly: f at a time whose interpolation is
                             `nodes`, a list of (node index, weight). The fast path is tested
                             against it.
      prepare(index, weight, slots) -> prepared
                             the fast path, part 1: every evaluation's weights at once, from
                             index and weight (E, 2) device tensors and, per evaluation, the
                             `slots` (0, 1 or both) whose weight is not exactly 0.
      evaluate(x, prepared, e)
                             the fast path, part 2: f at evaluation e; calls count_evaluation().
      cifar_first_conv(in_planes, planes, stride)
                             (static) the first convolution of a CIFAR residual block of this type.

    The fast path also serves K fields trained side by side (stack_members, for several seeds
    in one process): then `members` = K, every parameter and buffer holds the K members' tensors
    concatenated along its output-channel axis (MEMBER_AXIS), and each convolution is grouped K
    ways, so the members never mix. A type whose tensors are convolution weights, possibly with
    a leading node axis, and whose convolutions pass groups=self.members, supports this as is.
    """

    name = ''
    release_index_shift = 0
    members = 1

    def __init__(self, dim: int, dim_int: int, num_steps: int, time_weights: str):
        super().__init__()
        if time_weights not in TIME_WEIGHTS:
            raise ValueError(f'time_weights must be one of {TIME_WEIGHTS}, got {time_weights!r}')
        self.dim, self.dim_int, self.num_steps = dim, dim_int, num_steps
        self.time_weights = time_weights
        self.nfe = 0  # function evaluations, as torchdiffeq's odenet_mnist example counts them

    def count_evaluation(self):
        # Counted in eager mode only. Inside torch.compile a Python int attribute of a module is
        # a guard: each new count would recompile the whole model, and after the recompile limit
        # torch falls back to eager. Under --compile nfe therefore stays where it was.
        if not torch.compiler.is_compiling():
            self.nfe += 1

    def coefficients(self, t) -> tuple[int, int, float, float]:
        if self.time_weights == 'release':
            return release_coefficients(t, self.num_steps, self.release_index_shift)
        return linear_coefficients(float(t), self.num_steps)

    def forward(self, t, x):
        """f(t, x) for torchdiffeq.odeint. Reads t on the host: the reference path, not the fast one."""
        i0, i1, w0, w1 = self.coefficients(t)
        like = next(self.parameters())
        index = torch.tensor([[i0, i1]], device=like.device)
        weight = torch.tensor([[w0, w1]], dtype=like.dtype, device=like.device)
        prepared = self.prepare(index, weight, (active_slots(w0, w1),))
        return self.evaluate(x, prepared, 0)


def active_slots(w0: float, w1: float) -> tuple:
    """Which of the two nodes contribute: a node with weight exactly 0 is skipped."""
    if w1 == 0.0:
        return (0,)
    if w0 == 0.0:
        return (1,)
    return (0, 1)


def conv3x3(x, weight, groups=1):
    return F.conv2d(x, weight, padding=1, groups=groups)


class RKHSField(ResidualField):
    """f(t, x) = W(t) * ReLU(Omega * x): fixed random hidden layer, trained output layer.

    Omega: dim -> dim_int, N(0, 1/(3 dim_int)) entries, a buffer (never trained).
    W: N+1 nodes dim_int -> dim, zeros; tensor of shape (N+1, dim, dim_int, 3, 3).
    Linear in W, so W(t) = w0 W_i0 + w1 W_i1 is formed first and applied in one convolution.
    """

    name = 'RKHS'
    release_index_shift = 1

    def __init__(self, dim: int, dim_int: int, num_steps: int, time_weights: str = 'release'):
        super().__init__(dim, dim_int, num_steps, time_weights)
        self.omega = FixedConv2d(random_feature_weight(dim_int, dim, 1.0 / (3 * dim_int)))
        self.output_weight = nn.Parameter(torch.zeros(num_steps + 1, dim, dim_int, 3, 3))

    def reference(self, x, nodes):
        output_weight = sum(w * self.output_weight[i] for i, w in nodes)
        return conv3x3(F.relu(self.omega(x)), output_weight)

    def prepare(self, index: torch.Tensor, weight: torch.Tensor, slots):
        """W(t_e) = w0 W_i0 + w1 W_i1 for every evaluation e at once. index, weight: (E, 2)."""
        nodes = self.output_weight[index]  # (E, 2, dim, dim_int, 3, 3)
        return (nodes * weight[:, :, None, None, None, None]).sum(1)

    def evaluate(self, x, prepared, e):
        self.count_evaluation()
        return conv3x3(F.relu(self.omega(x)), prepared[e], self.members)

    @staticmethod
    def cifar_first_conv(in_planes: int, planes: int, stride: int) -> nn.Module:
        """Fixed and random, N(0, 1/(9 in_planes)) entries."""
        return FixedConv2d(random_feature_weight(planes, in_planes, 1.0 / (9 * in_planes)),
                           stride=stride, padding=1)


class SHLField(ResidualField):
    """f(t, x) = w0 V_i0 * ReLU(H_i0 * x) + w1 V_i1 * ReLU(H_i1 * x): both layers trained.

    H: N+1 nodes dim -> dim_int, PyTorch's default Conv2d initialisation.
    V: N+1 nodes dim_int -> dim, zeros.
    The ReLU makes interpolating outputs differ from interpolating weights, so the outputs of the
    two nodes are blended, as in the paper (`reference`). The fast path computes the same sum in
    2 convolutions instead of 4: the two hidden weights stacked along output channels, then the
    weighted output weights side by side along input channels.
    """

    name = 'SHL'
    release_index_shift = 0

    def __init__(self, dim: int, dim_int: int, num_steps: int, time_weights: str = 'release'):
        super().__init__(dim, dim_int, num_steps, time_weights)
        hidden = [nn.Conv2d(dim, dim_int, 3, padding=1, bias=False).weight.data
                  for _ in range(num_steps + 1)]
        self.hidden_weight = nn.Parameter(torch.stack(hidden))  # (N+1, dim_int, dim, 3, 3)
        self.output_weight = nn.Parameter(torch.zeros(num_steps + 1, dim, dim_int, 3, 3))

    def reference(self, x, nodes):
        return sum(w * conv3x3(F.relu(conv3x3(x, self.hidden_weight[i])), self.output_weight[i])
                   for i, w in nodes)

    def prepare(self, index: torch.Tensor, weight: torch.Tensor, slots):
        num_eval, k = index.shape[0], self.members
        hidden = self.hidden_weight[index]  # (E, 2, K dim_int, dim, 3, 3)
        output = self.output_weight[index] * weight[:, :, None, None, None, None]
        stacked_hidden = stacked_output = None
        if any(len(s) == 2 for s in slots):
            # Per member: its two hidden weights one after the other along output channels, and
            # its two weighted output weights side by side along input channels.
            stacked_hidden = hidden.unflatten(2, (k, self.dim_int)).transpose(1, 2) \
                .reshape(num_eval, k * 2 * self.dim_int, self.dim, 3, 3)
            stacked_output = output.unflatten(2, (k, self.dim)).permute(0, 2, 3, 1, 4, 5, 6) \
                .reshape(num_eval, k * self.dim, 2 * self.dim_int, 3, 3)
        return [(hidden[e, s[0]], output[e, s[0]]) if len(s) == 1
                else (stacked_hidden[e], stacked_output[e]) for e, s in enumerate(slots)]

    def evaluate(self, x, prepared, e):
        self.count_evaluation()
        hidden_w, output_w = prepared[e]
        return conv3x3(F.relu(conv3x3(x, hidden_w, self.members)), output_w, self.members)

    @staticmethod
    def cifar_first_conv(in_planes: int, planes: int, stride: int) -> nn.Module:
        """Trained, PyTorch's default initialisation."""
        return nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)


# Every residual type, by --model name. A new type: one ResidualField subclass, one entry here.
RESIDUALS = {'RKHS': RKHSField, 'SHL': SHLField}


def residual_type(model: str) -> type[ResidualField]:
    if model not in RESIDUALS:
        raise ValueError(f'model must be one of {tuple(RESIDUALS)}, got {model!r}')
    return RESIDUALS[model]


class ResidualODEBlock(nn.Module):
    """x(1) from x(0) by integrating dx/dt = f(t, x) over t in [0, 1] with N fixed steps.

    Input and output: (batch, dim, 5, 5) for MNIST, any spatial size in general.
    integrator='fixed' uses the precomputed schedule (fast, no synchronisation);
    integrator='torchdiffeq' calls torchdiffeq.odeint, as the release did.
    """

    def __init__(self, model: str = 'RKHS', dim: int = 32, dim_int: int = 32, num_steps: int = 20,
                 method: str = 'midpoint', time_weights: str = 'release', integrator: str = 'fixed',
                 field: ResidualField | None = None):
        """field: a field already built (e.g. a fully connected one, `dense_field`); model, dim,
        dim_int, num_steps and time_weights are then read from it and the arguments ignored."""
        super().__init__()
        if integrator not in INTEGRATORS:
            raise ValueError(f'integrator must be one of {INTEGRATORS}, got {integrator!r}')
        if field is None:
            if num_steps < 1:
                raise ValueError(f'num_steps must be >= 1, got {num_steps}')
            field = residual_type(model)(dim, dim_int, num_steps, time_weights)
        self.model, self.method, self.integrator = field.name, method, integrator
        self.num_steps, self.time_weights = field.num_steps, field.time_weights
        self.func = field
        self.schedule = build_schedule(self.num_steps, method, self.time_weights,
                                       field.release_index_shift)
        # Device copies of the schedule: buffers move with .to(device), so no host-to-device
        # copy (which would synchronise) happens during a forward pass.
        self.register_buffer('node_index', torch.tensor(self.schedule.node_pairs, dtype=torch.long),
                             persistent=False)
        self.register_buffer('node_weight', torch.tensor(self.schedule.node_weights,
                                                         dtype=torch.float32), persistent=False)
        self.slots = tuple(active_slots(w0, w1) for w0, w1 in self.schedule.node_weights)

    @property
    def nfe(self) -> int:
        return self.func.nfe

    @nfe.setter
    def nfe(self, value: int):
        self.func.nfe = value

    def odeint_times(self, device) -> tuple[torch.Tensor, dict]:
        """The t argument and options that reproduce this block's grid with torchdiffeq."""
        if self.time_weights == 'release':
            return torch.tensor([0.0, 1.0], device=device), {'step_size': 1 / self.num_steps}
        return torch.linspace(0.0, 1.0, self.num_steps + 1, device=device), {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.integrator == 'torchdiffeq':
            import torchdiffeq

            t, options = self.odeint_times(x.device)
            return torchdiffeq.odeint(self.func, x, t, method=self.method, options=options)[-1]
        prepared = self.func.prepare(self.node_index, self.node_weight.to(x.dtype), self.slots)
        return integrate_fixed_grid(lambda e, y: self.func.evaluate(y, prepared, e), x,
                                    self.schedule.step_sizes, self.method)


# ----------------------------------------------------------------------------------------------
# Several seeds side by side: K blocks as one, for one process that trains K seeds at once
# ----------------------------------------------------------------------------------------------

# Members are stacked along the output-channel axis of every tensor of a field: axis 0 of a
# convolution weight (out, in, kh, kw), axis 1 of a node-stacked one (N+1, out, in, kh, kw).
MEMBER_AXIS = -4


def stack_members(blocks: list[ResidualODEBlock]) -> ResidualODEBlock:
    """One block that computes K independent blocks side by side.

    Its state is (batch, K*dim, H, W): member k's channels are the k-th block of dim channels
    (`side_by_side`). Each tensor of the field is the K blocks' tensors concatenated along
    MEMBER_AXIS and each convolution is grouped K ways, so member k's output and gradients are
    member k's alone. The blocks must share every setting but their weights.
    """
    import copy

    stacked = copy.deepcopy(blocks[0])
    members = len(blocks)
    for name, tensor in blocks[0].func.state_dict(keep_vars=True).items():
        joined = torch.cat([block.func.get_parameter(name) if isinstance(tensor, nn.Parameter)
                            else block.func.get_buffer(name) for block in blocks], dim=MEMBER_AXIS)
        owner_name, _, leaf = name.rpartition('.')
        owner = stacked.func.get_submodule(owner_name)
        if isinstance(tensor, nn.Parameter):
            owner._parameters[leaf] = nn.Parameter(joined.detach().clone(), tensor.requires_grad)
        else:
            owner._buffers[leaf] = joined.detach().clone()
    stacked.func.members = members
    for module in stacked.func.modules():
        if isinstance(module, FixedConv2d):
            module.groups = members
    return stacked


def member_state_dict(block: ResidualODEBlock, member: int) -> dict:
    """Member `member`'s weights as the state dict of a single block (a single run's checkpoint)."""
    state = {}
    for name, tensor in block.state_dict().items():
        axis = tensor.dim() + MEMBER_AXIS
        state[name] = tensor.unflatten(axis, (block.func.members, -1)).select(axis, member).clone()
    return state


def zero_member_gradients(block: ResidualODEBlock, members: list[int]):
    """Set these members' gradients to exactly 0, so that plain SGD leaves their weights alone
    (multiplying by a mask would not: 0 * NaN is NaN)."""
    for parameter in block.parameters():
        if parameter.grad is not None:
            axis = parameter.grad.dim() + MEMBER_AXIS
            index = torch.tensor(members, device=parameter.grad.device)
            parameter.grad.unflatten(axis, (block.func.members, -1)).index_fill_(axis, index, 0.0)


def side_by_side(x: torch.Tensor, members: int) -> torch.Tensor:
    """(K*B, C, H, W), member after member -> (B, K*C, H, W), members side by side in channels."""
    return x.unflatten(0, (members, -1)).transpose(0, 1).flatten(1, 2)


def one_after_another(x: torch.Tensor, members: int) -> torch.Tensor:
    """The inverse of side_by_side."""
    return x.unflatten(1, (members, -1)).transpose(0, 1).flatten(0, 1)


# ----------------------------------------------------------------------------------------------
# MNIST input network A and output network B (frozen around the ODE block)
# ----------------------------------------------------------------------------------------------

MNIST_STATE_SIZE = 5  # 28 -> 13 -> 5 through two 4x4 convolutions of stride 2
MNIST_CLASSES = 10


def mnist_input_network(channels: int) -> nn.Sequential:
    """A: (B, 1, 28, 28) -> (B, C, 5, 5)."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 4, stride=2, padding=0),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 4, stride=2, padding=0),
        nn.BatchNorm2d(channels),
    )


def mnist_output_network(channels: int) -> nn.Sequential:
    """B: (B, C, 5, 5) -> (B, 10) logits."""
    return nn.Sequential(
        nn.BatchNorm2d(channels),
        nn.Flatten(),
        nn.Linear(MNIST_STATE_SIZE * MNIST_STATE_SIZE * channels, MNIST_CLASSES),
    )


class MNISTODENet(nn.Module):
    """B(ODE block(A(image))): the model of Figures 1 and 2. Only the ODE block is trained."""

    def __init__(self, model='RKHS', in_channels=32, dim_int=32, layers=20, method='midpoint',
                 time_weights='release', integrator='fixed', input_net=None, output_net=None,
                 ode_block=None):
        super().__init__()
        # The ODE block is drawn first, so that its initialisation depends on the global RNG's
        # seed alone, whether A and B are drawn here, given, or loaded from files.
        if ode_block is None:
            ode_block = ResidualODEBlock(model, in_channels, dim_int, layers, method, time_weights,
                                         integrator)
        self.input_net = input_net if input_net is not None else mnist_input_network(in_channels)
        self.ode_block = ode_block
        self.output_net = output_net if output_net is not None else mnist_output_network(in_channels)
        self.embedding_frozen = False

    def freeze_embedding(self):
        """Fix A and B for good: no gradients, and eval mode whatever train() is asked later."""
        self.embedding_frozen = True
        for net in (self.input_net, self.output_net):
            net.requires_grad_(False)
            net.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.embedding_frozen:
            self.input_net.eval()
            self.output_net.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) -> (B, 10). With K stacked members (stack_members): (K*B, 1, 28, 28),
        member k's images the k-th block of B, -> (K*B, 10) in the same order."""
        members = self.ode_block.func.members
        if members == 1:
            return self.output_net(self.ode_block(self.input_net(images)))
        states = side_by_side(self.input_net(images), members)
        return self.output_net(one_after_another(self.ode_block(states), members))


# ----------------------------------------------------------------------------------------------
# CIFAR-10 ResNet (Figure 3): ResNet18 layout with RKHS or SHL residual blocks
# ----------------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """out = conv2(ReLU(conv1(x))) + shortcut(x); no BN inside, no ReLU after the sum.

    conv1 is the residual type's (`cifar_first_conv`): RKHS fixed and random, SHL trained.
    conv2 starts at zero in every block, so each block starts as its shortcut.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, model: str):
        super().__init__()
        self.conv1 = residual_type(model).cifar_first_conv(in_planes, planes, stride)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        nn.init.zeros_(self.conv2.weight)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes))

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x))) + self.shortcut(x)


CIFAR_STAGE_PLANES = (64, 128, 256, 512)
CIFAR_STAGE_STRIDES = (1, 2, 2, 2)
CIFAR_CLASSES = 10


class CifarResNet(nn.Module):
    """ResNet18 layout (pytorch-cifar style), stage sizes [2, 2, L, 2]. (B, 3, 32, 32) -> (B, 10)."""

    def __init__(self, model: str = 'RKHS', layers: int = 10):
        super().__init__()
        if layers < 1:
            raise ValueError(f'layers must be >= 1, got {layers}')
        self.model, self.layers = model, layers
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU())
        blocks_per_stage = (2, 2, layers, 2)
        in_planes, stages = 64, []
        for planes, stride, num_blocks in zip(CIFAR_STAGE_PLANES, CIFAR_STAGE_STRIDES, blocks_per_stage):
            blocks = []
            for block_stride in [stride] + [1] * (num_blocks - 1):
                blocks.append(ResidualBlock(in_planes, planes, block_stride, model))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(128)  # the release's only BN outside the stem and shortcuts
        self.pool = nn.AvgPool2d(4)
        self.linear = nn.Linear(512, CIFAR_CLASSES)

    def forward(self, x):
        out = self.stem(x)
        out = self.bn2(self.layer2(self.layer1(out)))
        out = self.layer4(self.layer3(out))
        return self.linear(torch.flatten(self.pool(out), 1))


def count_trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# Fully connected residuals (the synthetic experiment, synthetic_experiments.py)
# ----------------------------------------------------------------------------------------------
#
# The release's unpublished script synthetic.py trains the same ODE block on points of R^q
# instead of C x 5 x 5 images, so the residual's layers are matrices, not 3x3 convolutions:
#
#     x(0) = A x_data,   dx/dt = f(t, x) on R^q,   prediction = B x(1),
#     RKHS  f(t, x) = W(t) ReLU(Omega x)           Omega (r x q) fixed and random, W(t) trained.
#     SHL   f(t, x) = (1-s) V_k ReLU(H_k x) + s V_{k+1} ReLU(H_{k+1} x)     both trained.
#
# The fields below are these residuals. They are ResidualFields like the convolutional ones, so
# ResidualODEBlock(field=...) integrates them with the same time schedules, node rule and
# integrator. They are single fields only (stack_members does not apply to them).
#
# The release built every layer as torch.nn.Linear, whose constructor draws a default
# initialisation from the global RNG even where the script then replaced it (by zeros or by its
# random features). Those draws are made here too (`_discarded_linear`), in the release's order,
# so that one seed gives the release's Omega and hidden layers.


def _discarded_linear(in_features: int, out_features: int):
    """Advance the global RNG exactly as the release's nn.Linear(in, out, bias=False) did before
    its weight was replaced."""
    nn.Linear(in_features, out_features, bias=False)


def synthetic_random_features(dim_int: int, dim: int, nu: float) -> torch.Tensor:
    """Omega, the RKHS residual's fixed layer R^q -> R^r: (dim_int, dim) = (r, q).

    nu < 0: i.i.d. N(0, 1/r) entries (Gaussian features).
    nu > 0: Student-t features: row i is g_i / sqrt(u_i / (2 nu)) with g_i ~ N(0, I_q) and
            u_i ~ chi^2(2 nu), a multivariate t with 2 nu degrees of freedom; the rows are then
            centred (their mean row is subtracted from each) and divided by sqrt(r).
    Draws from the global RNG in the release's order (Gaussian rows first, then the u_i).
    """
    if nu == 0:
        raise ValueError('nu must be negative (Gaussian features) or positive (Student-t), got 0')
    if nu < 0:
        return torch.randn(dim_int, dim) / dim_int ** 0.5
    rows = torch.randn(dim_int, dim)
    u = torch.distributions.Chi2(df=2 * nu).sample(sample_shape=(dim_int,))
    omega = rows / torch.sqrt(u / (2 * nu))[:, None]
    return (omega - torch.mean(omega, dim=0)[None, :]) / dim_int ** 0.5


class DenseRKHSField(ResidualField):
    """f(t, x) = W(t) ReLU(Omega x) on R^q; x: (batch, q).

    Omega: (r, q) buffer, never trained (synthetic_random_features).
    W: N+1 nodes (q, r), zeros: a tensor of shape (N+1, q, r).
    Linear in W, so W(t) = w0 W_i0 + w1 W_i1 is formed first and applied once.
    """

    name = 'RKHS'
    release_index_shift = 1

    def __init__(self, dim: int, dim_int: int, num_steps: int, time_weights: str = 'release',
                 nu: float = -1.0):
        super().__init__(dim, dim_int, num_steps, time_weights)
        _discarded_linear(dim, dim_int)  # the release's lin1, then overwritten by Omega
        self.register_buffer('omega', synthetic_random_features(dim_int, dim, nu))
        for _ in range(num_steps + 1):  # its N+1 output layers, then zeroed
            _discarded_linear(dim_int, dim)
        self.output_weight = nn.Parameter(torch.zeros(num_steps + 1, dim, dim_int))

    def reference(self, x, nodes):
        return F.linear(F.relu(F.linear(x, self.omega)), sum(w * self.output_weight[i] for i, w in nodes))

    def prepare(self, index: torch.Tensor, weight: torch.Tensor, slots):
        """W(t_e) for every evaluation e at once: (E, q, r). index, weight: (E, 2)."""
        return (self.output_weight[index] * weight[:, :, None, None]).sum(1)

    def evaluate(self, x, prepared, e):
        self.count_evaluation()
        return F.linear(F.relu(F.linear(x, self.omega)), prepared[e])


class DenseSHLField(ResidualField):
    """f(t, x) = w0 V_i0 ReLU(H_i0 x) + w1 V_i1 ReLU(H_i1 x) on R^q; x: (batch, q).

    H: N+1 nodes (r, q), R^q -> R^r, nn.Linear's default initialisation; trained.
    V: N+1 nodes (q, r), R^r -> R^q, zeros; trained.
    The release gave its hidden layers the shape (q, r) and its output layers (r, q), so that it
    ran only when q = r; here the shapes follow the formula, and for q = r the same seed gives the
    release's numbers. The fast path applies the active nodes' hidden layers stacked (k r, q),
    then their weighted output layers side by side (q, k r).
    """

    name = 'SHL'
    release_index_shift = 0

    def __init__(self, dim: int, dim_int: int, num_steps: int, time_weights: str = 'release'):
        super().__init__(dim, dim_int, num_steps, time_weights)
        for _ in range(num_steps + 1):  # the release's output layers, drawn first, then zeroed
            _discarded_linear(dim, dim_int)
        hidden = [nn.Linear(dim, dim_int, bias=False).weight.data for _ in range(num_steps + 1)]
        self.hidden_weight = nn.Parameter(torch.stack(hidden))  # (N+1, r, q)
        self.output_weight = nn.Parameter(torch.zeros(num_steps + 1, dim, dim_int))

    def reference(self, x, nodes):
        return sum(w * F.linear(F.relu(F.linear(x, self.hidden_weight[i])), self.output_weight[i])
                   for i, w in nodes)

    def prepare(self, index: torch.Tensor, weight: torch.Tensor, slots):
        hidden = self.hidden_weight[index]  # (E, 2, r, q)
        output = self.output_weight[index] * weight[:, :, None, None]  # (E, 2, q, r)
        prepared = []
        for e, active in enumerate(slots):
            active = list(active)
            prepared.append((hidden[e, active].reshape(-1, self.dim),
                             output[e, active].transpose(0, 1).reshape(self.dim, -1)))
        return prepared

    def evaluate(self, x, prepared, e):
        self.count_evaluation()
        hidden_w, output_w = prepared[e]
        return F.linear(F.relu(F.linear(x, hidden_w)), output_w)


DENSE_RESIDUALS = {'RKHS': DenseRKHSField, 'SHL': DenseSHLField}


def dense_field(model: str, dim: int, dim_int: int, num_steps: int, time_weights: str = 'release',
                nu: float = -1.0) -> ResidualField:
    """The fully connected field of a residual type; nu (the features' law) is RKHS's only."""
    if model not in DENSE_RESIDUALS:
        raise ValueError(f'model must be one of {tuple(DENSE_RESIDUALS)}, got {model!r}')
    if num_steps < 1:
        raise ValueError(f'num_steps must be >= 1, got {num_steps}')
    if model == 'RKHS':
        return DenseRKHSField(dim, dim_int, num_steps, time_weights, nu)
    return DenseSHLField(dim, dim_int, num_steps, time_weights)


SYNTHETIC_MATRICES = ('lifting', 'scaling')


def synthetic_maps(matrix: str, data_dim: int, dim: int, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed maps A: R^d -> R^q, (q, d), and B: R^q -> R^d, (d, q), never trained.

    lifting: A stacks q // d copies of I_d (rows past them are 0); B = [I_d 0] reads the first d
             coordinates. Needs q >= d.
    scaling: q = 2d; A = alpha [I_d; 0] and B = alpha [0 I_d], so that the flow must carry the
             data from the first d coordinates to the last d.
    Advances the global RNG as the release's two nn.Linear did (A's first, then B's).
    """
    if matrix == 'lifting':
        if dim < data_dim:
            raise ValueError(f'lifting needs q >= d, got q={dim}, d={data_dim}')
        a = torch.zeros(dim, data_dim)
        for copy in range(dim // data_dim):
            a[copy * data_dim:(copy + 1) * data_dim] = torch.eye(data_dim)
        b = torch.zeros(data_dim, dim)
        b[:, :data_dim] = torch.eye(data_dim)
    elif matrix == 'scaling':
        if dim != 2 * data_dim:
            raise ValueError(f'scaling needs q = 2d, got q={dim}, d={data_dim}')
        eye = torch.eye(data_dim)
        a = alpha * torch.cat([eye, torch.zeros(data_dim, data_dim)], dim=0)
        b = alpha * torch.cat([torch.zeros(data_dim, data_dim), eye], dim=1)
    else:
        raise ValueError(f'matrix must be one of {SYNTHETIC_MATRICES}, got {matrix!r}')
    _discarded_linear(data_dim, dim)
    _discarded_linear(dim, data_dim)
    return a, b


class SyntheticODENet(nn.Module):
    """B x(1) from x(0) = A x_data: (batch, d) -> (batch, d). Only the ODE block is trained."""

    def __init__(self, input_map: torch.Tensor, ode_block: ResidualODEBlock, output_map: torch.Tensor):
        super().__init__()
        self.register_buffer('input_map', input_map)
        self.ode_block = ode_block
        self.register_buffer('output_map', output_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ode_block(F.linear(x, self.input_map)), self.output_map)
