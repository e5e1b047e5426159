"""Active speaker detection networks used by curation to compute per-frame speaking/listening masks."""
