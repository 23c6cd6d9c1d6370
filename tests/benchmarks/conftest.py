import os
import sys

# The benchmark scripts import each other as top-level modules (benchmarks/ is not a package).
sys.path.insert(
    0,
    os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks"),
)
