"""Load a reward function from a spec string and normalise it to one batch signature.

Spec: a built-in name or ``"path/to/file.py:fn_name"`` (config key ``worker.reward.reward_function``).
Built-ins (:data:`BUILTIN`): ``"math"`` (:func:`mentor.rewards.math.compute_score`) and the tool-use MENTOR
rewards of :mod:`mentor.rewards.tool`: ``"tool_mentor"`` (the official one), ``"tool_overlap"``,
``"tool_no_match"``, ``"tool_f1"`` (its ablations) and ``"tool_sparse"`` (the sparse baseline).

Accepted signatures, detected from ``inspect.signature`` or forced with ``reward_type``:

- ``batch`` (EasyR1): ``fn(reward_inputs: list[dict], **kwargs) -> list[dict]``;
- ``sequential``, one sample a call, either
  EasyR1's ``fn(reward_input: dict, **kwargs) -> dict`` (one required positional parameter) or
  verl's ``fn(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float | dict``
  (three or four positional parameters).

``reward_type="auto"`` picks verl for three or more required positional parameters (or one named
``solution_str``), EasyR1 sequential for a single parameter annotated as a dict, and batch for any
other single parameter (EasyR1's default). Every form becomes a :class:`BatchRewardFn`: called on a
list of input dicts (``response``, ``ground_truth``, ``ended_with_eos``, ``data_source`` and, for
tool-use rows, ``func_schemas`` and ``tool_calls_used``: see :mod:`mentor.rewards.inputs`; verl functions
get the fields beyond their three positional ones as ``extra_info``) it returns one item per input, a
dict with ``overall`` where the function returned one (verl's ``score`` is copied to ``overall``; a bare
number becomes ``{"overall": x}``). Anything else is passed through unchanged: :class:`mentor.rewards.pool.RewardPool` validates the items.

A BatchRewardFn pickles as its spec string and kwargs and reloads by path on the other side, so it
can be shipped to worker processes even when the user's module is not importable by name there.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import numbers
import os
import sys
import typing
from collections.abc import Callable, Mapping
from typing import Any

CONFIG_KEY = "worker.reward.reward_function"
REWARD_TYPES = ("auto", "batch", "sequential")
BUILTIN = {
    "math": ("mentor.rewards.math", "compute_score"),
    "tool_mentor": ("mentor.rewards.tool", "compute_score"),
    "tool_overlap": ("mentor.rewards.tool", "compute_score_overlap"),
    "tool_no_match": ("mentor.rewards.tool", "compute_score_no_match"),
    "tool_f1": ("mentor.rewards.tool", "compute_score_f1"),
    "tool_sparse": ("mentor.rewards.tool", "compute_score_sparse"),
}
"""Built-in reward name -> (module, function); modules are imported only when their reward is loaded."""
_BUILTIN_NAMES = "', '".join(BUILTIN)


def builtin_reward_range(spec: str, kwargs: Mapping[str, Any] | None = None) -> float | None:
    """max - min of a built-in reward under ``kwargs`` (``worker.reward.reward_kwargs``); None for a user file."""
    kwargs = kwargs or {}
    if spec == "math":
        # overall = w_acc * acc + w_fmt * fmt with acc, fmt in {0, 1}: the span is |w_acc| + |w_fmt|, with the
        # weights' defaults read from compute_score's signature (0.9 + 0.1 = 1.0)
        import inspect

        from mentor.rewards.math import compute_score

        defaults = {k: p.default for k, p in inspect.signature(compute_score).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        return sum(abs(float(kwargs.get(k, defaults[k]))) for k in ("accuracy_weight", "format_weight"))
    if spec in BUILTIN:
        from mentor.rewards.tool import REWARD_RANGES

        return REWARD_RANGES[spec]
    return None


class RewardFunctionError(ValueError):
    """A reward spec that cannot be loaded; the message names the file, function and the fix."""


class BatchRewardFn:
    """``fn(reward_inputs: list[dict]) -> list`` wrapping a loaded reward function of any form.

    Attributes: ``spec``, ``kwargs``, ``style`` (``"batch"``, ``"easyr1_sequential"`` or ``"verl"``).
    """

    def __init__(self, spec: str, fn: Callable, style: str, kwargs: dict[str, Any], pass_extra_info: bool = True):
        self.spec, self.style, self.kwargs = spec, style, dict(kwargs)
        self._fn = functools.partial(fn, **kwargs) if kwargs else fn
        self._pass_extra_info = pass_extra_info  # verl's older 3-argument compute_score has no extra_info

    def __call__(self, reward_inputs: list[dict]) -> list:
        if self.style == "batch":
            return self._fn(reward_inputs)
        if self.style == "easyr1_sequential":
            return [_as_score(self._fn(item)) for item in reward_inputs]
        scores = []
        for item in reward_inputs:
            args = [item.get("data_source", ""), item.get("response", ""), item.get("ground_truth")]
            if self._pass_extra_info:
                args.append(_extra_info(item))
            scores.append(_as_score(self._fn(*args)))
        return scores

    def __reduce__(self):
        return (_reload, (self.spec, self.style, self.kwargs))

    def __repr__(self) -> str:
        return f"BatchRewardFn({self.spec!r}, style={self.style!r}, kwargs={self.kwargs!r})"


def _extra_info(item: Mapping[str, Any]) -> dict[str, Any]:
    """verl's ``extra_info``: the input's own, else its other fields (``ended_with_eos``, ``tool_calls_used``, ...)."""
    if item.get("extra_info") is not None:
        return item["extra_info"]
    return {k: v for k, v in item.items() if k not in ("data_source", "response", "ground_truth")}


def _reload(spec: str, style: str, kwargs: dict[str, Any]) -> BatchRewardFn:
    forced = "batch" if style == "batch" else "sequential"
    return load_reward_function(spec, reward_type=forced, **kwargs)


def _as_score(value: Any) -> Any:
    """verl/EasyR1 per-sample result -> ``{"overall": ...}`` dict; garbage passes through."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return {"overall": value}
    if isinstance(value, Mapping) and "overall" not in value and "score" in value:
        return {**value, "overall": value["score"]}
    return value


def load_reward_function(spec: str, reward_type: str = "auto", **kwargs: Any) -> BatchRewardFn:
    """Load ``spec`` (a :data:`BUILTIN` name or ``"file.py:fn"``) as a :class:`BatchRewardFn`.

    ``kwargs`` are bound to the function as keyword arguments (``worker.reward.reward_kwargs``).
    Raises :class:`RewardFunctionError` naming the file / function / signature at fault.
    """
    if reward_type not in REWARD_TYPES:
        raise RewardFunctionError(f"reward_type={reward_type!r} is not one of {REWARD_TYPES}")
    if not isinstance(spec, str) or not spec.strip():
        raise RewardFunctionError(f"{CONFIG_KEY}={spec!r}: expected a built-in ('{_BUILTIN_NAMES}') or "
                                  f"'path/to/file.py:function_name'")
    spec = spec.strip()
    if spec in BUILTIN:
        module_name, fn_name = BUILTIN[spec]
        fn = getattr(importlib.import_module(module_name), fn_name)
        where = f"built-in reward {spec!r}"
    else:
        path, fn_name = _split_spec(spec)
        spec = f"{path}:{fn_name}"
        fn = _get_function(_import_file(path), fn_name, path)
        where = f"{fn_name!r} in {path}"
    style, n_args = _detect_style(fn, reward_type, where)
    _check_kwargs(fn, n_args, kwargs, where)
    return BatchRewardFn(spec, fn, style, kwargs, pass_extra_info=n_args == 4)


def _split_spec(spec: str) -> tuple[str, str]:
    path, sep, fn_name = spec.rpartition(":")
    if not sep or not path or not fn_name.isidentifier():
        raise RewardFunctionError(
            f"{CONFIG_KEY}={spec!r} is neither a built-in ('{_BUILTIN_NAMES}') nor 'path/to/file.py:function_name' "
            f"(e.g. examples/reward_function/math.py:compute_score)"
        )
    return os.path.abspath(os.path.expanduser(path)), fn_name


def _import_file(path: str):
    """Import the file at ``path`` as a uniquely named module (two files may share a stem)."""
    if not os.path.isfile(path):
        raise RewardFunctionError(
            f"reward function file {path} not found (set {CONFIG_KEY} to an existing "
            f"'path/to/file.py:function_name', paths are relative to the launch directory)"
        )
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"mentor_user_reward_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardFunctionError(f"reward function file {path} is not an importable Python file ({CONFIG_KEY})")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before exec: dataclasses/pickle in the file look themselves up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise RewardFunctionError(f"importing reward function file {path} failed: {type(e).__name__}: {e}") from e
    return module


def _get_function(module, fn_name: str, path: str) -> Callable:
    available = sorted(
        n for n, v in vars(module).items()
        if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
    )
    if not hasattr(module, fn_name):
        raise RewardFunctionError(
            f"function {fn_name!r} not found in reward function file {path} ({CONFIG_KEY}); "
            f"callables defined there: {available or 'none'}"
        )
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise RewardFunctionError(
            f"{fn_name!r} in {path} is a {type(fn).__name__}, not a function ({CONFIG_KEY}); "
            f"callables defined there: {available or 'none'}"
        )
    return fn


def _positional(sig: inspect.Signature) -> tuple[list[inspect.Parameter], int, bool]:
    """(positional parameters, how many are required, accepts *args)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p for p in sig.parameters.values() if p.kind in kinds]
    required = sum(p.default is inspect.Parameter.empty for p in params)
    varargs = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values())
    return params, required, varargs


def _is_dict_annotation(fn: Callable, param: inspect.Parameter) -> bool:
    try:
        ann = typing.get_type_hints(fn).get(param.name, param.annotation)
    except Exception:  # unresolvable string annotations: fall back to the raw one
        ann = param.annotation
    origin = typing.get_origin(ann) or ann
    return origin in (dict, Mapping) or (isinstance(origin, type) and issubclass(origin, dict))


def _check_kwargs(fn: Callable, n_args: int, kwargs: dict[str, Any], where: str) -> None:
    try:
        inspect.signature(fn).bind(*([None] * n_args), **kwargs)
    except TypeError as e:
        raise RewardFunctionError(
            f"{where} does not accept reward kwargs {sorted(kwargs)} (worker.reward.reward_kwargs): {e}"
        ) from e


def _detect_style(fn: Callable, reward_type: str, where: str) -> tuple[str, int]:
    """(style, number of positional arguments it will be called with)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise RewardFunctionError(f"cannot read the signature of {where}: {e}") from e
    params, required, varargs = _positional(sig)
    takes = lambda n: required <= n and (len(params) >= n or varargs)  # noqa: E731
    verl_like = takes(3) and (required >= 3 or "solution_str" in sig.parameters)
    expected = (
        "expected fn(reward_inputs: list[dict], **kw) -> list[dict] (batch), "
        "fn(reward_input: dict, **kw) -> dict (EasyR1 sequential) or "
        "fn(data_source, solution_str, ground_truth, extra_info=None, **kw) -> float | dict (verl)"
    )
    if reward_type in ("auto", "sequential") and verl_like:
        return "verl", 4 if takes(4) else 3
    if takes(1) and not verl_like:
        if reward_type == "sequential" or (reward_type == "auto" and params and _is_dict_annotation(fn, params[0])):
            return "easyr1_sequential", 1
        if reward_type in ("auto", "batch"):
            return "batch", 1
    raise RewardFunctionError(f"{where} has signature {sig}, which fits no reward form for "
                              f"reward_type={reward_type!r}: {expected}")
