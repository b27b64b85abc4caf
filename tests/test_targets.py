"""Every FFI target the extension registers is called from Python (the naming chain of
docs/design.md: a target nobody calls is dead code, one called but not registered fails at
lowering)."""

from pathlib import Path

import pytest

from jaxep import _cuda

SOURCE = (Path(_cuda.__file__).parent / "_cuda.py").read_text()


@pytest.mark.skipif(not _cuda.available(), reason="extension built without CUDA")
def test_every_registered_target_is_used_from_python():
    targets = sorted(_cuda._ext.registrations())
    assert len(targets) >= 12, targets
    unused = [t for t in targets if f'"{t}"' not in SOURCE]
    assert not unused, f"registered but never called from jaxep/_cuda.py: {unused}"


def test_every_target_python_names_is_registered():
    import re

    named = set(re.findall(r'"(jaxep_[a-z_]+_ffi)"', SOURCE))
    if not _cuda.available():
        pytest.skip("extension built without CUDA")
    missing = sorted(named - set(_cuda._ext.registrations()))
    assert not missing, f"jaxep/_cuda.py names targets the extension does not register: {missing}"
