import subprocess
import sys

import promptkd


def test_every_public_name_resolves_to_its_module():
    for name, module in promptkd._API.items():
        obj = getattr(promptkd, name)
        assert obj.__module__ == module, (name, obj.__module__)
    assert set(dir(promptkd)) >= set(promptkd._API)


def test_import_is_lazy_and_unknown_names_fail_clearly():
    code = "import sys, promptkd; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    try:
        promptkd.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
