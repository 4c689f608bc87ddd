import pathlib
import sys

# Tests import the NumPy references beside them.
sys.path.insert(0, str(pathlib.Path(__file__).parent))

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
  if not (SHARED_DATA / "tofu").is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the repo)")
  return SHARED_DATA
