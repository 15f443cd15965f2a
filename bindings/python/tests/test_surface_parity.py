"""Surface parity with upstream's wheel: every public module, class, function, method, constant and enum member of the
modules below that upstream's installed package has, ours has too, with the same parameters where both expose a
signature. What ours lacks on purpose or has not built yet is in differential/surface_exceptions.py, each with its
reason; an entry for something ours now has is an error too, so the list stays exact.

Skipped unless MOONCAKE_UPSTREAM_PYTHON names upstream's python (CI: target/upstream-venv/bin/python). Prints a
coverage table (pytest -s shows it).
"""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "differential"))
from surface_exceptions import EXCEPTIONS, INHERITED  # noqa: E402

UPSTREAM_PYTHON = os.environ.get("MOONCAKE_UPSTREAM_PYTHON", "")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "differential", "surface.py")
MODULES = [
    "mooncake",
    "mooncake.engine",
    "mooncake.store",
    "mooncake.mooncake_config",
    "mooncake.http_metadata_server",
    "mooncake.async_store",
    "mooncake.buffer_pool",
    "mooncake.shared_segment",
    "mooncake.mooncake_store_service",
]

pytestmark = pytest.mark.skipif(
    not (UPSTREAM_PYTHON and os.path.isfile(UPSTREAM_PYTHON) and os.access(UPSTREAM_PYTHON, os.X_OK)),
    reason="set MOONCAKE_UPSTREAM_PYTHON to upstream's python (tests/interop/setup_upstream_venv.sh) to compare",
)


def surface(python: str) -> dict:
    out = subprocess.run([python, SCRIPT, ",".join(MODULES)], capture_output=True, timeout=120)
    assert out.returncode == 0, f"surface.py under {python}: {out.stderr.decode()[-2000:]}"
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def comparable(sig):
    """A signature without `self` (methods of Python classes list it, native ones do not)."""
    return [p for p in sig if p[0] != "self"] if sig is not None else None


def compatible(ours, theirs) -> bool:
    """Every call upstream's signature accepts, ours accepts the same way: upstream's parameters come first, with
    the same names, kinds and defaults (ours may give a default where upstream has none), and any parameter ours
    adds after them is optional."""
    if len(ours) < len(theirs):
        return False
    for (name, kind, default), (t_name, t_kind, t_default) in zip(ours, theirs):
        if name != t_name or kind != t_kind or (t_default is not None and default != t_default):
            return False
    return all(default is not None or kind in ("VAR_POSITIONAL", "VAR_KEYWORD") for _, kind, default in ours[len(theirs):])


def compare():
    """(rows of the coverage table, problems, exception entries that matched something missing)."""
    ours, theirs = surface(sys.executable), surface(UPSTREAM_PYTHON)
    rows, problems, used = [], [], set()

    def canonical(path):
        """The exception key for `path`: members of an inheriting class use their base class's entries."""
        owner, dot, member = path.rpartition(".")
        if dot and owner in INHERITED:
            return f"{INHERITED[owner]}.{member}"
        return path

    def check(path, theirs_entry, ours_entry, counts):
        counts[0] += 1
        path = canonical(path)
        if ours_entry is None:
            if path in EXCEPTIONS:
                used.add(path)
                counts[2] += 1
            else:
                problems.append(f"missing: {path}")
            return
        counts[1] += 1
        a, b = comparable(ours_entry.get("signature")), comparable(theirs_entry.get("signature"))
        if a is not None and b is not None and not compatible(a, b) and f"{path}()" not in EXCEPTIONS:
            problems.append(f"signature of {path}: ours {a}, upstream {b}")
        elif f"{path}()" in EXCEPTIONS:
            used.add(f"{path}()")

    for module in MODULES:
        t, o = theirs.get(module, {}), ours.get(module, {})
        if "error" in t:
            rows.append((module, "upstream cannot import it here: " + t["error"][:80], "", "", ""))
            continue
        counts = [0, 0, 0]  # upstream's names, ours present, excepted
        if "error" in o:
            o = {"names": {}}
        for name, entry in t["names"].items():
            path = f"{module}:{name}"
            mine = o["names"].get(name)
            if mine is None and path in EXCEPTIONS:
                # The whole name is excepted: its members are not counted one by one.
                check(path, entry, None, counts)
                continue
            check(path, entry, mine, counts)
            if entry["kind"] == "class" and mine is not None:
                for member, m_entry in entry["members"].items():
                    check(f"{path}.{member}", m_entry, mine.get("members", {}).get(member), counts)
        covered = 100.0 * counts[1] / counts[0] if counts[0] else 100.0
        rows.append((module, str(counts[0]), str(counts[1]), str(counts[2]), f"{covered:.0f}%"))
    return rows, problems, used


def test_surface_matches_upstream():
    rows, problems, used = compare()
    print("\nmodule | upstream names+members | ours | excepted | covered")
    for r in rows:
        print(" | ".join(r))
    stale = sorted(set(EXCEPTIONS) - used)
    assert not stale, "surface_exceptions.py lists names ours now has (or upstream no longer has):\n" + "\n".join(stale)
    assert not problems, f"{len(problems)} differences from upstream's surface:\n" + "\n".join(problems)
