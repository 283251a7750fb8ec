"""Simulated GCaMP recordings of epithelial tissue with exact ground truth.

Modules: :mod:`~calseg.simulate.config` (``SimulationConfig``), :mod:`~calseg.simulate.geometry`
(Voronoi tissue, Laplacian), :mod:`~calseg.simulate.model` (calcium model, integrators),
:mod:`~calseg.simulate.indicator` (GECI response, activity),
:mod:`~calseg.simulate.stages` (the rendering chain: indicator, optics, defects, camera),
:mod:`~calseg.simulate.render` (``render_video``),
:mod:`~calseg.simulate.dataset` (``simulate_dataset``, the ``calseg-dataset`` v1 writer).
"""
