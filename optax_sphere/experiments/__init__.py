"""The experiment harness behind the main job and the longer examples.

Installed with the package (its plotting and data needs are the ``examples`` extra):

* :mod:`optax_sphere.experiments.harness`: a Flax training loop for comparing optimizers
  (learning rate selected on a validation split, then every seed at the selected rate),
  divergence handling, results files, figures;
* :mod:`optax_sphere.experiments.stats`: paired comparisons of an optimizer with its base
  over seeds (confidence intervals and verdicts, with ``scipy``);
* :mod:`optax_sphere.experiments.compare`: the main job, every optimizer on MNIST-1D
  (``python -m optax_sphere.experiments.compare`` or the ``optax-sphere-compare`` command).
"""
