"""Ablation grids: run every cell of a config grid (resumably), then tabulate and plot them."""
