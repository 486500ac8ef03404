import sys
from pathlib import Path

# The zoo and helpers are plain modules next to the tests.
sys.path.insert(0, str(Path(__file__).parent))
