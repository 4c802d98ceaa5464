"""Built-in regularizers (SPEC §2), each registered by its module's ``register_regularizers``:

- :mod:`.sn`: ``sn`` (spectral normalization) and ``ssn`` (scaled SN);
- :mod:`.bsn`: ``bsn`` (bidirectional SN) and ``bssn`` (bidirectional scaled SN);
- :mod:`.sr`: ``sr_static`` and ``sr_dynamic`` (spectral regularization, projection or
  parametrization mode);
- :mod:`.svd`: the fast exact SVD both SR modes use; :mod:`.base`: shared helpers.
"""
