"""Side-by-side benchmarks of flask-koala and the alternatives: ``python -m benchmarks.run``."""
