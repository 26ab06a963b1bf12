"""How much the model needs each head: gradient and ablation importance (Michel et al. 2019;
:mod:`.importance`), redundancy between heads (:mod:`.redundancy`), and pruning that really
removes heads from the weights, with the curve of perplexity against heads removed
(:mod:`.pruning`)."""
