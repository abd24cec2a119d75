"""The ring's record moves in shmq/_ring.py are written by tools/gen_ring.py
from one template: this fails when the checked-in code is not what the
template gives (someone edited the generated part by hand, or changed the
template without running the generator)."""
from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_ring", ROOT / "tools" / "gen_ring.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_ring_code_is_fresh():
    gen = load_generator()
    source = (ROOT / "shmq" / "_ring.py").read_text()
    assert gen.render(source) == source, "shmq/_ring.py is stale: run python tools/gen_ring.py"


def test_every_snippet_is_used_and_expands():
    gen = load_generator()
    text = gen.generate()
    assert not [line for line in text.splitlines() if gen._MACRO.match(line)]  # every macro expanded
    used = set()
    for line in (gen.TEMPLATE + "".join(gen.SNIPPETS.values()) + "".join(
        v for params in gen.VARIANTS.values() for v in params.values()
    )).splitlines():
        m = gen._MACRO.match(line)
        if m:
            used.add(m.group(2))
    assert used == set(gen.SNIPPETS), f"unused snippets: {set(gen.SNIPPETS) - used}"
    assert "$" not in text  # every parameter was given
    compile(text.replace(gen.BEGIN, "class _C:\n").replace(gen.END, ""), "<generated>", "exec")
