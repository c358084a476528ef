"""The names a scientist may call on the owner: what may run, and how big it may get.

This module is data: both sides read it (the scientist to fail fast and to
name torch functions it intercepts, the owner to decide). Only the owner's
check counts. Nothing is resolved by getattr on a name that crossed the wire:
the owner looks names up in these tables and resolves dotted paths that are
written here.

The tables decide only what may run. They do not decide lineage: what a
result or a changed argument derives from is observed while the action runs
(see `duet.owner.executor`). Flags of an entry:

- factory: creates a tensor whose size comes from integer arguments; the
  owner checks that size against the scientist's limits before allocating.
- in_place: writes into its first argument. The owner relies on this only
  for numpy arrays, which keep no write counter; torch's writes are observed.
"""
from __future__ import annotations

from dataclasses import dataclass
import importlib
from typing import Any, Dict, FrozenSet, Iterable, Optional


@dataclass(frozen=True)
class Entry:
    """How one allowlisted name is checked before it runs."""

    factory: bool = False
    in_place: bool = False

    @property
    def mutates(self) -> bool:  # the name numpy's declared writes are looked up by
        return self.in_place


PLAIN = Entry()
ALIAS = PLAIN  # views and aliases are found from memory, not declared
INPLACE = Entry(in_place=True)
MUTATES = Entry(in_place=True)
PRIVATE_SHAPE = PLAIN  # data-dependent shapes are found by the shadow run on meta tensors
FACTORY = Entry(factory=True)


def _entries(names: Iterable[str], entry: Entry = PLAIN, prefix: str = "") -> Dict[str, Entry]:
    return {prefix + n: entry for n in names}


# --- arithmetic shared by functions and methods -----------------------------
_ELEMENTWISE = """
abs absolute acos arccos acosh arccosh add addcdiv addcmul asin arcsin asinh arcsinh atan arctan
atan2 arctan2 atanh arctanh bitwise_and bitwise_not bitwise_or bitwise_xor ceil clamp clip cos cosh
deg2rad digamma div divide eq erf erfc erfinv exp exp2 expm1 float_power floor floor_divide fmod frac
ge greater greater_equal gt hypot isclose isfinite isinf isnan isneginf isposinf le less less_equal
lerp lgamma log log10 log1p log2 logaddexp logical_and logical_not logical_or logical_xor lt
maximum minimum mul multiply nan_to_num ne neg negative not_equal pow rad2deg reciprocal remainder
round rsqrt sigmoid sign signbit sin sinc sinh sqrt square sub subtract tan tanh true_divide trunc
where xlogy fmax fmin heaviside logit relu
""".split()

_REDUCTIONS = """
all amax amin aminmax any argmax argmin count_nonzero cummax cummin cumprod cumsum logcumsumexp
logsumexp max mean median min mode nanmean nanmedian nansum norm prod quantile nanquantile std
std_mean sum var var_mean
""".split()

_LINALG = """
addmm addmv baddbmm bmm cdist chain_matmul cross det diag diag_embed diagonal dot einsum inner
inverse kron logdet matmul mm mv outer pinverse slogdet tensordot trace tril triu vdot
""".split()

_SHAPE_ALIAS = """
chunk movedim moveaxis narrow permute select split squeeze swapaxes swapdims t tensor_split
transpose unbind unflatten unsqueeze unfold view_as_real view_as_complex
""".split()

_SHAPE_COPY = """
broadcast_to cat concat concatenate clone column_stack dstack flatten flip fliplr flipud gather hstack
index_select repeat_interleave reshape roll rot90 scatter scatter_add searchsorted sort stack
argsort take take_along_dim tile topk kthvalue vstack histc bincount bucketize cartesian_prod
combinations diff meshgrid msort ravel trapezoid cumulative_trapezoid
""".split()

_DATA_DEPENDENT_SHAPE = """
masked_select nonzero argwhere unique unique_consecutive
""".split()

_FACTORIES = """
zeros ones empty full rand randn randint arange linspace logspace eye randperm normal
""".split()

_LIKE = """
zeros_like ones_like empty_like full_like rand_like randn_like randint_like
""".split()


# --- torch functions ---------------------------------------------------------
TORCH_FUNCTIONS: Dict[str, Entry] = {}
TORCH_FUNCTIONS.update(_entries(_ELEMENTWISE, prefix="torch."))
TORCH_FUNCTIONS.update(_entries(_REDUCTIONS, prefix="torch."))
TORCH_FUNCTIONS.update(_entries(_LINALG, prefix="torch."))
TORCH_FUNCTIONS.update(_entries(_SHAPE_ALIAS, ALIAS, prefix="torch."))
TORCH_FUNCTIONS.update(_entries(_SHAPE_COPY, prefix="torch."))
TORCH_FUNCTIONS.update(_entries(_DATA_DEPENDENT_SHAPE, PRIVATE_SHAPE, prefix="torch."))
TORCH_FUNCTIONS.update(_entries(_FACTORIES, FACTORY, prefix="torch."))
TORCH_FUNCTIONS.update(_entries(_LIKE, prefix="torch."))
TORCH_FUNCTIONS.update(
    _entries(
        """tensor as_tensor from_numpy numel is_tensor is_floating_point
        is_complex result_type promote_types can_cast bernoulli multinomial poisson
        softmax log_softmax dropout conv1d conv2d max_pool1d max_pool2d avg_pool1d
        batch_norm layer_norm group_norm""".split(),
        prefix="torch.",
    )
)
TORCH_FUNCTIONS["torch.from_numpy"] = ALIAS
TORCH_FUNCTIONS["torch.as_tensor"] = ALIAS
TORCH_FUNCTIONS.update(
    _entries(
        "cholesky eig eigh eigvals eigvalsh inv matrix_norm matrix_rank norm pinv qr solve svd svdvals vector_norm det slogdet lstsq".split(),
        prefix="torch.linalg.",
    )
)
# Legacy constructors (torch.Tensor(3, 4), torch.LongTensor([1, 2])): the owner runs safe versions
# (duet.owner.legacy) that zero sizes instead of returning uninitialised memory.
LEGACY_CONSTRUCTORS = tuple(
    "torch." + n
    for n in "Tensor FloatTensor DoubleTensor HalfTensor LongTensor IntTensor ShortTensor ByteTensor BoolTensor".split()
)
TORCH_FUNCTIONS.update(_entries(LEGACY_CONSTRUCTORS, FACTORY))
TORCH_FUNCTIONS["torch.autograd.backward"] = PLAIN
TORCH_FUNCTIONS["torch.manual_seed"] = PLAIN  # seeds the scientist's own generator on the owner
TORCH_FUNCTIONS["torch.autograd.grad"] = PLAIN

NN_FUNCTIONAL: Dict[str, Entry] = _entries(
    """adaptive_avg_pool1d adaptive_avg_pool2d adaptive_max_pool1d adaptive_max_pool2d avg_pool1d avg_pool2d
    batch_norm binary_cross_entropy binary_cross_entropy_with_logits celu conv1d conv2d conv_transpose1d
    conv_transpose2d cosine_similarity cross_entropy dropout dropout1d dropout2d elu embedding gelu glu
    group_norm hardsigmoid hardswish hardtanh huber_loss instance_norm kl_div l1_loss layer_norm leaky_relu
    linear log_softmax logsigmoid margin_ranking_loss max_pool1d max_pool2d mish mse_loss nll_loss normalize
    one_hot pad pairwise_distance pixel_shuffle pixel_unshuffle poisson_nll_loss relu relu6 rrelu selu sigmoid silu
    smooth_l1_loss soft_margin_loss softmax softmin softplus softshrink softsign tanh tanhshrink threshold
    triplet_margin_loss unfold fold interpolate""".split(),
    prefix="torch.nn.functional.",
)

NN_MODULES: FrozenSet[str] = frozenset(
    "torch.nn." + n
    for n in """Linear Bilinear Identity Conv1d Conv2d ConvTranspose1d ConvTranspose2d MaxPool1d MaxPool2d
    AvgPool1d AvgPool2d AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveMaxPool1d AdaptiveMaxPool2d
    BatchNorm1d BatchNorm2d LayerNorm GroupNorm InstanceNorm1d InstanceNorm2d Dropout Dropout1d Dropout2d
    Embedding Flatten Unflatten ReLU ReLU6 LeakyReLU ELU SELU CELU GELU SiLU Mish Sigmoid Tanh Softmax
    LogSoftmax Softplus Softsign Hardtanh Hardswish Hardsigmoid PReLU Sequential ModuleList
    MSELoss L1Loss NLLLoss CrossEntropyLoss BCELoss BCEWithLogitsLoss HuberLoss SmoothL1Loss KLDivLoss
    RNN LSTM GRU RNNCell LSTMCell GRUCell PixelShuffle PixelUnshuffle Upsample""".split()
)

OPTIMIZERS: FrozenSet[str] = frozenset(
    "torch.optim." + n for n in "SGD Adam AdamW RMSprop Adagrad Adadelta Adamax NAdam RAdam".split()
)

LR_SCHEDULERS: FrozenSet[str] = frozenset(
    "torch.optim.lr_scheduler." + n for n in "StepLR MultiStepLR ExponentialLR CosineAnnealingLR LambdaLR".split()
) - {"torch.optim.lr_scheduler.LambdaLR"}  # LambdaLR takes a Python callable: never

# --- numpy -------------------------------------------------------------------
_NUMPY_EXTRA = """
array asarray copy zeros_like ones_like full_like empty_like dot vdot matmul inner outer tensordot
einsum trace transpose reshape ravel concatenate stack vstack hstack dstack column_stack split array_split
squeeze expand_dims swapaxes moveaxis flip fliplr flipud roll rot90 tile repeat sort argsort clip where
percentile nanpercentile quantile nanquantile average mean median std var sum prod cumsum cumprod min max
amin amax argmin argmax ptp nanmin nanmax nansum nanmean nanstd nanvar histogram bincount digitize
corrcoef cov diff gradient interp convolve correlate isclose allclose array_equal round around floor ceil
trunc rint fix abs absolute sqrt square exp exp2 expm1 log log2 log10 log1p sin cos tan arcsin arccos arctan
arctan2 sinh cosh tanh add subtract multiply divide true_divide floor_divide power mod remainder fmod negative
positive reciprocal sign maximum minimum fmax fmin greater greater_equal less less_equal equal not_equal
logical_and logical_or logical_not logical_xor isnan isinf isfinite nan_to_num all any count_nonzero
searchsorted cross kron tril triu diag diagonal broadcast_to atleast_1d atleast_2d atleast_3d
""".split()
NUMPY_FUNCTIONS: Dict[str, Entry] = _entries(_NUMPY_EXTRA, prefix="numpy.")
NUMPY_FUNCTIONS.update(_entries("zeros ones empty full arange linspace logspace eye identity".split(), FACTORY, prefix="numpy."))
NUMPY_FUNCTIONS.update(_entries("nonzero argwhere unique flatnonzero extract compress".split(), PRIVATE_SHAPE, prefix="numpy."))
NUMPY_FUNCTIONS.update(_entries("transpose squeeze swapaxes moveaxis broadcast_to diagonal".split(), ALIAS, prefix="numpy."))
NUMPY_FUNCTIONS.update(
    _entries("inv det norm eig eigh eigvals svd qr solve pinv matrix_rank lstsq cholesky slogdet".split(), prefix="numpy.linalg.")
)
NUMPY_FUNCTIONS.update(
    _entries("rand randn randint random normal uniform permutation choice".split(), FACTORY, prefix="numpy.random.")
)
for _n in ("numpy.random.permutation", "numpy.random.choice"):
    NUMPY_FUNCTIONS[_n] = PLAIN

# Python operators a Pointer forwards (a + b, a[i], -a, a @ b, ...).
OPERATORS: Dict[str, Entry] = _entries(
    """add sub mul truediv floordiv mod pow matmul neg pos abs invert and_ or_ xor lshift rshift
    lt le eq ne gt ge""".split(),
    prefix="operator.",
)
OPERATORS["operator.getitem"] = ALIAS
OPERATORS["operator.setitem"] = MUTATES
OPERATORS.update(
    _entries("iadd isub imul itruediv ifloordiv imod ipow imatmul iand ior ixor".split(), INPLACE, prefix="operator.")
)

# torch.distributions: construct, sample (from the scientist's generator on the owner), log_prob,
# entropy. Sizes of samples are checked op by op (no shadow run predicts them).
DISTRIBUTIONS: FrozenSet[str] = frozenset(
    "torch.distributions." + n
    for n in """Bernoulli Beta Binomial Categorical Cauchy Dirichlet Exponential Gamma Geometric Gumbel
    Independent Laplace LogNormal Multinomial MultivariateNormal Normal OneHotCategorical Poisson StudentT
    Uniform""".split()
)
DISTRIBUTION_FUNCTIONS = frozenset({"torch.distributions.kl_divergence", "torch.distributions.kl.kl_divergence"})

FUNCTIONS: Dict[str, Entry] = {}
FUNCTIONS.update(TORCH_FUNCTIONS)
FUNCTIONS.update({n: PLAIN for n in DISTRIBUTIONS | DISTRIBUTION_FUNCTIONS})
FUNCTIONS.update(NN_FUNCTIONAL)
FUNCTIONS.update(OPERATORS)
FUNCTIONS.update(NUMPY_FUNCTIONS)
FUNCTIONS.update({n: PLAIN for n in NN_MODULES | OPTIMIZERS | LR_SCHEDULERS})
FUNCTIONS.update({"builtins.float": PLAIN, "builtins.int": PLAIN, "builtins.len": PLAIN})
# Statistics with a differentially private release (scientist.dp.histogram, scientist.dp.quantile):
# exact on the owner like any action; `.get(dp=epsilon)` releases them with noise.
DP_QUERIES: FrozenSet[str] = frozenset({"duet.owner.privacy.queries.histogram", "duet.owner.privacy.queries.quantile"})
FUNCTIONS.update({n: PLAIN for n in DP_QUERIES})

# --- methods, by receiver kind ----------------------------------------------
_TENSOR_METHODS_PLAIN = set(_ELEMENTWISE) | set(_REDUCTIONS) | set(_LINALG) | set(_SHAPE_COPY) | set(_LIKE) - {
    "where"
}
_TENSOR_METHODS_PLAIN |= set(
    """item tolist float double half bfloat16 int long short bool byte char type_as new_zeros new_ones
    new_full new_empty new_tensor softmax log_softmax numel dim size element_size nelement
    is_floating_point is_complex is_contiguous isreal masked_fill clamp_min clamp_max
    to type cpu contiguous sum_to_size expand_as where argmax argmin allclose equal relu sigmoid std var
    """.split()
)
_TENSOR_METHODS_ALIAS = set(_SHAPE_ALIAS) | set(
    "view view_as expand expand_as reshape_as detach numpy requires_grad_ retain_grad flatten".split()
)
_TENSOR_METHODS_INPLACE = set(
    """abs_ add_ addcdiv_ addcmul_ clamp_ clamp_min_ clamp_max_ copy_ div_ exp_ fill_ floor_ ceil_ index_add_
    index_fill_ log_ masked_fill_ mul_ neg_ normal_ pow_ relu_ round_ sigmoid_ sqrt_ sub_ tanh_ uniform_
    zero_ t_ transpose_ squeeze_ unsqueeze_ clip_ lerp_ scatter_ scatter_add_ bernoulli_ random_ sign_
    detach_ resize_as_""".split()
)

TENSOR_METHODS: Dict[str, Entry] = {}
TENSOR_METHODS.update(_entries(_TENSOR_METHODS_PLAIN))
TENSOR_METHODS.update(_entries(_TENSOR_METHODS_ALIAS, ALIAS))
TENSOR_METHODS.update(_entries(_TENSOR_METHODS_INPLACE, INPLACE))
TENSOR_METHODS.update(_entries(_DATA_DEPENDENT_SHAPE, PRIVATE_SHAPE))
TENSOR_METHODS.update({"repeat": FACTORY, "backward": MUTATES})
TENSOR_METHODS.update(_entries("new_zeros new_ones new_empty new_full".split(), FACTORY))

TENSOR_ATTRIBUTES: Dict[str, Entry] = _entries("grad T mT H data real imag".split(), ALIAS)
TENSOR_ATTRIBUTES.update(_entries("requires_grad is_leaf ndim dtype shape".split()))

NDARRAY_METHODS: Dict[str, Entry] = _entries(
    """all any argmax argmin argsort astype clip conj copy cumprod cumsum diagonal dot flatten item max mean
    min nonzero prod ptp ravel repeat round sort std sum tolist trace transpose var reshape squeeze swapaxes""".split()
)
NDARRAY_METHODS.update(_entries("transpose squeeze swapaxes view reshape diagonal".split(), ALIAS))
NDARRAY_METHODS.update(_entries("fill sort".split(), INPLACE))
NDARRAY_METHODS["nonzero"] = PRIVATE_SHAPE
NDARRAY_ATTRIBUTES: Dict[str, Entry] = _entries("T real imag".split(), ALIAS)
NDARRAY_ATTRIBUTES.update(_entries("ndim dtype shape size".split()))

MODULE_METHODS: Dict[str, Entry] = _entries("parameters buffers children modules state_dict".split(), ALIAS)
MODULE_METHODS.update(_entries("train eval zero_grad requires_grad_ load_state_dict".split(), INPLACE))
MODULE_METHODS.update(_entries("cpu to".split(), ALIAS))  # device boilerplate: the owner's CPU, the same module
MODULE_METHODS["forward"] = MUTATES  # may update running statistics; see __call__
MODULE_ATTRIBUTES: Dict[str, Entry] = _entries("weight bias training in_features out_features".split(), ALIAS)

OPTIMIZER_METHODS: Dict[str, Entry] = _entries("step zero_grad".split(), MUTATES)
OPTIMIZER_METHODS["state_dict"] = ALIAS
OPTIMIZER_METHODS["load_state_dict"] = MUTATES
SCHEDULER_METHODS: Dict[str, Entry] = {"step": MUTATES, "get_last_lr": PLAIN}

SEQUENCE_METHODS: Dict[str, Entry] = {"index": PLAIN, "count": PLAIN}

DISTRIBUTION_METHODS: Dict[str, Entry] = _entries("sample rsample log_prob entropy cdf icdf perplexity".split())
DISTRIBUTION_ATTRIBUTES: Dict[str, Entry] = _entries(
    "mean mode stddev variance probs logits loc scale concentration rate batch_shape event_shape".split()
)

METHODS: Dict[str, Dict[str, Entry]] = {
    "Tensor": TENSOR_METHODS,
    "ndarray": NDARRAY_METHODS,
    "Module": MODULE_METHODS,
    "Optimizer": OPTIMIZER_METHODS,
    "LRScheduler": SCHEDULER_METHODS,
    "sequence": SEQUENCE_METHODS,
    "Distribution": DISTRIBUTION_METHODS,
}

# pandas (optional): methods of a published DataFrame, its columns and its groupbys. Each takes
# only plain arguments from its own list of keywords (duet.owner.frames); nothing changes in place.
_PANDAS_REDUCTIONS = "count mean median min max std var sum nunique".split()
PANDAS_METHODS: Dict[str, Dict[str, Entry]] = {
    "DataFrame": _entries(_PANDAS_REDUCTIONS + "describe quantile groupby to_numpy".split()),
    "Series": _entries(_PANDAS_REDUCTIONS + "describe quantile value_counts to_numpy".split()),
    "GroupBy": _entries(_PANDAS_REDUCTIONS + "agg aggregate size prod sem".split()),
}
METHODS.update(PANDAS_METHODS)
ATTRIBUTES: Dict[str, Dict[str, Entry]] = {
    "Tensor": TENSOR_ATTRIBUTES,
    "ndarray": NDARRAY_ATTRIBUTES,
    "Module": MODULE_ATTRIBUTES,
    "Distribution": DISTRIBUTION_ATTRIBUTES,
}
# Calling a module runs its forward (what it writes, e.g. batch norm statistics, is observed).
MODULE_CALL = PLAIN

# Keyword arguments the owner refuses everywhere: they write into, or move, memory
# the scientist did not create through this call.
FORBIDDEN_KWARGS: FrozenSet[str] = frozenset({"out", "device", "pin_memory", "memory_format", "generator"})


# What to write instead of a name that is refused, where something close is allowed.
ALTERNATIVES: Dict[str, str] = {
    "Module.numpy": "a module has no values to convert; get its weights with .get() on the model pointer",
    "Module.item": "a module has no values to convert; call it on an input first",
    "Module.size": "iterate .parameters() and ask each for its size",
    "Tensor.data_ptr": "memory addresses of the owner are never shown",
    "Tensor.storage": "memory of the owner is never shown; use .clone() for a copy",
    "Tensor.untyped_storage": "memory of the owner is never shown; use .clone() for a copy",
    "Tensor.apply_": "pass no Python function; compose allowlisted torch operations instead",
    "Tensor.map_": "pass no Python function; compose allowlisted torch operations instead",
    "Tensor.register_hook": "hooks are Python functions, which never run on the owner",
    "torch.save": "ask for the value with .get(), then save it on your side",
    "torch.load": "publish data on the owner's side with owner.store.add(...)",
}


def alternative(kind: str, name: str) -> str:
    """'; <what to do instead>' for a refused name, or '' when there is no close alternative."""
    hint = ALTERNATIVES.get(f"{kind}.{name}" if kind else name)
    return f"; {hint}" if hint else ""


def import_dotted(name: str) -> Optional[Any]:
    """The object a dotted name written in these tables stands for, or None if absent here.

    Only names from these tables are ever passed in; never a name from the wire
    that was not first looked up in them.
    """
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def all_method_names() -> FrozenSet[str]:
    """Every method name allowed on some receiver kind (the scientist's fast check)."""
    names: set = set()
    for table in METHODS.values():
        names |= set(table)
    return frozenset(names)


def all_attribute_names() -> FrozenSet[str]:
    """Every attribute name allowed on some receiver kind."""
    names: set = set()
    for table in ATTRIBUTES.values():
        names |= set(table)
    return frozenset(names)


# --- model graphs (duet.owner.models) -------------------------------------------
# Functions a model sent as a graph may call: the torch, torch.nn.functional and
# operator entries above, minus module/optimizer constructors, factories other than the
# random ones, autograd, and setitem.
# Random factories stay in a graph (traced once, a call would otherwise be frozen as a constant);
# their sizes are checked by the graph's shadow run on meta tensors, like every allocation inside.
GRAPH_RANDOM_FACTORIES = frozenset({"torch.rand", "torch.randn", "torch.randint", "torch.normal"})
GRAPH_FUNCTIONS: FrozenSet[str] = frozenset(
    n
    for n, e in FUNCTIONS.items()
    if (n.startswith("torch.") or n.startswith("operator."))
    and n not in NN_MODULES
    and n not in OPTIMIZERS
    and n not in LR_SCHEDULERS
    and (not e.factory or n in GRAPH_RANDOM_FACTORIES)
    and not n.startswith("torch.autograd.")
    and n != "operator.setitem"
    and n != "torch.manual_seed"
    and not n.startswith("torch.distributions.")  # a graph holds tensors only
)

# Tensor methods a model graph may call: not backward, and nothing that changes a
# tensor's autograd flags or exposes memory (a graph has no per-action checks).
# (new_empty is rebuilt as new_zeros; sizes inside a forward are checked by its shadow run.)
GRAPH_METHODS: FrozenSet[str] = frozenset(TENSOR_METHODS) - {
    "backward", "requires_grad_", "retain_grad", "detach_", "resize_as_",
    "tolist", "numpy", "item",  # values turned into Python inside a model could choose what it writes
}
