"""benchmarks/ab_inprocess.py: every update of a round runs under its own value of the switch, the
order rotates from round to round, and the variable is gone afterwards."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import ab_inprocess  # noqa: E402

import calibfast  # noqa: E402


def test_each_update_sees_its_value_in_rotating_order(monkeypatch, capsys):
    seen = []
    update = calibfast.ChannelStats.update

    def spy(self, x, *a, **k):
        seen.append((os.environ.get("CF_TEST_AB"), tuple(x.shape), x.dtype))
        return update(self, x, *a, **k)

    monkeypatch.setattr(calibfast.ChannelStats, "update", spy)
    monkeypatch.delenv("CF_TEST_AB", raising=False)
    res = ab_inprocess.main(["--var", "CF_TEST_AB", "--values", "a", "b", "c", "--pairs", "3",
                             "--case", "64x40:16:bfloat16:crowded", "--bins", "64"])
    assert "CF_TEST_AB" not in os.environ
    times = res["64x40:16:bfloat16:crowded"]
    assert sorted(times) == ["a", "b", "c"] and all(len(v) == 3 and min(v) > 0 for v in times.values())
    # the first update (unset) sets the range; then 2e6 // 2560 = 781 calls a sample
    assert seen[0][0] is None
    rest = [v for v, _, _ in seen[1:]]
    reps = 2_000_000 // (64 * 40)
    assert len(rest) == 3 * 3 * reps
    order = [rest[i * reps] for i in range(9)]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(rest[i] == rest[i - i % reps] for i in range(len(rest)))
    assert all(shape == (64, 40) and dt == torch.bfloat16 for _, shape, dt in seen)
    out = capsys.readouterr().out
    assert "paired a/b" in out and "paired a/c" in out


@pytest.mark.parametrize("case, msg", [
    ("64x40:16:floatx:randn", "floatx"),
    ("64x40:16:float32:uniform", "randn or crowded"),
    ("64x40:float32:randn", "SHAPE:CHANNEL_BINS:DTYPE:DATA"),
])
def test_bad_case_names_the_problem(case, msg):
    with pytest.raises(SystemExit, match=msg):
        ab_inprocess.main(["--values", "1", "0", "--case", case])


def test_one_value_is_refused():
    with pytest.raises(SystemExit, match="at least two values"):
        ab_inprocess.main(["--values", "1", "--case", "8x8:0:float32:randn"])
