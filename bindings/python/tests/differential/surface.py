"""Prints the public surface of the mooncake package installed for this interpreter, as JSON (one object).

    python surface.py MODULE[,MODULE...]

For each module: {"error": "..."} when it cannot be imported, else its public names (not starting with "_"), each
{"kind": "class" | "function" | "value", "signature": [...] or null, "members": {...} for classes}. Names a module
only imports from outside the package (modules, `typing.Optional`, `enum.Enum`, `aiohttp.web`, ...) are left out:
they are not part of its API. A signature is a list of [name, kind, default repr or null], or null where the
callable has none that `inspect` can read (native functions of pybind11 modules, for instance).
"""

import importlib
import inspect
import json
import sys


def signature(obj):
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    out = []
    for p in sig.parameters.values():
        default = None if p.default is inspect.Parameter.empty else repr(p.default)
        out.append([p.name, p.kind.name, default])
    return out


def own(obj, module_name: str) -> bool:
    """True when `obj` belongs to the package rather than being imported from elsewhere."""
    if inspect.ismodule(obj):
        return False
    mod = getattr(obj, "__module__", None)
    if (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)) and isinstance(mod, str):
        return mod.split(".")[0] == "mooncake" or mod == module_name or mod in ("engine", "store", "builtins")
    if getattr(type(obj), "__module__", "") in ("typing", "__future__"):
        return False
    return True


def describe_class(cls):
    members = {}
    for name in dir(cls):
        if name.startswith("_"):
            continue
        try:
            attr = inspect.getattr_static(cls, name)
        except AttributeError:
            continue
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        callable_ = callable(attr) and not isinstance(attr, property)
        members[name] = {"kind": "method" if callable_ else "attribute", "signature": signature(attr) if callable_ else None}
    return members


def describe(module_name: str):
    try:
        mod = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is reported
        return {"error": f"{type(e).__name__}: {e}"}
    names = {}
    for name in dir(mod):
        if name.startswith("_"):
            continue
        obj = getattr(mod, name)
        if not own(obj, module_name):
            continue
        if inspect.isclass(obj):
            names[name] = {"kind": "class", "signature": signature(obj), "members": describe_class(obj)}
        elif callable(obj):
            names[name] = {"kind": "function", "signature": signature(obj)}
        else:
            names[name] = {"kind": "value", "signature": None}
    return {"names": names}


if __name__ == "__main__":
    print(json.dumps({m: describe(m) for m in sys.argv[1].split(",")}))
