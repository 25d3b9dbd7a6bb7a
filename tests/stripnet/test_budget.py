"""stripnet.budget: the arithmetic cost of a spec equals what the built network has, and each limit holds at its edge."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.checkpoint import ArchitectureSpec, BlockSpec, BoxHeadSpec, InputSpec, Manifest, Normalization
from stripnet.architectures import EG_REPVGG, REPVGG_A0
from stripnet.boxhead import block_strides
from stripnet.budget import CheckpointError, CheckpointLimits, box_head_cost, check_budget, cost
from stripnet.network import build_model
from stripnet.profile import count_head_macs, count_macs, count_parameters

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200")) // 8  # each example builds and runs a network


def specs() -> st.SearchStrategy[ArchitectureSpec]:
    block = st.builds(BlockSpec, out_channels=st.integers(1, 12), stride=st.sampled_from([1, 2]))
    return st.builds(ArchitectureSpec, name=st.just("random"), in_channels=st.integers(1, 4),
                     blocks=st.lists(block, min_size=1, max_size=5).map(tuple),
                     activation=st.sampled_from(["gelu", "relu"]), attention=st.sampled_from(["eca", "none"]),
                     eca_kernel_size=st.sampled_from([1, 3, 5]))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), classes=st.integers(2, 7), size=st.integers(1, 40), deploy=st.booleans())
def test_the_arithmetic_matches_the_built_network(spec, classes, size, deploy):
    model = build_model(spec, classes, deploy=deploy).eval()
    c = cost(spec, classes, size, deploy=deploy)
    assert c.parameters == count_parameters(model)
    assert c.macs == count_macs(model, size, spec.in_channels)
    with torch.no_grad():
        x = torch.zeros(1, spec.in_channels, size, size)
        sizes = [x.numel()]
        for block in model.blocks:
            x = block(x)
            sizes.append(x.numel())
    assert c.activation_elements == max(a + b for a, b in zip(sizes, sizes[1:]))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.lists(st.integers(0, len(EG_REPVGG.blocks) - 1), min_size=1, max_size=3), hidden=st.integers(1, 16),
       classes=st.integers(2, 7), deploy=st.booleans())
def test_the_head_arithmetic_matches_the_built_head(layers, hidden, classes, deploy):
    layers = tuple(sorted(layers, key=lambda i: (block_strides(EG_REPVGG)[i], i)))  # finest first
    spec = BoxHeadSpec(layers=layers, hidden=hidden, fitted_images=1)
    model = build_model(EG_REPVGG, classes, deploy=deploy, boxes=spec).eval()
    c = box_head_cost(EG_REPVGG, classes, spec, 64, deploy=deploy)
    assert c.parameters == count_parameters(model.boxes)
    assert c.macs == count_head_macs(model, 64)


def test_a_head_counts_against_the_limits():
    m = manifest().model_copy(update={"boxes": BoxHeadSpec(layers=(3,), hidden=256, fitted_images=1)})
    plain = check_budget(manifest(), CheckpointLimits())
    with pytest.raises(CheckpointError, match="MACs"):
        check_budget(m, CheckpointLimits(max_macs=plain.macs + 1000))


@pytest.mark.parametrize("spec", [EG_REPVGG, REPVGG_A0], ids=lambda s: s.name)
def test_the_paper_architectures(spec):
    fused = cost(spec, 6, 200, deploy=True)
    assert (fused.parameters, fused.macs) == {"eg-repvgg": (140_831, 19_223_718),
                                              "repvgg-a0": (7_036_070, 1_163_414_784)}[spec.name]


def manifest(spec: ArchitectureSpec = EG_REPVGG, size: int = 200, channels: int = 3) -> Manifest:
    norm = Normalization(mean=(0.5,) * channels, std=(0.25,) * channels)
    return Manifest(model_name="m", model_version="v1", architecture=spec, class_names=("a", "b"),
                    input=InputSpec(size=size, channels=channels, normalization=norm), weights_sha256="0" * 64,
                    parameters=0, macs=0, created_at="2026-01-01T00:00:00Z")


def test_every_limit_holds_at_its_edge():
    c = cost(EG_REPVGG, 2, 200, deploy=True)
    m, batch = manifest(), 8
    exact = CheckpointLimits(max_blocks=len(EG_REPVGG.blocks), max_parameters=c.parameters, max_macs=c.macs,
                             max_activation_bytes=c.activation_elements * batch * 4)
    assert check_budget(m, exact, batch) == c
    for field, what in (("max_blocks", "blocks"), ("max_parameters", "parameters"), ("max_macs", "MACs"),
                        ("max_activation_bytes", "activation bytes at batch 8")):
        tight = exact.model_copy(update={field: getattr(exact, field) - 1})
        with pytest.raises(CheckpointError, match=f"{what}.* > limit"):
            check_budget(m, tight, batch)


def test_a_spec_whose_input_channels_differ_from_the_input_is_refused():
    with pytest.raises(CheckpointError, match="takes 1 channels"):
        check_budget(manifest(EG_REPVGG.model_copy(update={"in_channels": 1})), CheckpointLimits())


def test_a_network_of_a_trillion_parameters_costs_only_arithmetic():
    huge = EG_REPVGG.model_copy(update={"blocks": (BlockSpec(out_channels=10**6, stride=2),) * 2})
    assert cost(huge, 2, 200, deploy=True).parameters > 9 * 10**12
    with pytest.raises(CheckpointError, match="parameters > limit 20,000,000"):
        check_budget(manifest(huge), CheckpointLimits())
