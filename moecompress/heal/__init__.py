"""Heal: win back what removing experts or neurons cost, by fitting the compressed blocks to the original's outputs.

``spec`` holds the settings, ``fit`` the per-layer science (router least squares, ridge down projections,
Adam), ``select`` the reconstruction-based expert selection, ``walk`` the two-stream layer walk (the seam for
the streaming engine) and ``run`` the model-level drivers and report numbers. Import the submodules
directly (this package stays import-light so pass configs can embed ``HealSpec``).
"""
