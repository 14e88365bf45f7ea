"""keep_freed_memory: glibc's settings asked for, restored, refused; the effect, measured
in a fresh process (the test process keeps glibc's defaults, see the conftest)."""

import json
import os
import subprocess
import sys

import pytest

from ntk_torch import allocator


class FakeLibc:
    """Records ``mallopt`` and ``malloc_trim`` calls; ``refuse`` names a parameter to refuse."""

    def __init__(self, refuse=None):
        self.calls, self.refuse = [], refuse

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter.value, value.value))
        return 0 if parameter.value == self.refuse else 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad.value))
        return 1


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(allocator, "_kept", False)  # restored after the test
    return FakeLibc()


def test_keeping_freed_memory_disables_fresh_mappings_and_trimming(fake):
    assert allocator.keep_freed_memory(libc=lambda: fake)
    assert fake.calls == [("mallopt", -4, 0), ("mallopt", -1, 2**31 - 1)]  # M_MMAP_MAX, M_TRIM_THRESHOLD
    assert allocator.describe({}) == "glibc keeps freed memory (ntk_torch.keep_freed_memory); THP_MEM_ALLOC_ENABLE=unset"


def test_turning_it_off_restores_glibcs_defaults_and_returns_the_memory(fake):
    allocator.keep_freed_memory(libc=lambda: fake)
    fake.calls.clear()
    assert allocator.keep_freed_memory(False, libc=lambda: fake)
    assert fake.calls == [("mallopt", -4, 65536), ("mallopt", -1, 128 * 1024), ("malloc_trim", 0)]
    assert allocator.describe({"THP_MEM_ALLOC_ENABLE": "1"}) == (
        "glibc returns freed memory to the system; THP_MEM_ALLOC_ENABLE=1")


def test_without_glibc_nothing_changes(fake):
    assert not allocator.keep_freed_memory(libc=lambda: None)
    assert allocator.describe().startswith("glibc returns")


def test_a_refused_setting_is_an_error_naming_it(fake):
    refusing = FakeLibc(refuse=-1)
    with pytest.raises(OSError, match=r"mallopt refused M_TRIM_THRESHOLD=2147483647"):
        allocator.keep_freed_memory(libc=lambda: refusing)
    assert allocator.describe().startswith("glibc returns")


def test_enabled_must_be_a_bool(fake):
    with pytest.raises(TypeError, match="enabled must be True or False, got 'yes'"):
        allocator.keep_freed_memory("yes")


def test_the_commands_switch(fake):
    assert not allocator.keep_for_command({}, libc=lambda: fake)  # opt-in: it costs memory
    assert not allocator.keep_for_command({allocator.KEEP_FREED_MEMORY: "0"}, libc=lambda: fake)
    assert fake.calls == []
    assert allocator.keep_for_command({allocator.KEEP_FREED_MEMORY: "1"}, libc=lambda: fake)
    with pytest.raises(ValueError, match="NTK_TORCH_KEEP_FREED_MEMORY must be 0 or 1, got 'on'"):
        allocator.keep_for_command({allocator.KEEP_FREED_MEMORY: "on"}, libc=lambda: fake)


FAULTS = """
import ctypes, json, resource, sys
from ntk_torch import allocator
applied = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2**20
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def fill_and_free():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
fill_and_free()
before = faults()
for _ in range(3):
    fill_and_free()
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def _faults(setting):
    done = subprocess.run([sys.executable, "-c", FAULTS, setting], capture_output=True, text=True, check=True,
                          env={**os.environ, "THP_MEM_ALLOC_ENABLE": "0"})
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or allocator._glibc() is None, reason="glibc only")
def test_a_freed_large_block_is_reused_without_page_faults():
    """64 MB blocks filled and freed in turn: glibc maps each afresh by default (16,384
    pages of 4 KB each), and once it keeps freed memory, reuses the first block's pages."""
    default, kept = _faults("default"), _faults("keep")
    assert kept["applied"] and not default["applied"]
    assert default["faults"] >= 3 * 16_000
    assert kept["faults"] < 1_000



def test_free_heap_bytes_reads_mallinfo2():
    def mallinfo2():
        return allocator._MallInfo2(fordblks=123_456, uordblks=7)

    library = type("Libc", (), {})()
    library.mallinfo2 = mallinfo2
    assert allocator.free_heap_bytes(libc=lambda: library) == 123_456
    assert allocator.free_heap_bytes(libc=lambda: type("Old", (), {})()) == 0  # glibc before 2.33
    assert allocator.free_heap_bytes(libc=lambda: None) == 0


HEAP = """
import ctypes, json, sys
from ntk_torch import allocator
if sys.argv[1] == "keep":
    allocator.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
block = libc.malloc(64 * 2**20)
ctypes.memset(block, 1, 64 * 2**20)
libc.free(block)
print(json.dumps(allocator.free_heap_bytes()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or allocator._glibc() is None, reason="glibc only")
def test_a_kept_block_counts_as_free_heap():
    """A freed 64 MB block stays in glibc's heap when freed memory is kept (the process can
    reuse it, the system does not count it as available), and goes back otherwise."""
    def free_after(setting):
        done = subprocess.run([sys.executable, "-c", HEAP, setting], capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert free_after("keep") >= 64 * 2**20
    assert free_after("default") < 64 * 2**20


def test_available_host_memory_counts_the_free_heap(monkeypatch):
    import torch

    from ntk_torch.kernel import cost

    monkeypatch.setattr(cost, "_system_available_memory", lambda: 1000)
    monkeypatch.setattr(cost, "free_heap_bytes", lambda: 24)
    assert cost.available_memory(torch.device("cpu")) == 1024
    monkeypatch.setattr(cost, "_system_available_memory", lambda: None)
    assert cost.available_memory(torch.device("cpu")) is None


def test_prefer_huge_pages_sets_the_allocator_switch_only_when_it_can_take_effect():
    environ = {}
    assert allocator.prefer_huge_pages(environ, modules={}, platform="linux")
    assert environ == {allocator.HUGE_PAGES: "1"}
    mine = {allocator.HUGE_PAGES: "0"}  # the user's choice, also to turn it off
    assert not allocator.prefer_huge_pages(mine, modules={}, platform="linux")
    assert mine == {allocator.HUGE_PAGES: "0"}
    late = {}  # torch read its allocator settings already
    assert not allocator.prefer_huge_pages(late, modules={"torch": object()}, platform="linux") and late == {}
    elsewhere = {}
    assert not allocator.prefer_huge_pages(elsewhere, modules={}, platform="darwin") and elsewhere == {}
