"""The device is chosen once (moetron/device.py); no other module names a device type.

Reads every source file of the product (src/, parallel/, comm/; tests and benchmarks excepted) and fails on
a "cpu" / "cuda" string literal or a .cpu() / .cuda() call outside moetron/device.py, so a module cannot
quietly pin tensors to one device and break the other path.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("src", "parallel", "comm")
ALLOWED = {ROOT / "src" / "moetron" / "device.py"}
DEVICE_TYPES = {"cpu", "cuda"}


def device_literals(source: str) -> list[tuple[int, str]]:
    """(line, what) for each device-type string literal and each .cpu() / .cuda() call in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.split(":")[0] in DEVICE_TYPES:
            found.append((node.lineno, repr(node.value)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in DEVICE_TYPES):
            found.append((node.lineno, f".{node.func.attr}()"))
    return sorted(found)


def test_the_checker_finds_each_kind_of_literal():
    source = 'a = torch.device("cuda")\nb = x.cpu()\nc = y.cuda()\nd = "cuda:0"\ne = "cpus"\nf = x.to(device)\n'
    assert [what for _, what in device_literals(source)] == ["'cuda'", ".cpu()", ".cuda()", "'cuda:0'"]


def test_no_module_but_device_py_names_a_device_type():
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path in ALLOWED:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in device_literals(path.read_text())]
    assert not offenders, "device types named outside moetron/device.py:\n" + "\n".join(offenders)
