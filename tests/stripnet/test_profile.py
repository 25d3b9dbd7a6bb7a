"""Table 1 of the paper: per-block parameters, output sizes, channels and MACs of EG-RepVGG."""

import pytest

from stripnet.architectures import EG_REPVGG, REPVGG_A0
from stripnet.network import build_model, reparameterize
from stripnet.profile import count_macs, count_parameters, profile_rows

TABLE1_TRAIN = [309, 849, 1789, 3727, 7375, 14671, 14671, 14671, 98307, 1542]
TABLE1_FUSED = [252, 738, 1558, 3268, 6536, 13034, 13034, 13034, 87808, 1542]  # without the 3 ECA weights
TABLE1_SIZES = [100, 50, 25, 25, 13, 13, 13, 13, 7, 1]
TABLE1_CHANNELS = [9, 9, 19, 19, 38, 38, 38, 38, 256, 6]


def test_table1_training_rows():
    rows = profile_rows(build_model(EG_REPVGG, 6), 200)
    assert [r.parameters for r in rows] == TABLE1_TRAIN
    assert [r.output_size[0] for r in rows] == TABLE1_SIZES
    assert [r.out_channels for r in rows] == TABLE1_CHANNELS
    assert sum(TABLE1_TRAIN) == 157_911


def test_table1_fused_rows():
    rows = profile_rows(reparameterize(build_model(EG_REPVGG, 6)), 200)
    eca = [3] * 9 + [0]
    assert [r.parameters - e for r, e in zip(rows, eca)] == TABLE1_FUSED
    assert sum(r.parameters for r in rows) == 140_804 + 27


def test_teacher_is_repvgg_a0_size():
    fused = reparameterize(build_model(REPVGG_A0, 6))
    assert count_parameters(fused) == pytest.approx(7.04e6, rel=0.005)
    widths = [b.out_channels for b in REPVGG_A0.blocks]
    assert widths.count(48) == 3 and widths.count(96) == 4 and widths.count(192) == 14 and widths[-1] == 1280


@pytest.mark.parametrize("fused", [False, True])
def test_macs_are_those_of_the_convolutions_and_the_head(fused):
    """Per image: out_h·out_w·out_c·in_c·k² for each conv (3×3 + 1×1 in training form, one 3×3 fused), in·out for
    the linear head; BN, activations and ECA's gate are element-wise and count nothing."""
    model = build_model(EG_REPVGG, 6)
    model = reparameterize(model) if fused else model
    rows = profile_rows(model, 200)
    taps = 9 if fused else 9 + 1
    in_channels = [3] + TABLE1_CHANNELS[:-2]
    expected = [s * s * c * i * taps for s, c, i in zip(TABLE1_SIZES[:-1], TABLE1_CHANNELS[:-1], in_channels)]
    assert [r.macs for r in rows] == expected + [256 * 6]
    assert count_macs(model, 200) == sum(expected) + 256 * 6 == (19_223_718 if fused else 21_359_516)
    assert count_macs(reparameterize(build_model(REPVGG_A0, 6)), 200) == 1_163_414_784
