"""Registries: explicit registration, lookups with suggestions, building with key checks."""
import pytest

from dalpsr.utils.options import OptionError
from dalpsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY, Registry, check_call_kwargs


def test_register_get_and_duplicates():
    reg = Registry('toy')

    @reg.register()
    class Foo:
        def __init__(self, a, b=2):
            self.a, self.b = a, b

    reg.register(lambda: 1, name='one')
    assert reg.get('Foo') is Foo and 'one' in reg and set(reg.keys()) == {'Foo', 'one'}
    reg.register(Foo)  # the same object again is fine (re-import)

    class Other:
        pass
    with pytest.raises(KeyError, match="already registered in the 'toy' registry"):
        reg.register(Other, name='Foo')
    with pytest.raises(KeyError, match="No object named 'Fo0'.*Did you mean: Foo"):
        reg.get('Fo0')


def test_build_checks_keys():
    reg = Registry('toy')

    @reg.register()
    class Foo:
        def __init__(self, a, b=2):
            self.a, self.b = a, b

    obj = reg.build({'type': 'Foo', 'a': 1}, where='net in x.yml', b=5)
    assert (obj.a, obj.b) == (1, 5)
    with pytest.raises(OptionError, match=r"net in x.yml \(type: Foo\): unknown key 'bb' \(did you mean 'b'\?\)"):
        reg.build({'type': 'Foo', 'a': 1, 'bb': 3}, where='net in x.yml')
    with pytest.raises(OptionError, match="missing required key 'a'"):
        reg.build({'type': 'Foo'}, where='net in x.yml')
    with pytest.raises(OptionError, match="needs a 'type:' key"):
        reg.build({'a': 1}, where='net in x.yml')
    with pytest.raises(OptionError, match="net in x.yml: No object named 'Bar'"):
        reg.build({'type': 'Bar'}, where='net in x.yml')

    def takes_kwargs(x, **kw):
        return x
    check_call_kwargs(takes_kwargs, {'x': 1, 'anything': 2}, 'fn')  # **kwargs accepts any key


def test_packages_register_their_modules():
    import dalpsr.archs  # noqa: F401
    import dalpsr.data  # noqa: F401
    import dalpsr.models  # noqa: F401
    from tests import toy_plugin  # noqa: F401  (a plugin registers without editing dalpsr)
    assert 'ToyModel' in MODEL_REGISTRY and 'ToyRegression' in DATASET_REGISTRY
    assert isinstance(ARCH_REGISTRY, Registry)
