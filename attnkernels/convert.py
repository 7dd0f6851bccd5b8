"""`fuse(model)` and `unfuse(model)`: swap a model's attention modules for fused ones, and back.

`fuse` replaces, in place, every module that has a fused version:

* a residual block of `attnkernels.models` (resnet.BasicBlock, resnet.Bottleneck) with no
  attention, SE, ECA, CBAM or HAM: its tail-fused class (`attnkernels.nn.block_tail`), which runs
  BatchNorm, the gate, the add and the ReLU as one hot path (`tails=False` leaves blocks);

* a reference module (`attnkernels.reference`) whose class `attnkernels.nn.FUSED` maps to a
  fused class (exactly that class: a subclass may change the forward, so it is left);
* timm's `EcaModule`, `SEModule` and `CbamModule` (timm.layers) in the configuration the fused
  module reproduces exactly: sigmoid gate, zero-padded 1-D conv of padding (k-1)//2 and no bias
  for ECA; Conv2d(C, rd, 1) and Conv2d(rd, C, 1) with biases, ReLU, no norm, no max pooling for
  SE; for CBAM the same 1x1 convs without biases, ReLU, sigmoid gates, and a spatial
  Conv2d(2, 1, k odd, 'same' zero padding, no bias) followed by a BatchNorm2d(1) with no
  activation, dropout or anti-aliasing. Any other configuration is left in place, with the
  reason.

The fused module holds the same parameter, buffer and submodule objects as the module it
replaces (no copies), so the state_dict keys, the optimizer's parameters and the train/eval
mode are unchanged. `unfuse` turns every fused module back into the module it replaced.
Both return the model (a new object only when the model itself is an attention module) and
log a `FuseReport` on the "attnkernels" logger at INFO; `report=True` also returns it.

timm is optional: it is imported only when the model holds a module of a timm class.
"""
from __future__ import annotations

import dataclasses
import importlib
import itertools
import logging
from typing import Callable, Literal, NamedTuple, Union, overload

import torch
from torch import nn

from . import backend as _backend
from .nn import FUSED, FusedModule, fused_class, reference_class
from .nn._fused import CACHE_ATTRIBUTE, TIMM_ORIGIN, rebind
from .nn.block_tail import TAIL_FUSED, timm_tail_class, why_tail_not_fused, why_timm_tail_not_fused
from .reference import AttentionModule

__all__ = ["FuseReport", "ReportEntry", "fuse", "unfuse"]

logger = logging.getLogger("attnkernels")


class ReportEntry(NamedTuple):
    """One module in a `FuseReport`."""

    name: str
    """Qualified name in the model, as `named_modules` gives it ("" for the model itself)."""
    module: str
    """The module's class (module path and name) before the call."""
    detail: str
    """For a swapped module, the class it became; for a left one, why it was left."""


@dataclasses.dataclass
class FuseReport:
    """What `fuse` or `unfuse` swapped and what it left, one entry per module object.

    `left` lists the attention modules it recognised and did not swap (no fused version,
    a configuration the fused module cannot reproduce, already fused, ...) with the reason;
    modules that are not attention modules (convs, norms, ...) are in neither list.
    """

    action: str
    """"fuse" or "unfuse"."""
    backend: str | None = None
    """The backend `fuse` pinned the swapped modules to (None: automatic)."""
    swapped: list[ReportEntry] = dataclasses.field(default_factory=list)
    left: list[ReportEntry] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        pinned = f", backend {self.backend}" if self.backend else ""
        lines = [f"attnkernels.{self.action}: swapped {len(self.swapped)}, left {len(self.left)}{pinned}"]
        lines += [f"  swapped {e.name or '<model>'}: {e.module} -> {e.detail}" for e in self.swapped]
        lines += [f"  left    {e.name or '<model>'}: {e.module}: {e.detail}" for e in self.left]
        return "\n".join(lines)


class _Plan(NamedTuple):
    """What to do with one module: `build()` makes its replacement (None: leave it)."""

    build: Callable[[], nn.Module] | None
    detail: str  # the target class, or why the module is left
    descend: bool  # look for attention modules among its children
    target: type[nn.Module] | None = None  # the replacement's class


class _Site(NamedTuple):
    parent: nn.Module | None  # None: the model itself
    attr: str
    module: nn.Module
    plan: _Plan


@overload
def fuse(
    model: nn.Module, backend: str | None = None, *, tails: bool = True, report: Literal[False] = False
) -> nn.Module: ...
@overload
def fuse(
    model: nn.Module, backend: str | None = None, *, tails: bool = True, report: Literal[True]
) -> tuple[nn.Module, FuseReport]: ...


def fuse(
    model: nn.Module, backend: str | None = None, *, tails: bool = True, report: bool = False
) -> Union[nn.Module, tuple[nn.Module, FuseReport]]:
    """Replace, in place, every attention module of `model` that has a fused version.

    Reference modules with a class in `attnkernels.nn.FUSED`, and timm's EcaModule and
    SEModule in a configuration the fused modules reproduce exactly, become fused modules
    holding the same parameter, buffer and submodule objects: same state_dict keys, same
    train/eval mode, same forward hooks. Already fused modules are left as they are (fusing
    twice is a no-op); to change their backend, set their `backend` attribute.

    Args:
        model: any nn.Module; it may itself be an attention module.
        backend: None or "auto" lets `attnkernels.backend` pick at every call; a name
            ("cpu", "cuda", "triton", "reference") pins the swapped modules to it. It must be
            available on the device of every module to swap (checked before any swap).
        tails: also fuse the tails of residual blocks (`attnkernels.nn.block_tail`): a block of
            `attnkernels.models` (resnet.BasicBlock, resnet.Bottleneck) whose attention is
            none, SE, ECA, CBAM or HAM becomes its tail-fused class, which runs BatchNorm, the gates, the
            residual add and the ReLU as the block_tail ops; other blocks are reported as left.
        report: also return the `FuseReport` (it is always logged at INFO on the
            "attnkernels" logger).

    Returns:
        The model (a new object only when `model` itself was swapped: use the return value),
        or `(model, report)` when `report=True`.

    Raises:
        TypeError: `model` is not an nn.Module.
        ValueError: `backend` is not a backend name.
        RuntimeError: the pinned backend cannot run on a swapped module's device.
    """
    _check_model(model, "fuse")
    pinned = _backend_name(backend)
    rep = FuseReport("fuse", pinned)
    sites = _walk(model, lambda m: _fuse_plan(m, pinned, tails), rep)
    if pinned is not None:
        _check_available(pinned, [(site.module, site.plan.target) for site in sites])
    return _finish(_apply(model, sites), rep, report)


@overload
def unfuse(model: nn.Module, *, report: Literal[False] = False) -> nn.Module: ...
@overload
def unfuse(model: nn.Module, *, report: Literal[True]) -> tuple[nn.Module, FuseReport]: ...


def unfuse(model: nn.Module, *, report: bool = False) -> Union[nn.Module, tuple[nn.Module, FuseReport]]:
    """Turn every fused module of `model` back into the module it replaced, in place.

    A fused module that `fuse` made from a timm module becomes that timm module again;
    every other fused module (of a class in `attnkernels.nn.FUSED`) becomes its reference
    class. Parameter, buffer and submodule objects, state_dict keys and train/eval mode are
    kept. Subclasses of the fused classes are left (their own forward would be lost).

    Args:
        model: any nn.Module; it may itself be a fused module.
        report: also return the `FuseReport` (always logged at INFO on "attnkernels").

    Returns:
        The model (a new object only when `model` itself was swapped), or `(model, report)`.
    """
    _check_model(model, "unfuse")
    rep = FuseReport("unfuse")
    sites = _walk(model, _unfuse_plan, rep)
    return _finish(_apply(model, sites), rep, report)


# --- the walk ---------------------------------------------------------------------------


def _check_model(model: object, where: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")


def _walk(model: nn.Module, plan_of: Callable[[nn.Module], _Plan | None], rep: FuseReport) -> list[_Site]:
    """Plan every module (no change yet, so a failed check leaves the model untouched);
    fill the report; return where the swaps go. A module registered in several places is
    planned and reported once and swapped everywhere."""
    plans: dict[int, _Plan | None] = {}
    sites: list[_Site] = []

    def visit(parent: nn.Module | None, attr: str, name: str, module: nn.Module) -> None:
        first = id(module) not in plans
        if first:
            plans[id(module)] = plan = plan_of(module)
            if plan is not None:
                entries = rep.swapped if plan.build is not None else rep.left
                entries.append(ReportEntry(name, _qualname(type(module)), plan.detail))
        plan = plans[id(module)]
        if plan is not None and plan.build is not None:
            sites.append(_Site(parent, attr, module, plan))
        if first and (plan is None or plan.descend):
            for child_attr, child in module._modules.items():
                if child is not None:
                    visit(module, child_attr, f"{name}.{child_attr}" if name else child_attr, child)

    visit(None, "", "", model)
    return sites


def _apply(model: nn.Module, sites: list[_Site]) -> nn.Module:
    """Make each replacement once and put it at every site; return the (possibly new) model."""
    made: dict[int, nn.Module] = {}
    for site in sites:
        if id(site.module) not in made:
            made[id(site.module)] = site.plan.build()
        new = made[id(site.module)]
        if site.parent is None:
            model = new
        else:
            setattr(site.parent, site.attr, new)
    return model


def _finish(model: nn.Module, rep: FuseReport, want_report: bool):
    logger.info("%s", rep)
    return (model, rep) if want_report else model


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# --- fuse: what becomes what ------------------------------------------------------------


def _fuse_plan(module: nn.Module, pinned: str | None, tails: bool) -> _Plan | None:
    if tails and type(module) in TAIL_FUSED:
        return _tail_plan(module, TAIL_FUSED[type(module)], why_tail_not_fused(module), pinned)
    if tails and _timm_resnet_block(module):
        problem = why_timm_tail_not_fused(module, _why_timm_attention_not_fused)
        return _tail_plan(module, timm_tail_class(type(module)), problem, pinned)
    if isinstance(module, FusedModule):  # it owns its children: nothing below it to fuse
        return _Plan(None, "already fused", descend=False)
    if isinstance(module, AttentionModule):
        cls = fused_class(module)
        if cls is None:
            return _Plan(None, _why_no_fused_class(module), descend=True)
        return _Plan(lambda: _rebind(module, cls, pinned), _qualname(cls), False, cls)
    if _is_timm(module):
        return _timm_plan(module, pinned)
    return None


def _tail_plan(block: nn.Module, cls: type[nn.Module], problem: str | None, pinned: str | None) -> _Plan:
    """A residual block: its tail-fused class `cls` if nothing stops it (`problem`), else left
    (reported). Its children are walked either way, so its attention module is fused too."""
    if problem is not None:
        return _Plan(None, f"tail not fused: {problem}", descend=True)

    def build() -> nn.Module:
        new = rebind(block, cls)
        if pinned is not None:
            new.backend = pinned
        return new

    return _Plan(build, _qualname(cls), True, cls)


def _why_no_fused_class(module: nn.Module) -> str:
    for cls in FUSED.values():
        ref = reference_class(cls)
        if isinstance(module, ref):
            return f"a subclass of {_qualname(ref)}: its forward may differ from the fused one"
    return f"no fused version of {type(module).__name__} yet (fused: {', '.join(FUSED)})"


def _rebind(module: nn.Module, cls: type[nn.Module], pinned: str | None) -> nn.Module:
    """`module`'s whole state behind class `cls` (`rebind`: the same parameter, buffer and
    submodule objects, hook dicts, whose handles still remove, and mode), with the pin. A
    composite (a fused class with `fused_children`, e.g. CSM) swaps those children with it:
    to their fused classes when fusing, back to their reference classes when unfusing."""
    fusing = issubclass(cls, FusedModule)
    new = rebind(module, cls)
    new.__dict__.pop("backend", None)
    new.__dict__.pop(CACHE_ATTRIBUTE, None)  # a fused module's inference caches
    if fusing and pinned is not None:
        new.backend = pinned
    composite = cls if fusing else type(module)
    for name, fused_child in getattr(composite, "fused_children", {}).items():
        source, target = (reference_class(fused_child), fused_child) if fusing else (fused_child, reference_class(fused_child))
        child = module._modules.get(name)
        if type(child) is source:
            if new._modules is module._modules:  # the parent keeps its own children
                new.__dict__["_modules"] = dict(module._modules)
            new._modules[name] = _rebind(child, target, pinned)
    return new


def _backend_name(backend: object) -> str | None:
    if backend is None:
        return None
    name = backend.strip().lower() if isinstance(backend, str) else None
    if name not in ("auto", *_backend.BACKENDS):
        raise ValueError(
            f"fuse: backend must be None, 'auto' or one of {', '.join(_backend.BACKENDS)}; got {backend!r}"
        )
    return None if name == "auto" else name


def _check_available(pinned: str, swaps: list[tuple[nn.Module, type[nn.Module]]]) -> None:
    """Raise RuntimeError, before anything is swapped, if `pinned` cannot run the hot paths
    of a fused class (`FusedModule.hot_paths`) on the device of a module it replaces."""
    needed = {(str(_device_of(m)), hp) for m, cls in swaps for hp in cls.hot_paths}
    for device, hot_path in sorted(needed):
        problem = _backend.why_unavailable(pinned, hot_path, device)
        if problem is not None:
            raise RuntimeError(
                f"fuse: backend={pinned!r} cannot run {hot_path} on {device}: {problem}. "
                "Pick another backend, or None for automatic."
            )


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


# --- timm ---------------------------------------------------------------------------------

# timm's other channel-attention modules: reported as left, with why.
_TIMM_NOT_CONVERTED = {
    "timm.layers.eca.CecaModule": "circular ECA: pads the channel conv circularly, the fused ECA pads with zeros",
    "timm.layers.squeeze_excite.EffectiveSEModule": "effective SE (one fc, hard-sigmoid gate): no fused version",
    "timm.layers.squeeze_excite.SqueezeExciteCl": "channels-last SE on Linear layers: no fused version",
    "timm.models.senet.SEModule": "legacy SENet SE module: only timm.layers.SEModule is converted",
    "timm.layers.cbam.LightCbamModule": "light CBAM (channel mean and max summed before one MLP, "
    "a spatial gate on their mean): no fused version",
}


def _is_timm(module: nn.Module) -> bool:
    return any(c.__module__.split(".")[0] == "timm" for c in type(module).__mro__)


class _TimmAdapter(NamedTuple):
    """How one timm class maps onto a fused class (`attnkernels.nn.FUSED[fused]`)."""

    timm_name: str  # its name in timm.layers ("cbam.CbamModule": in the submodule timm.layers.cbam)
    fused: str  # registry name of the fused class
    why_not: Callable[[nn.Module], str | None]  # None when the fused module reproduces it
    attributes: Callable[[nn.Module], dict]  # the plain attributes the fused __init__ would set
    shared: tuple[str, ...]  # the submodules the fused module takes over (all the parameters)


def _timm_plan(module: nn.Module, pinned: str | None) -> _Plan | None:
    name = _qualname(type(module))
    if name in _TIMM_NOT_CONVERTED:
        return _Plan(None, _TIMM_NOT_CONVERTED[name], descend=True)
    for adapter in _TIMM_ADAPTERS:
        timm_cls = _timm_class(adapter.timm_name)
        if timm_cls is None or not isinstance(module, timm_cls):
            continue
        if type(module) is not timm_cls:
            return _Plan(None, f"a subclass of timm's {adapter.timm_name}: its forward may differ", True)
        cls = FUSED.get(adapter.fused)
        if cls is None:
            return _Plan(None, f"no fused version of {adapter.fused} yet", descend=True)
        reason = adapter.why_not(module)
        if reason is not None:
            return _Plan(None, f"{reason}; the fused {cls.__name__} cannot reproduce it", descend=True)
        return _Plan(lambda: _from_timm(module, adapter, cls, pinned), _qualname(cls), False, cls)
    return None


def _timm_resnet_block(module: nn.Module) -> bool:
    """Whether `module` is exactly timm's ResNet BasicBlock or Bottleneck (timm.models.resnet)."""
    cls = type(module)
    return cls.__module__ == "timm.models.resnet" and cls.__name__ in ("BasicBlock", "Bottleneck")


def _why_timm_attention_not_fused(se: nn.Module) -> str | None:
    """Why a timm block's attention module keeps its tail unfused (None: it becomes a fused SE,
    ECA or CBAM, whose gates the tail runs)."""
    plan = _timm_plan(se, None) if _is_timm(se) else None
    if plan is not None and plan.build is not None and plan.target in (FUSED["se"], FUSED["eca"], FUSED["cbam"]):
        return None
    why = plan.detail if plan is not None and plan.build is None else "no fused SE, ECA or CBAM gate"
    return (f"attention {type(se).__name__}: {why}; only blocks with no attention, SE, ECA, CBAM or HAM have a "
            "fused tail")


def _timm_class(name: str) -> type | None:
    """timm.layers' class `name` (dotted: from a submodule), or None when timm is not installed
    or has no such class (fuse then converts no module of it)."""
    module_name, _, cls_name = f"timm.layers.{name}".rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), cls_name, None)
    except ImportError:
        return None


def _from_timm(module: nn.Module, adapter: _TimmAdapter, cls: type[nn.Module], pinned: str | None) -> nn.Module:
    """A `cls` module around `module`'s own submodules. Not through the constructor: timm's
    configuration (e.g. SE's rd_channels) need not be one the constructor computes."""
    fused = cls.__new__(cls)
    nn.Module.__init__(fused)
    # The same hook dicts: hooks keep firing and their handles still remove them.
    fused.__dict__.update({k: v for k, v in vars(module).items() if "hook" in k})
    fused.__dict__.update(adapter.attributes(module))
    for attr in adapter.shared:
        setattr(fused, attr, getattr(module, attr))
    fused.training = module.training
    fused.__dict__[TIMM_ORIGIN] = module
    if pinned is not None:
        fused.backend = pinned
    return fused


def _conv_problem(conv: nn.Module, name: str, kind: type, in_ch: int, out_ch: int, bias: bool) -> str | None:
    """Why `conv` is not a plain zero-padded 'same' conv of this shape, or None."""
    if type(conv) is not kind:
        return f"{name} is {type(conv).__name__}, not {kind.__name__}"
    same = tuple((k - 1) // 2 for k in conv.kernel_size)
    wanted = {
        "in_channels": in_ch,
        "out_channels": out_ch,
        "groups": 1,
        "stride": (1,) * len(same),
        "dilation": (1,) * len(same),
        "padding": same,
        "padding_mode": "zeros",
    }
    for attr, want in wanted.items():
        if getattr(conv, attr) != want:
            return f"{name}.{attr} is {getattr(conv, attr)!r}, not {want!r}"
    if (conv.bias is not None) != bias:
        return f"{name} has {'no ' if bias else 'a '}bias"
    return None


def _gate_problem(gate: object) -> str | None:
    # timm's create_act_layer('sigmoid') gives timm.layers.activations.Sigmoid; nn.Sigmoid is equal.
    if isinstance(gate, nn.Sigmoid) or _qualname(type(gate)) == "timm.layers.activations.Sigmoid":
        return None
    return f"gate is {type(gate).__name__}, not sigmoid"


def _eca_why_not(m: nn.Module) -> str | None:
    if m.conv2 is not None:
        return "use_mlp=True (an MLP over the channels)"
    return (_conv_problem(m.conv, "conv", nn.Conv1d, 1, 1, bias=False) or _odd_kernel_problem(m.conv, "conv")
            or _gate_problem(m.gate))


def _odd_kernel_problem(conv: nn.Module, what: str) -> str | None:
    """Why `conv`'s kernel is not odd (and, in 2-D, square), or None: 'same' padding (k-1)//2
    keeps the size only then."""
    k = conv.kernel_size
    if k[0] % 2 == 0:
        return f"{what} kernel size {k[0]} is even"
    if any(side != k[0] for side in k):
        return f"{what} kernel size {k} is not square"
    return None


def _se_why_not(m: nn.Module) -> str | None:
    if m.add_maxpool:
        return "add_maxpool=True (mean and max pooling)"
    if not isinstance(m.bn, nn.Identity):
        return f"bn is {type(m.bn).__name__} (norm_layer), not Identity"
    if type(m.act) is not nn.ReLU:
        return f"act is {type(m.act).__name__}, not ReLU"
    return _one_by_one_problem(m.fc1, m.fc2, bias=True) or _gate_problem(m.gate)


def _one_by_one_problem(fc1: nn.Module, fc2: nn.Module, bias: bool) -> str | None:
    """Why fc1, fc2 are not Conv2d(C, rd, 1) and Conv2d(rd, C, 1) (with or without biases), or None."""
    if not isinstance(fc1, nn.Conv2d):
        return f"fc1 is {type(fc1).__name__}, not Conv2d"
    c, rd = fc1.in_channels, fc1.out_channels
    if fc1.kernel_size != (1, 1) or getattr(fc2, "kernel_size", None) != (1, 1):
        return "fc1/fc2 are not 1x1 convs"
    return _conv_problem(fc1, "fc1", nn.Conv2d, c, rd, bias) or _conv_problem(fc2, "fc2", nn.Conv2d, rd, c, bias)


def _cbam_why_not(m: nn.Module) -> str | None:
    channel, spatial = m.channel, m.spatial
    if _qualname(type(channel)) != "timm.layers.cbam.ChannelAttn":
        return f"channel is {type(channel).__name__}, not timm's ChannelAttn"
    if _qualname(type(spatial)) != "timm.layers.cbam.SpatialAttn":
        return f"spatial is {type(spatial).__name__}, not timm's SpatialAttn"
    if type(channel.act) is not nn.ReLU:
        return f"channel.act is {type(channel.act).__name__}, not ReLU"
    problem = _one_by_one_problem(channel.fc1, channel.fc2, bias=False)
    if problem is not None:
        return f"channel.{problem}"
    problem = _gate_problem(channel.gate) or _gate_problem(spatial.gate)
    if problem is not None:
        return problem
    cna = spatial.conv
    if set(cna._modules) - {"conv", "bn", "aa"} or not isinstance(getattr(cna, "aa", None), (type(None), nn.Identity)):
        return "spatial.conv has more than a conv and a norm (anti-aliasing?)"
    problem = (_conv_problem(cna.conv, "spatial.conv.conv", nn.Conv2d, 2, 1, bias=False)
               or _odd_kernel_problem(cna.conv, "spatial conv"))
    if problem is not None:
        return problem
    bn = cna.bn
    if not isinstance(bn, nn.BatchNorm2d):
        return f"spatial.conv.bn is {type(bn).__name__}, not BatchNorm2d"
    for extra in ("drop", "act"):  # timm's BatchNormAct2d applies them after the norm
        if not isinstance(getattr(bn, extra, nn.Identity()), nn.Identity):
            return f"spatial.conv.bn.{extra} is {type(getattr(bn, extra)).__name__}, not Identity"
    return None


_TIMM_ADAPTERS = (
    _TimmAdapter(
        "EcaModule",
        "eca",
        _eca_why_not,
        # timm's EcaModule does not record C; None skips the channel-count input check.
        lambda m: {"channels": None, "kernel_size": m.conv.kernel_size[0]},
        ("conv",),
    ),
    _TimmAdapter("SEModule", "se", _se_why_not, lambda m: {"channels": m.fc1.in_channels}, ("fc1", "fc2")),
    _TimmAdapter(
        "cbam.CbamModule",
        "cbam",
        _cbam_why_not,
        lambda m: {"channels": m.channel.fc1.in_channels},
        ("channel", "spatial"),
    ),
)


# --- unfuse ---------------------------------------------------------------------------------


def _unfuse_plan(module: nn.Module) -> _Plan | None:
    block = type(module).__dict__.get("tail_of")
    if block is not None:  # a tail-fused block: back to its class, and on to its attention module
        def build() -> nn.Module:
            new = rebind(module, block)
            new.__dict__.pop("backend", None)
            new.__dict__.pop(CACHE_ATTRIBUTE, None)  # the tail choice's key part
            return new

        return _Plan(build, _qualname(block), descend=True)
    if not isinstance(module, FusedModule):
        return None
    cls = type(module)
    if cls not in FUSED.values():  # its own forward would be lost
        return _Plan(None, "not a class of attnkernels.nn.FUSED (a subclass?): left fused", False)
    origin = module.__dict__.get(TIMM_ORIGIN)
    if origin is not None:
        return _Plan(lambda: _back_to_timm(module, origin), _qualname(type(origin)), descend=False)
    ref = reference_class(cls)
    return _Plan(lambda: _rebind(module, ref, None), _qualname(ref), descend=False)


def _back_to_timm(fused: nn.Module, origin: nn.Module) -> nn.Module:
    """The timm module `fused` was made from, holding `fused`'s submodules (whichever the
    caller may have replaced since) and its mode."""
    for attr, child in fused._modules.items():
        setattr(origin, attr, child)
    for attr, child in origin._modules.items():
        if attr not in fused._modules and child is not None:  # timm's own act/gate/bn
            child.train(fused.training)
    origin.training = fused.training
    return origin
