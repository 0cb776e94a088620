"""The activation-bytes instrument shared by the profiler and the runtime (plan/saved_bytes.py)."""
from __future__ import annotations

import gc

import torch

from omnibal_pl.plan.saved_bytes import ParameterFilter, PeakSavedBytes, saved_bytes


def test_peak_counts_live_storages_and_drops_them_after_backward() -> None:
    w = torch.nn.Parameter(torch.randn(32, 32))
    x = torch.randn(8, 32, requires_grad=True)
    probe = PeakSavedBytes(ParameterFilter([w]))
    with probe:
        h = x @ w            # saves x (and w: a parameter, not counted)
        y = h.exp()          # saves its own output
        first = probe.current
        z = (y * 2).sin()    # saves y * 2
    assert first == 2 * x.numel() * 4
    assert probe.peak == 3 * x.numel() * 4
    z.sum().backward()
    del h, y, z
    # every saved storage is released once its node ran: an op's saved output held strongly would keep
    # its own graph alive (a cycle through autograd that gc cannot collect) and leave bytes here
    assert probe.current == 0 and not probe.live
    assert probe.peak == 3 * x.numel() * 4
    probe.reset()
    assert probe.peak == 0


def test_a_graph_dropped_without_backward_releases_its_bytes() -> None:
    """A forward whose graph is dropped unused (a shape-inference pass) must not stay counted, nor stay
    alive: holding an op's saved *output* strongly makes a cycle (node -> saved output -> its grad_fn, the
    node) that neither refcounting nor gc can free."""
    x = torch.randn(64, 64, requires_grad=True)
    probe = PeakSavedBytes(ParameterFilter([]))
    with probe:
        y = x.exp()  # saves its own output
    assert probe.current == x.numel() * 4
    del y
    gc.collect()
    assert probe.current == 0


def test_a_storage_saved_by_two_nodes_counts_once_until_both_release() -> None:
    x = torch.randn(16, 16, requires_grad=True)
    probe = PeakSavedBytes(ParameterFilter([]))
    with probe:
        a = x.sin()
        b = x.cos()
    assert probe.current == x.numel() * 4
    a.sum().backward()
    assert probe.current == x.numel() * 4  # still held by cos's node
    b.sum().backward()
    assert probe.current == 0


def test_saved_bytes_matches_the_peak_of_one_forward() -> None:
    lin = torch.nn.Linear(24, 24)
    x = torch.randn(5, 24, requires_grad=True)
    skip = ParameterFilter(lin.parameters())
    once, _ = saved_bytes(lambda: lin(x).relu().exp(), skip)
    probe = PeakSavedBytes(skip)
    with probe:
        lin(x).relu().exp()
    assert once == probe.peak == 3 * x.numel() * 4  # x, relu's output, exp's output
