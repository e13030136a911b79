"""Evaluation: MDQA by gold position, synthetic retrieval, general benchmarks (`python -m eval --help`)."""
