"""Safety heads (Zhou et al. 2024, Ships): prompts.py holds the request sets and refusal detectors, ships.py scores heads and ablates them."""
