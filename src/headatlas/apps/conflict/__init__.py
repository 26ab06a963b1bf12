"""Knowledge-conflict heads and PH3 (Jin et al. 2024): items.py builds the conflict set, ph3.py scores heads and prunes them."""
