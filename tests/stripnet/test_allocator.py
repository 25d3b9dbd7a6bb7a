"""The allocator setting: with it, a process that allocates the same large tensors batch after batch reuses its
pages instead of faulting fresh ones in (a subprocess each way: the setting is process-wide)."""

import subprocess
import sys

import pytest

from stripnet.allocator import keep_freed_memory

BATCHES = """
import resource, sys, torch
from stripnet.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
x, w = torch.randn(32, 16, 100, 100), torch.randn(16, 16, 3, 3)
def batch():
    torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, w, padding=1).relu(), w, padding=1).sum()
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", BATCHES, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_keeping_freed_memory_cuts_the_page_faults_of_repeated_batches():
    kept, default = _page_faults("keep"), _page_faults("default")
    assert kept * 4 < default, (kept, default)


def test_without_glibc_it_says_so_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert keep_freed_memory() is False
