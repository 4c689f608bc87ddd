import pytest

from dualoptim_jax.unlearn.batching import in_batches, pad_rows


@pytest.mark.parametrize(
  "n, multiple, size",
  [(1, None, 1), (5, None, 8), (8, None, 8), (9, None, 16), (40, 8, 40), (41, 8, 48)],
)
def test_pad_rows_repeats_the_first_row_up_to_the_size(n, multiple, size):
  rows = [[i] for i in range(n)]
  padded = pad_rows(rows, multiple)
  assert len(padded) == size and padded[:n] == rows and all(r == [0] for r in padded[n:])


def test_in_batches_concatenates_slices_in_order():
  calls, ticks = [], []
  out = in_batches(
    lambda xs: calls.append(list(xs)) or [x * 10 for x in xs], range(7), 3, lambda: ticks.append(1)
  )
  assert (
    out == [x * 10 for x in range(7)] and calls == [[0, 1, 2], [3, 4, 5], [6]] and len(ticks) == 3
  )


def test_in_batches_checks_one_output_per_input():
  def short(xs):
    return list(xs)[:-1]

  with pytest.raises(ValueError, match="short returned 4 outputs for 6 inputs"):
    in_batches(short, range(6), 3)
  with pytest.raises(ValueError, match="batch_size"):
    in_batches(short, range(6), 0)
