"""Built-in metric plugins (SPEC §5). Each module registers its metrics through
``register_metrics``:

- ``fid`` (:mod:`.fid`) and ``is`` (:mod:`.inception_score`): clean-fid's TorchScript Inception
  and resizing, shared through :mod:`.inception`; reference statistics in :mod:`.reference`.
- ``modes`` and ``digits_fid`` (:mod:`.modes`): mode coverage on stacked digits with the digit
  classifier of :mod:`.digit_classifier`.
- ``d_stats`` (:mod:`.d_stats`): discriminator output statistics (SR paper, Section IV-C).

They run through :func:`core.eval.runner.evaluate`, which adds the shared protocol fields.
"""
