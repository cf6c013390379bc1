"""Explicit name -> object registries (BasicSR style, without filename magic).

Every arch, model, dataset, loss, metric and batch transform is registered with a decorator
in the module that defines it, and the package ``__init__`` of each kind imports its modules
explicitly, so ``import dalpsr.archs`` fills ``ARCH_REGISTRY``. Options pick objects with a
``type:`` key::

    network_irpad:
      type: IRPAD          # looked up in ARCH_REGISTRY
      embed_dim: 256       # passed as keyword arguments

Nothing is discovered by scanning the file system.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Dict, Iterator, Tuple


class Registry:
    """A named map from a string to a class or function.

    >>> REG = Registry('toy')
    >>> @REG.register()
    ... class Foo: ...
    >>> REG.get('Foo') is Foo
    True
    """

    def __init__(self, name: str):
        self._name = name
        self._obj_map: Dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self._name

    def _do_register(self, name: str, obj: Any) -> None:
        if name in self._obj_map and self._obj_map[name] is not obj:
            raise KeyError(f"An object named '{name}' is already registered in the '{self._name}' registry")
        self._obj_map[name] = obj

    def register(self, obj: Any = None, name: str | None = None) -> Callable:
        """Register ``obj`` under ``name`` (default: its ``__name__``). Usable as decorator."""
        if obj is None:
            def deco(func_or_class):
                self._do_register(name or func_or_class.__name__, func_or_class)
                return func_or_class
            return deco
        self._do_register(name or obj.__name__, obj)
        return obj

    def get(self, name: str) -> Any:
        if name not in self._obj_map:
            close = difflib.get_close_matches(name, list(self._obj_map), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ''
            raise KeyError(f"No object named '{name}' in the '{self._name}' registry "
                           f"(known: {', '.join(sorted(self._obj_map)) or 'none'}).{hint}")
        return self._obj_map[name]

    def build(self, cfg: Dict[str, Any], where: str = '', **extra) -> Any:
        """Instantiate ``cfg['type']`` with the other keys of ``cfg`` (and ``extra``) as kwargs.

        Keys that the constructor does not accept, and required constructor arguments that
        are missing, raise :class:`dalpsr.utils.options.OptionError` naming the key and
        ``where`` (e.g. ``"network_irpad in options/train/x.yml"``).
        """
        from dalpsr.utils.options import OptionError
        where = where or f'a {self._name} block'
        if not isinstance(cfg, dict) or 'type' not in cfg:
            raise OptionError(f"{where}: needs a 'type:' key naming a registered {self._name} "
                              f"(known: {', '.join(sorted(self._obj_map))})")
        kwargs = {k: v for k, v in cfg.items() if k != 'type'}
        kwargs.update(extra)
        try:
            cls = self.get(cfg['type'])
        except KeyError as err:
            raise OptionError(f"{where}: {err.args[0]}") from None
        check_call_kwargs(cls, kwargs, f"{where} (type: {cfg['type']})")
        return cls(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._obj_map

    def __iter__(self) -> Iterator[Tuple[str, Any]]:
        return iter(self._obj_map.items())

    def keys(self):
        return self._obj_map.keys()


ARCH_REGISTRY = Registry('arch')
MODEL_REGISTRY = Registry('model')
DATASET_REGISTRY = Registry('dataset')
TRANSFORM_REGISTRY = Registry('transform')
LOSS_REGISTRY = Registry('loss')
METRIC_REGISTRY = Registry('metric')
#: LR -> SR restorers of test.py (``method: {type: ...}``); see dalpsr/restorers/base.py.
RESTORER_REGISTRY = Registry('restorer')


def check_call_kwargs(fn: Callable, kwargs: Dict[str, Any], where: str) -> None:
    """Raise ``OptionError`` if ``kwargs`` has keys ``fn`` does not take or lacks required ones."""
    from dalpsr.utils.options import OptionError
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without signature
        return
    params = [p for p in sig.parameters.values() if p.name != 'self']
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        for key in kwargs:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ''
                raise OptionError(f"{where}: unknown key '{key}'{hint}; accepted keys: "
                                  f"{', '.join(sorted(accepted))}")
    for p in params:
        if (p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.name not in kwargs):
            raise OptionError(f"{where}: missing required key '{p.name}'")
