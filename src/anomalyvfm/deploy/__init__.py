"""Deployment: export a model's backbone to a graph form (`export`, needs torch), run graph forms without
torch (`runtime`); `load_predictor` opens a model directory with the backend asked for (or an earlier bundle)."""
